"""TangoFlux (declare-lab, arXiv 2412.21037) as a backbone: rectified-flow text-to-audio at 44.1 kHz.

Read straight from the hub layout of ``declare-lab/TangoFlux`` (no conversion step): ``config.json`` (the keys of
TangoFlux's ``TangoFlux.__init__``: ``num_layers`` 6, ``num_single_layers`` 18, ``in_channels`` 64,
``attention_head_dim`` 128, ``num_attention_heads`` 8, ``joint_attention_dim`` 1024, ``audio_seq_len`` 645,
``max_duration`` 30, ``text_encoder_name`` "google/flan-t5-large"), ``tangoflux.safetensors`` (one state dict with
the prefixes ``text_encoder.``, ``fc.``, ``duration_emebdder.`` (sic) and ``transformer.``; T5's tied
``encoder.embed_tokens`` is absent, as the hub file has it) and ``vae.safetensors`` (Stable Audio Open's
``AutoencoderOobleck`` with its default config). The T5 config and tokenizer come from ``text_encoder_name``: a
subfolder of the model folder when one has that name (the tiny test model), else a hub id or path as TangoFlux
loads it. An optional ``vae_config.json``, absent on the hub, sizes a small VAE (default: diffusers' Oobleck
defaults, which are Stable Audio Open's, as TangoFlux's ``AutoencoderOobleck()``). Detected by
``tangoflux.safetensors``; a hub id not yet downloaded needs ``model.family=tangoflux``.

The modules (TangoFlux's ``tangoflux/model.py``, written anew here):

- ``text_encoder`` FLAN-T5 ``T5EncoderModel`` (frozen). Prompts are tokenized to at most ``TEXT_TOKENS`` = 64 tokens
  (TangoFlux's ``max_text_seq_len``). The attention mask is NOT given to the transformer: TangoFlux pads a batch to
  its longest prompt and the transformer attends to the padding. Rows are stored padded to 64 (so cached rows
  stack) and :meth:`conditioning` cuts a batch back to its longest prompt, which reproduces TangoFlux's batches.
- ``conditioner`` (frozen; TangoFlux trains ``fc`` with the transformer in full fine-tuning, here it stays frozen):
  ``fc`` = Linear(d_model, joint_attention_dim) + ReLU on the mean of the prompt's unpadded T5 states ->
  ``pooled_projections``; ``duration_emebdder`` = clamp(seconds, 0, max_duration) / max_duration -> ``[t,
  sin(2 pi w t), cos(2 pi w t)]`` (w: 128 learned frequencies) -> Linear(257, d_model), appended to the T5 states as
  one more token.
- ``denoiser``: diffusers ``FluxTransformer2DModel`` (MMDiT + single DiT blocks, ``guidance_embeds=False``) on latent
  sequences ``[B, T, C]``; text ids are zeros, audio ids ``arange(T)`` on all three rope axes; it is told ``sigma``
  (its forward multiplies by 1000).
- ``vae``: ``AutoencoderOobleck`` on stereo waveforms; latents ``[B, 64, T]`` (2048 samples per frame) transposed to
  ``[B, T, 64]``, unscaled. :meth:`encode` takes mono ``[B, samples]`` and repeats it to both channels (TangoFlux's
  "fake stereo" for mono files) and keeps the posterior mode (TangoFlux samples it); :meth:`decode` returns the mean
  of the two channels (the rest of this toolkit, CLAP included, is mono; laion_clap also loads files as mono).
- schedule: ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)`` (shift 1, built in code as TangoFlux does):
  ``x_t = (1 - sigma) x0 + sigma eps``, target ``eps - x0``, logit-normal(0, 1) training timesteps, as TangoFlux's
  ``compute_density_for_timestep_sampling("logit_normal")``.

Clip length and duration: TangoFlux always works on ``audio_seq_len`` latent frames (645 = 29.95 s): training audio
is read up to 30 s and zero-padded, generation makes 645 frames and cuts the waveform to ``duration``; the duration
(default 10 s, TangoFlux's CLI and CRPO default) is a condition. Here :meth:`audio_front_end` ``(seconds)`` gives
that window with :class:`~diffusion_pref.audio.WaveSettings` (44.1 kHz, the first ``seconds`` kept, no
normalisation) and records ``seconds`` as the duration training conditions on (``data.audio_seconds``; default 10).

DPO: TangoFlux's CRPO loss (``TangoFlux.forward(sft=False)``) is ``-logsigmoid(-0.5 * beta_dpo * ((mse_w - mse_l) -
(ref_w - ref_l))) + mse_w`` with ``beta_dpo = 2000``, per-sample velocity MSEs at a timestep and noise shared by the
pair: this library's ``rpo`` with ``beta`` 1000 (the halved convention) and ``alpha`` 1.

Sampling (:meth:`sample`): TangoFlux's ``inference_flow``: Euler on ``sigmas = linspace(1, 1/steps, steps)``,
classifier-free guidance with the empty prompt (padded to the prompt's length) when ``guidance_scale > 1``
(TangoFlux's defaults: 50 steps in the CLI, 25 in ``TangoFluxInference.generate``, guidance 4.5, 10 s); each
sample's noise ``randn(1, T, C)`` from its own seed's CPU generator (the draw ``inference_flow`` makes after
``torch.manual_seed(seed)``). Prompts are run in groups of equal token length, so that, as in TangoFlux's
single-prompt inference, no prompt sees padding and results do not depend on the batch. Returns mono float32
waveforms at 44.1 kHz of ``duration`` seconds.

Differences from TangoFlux's code, all deliberate: mono in and out (the data checks refuse multi-channel files:
mix them down; TangoFlux keeps stereo files stereo); one duration for every pair (``data.audio_seconds``; TangoFlux
reads a ``duration`` column per row); latents are the posterior mode, not a sample; ``fc`` is not trained;
sampling cuts prompts at 64 tokens as training does (TangoFlux's inference at the tokenizer's 512); training audio
below 44.1 kHz is refused by the data checks (TangoFlux upsamples it).

Example::

    backbone = load_backbone(cfg.model)     # model.pretrained = declare-lab/TangoFlux or a local copy of it
    waves = backbone.sample(["a dog barks"], [0], steps=50, guidance_scale=4.5, duration=10)
    soundfile.write("dog.wav", waves[0], backbone.sample_rate)
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

from diffusion_pref.pipelines.base import (
    Backbone,
    DenoiserLora,
    Samples,
    scheduler_class,
    waveform_samples,
)
from diffusion_pref.pipelines.tango import T5Text, _model_error, local_folder  # the same T5 text side and error type

TEXT_TOKENS = 64  # TangoFlux's max_text_seq_len
DEFAULT_SECONDS = 10.0  # TangoFlux's CLI / generate / CRPO duration
WEIGHTS, VAE_WEIGHTS, CONFIG = "tangoflux.safetensors", "vae.safetensors", "config.json"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def is_tangoflux(pretrained: str) -> bool:
    """Whether ``model.pretrained`` (a folder, registered name, or a hub id already in the local cache) holds
    ``tangoflux.safetensors``; never touches the network."""
    from diffusion_pref.pipelines import named_model_folder

    folder = named_model_folder(pretrained) or Path(pretrained).expanduser()
    if folder.is_dir():
        return (folder / WEIGHTS).is_file()
    if pretrained.count("/") != 1 or pretrained.startswith((".", "/", "~")):
        return False
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(pretrained, WEIGHTS), str)
    except ValueError:
        return False


def tangoflux_folder(model_cfg) -> Path:
    """The local folder of ``model.pretrained`` (downloaded from the hub when it is an id), with its three files."""
    name = model_cfg.pretrained
    folder = local_folder(model_cfg, "a TangoFlux folder (the declare-lab/TangoFlux hub layout) or its hub id")
    missing = [f for f in (CONFIG, WEIGHTS, VAE_WEIGHTS) if not (folder / f).is_file()]
    if missing:
        raise _model_error(f"model.pretrained={name}: not a TangoFlux folder (missing {', '.join(missing)}); give "
                           "the declare-lab/TangoFlux hub layout")
    return folder


def _conditioner_class():
    import torch
    from torch import nn

    class Fourier(nn.Module):
        """``t -> [t, sin(2 pi w t), cos(2 pi w t)]`` with learned frequencies ``weights`` (Stable Audio's)."""

        def __init__(self, dim: int):
            super().__init__()
            self.weights = nn.Parameter(torch.zeros(dim // 2))

        def forward(self, t):
            angle = t[..., None] * self.weights * (2 * math.pi)
            return torch.cat([t[..., None], angle.sin(), angle.cos()], dim=-1)

    class Duration(nn.Module):
        def __init__(self, width: int, max_value: float, internal: int = 256):
            super().__init__()
            self.max_value = float(max_value)
            self.time_positional_embedding = nn.Sequential(Fourier(internal), nn.Linear(internal + 1, width))

        def forward(self, seconds):
            linear = self.time_positional_embedding[1]
            t = seconds.clamp(0.0, self.max_value) / self.max_value
            return self.time_positional_embedding(t.to(linear.weight.dtype))[:, None]  # [B, 1, width]

    class TangoFluxConditioner(nn.Module):
        """TangoFlux's ``fc`` (pooled text -> ``pooled_projections``) and ``duration_emebdder`` (the duration token),
        under the parameter names of ``tangoflux.safetensors``."""

        def __init__(self, text_width: int, joint_width: int, max_duration: float):
            super().__init__()
            self.fc = nn.Sequential(nn.Linear(text_width, joint_width), nn.ReLU())
            self.duration_emebdder = Duration(text_width, max_duration)

    return TangoFluxConditioner


def _split(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_strict(module, state: dict, what: str, allowed_missing=()) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in allowed_missing]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise _model_error(f"{what}: {len(missing)} missing and {len(unexpected)} unexpected tensors (e.g. "
                           f"{example!r}); the checkpoint does not match config.json")


class TangoFluxBackbone(DenoiserLora, T5Text, Backbone):
    """TangoFlux: ``denoiser`` is the ``FluxTransformer2DModel``; see the module docstring."""

    family = "tangoflux"
    LORA_PREFIX = "transformer"  # save_lora writes diffusers' Flux layout
    default_lora_targets = LORA_TARGETS

    def __init__(self, config, text_encoder, tokenizer, conditioner, transformer, vae, scheduler, folder=None):
        import torch

        from diffusion_pref.schedules import schedule_from_scheduler

        self.config, self.folder = dict(config), (Path(folder) if folder is not None else None)
        self.text_encoder, self.tokenizer, self.conditioner, self.vae = text_encoder, tokenizer, conditioner, vae
        self.denoiser = transformer
        self.scheduler = scheduler
        self.frozen = {"vae": vae, "text_encoder": text_encoder, "conditioner": conditioner}
        # The Oobleck VAE and the small conditioner stay fp32 under fp16/bf16 training.
        self.frozen_dtype = {"vae": torch.float32, "conditioner": torch.float32}
        self.schedule = schedule_from_scheduler(scheduler)
        self.sample_rate = int(vae.config.sampling_rate)
        self.hop = int(math.prod(vae.config.downsampling_ratios))
        self.frames = int(self.config.get("audio_seq_len", 645))
        self.max_duration = float(self.config.get("max_duration", 30))
        self.duration = min(DEFAULT_SECONDS, self.max_duration)  # what training conditions on (audio_front_end)
        limit = getattr(tokenizer, "model_max_length", None)
        self.text_tokens = min(TEXT_TOKENS, limit) if isinstance(limit, int) else TEXT_TOKENS

    @classmethod
    def load(cls, model_cfg, dtype=None):
        from diffusers import (
            AutoencoderOobleck,
            FlowMatchEulerDiscreteScheduler,
            FluxTransformer2DModel,
        )
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoTokenizer, T5EncoderModel

        folder = tangoflux_folder(model_cfg)
        try:
            config = json.loads((folder / CONFIG).read_text())
            name = config.get("text_encoder_name", "google/flan-t5-large")
            where = str(folder / name) if (folder / name).is_dir() else name
            t5_config = AutoConfig.from_pretrained(where)
            tokenizer = AutoTokenizer.from_pretrained(where)
            vae_file = folder / "vae_config.json"
            vae = (AutoencoderOobleck.from_config(json.loads(vae_file.read_text())) if vae_file.is_file()
                   else AutoencoderOobleck())
            state = load_file(str(folder / WEIGHTS))
            vae_state = load_file(str(folder / VAE_WEIGHTS))
        except Exception as err:
            raise _model_error(f"could not load the TangoFlux folder model.pretrained={model_cfg.pretrained!r} "
                               f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        text_encoder = T5EncoderModel(t5_config)
        _load_strict(text_encoder, _split(state, "text_encoder."), f"{WEIGHTS} text_encoder",
                     allowed_missing=("encoder.embed_tokens.weight",))
        text_encoder.set_input_embeddings(text_encoder.shared)  # encoder.embed_tokens is shared, as T5 builds it
        width = t5_config.d_model
        transformer = FluxTransformer2DModel(
            in_channels=config.get("in_channels", 64), num_layers=config.get("num_layers", 6),
            num_single_layers=config.get("num_single_layers", 18),
            attention_head_dim=config.get("attention_head_dim", 128),
            num_attention_heads=config.get("num_attention_heads", 8),
            joint_attention_dim=config.get("joint_attention_dim", 1024), pooled_projection_dim=width,
            guidance_embeds=False)
        _load_strict(transformer, _split(state, "transformer."), f"{WEIGHTS} transformer")
        conditioner = _conditioner_class()(width, config.get("joint_attention_dim", 1024),
                                           config.get("max_duration", 30))
        _load_strict(conditioner, {k: v for k, v in state.items() if k.startswith(("fc.", "duration_emebdder."))},
                     f"{WEIGHTS} fc / duration_emebdder")
        _load_strict(vae, vae_state, VAE_WEIGHTS)
        for module in (text_encoder, transformer, conditioner, vae):
            module.eval()
            if dtype is not None:
                module.to(dtype)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
        return cls(config, text_encoder, tokenizer, conditioner, transformer, vae, scheduler, folder=folder)

    # -- audio ---------------------------------------------------------------------------------------------
    def _check_duration(self, seconds: float, key: str) -> float:
        seconds = float(seconds)
        if not 0 < seconds <= self.max_duration:
            raise ValueError(f"{key}={seconds:g}: TangoFlux takes durations in (0, {self.max_duration:g}] seconds "
                             "(config.json max_duration)")
        return seconds

    def audio_front_end(self, seconds: Optional[float] = None):
        """``(WaveSettings, audio_seq_len)``: clips cut to ``seconds`` (None: 10 s) and zero-padded to the model's
        window; ``seconds`` also becomes the duration training conditions on."""
        from diffusion_pref.audio import WaveSettings

        self.duration = (self._check_duration(seconds, "data.audio_seconds") if seconds is not None
                         else min(DEFAULT_SECONDS, self.max_duration))
        return WaveSettings(self.sample_rate, self.hop, self.duration), self.frames

    # -- encoders ------------------------------------------------------------------------------------------
    def encode(self, media):
        """Mono waveforms ``[B, samples]`` (or ``[B, channels, samples]``) -> latents ``[B, samples / hop, C]``."""
        import torch

        vae = self.vae
        x = media.to(device=vae.device, dtype=vae.dtype)
        if x.ndim == 2:
            x = x[:, None].expand(-1, vae.config.audio_channels, -1)
        with torch.no_grad():
            return vae.encode(x).latent_dist.mode().transpose(1, 2)

    def decode(self, latents):
        """Latents ``[B, T, C]`` -> mono waveforms ``[B, T * hop]`` (the mean of the VAE's channels)."""
        import torch

        vae = self.vae
        with torch.no_grad():
            return vae.decode(latents.to(device=vae.device, dtype=vae.dtype).transpose(1, 2)).sample.mean(1)

    def conditioning(self, text: Dict[str, object], batch: Optional[Dict[str, object]] = None,
                     duration: Optional[float] = None) -> Dict[str, object]:
        """The transformer's inputs: T5 states cut to the batch's longest prompt (TangoFlux pads a batch to it) plus
        the duration token (``duration``; None: :attr:`duration`), and ``fc`` of each prompt's mean unpadded state."""
        hidden, mask = text["encoder_hidden_states"], text["encoder_attention_mask"]
        length = max(int(mask.sum(1).max()), 1)
        return self._inputs(hidden[:, :length], mask[:, :length], self.duration if duration is None else duration)

    def _inputs(self, hidden, mask, seconds: float) -> Dict[str, object]:
        """``encoder_hidden_states`` = ``[hidden; duration token]`` (every position of ``hidden`` kept, padding
        included) and ``pooled_projections`` = ``fc(mean of hidden over mask)``."""
        import torch

        module = self.conditioner
        first = next(module.parameters())
        seconds = torch.full((hidden.shape[0],), float(seconds), device=first.device, dtype=torch.float32)
        with torch.no_grad():
            h, m = hidden.to(device=first.device, dtype=first.dtype), mask.to(device=first.device, dtype=first.dtype)
            pooled = module.fc((h * m[..., None]).sum(1) / m.sum(1, keepdim=True))
            token = module.duration_emebdder(seconds).to(first.dtype)
            states = torch.cat([h, token], dim=1)
        return {"encoder_hidden_states": states.to(device=hidden.device, dtype=hidden.dtype),
                "pooled_projections": pooled.to(device=hidden.device, dtype=hidden.dtype)}

    # -- the denoiser --------------------------------------------------------------------------------------
    def predict(self, x_t, t, cond: Dict[str, object], denoiser=None):
        """Velocity for latents ``x_t`` ``[N, T, C]`` at schedule indices ``t`` ``[N]``."""
        module = self.denoiser if denoiser is None else denoiser
        sigma = self.schedule.model_timestep(t).to(x_t.device) / self.schedule.num_train_timesteps
        return self._forward(module, x_t, sigma, cond)

    @staticmethod
    def _forward(module, x, sigma, cond):
        import torch

        states = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(states.shape[1], 3, device=x.device)
        img_ids = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)[:, None].expand(-1, 3)
        return module(hidden_states=x, timestep=sigma, encoder_hidden_states=states,
                      pooled_projections=cond["pooled_projections"], txt_ids=txt_ids, img_ids=img_ids,
                      guidance=None, return_dict=False)[0]

    # -- sampling ------------------------------------------------------------------------------------------
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 50, guidance_scale: float = 4.5,
               resolution: Optional[int] = None, scheduler: Optional[str] = None,
               safety_checker: Optional[bool] = False, output_type: str = "np",
               duration: Optional[float] = None) -> Samples:
        """One mono 44.1 kHz waveform per (prompt, seed) of ``duration`` seconds (None: 10 s); see the module
        docstring. ``output_type``: "np", "pt" or "latent" (the final latents ``[T, C]``)."""
        import inspect

        import numpy as np
        import torch

        if len(prompts) != len(seeds):
            raise ValueError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        if resolution is not None:
            raise ValueError(f"sample.resolution={resolution} does not apply to audio; leave it unset")
        if safety_checker:
            raise ValueError("safety_checker=true: TangoFlux ships no safety checker; set sample.safety_checker=false")
        seconds = self._check_duration(duration if duration is not None else min(DEFAULT_SECONDS, self.max_duration),
                                       "duration")
        base = scheduler_class(scheduler) if scheduler else type(self.scheduler)
        if not base.__name__.startswith("FlowMatch"):
            raise ValueError(f"sample.scheduler={scheduler}: TangoFlux is a flow-matching model; use a FlowMatch* "
                             "scheduler (e.g. FlowMatchEulerDiscreteScheduler) or leave it unset")
        if not prompts:
            return Samples([])
        module = self.denoiser
        device, dtype = module.device, module.dtype
        guided = guidance_scale > 1.0
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), max_length=self.text_tokens, truncation=True)
                   ["input_ids"]]
        channels = module.config.in_channels
        results: Dict[int, object] = {}
        for length in sorted(set(lengths)):
            group = [i for i, n in enumerate(lengths) if n == length]
            text = self.encode_prompts([prompts[i] for i in group])  # every prompt here has `length` tokens
            cond = self._inputs(text["encoder_hidden_states"][:, :length], text["encoder_attention_mask"][:, :length],
                                seconds)
            if guided:  # the empty prompt padded to `length`, its padding visible (TangoFlux's unconditional input)
                empty = self.encode_prompts([""] * len(group))
                uncond = self._inputs(empty["encoder_hidden_states"][:, :length],
                                      empty["encoder_attention_mask"][:, :length], seconds)
                cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
            cond = {k: v.to(device=device, dtype=dtype) for k, v in cond.items()}
            sampler = base.from_config(self.scheduler.config)
            if "sigmas" in inspect.signature(sampler.set_timesteps).parameters:
                sampler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), device=device)
            else:
                sampler.set_timesteps(steps, device=device)
            generators = [torch.Generator("cpu").manual_seed(int(seeds[i])) for i in group]
            latents = torch.cat([torch.randn((1, self.frames, channels), generator=g) for g in generators])
            latents = latents.to(device=device, dtype=dtype)
            with torch.no_grad():
                for t in sampler.timesteps:
                    model_in = torch.cat([latents] * 2) if guided else latents
                    sigma = (t / 1000).expand(model_in.shape[0]).to(device)
                    out = self._forward(module, model_in, sigma, cond)
                    if guided:
                        uncond_out, cond_out = out.chunk(2)
                        out = uncond_out + guidance_scale * (cond_out - uncond_out)
                    latents = sampler.step(out, t, latents).prev_sample
            for i, latent in zip(group, latents):
                results[i] = latent
        ordered = torch.stack([results[i] for i in range(len(prompts))])
        if output_type == "latent":
            return Samples(list(ordered))
        waves = self.decode(ordered).float().cpu()[:, :int(seconds * self.sample_rate)]
        return waveform_samples(waves, output_type)

    # -- outputs -------------------------------------------------------------------------------------------
    def save_lora(self, directory, denoiser) -> None:
        """The transformer adapter in diffusers' Flux LoRA format (``transformer.``-prefixed keys in
        ``pytorch_lora_weights.safetensors``, the adapter config in its header): ``FluxTransformer2DModel
        .load_lora_adapter(directory, prefix="transformer")`` and :meth:`load_lora` read it. TangoFlux itself has no
        LoRA format."""
        from diffusers import FluxPipeline
        from peft.utils import get_peft_model_state_dict

        FluxPipeline.save_lora_weights(str(directory), transformer_lora_layers=get_peft_model_state_dict(denoiser),
                                       safe_serialization=True,
                                       transformer_lora_adapter_metadata=denoiser.peft_config["default"].to_dict())

    def save_full(self, directory, denoiser, state_dict=None) -> None:
        """A folder in the hub layout (loadable by TangoFlux's own ``TangoFluxInference`` and by this backbone) with
        the trained transformer; the other files copied from the source folder."""
        from safetensors.torch import load_file, save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        transformer = state_dict if state_dict is not None else denoiser.state_dict()
        if self.folder is not None:  # the frozen parts at their saved precision (training casts them)
            state = {k: v for k, v in load_file(str(self.folder / WEIGHTS)).items() if not k.startswith("transformer.")}
        else:
            state = {f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()
                     if k != "encoder.embed_tokens.weight"}  # tied to shared.weight; the hub file omits it too
            state.update(self.conditioner.state_dict())
        state.update({f"transformer.{k}": v for k, v in transformer.items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / WEIGHTS))
        if self.folder is not None:
            for item in self.folder.iterdir():
                if item.name == WEIGHTS or item.name.startswith("."):
                    continue
                if item.is_dir():
                    shutil.copytree(item, directory / item.name, dirs_exist_ok=True)
                else:
                    shutil.copy2(item, directory / item.name)
        else:
            (directory / CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")
            save_file({k: v.contiguous().cpu() for k, v in self.vae.state_dict().items()}, str(directory / VAE_WEIGHTS))
