"""The backbone protocol: everything training, sampling and the commands may use of a diffusion model.

One subclass of :class:`Backbone` per model family (``stable_diffusion.py``, ``sdxl.py``, ...). Code outside
``diffusion_pref/pipelines/`` uses only the members below, never a backbone's diffusers pipeline or its modules by
attribute: the trainer trains ``denoiser`` and freezes ``frozen``; generate, evaluate and training validation all
sample through :meth:`Backbone.sample`.

Members:

- ``family``: "sd" | "sdxl" | "sd3" ...
- ``denoiser``: the trainable network (UNet or transformer); the trainer, its reference copy and the savers use it.
- ``frozen``: the other networks by name (``{"vae": ..., "text_encoder": ...}``); frozen during training.
- ``frozen_dtype``: the frozen modules that must keep a precision during training (SDXL's VAE: fp32); the others
  get the run's dtype.
- ``schedule``: the training noise arithmetic (``diffusion_pref.schedules``).
- ``default_lora_targets``: the denoiser modules a LoRA adapts unless ``model.lora_targets`` says otherwise.
- ``sample_rate``: Hz of an audio backbone's output; None for images. ``audio_front_end(seconds)``: its mel
  settings and clip length in frames (how training audio is prepared); None for images.

Example::

    from diffusion_pref.pipelines import load_backbone
    backbone = load_backbone(cfg.model)
    latents = backbone.encode(pixels)                       # [B, 3, H, W] in [-1, 1] -> [B, C, H/f, W/f]
    text = backbone.encode_prompts(["a red cat"])           # {"encoder_hidden_states": [1, L, D], ...}
    cond = repeat_pair(backbone.conditioning(text, batch))  # [w; l] share the prompt
    pred = backbone.predict(x_t, t, cond)                   # t: schedule indices
    images = backbone.sample(["a red cat"], [0], steps=25, guidance_scale=7.5)
"""

from __future__ import annotations

import abc
from typing import Any, Dict, List, Optional, Sequence


class Samples(list):
    """The media :meth:`Backbone.sample` returns, one per (prompt, seed), plus ``blocked``: per item, whether the
    safety checker replaced it (a black image)."""

    def __init__(self, items, blocked: Optional[Sequence[bool]] = None):
        super().__init__(items)
        self.blocked: List[bool] = [bool(b) for b in blocked] if blocked is not None else [False] * len(self)


class Backbone(abc.ABC):
    """A diffusion model as training and sampling see it; see the module docstring for the attributes."""

    family: str = ""
    denoiser: Any
    frozen: Dict[str, Any]
    frozen_dtype: Dict[str, Any] = {}
    default_lora_targets: List[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    sample_rate: Optional[int] = None

    @classmethod
    @abc.abstractmethod
    def load(cls, model_cfg, dtype=None) -> "Backbone":
        """Load ``model.pretrained`` (with ``model.revision``, ``variant``, ``vae``); ``dtype``: load every module in
        that precision (sampling); None keeps the checkpoint's fp32 (training casts per ``frozen_dtype``)."""

    # -- encoders ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, media):
        """Pixels ``[B, 3, H, W]`` in [-1, 1] (any device) -> scaled latents (posterior mode), on the VAE's device."""

    @abc.abstractmethod
    def decode(self, latents):
        """Scaled latents -> pixels ``[B, 3, H, W]`` in about [-1, 1]: the inverse of :meth:`encode`."""

    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Dict[str, Any]:
        """Per-prompt tensors (first dimension = len(prompts)): the rows the data cache stores."""

    @abc.abstractmethod
    def prompts_cut(self, prompts: Sequence[str]) -> List[bool]:
        """Per prompt, whether a text encoder sees it cut at its tokenizer's limit (encoding truncates silently)."""

    @abc.abstractmethod
    def token_limit(self) -> Optional[int]:
        """The smallest token limit of the text encoders (for messages), or None."""

    @abc.abstractmethod
    def conditioning(self, text: Dict[str, Any], batch: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The denoiser's keyword inputs for a batch, from :meth:`encode_prompts` rows (and the batch's metadata)."""

    # -- the denoiser --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def predict(self, x_t, t, cond: Dict[str, Any], denoiser=None):
        """The denoiser's output at ``x_t`` ``[N, C, H, W]`` and schedule indices ``t`` ``[N]``; ``denoiser``
        replaces :attr:`denoiser` (a reference copy, a wrapped module)."""

    # -- sampling ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance_scale: float,
               resolution: Optional[int] = None, scheduler: Optional[str] = None,
               safety_checker: Optional[bool] = False, output_type: str = "pil") -> Samples:
        """One sample per (prompt, seed), each from its own seed's noise (a CPU generator), so results don't depend
        on which other samples share the batch. ``scheduler``: a diffusers scheduler class name (built from the
        model's scheduler config); None keeps the model's. ``safety_checker``: run the model's safety checker
        (True: an error when the model has none; None: run it when the model ships one)."""

    @abc.abstractmethod
    def load_lora(self, folder) -> None:
        """Sample with a LoRA that a training run saved (:meth:`save_lora`) on top of the denoiser."""

    @abc.abstractmethod
    def unload_lora(self) -> None:
        """Remove what :meth:`load_lora` added."""

    def audio_front_end(self, seconds: Optional[float] = None):
        """For an audio backbone, ``(MelSettings, frames)``: how training data is turned into the waveforms
        :meth:`encode` takes, for clips of ``seconds`` (None: the model's default length); None for images."""
        return None

    def to(self, device=None, dtype=None) -> "Backbone":
        """Move the denoiser and every frozen module to ``device``; ``dtype`` casts them all (sampling: the pipeline
        itself upcasts what must run in fp32). Returns self."""
        for module in (self.denoiser, *self.frozen.values()):
            # dtype only when it changes something: diffusers warns about any cast after loading
            cast = {} if dtype is None or getattr(module, "dtype", None) == dtype else {"dtype": dtype}
            module.to(device=device, **cast)
        return self

    # -- outputs -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def save_lora(self, directory, denoiser) -> None:
        """The adapter of ``denoiser`` in the diffusers LoRA format (``pipe.load_lora_weights(directory)``)."""

    @abc.abstractmethod
    def save_full(self, directory, denoiser, state_dict=None) -> None:
        """A full pipeline folder with ``denoiser`` (``state_dict``: its gathered weights when sharded)."""


class DenoiserLora:
    """:meth:`Backbone.load_lora` / :meth:`Backbone.unload_lora` for a backbone whose own sampling loop calls the
    denoiser (no diffusers pipeline): the folder :meth:`Backbone.save_lora` wrote (diffusers' LoRA format, keys
    prefixed ``LORA_PREFIX``, ``lora_alpha`` in the file's metadata) goes into the denoiser as adapter "sampling".
    Put it before :class:`Backbone` in the bases."""

    LORA_PREFIX: str = ""
    _lora_loaded: bool = False

    def load_lora(self, folder) -> None:
        self.denoiser.load_lora_adapter(str(folder), prefix=self.LORA_PREFIX, adapter_name="sampling",
                                        weight_name="pytorch_lora_weights.safetensors")
        self._lora_loaded = True

    def unload_lora(self) -> None:
        if self._lora_loaded:
            self.denoiser.delete_adapters("sampling")
            self._lora_loaded = False


def waveform_samples(waves, output_type: str) -> Samples:
    """Decoded waveforms ``[n, samples]`` (float, on the host) as :meth:`Backbone.sample` returns them: tensors for
    ``output_type="pt"``, numpy arrays otherwise."""
    if output_type == "pt":
        return Samples(list(waves))
    return Samples([w.numpy() for w in waves])


def repeat_pair(cond: Dict[str, Any]) -> Dict[str, Any]:
    """Repeat every per-pair tensor for the ``[w; l]`` layout (both sides of a pair share the prompt)."""
    import torch

    return {k: torch.cat([v, v]) if hasattr(v, "shape") else v for k, v in cond.items()}


_NO_LIMIT = 1_000_000  # transformers' "no limit" is int(1e30)


def texts_over_limit(tokenizers: Sequence[Any], texts: Sequence[str]) -> List[bool]:
    """Per text, whether one of ``tokenizers`` gives it more tokens than its ``model_max_length``: the text encoder
    behind it sees the text cut (for :meth:`Backbone.prompts_cut`)."""
    flags = [False] * len(texts)
    for tokenizer in tokenizers:
        limit = getattr(tokenizer, "model_max_length", None)
        if not texts or not isinstance(limit, int) or limit > _NO_LIMIT:
            continue
        # verbose=False: no per-call "sequence length is longer than the maximum" warning; the caller counts
        ids = tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        flags = [flag or len(row) > limit for flag, row in zip(flags, ids)]
    return flags


def smallest_token_limit(tokenizers: Sequence[Any]) -> Optional[int]:
    """The smallest ``model_max_length`` of ``tokenizers`` (for :meth:`Backbone.token_limit`), or None."""
    limits = [getattr(tokenizer, "model_max_length", None) for tokenizer in tokenizers]
    limits = [limit for limit in limits if isinstance(limit, int) and limit <= _NO_LIMIT]
    return min(limits) if limits else None


def scheduler_class(name: str, key: str = "sample.scheduler"):
    """The diffusers scheduler class called ``name``; a ConfigError naming ``key`` when there is none."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        from diffusion_pref.config import ConfigError

        raise ConfigError(f"{key}={name!r} is not a diffusers scheduler class; use e.g. DDIMScheduler, "
                          "EulerDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler")
    return cls
