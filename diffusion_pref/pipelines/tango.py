"""Tango / Tango 2 (declare-lab) as a backbone: text-to-audio latent diffusion over log-mel spectrograms.

Modules (each a subfolder of the model folder, as ``diffusion_pref.testing.save_tiny_tango`` and ``diffusion-pref
convert tango`` write it; there is no ``model_index.json``, ``stft_config.json`` marks the family):

- ``text_encoder/`` FLAN-T5 ``T5EncoderModel`` + ``tokenizer/``; the prompt's attention mask goes to the UNet as
  ``encoder_attention_mask`` (Tango's ``encode_text``: padded tokens are invisible to cross-attention).
- ``unet/`` diffusers ``UNet2DConditionModel`` with cross-attention, 8 latent channels: the ``denoiser``.
- ``vae/`` the AudioLDM ``AutoencoderKL`` on 1-channel log-mels ``[B, 1, T, 64]`` -> latents ``[B, 8, T/4, 16]``.
- ``vocoder/`` HiFi-GAN ``SpeechT5HifiGan`` (mels ``[B, T, 64]`` -> ``T * 160`` samples at 16 kHz).
- ``scheduler/`` the SD2.1 DDPM schedule Tango trains and samples with: scaled-linear betas, ``v_prediction``.
- ``stft_config.json``: the mel front end (Tango's ``TacotronSTFT`` arguments,
  :class:`~diffusion_pref.audio.MelSettings`); an optional ``audio_seconds`` key is the default clip length (else Tango's 10.24 s = 1024 frames).

``encode(media)``: waveforms ``[B, samples]`` already prepared by :func:`diffusion_pref.audio.prepare_waveform`
(16 kHz, mean removed, peak 0.5, ``frames * 160`` samples) -> log-mel -> VAE posterior mode * ``scaling_factor``
(Tango samples the posterior; the mode keeps cached and uncached latents equal, as for the image backbones).
``decode(latents)``: ``/ scaling_factor`` -> VAE decoder -> mel -> vocoder -> waveforms ``[B, samples]``.

Text is padded to a fixed length (``TEXT_TOKENS``, or the tokenizer's limit when smaller) so that cached rows stack;
Tango pads to the longest prompt of the batch, which gives the same UNet output: padded positions are masked.

Sampling (``sample``): Tango's ``AudioDiffusion.inference``: classifier-free guidance with the empty prompt as the
unconditional input when ``guidance_scale > 1`` (Tango's defaults: guidance 3, 100 steps), the model's stochastic
DDPM scheduler (``sample.scheduler`` may name another diffusers scheduler), each sample's initial and step noise from
its own seed's CPU generator. Returns 1-D float32 waveforms at ``sample_rate`` (16 kHz): numpy arrays, or torch
tensors for ``output_type="pt"`` (``"latent"``: the final latents, undecoded).

Example::

    backbone = load_backbone(cfg.model)                      # model.pretrained = a converted Tango folder
    waves = backbone.sample(["a dog barks"], [0], steps=100, guidance_scale=3.0, duration=10.24)
    soundfile.write("dog.wav", waves[0], backbone.sample_rate)
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from diffusion_pref.pipelines.base import (Backbone, DenoiserLora, Samples, scheduler_class, smallest_token_limit,
                                           texts_over_limit, waveform_samples)

TEXT_TOKENS = 128  # prompt tokens seen by the UNet (AudioCaps / Audio-alpaca captions are far shorter)
SUBFOLDERS = ("text_encoder", "tokenizer", "unet", "vae", "vocoder", "scheduler")


def _model_error(message: str):
    from diffusion_pref.pipelines.stable_diffusion import ModelLoadError

    return ModelLoadError(message)


def local_folder(model_cfg, what: str) -> Path:
    """``model.pretrained`` as a local folder: a registered short name, a folder, or a hub id (downloaded);
    ``what`` names the expected layout in the one-line error."""
    from diffusion_pref.pipelines import named_model_folder

    name = model_cfg.pretrained
    folder = named_model_folder(name) or Path(name).expanduser()
    if folder.is_dir():
        return folder
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise _model_error(f"model.pretrained={name}: no such folder; give {what}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=model_cfg.revision))
    except Exception as err:
        raise _model_error(f"could not download model.pretrained={name!r} ({type(err).__name__}); check the id "
                           "and your network, or give a local folder") from None


def tango_folder(model_cfg) -> Path:
    """The local folder of ``model.pretrained`` (a registered short name, a folder, or a hub id already in this
    backbone's layout), checked for every subfolder."""
    name = model_cfg.pretrained
    folder = local_folder(model_cfg, "a Tango folder written by `diffusion-pref convert tango`")
    if (folder / "pytorch_model_main.bin").is_file() and not (folder / "unet").is_dir():
        raise _model_error(f"model.pretrained={name}: this is the declare-lab checkpoint layout; convert it first: "
                           f"diffusion-pref convert tango --src {folder} --dst <folder>")
    missing = [sub for sub in SUBFOLDERS if not (folder / sub).is_dir()]
    missing += [] if (folder / "stft_config.json").is_file() else ["stft_config.json"]
    if missing:
        raise _model_error(f"model.pretrained={name}: not a Tango folder (missing {', '.join(missing)}); write one "
                           "with `diffusion-pref convert tango`")
    return folder


def _vocoder_class(folder: Path):
    """``SpeechT5HifiGan`` (Tango's HiFi-GAN), or a vocoder a plugin registered (``pipelines.register_vocoder``: the
    tones world's weight-free Griffin-Lim) when ``vocoder/config.json`` names it."""
    import importlib
    import json

    from transformers import SpeechT5HifiGan

    from diffusion_pref.pipelines import VOCODERS

    try:
        name = json.loads((Path(folder) / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        name = None
    if name in VOCODERS:
        module, attr = VOCODERS[name].split(":")
        return getattr(importlib.import_module(module), attr)
    return SpeechT5HifiGan


class T5Text:
    """The text side of Tango and TangoFlux: a (FLAN-)T5 encoder run on prompts padded to ``text_tokens`` with its
    attention mask; longer prompts are cut (and counted). Needs ``text_encoder``, ``tokenizer`` and ``text_tokens``.
    Put it before :class:`Backbone` in the bases."""

    def encode_prompts(self, prompts: Sequence[str]) -> Dict[str, object]:
        """-> ``{"encoder_hidden_states": [B, L, D], "encoder_attention_mask": [B, L]}`` (mask 1.0 for tokens, 0.0 for
        padding, in the encoder's dtype so it travels with the float tensors)."""
        import torch

        encoder = self.text_encoder
        tokens = self.tokenizer(list(prompts), max_length=self.text_tokens, padding="max_length", truncation=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(encoder.device), tokens.attention_mask.to(encoder.device)
        with torch.no_grad():
            hidden = encoder(input_ids=ids, attention_mask=mask)[0]
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask.to(hidden.dtype)}

    def _tokenizers(self) -> list:
        return [_Limited(self.tokenizer, self.text_tokens)]

    def prompts_cut(self, prompts: Sequence[str]) -> List[bool]:
        return texts_over_limit(self._tokenizers(), prompts)

    def token_limit(self) -> Optional[int]:
        return smallest_token_limit(self._tokenizers())


class TangoBackbone(DenoiserLora, T5Text, Backbone):
    """Tango / Tango 2: ``denoiser`` is the UNet; see the module docstring."""

    family = "tango"
    LORA_PREFIX = "unet"  # save_lora writes the diffusers SD layout

    def __init__(self, text_encoder, tokenizer, unet, vae, vocoder, scheduler, settings, folder=None,
                 audio_seconds: Optional[float] = None):
        import torch

        from diffusion_pref.audio import TANGO_FRAMES
        from diffusion_pref.schedules import schedule_from_scheduler

        self.text_encoder, self.tokenizer, self.vae, self.vocoder = text_encoder, tokenizer, vae, vocoder
        self.denoiser = unet
        self.scheduler = scheduler
        self.settings = settings
        self.folder = Path(folder) if folder is not None else None
        self.sample_rate = settings.sampling_rate
        self.frozen = {"vae": vae, "text_encoder": text_encoder, "vocoder": vocoder}
        # The mel VAE and the vocoder stay fp32 under fp16/bf16 (the AudioLDM pipelines run the vocoder in fp32).
        self.frozen_dtype = {"vae": torch.float32, "vocoder": torch.float32}
        self.schedule = schedule_from_scheduler(scheduler.config)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.frame_multiple = self.vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        self.frames = settings.frames(audio_seconds) if audio_seconds else TANGO_FRAMES
        limit = getattr(tokenizer, "model_max_length", None)
        self.text_tokens = min(TEXT_TOKENS, limit) if isinstance(limit, int) else TEXT_TOKENS

    @classmethod
    def load(cls, model_cfg, dtype=None):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, T5EncoderModel

        from diffusion_pref.audio import MelSettings

        folder = tango_folder(model_cfg)
        extra = {} if dtype is None else {"torch_dtype": dtype}
        try:
            stft = json.loads((folder / "stft_config.json").read_text())
            modules = dict(
                text_encoder=T5EncoderModel.from_pretrained(folder / "text_encoder", **extra),
                tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
                unet=UNet2DConditionModel.from_pretrained(folder / "unet", **extra),
                vae=AutoencoderKL.from_pretrained(folder / "vae", **extra),
                vocoder=_vocoder_class(folder / "vocoder").from_pretrained(folder / "vocoder", **extra),
                scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"),
            )
        except Exception as err:
            raise _model_error(f"could not load the Tango folder model.pretrained={model_cfg.pretrained!r} "
                               f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        return cls(settings=MelSettings.from_dict(stft), folder=folder, audio_seconds=stft.get("audio_seconds"),
                   **modules)

    # -- audio ---------------------------------------------------------------------------------------------
    def frames_for(self, duration: Optional[float] = None) -> int:
        """Mel frames of a clip of ``duration`` seconds (None: the model's default), checked against the VAE and
        UNet downsampling."""
        frames = self.frames if duration is None else self.settings.frames(duration)
        if frames <= 0 or frames % self.frame_multiple:
            seconds = self.frame_multiple * self.settings.hop_length / self.settings.sampling_rate
            raise ValueError(f"audio length {frames} mel frames ({frames * self.settings.hop_length} samples) is not "
                             f"a positive multiple of {self.frame_multiple} frames ({seconds:g} s), which the VAE and "
                             "UNet downsampling need; pick such a duration")
        return frames

    def audio_front_end(self, seconds: Optional[float] = None):
        """``(MelSettings, frames)`` of clips of ``seconds`` (None: the model's default length)."""
        return self.settings, self.frames_for(seconds)

    def samples_for(self, duration: Optional[float] = None) -> int:
        """Waveform samples of a clip of ``duration`` seconds (frames * hop)."""
        return self.frames_for(duration) * self.settings.hop_length

    # -- encoders ------------------------------------------------------------------------------------------
    def mel(self, waves):
        """Prepared waveforms ``[B, samples]`` -> log-mel ``[B, 1, samples / hop, n_mels]`` (the VAE's input)."""
        from diffusion_pref.audio import log_mel

        frames = waves.shape[-1] // self.settings.hop_length
        return log_mel(waves, self.settings, frames=frames).unsqueeze(1)

    def encode(self, media):
        """Waveforms ``[B, samples]`` (see :func:`diffusion_pref.audio.prepare_waveform`) -> scaled latents
        ``[B, 8, frames / 4, n_mels / 4]`` (posterior mode)."""
        import torch

        vae = self.vae
        mel = self.mel(media.to(vae.device))
        with torch.no_grad():
            latents = vae.encode(mel.to(dtype=vae.dtype)).latent_dist.mode()
        return latents * vae.config.scaling_factor

    def decode_mel(self, latents):
        """Scaled latents -> log-mel ``[B, 1, T, n_mels]``."""
        import torch

        vae = self.vae
        with torch.no_grad():
            return vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample

    def decode(self, latents):
        """Scaled latents -> waveforms ``[B, T * hop]`` (VAE decoder, then the vocoder)."""

        return self.vocode(self.decode_mel(latents).squeeze(1))

    def vocode(self, mel):
        """Log-mel ``[B, T, n_mels]`` -> waveforms ``[B, T * hop]`` with the vocoder (a subclass may use another,
        e.g. Griffin-Lim for a model trained without one)."""
        import torch

        vocoder = self.vocoder
        first = next(vocoder.parameters(), None)
        cast = {} if first is None else {"device": first.device, "dtype": first.dtype}
        with torch.no_grad():
            return vocoder(mel.to(**cast))

    def conditioning(self, text: Dict[str, object], batch: Optional[Dict[str, object]] = None) -> Dict[str, object]:
        return {"encoder_hidden_states": text["encoder_hidden_states"],
                "encoder_attention_mask": text["encoder_attention_mask"]}

    # -- the denoiser --------------------------------------------------------------------------------------
    def predict(self, x_t, t, cond: Dict[str, object], denoiser=None):
        """UNet output (v) for ``x_t`` ``[N, 8, T', M']`` at schedule indices ``t`` ``[N]``, the mask applied."""
        module = self.denoiser if denoiser is None else denoiser
        return module(x_t, self.schedule.model_timestep(t), encoder_hidden_states=cond["encoder_hidden_states"],
                      encoder_attention_mask=cond["encoder_attention_mask"]).sample

    # -- sampling ------------------------------------------------------------------------------------------
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 100, guidance_scale: float = 3.0,
               resolution: Optional[int] = None, scheduler: Optional[str] = None,
               safety_checker: Optional[bool] = False, output_type: str = "np",
               duration: Optional[float] = None) -> Samples:
        """One waveform per (prompt, seed) of ``duration`` seconds (None: the model's default); see the module
        docstring. ``resolution`` does not apply to audio; Tango ships no safety checker."""
        import torch

        if len(prompts) != len(seeds):
            raise ValueError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        if resolution is not None:
            raise ValueError(f"sample.resolution={resolution} does not apply to audio; leave it unset (the clip "
                             "length is the model's audio_seconds or the duration given)")
        if safety_checker:
            raise ValueError("safety_checker=true: Tango ships no safety checker; set sample.safety_checker=false")
        if not prompts:
            return Samples([])
        frames = self.frames_for(duration)
        unet = self.denoiser
        device, dtype = unet.device, unet.dtype
        base = scheduler_class(scheduler) if scheduler else type(self.scheduler)
        sampler = base.from_config(self.scheduler.config)  # a fresh one per call: multistep samplers keep state
        sampler.set_timesteps(steps, device=device)
        guided = guidance_scale > 1.0

        text = self.encode_prompts(prompts)
        hidden, mask = text["encoder_hidden_states"], text["encoder_attention_mask"]
        if guided:
            empty = self.encode_prompts([""] * len(prompts))
            hidden = torch.cat([empty["encoder_hidden_states"], hidden])
            mask = torch.cat([empty["encoder_attention_mask"], mask])
        hidden, mask = hidden.to(device=device, dtype=dtype), mask.to(device=device, dtype=dtype)

        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        shape = (1, unet.config.in_channels, frames // self.vae_factor,
                 self.settings.n_mel_channels // self.vae_factor)
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device=device, dtype=dtype)
        latents = latents * sampler.init_noise_sigma
        step_noise = {"generator": generators} if "generator" in inspect.signature(sampler.step).parameters else {}
        with torch.no_grad():
            for t in sampler.timesteps:
                model_in = torch.cat([latents] * 2) if guided else latents
                model_in = sampler.scale_model_input(model_in, t)
                out = unet(model_in, t, encoder_hidden_states=hidden, encoder_attention_mask=mask).sample
                if guided:
                    uncond, cond = out.chunk(2)
                    out = uncond + guidance_scale * (cond - uncond)
                latents = sampler.step(out, t, latents, **step_noise).prev_sample
            if output_type == "latent":
                return Samples(list(latents))
            waves = self.decode(latents).float().cpu()
        return waveform_samples(waves, output_type)

    # -- outputs -------------------------------------------------------------------------------------------
    def save_lora(self, directory, denoiser) -> None:
        """The UNet adapter in the diffusers LoRA format (``unet.``-prefixed keys in
        ``pytorch_lora_weights.safetensors``, the adapter config in its header): :meth:`load_lora` reads it."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
        StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=layers, safe_serialization=True,
                                                  unet_lora_adapter_metadata=denoiser.peft_config["default"].to_dict())

    def save_full(self, directory, denoiser, state_dict=None) -> None:
        """A Tango folder with the trained UNet; the other subfolders copied from the source folder (their saved
        precision). ``state_dict``: the gathered UNet weights when the live module is sharded."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if state_dict is not None:
            denoiser = type(denoiser).from_config(denoiser.config)
            denoiser.load_state_dict(state_dict)
        if self.folder is None:
            for name in ("text_encoder", "vae", "vocoder"):
                getattr(self, name).save_pretrained(str(directory / name), safe_serialization=True)
            self.tokenizer.save_pretrained(str(directory / "tokenizer"))
            self.scheduler.save_pretrained(str(directory / "scheduler"))
            (directory / "stft_config.json").write_text(json.dumps(self.settings.to_dict(), indent=2) + "\n")
        else:
            for name in ("text_encoder", "tokenizer", "vae", "vocoder", "scheduler"):
                shutil.copytree(self.folder / name, directory / name, dirs_exist_ok=True)
            shutil.copy2(self.folder / "stft_config.json", directory / "stft_config.json")
        denoiser.save_pretrained(str(directory / "unet"), safe_serialization=True)


class _Limited:
    """The tokenizer seen with the length the backbone pads and cuts to (for the cut-prompt count)."""

    def __init__(self, tokenizer, limit: int):
        self._tokenizer, self.model_max_length = tokenizer, limit

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)
