"""``diffusion-pref convert tango --src DIR --dst DIR``: a Tango / Tango 2 checkpoint in the declare-lab hub layout ->
the folder :class:`~diffusion_pref.pipelines.tango.TangoBackbone` loads.

The hub layout (``declare-lab/tango``, ``tango-full``, ``tango-full-ft-audiocaps``, ``tango2``, ``tango2-full``):

- ``main_config.json``: ``text_encoder_name`` (FLAN-T5 hub id), ``scheduler_name`` (SD 2.1, whose scheduler config
  Tango loads), ``unet_model_config_path`` (``configs/diffusion_model_config.json`` of the GitHub repository: not on
  the hub; give it with ``--unet-config`` unless ``--src`` holds it at that path).
- ``pytorch_model_main.bin``: ``unet.*`` (diffusers ``UNet2DConditionModel`` names) and ``text_encoder.*``
  (transformers ``T5EncoderModel`` names).
- ``vae_config.json`` (AudioLDM's ``AutoencoderKL`` arguments: ``ddconfig``, ``embed_dim``, ``scale_factor``) and
  ``pytorch_model_vae.bin``: the VAE in the original latent-diffusion names plus ``vocoder.*`` (HiFi-GAN; AudioLDM
  removes its weight norm after building it; ``weight_g``/``weight_v`` pairs, if present, are folded). The VAE goes
  through diffusers' ``convert_ldm_vae_checkpoint``; the vocoder keys are renamed as diffusers'
  AudioLDM conversion script does (``ups.i`` -> ``upsampler.i``; ``mean``/``scale`` unused: normalize_before=False).
  The vocoder's configuration is AudioLDM's fixed 16 kHz / 64-mel HiFi-GAN; its widths and kernel sizes are read from
  the weights (so smaller test checkpoints convert too), the upsampling rates must multiply to the STFT hop.
- ``stft_config.json``: copied. ``pytorch_model_stft.bin`` (the STFT's buffers) is not needed: when present, its mel
  filter bank is compared with the one :mod:`diffusion_pref.audio` computes, and a difference is reported.

Every ``.bin`` is read with ``torch.load(..., weights_only=True)``: tensors only, no pickled code runs.

Run it::

    huggingface-cli download declare-lab/tango2 --local-dir tango2-hub
    git clone https://github.com/declare-lab/tango
    diffusion-pref convert tango --src tango2-hub --dst models/tango2 \
        --unet-config tango/configs/diffusion_model_config.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Dict, Optional

logger = logging.getLogger(__name__)

# AudioLDM's HiFi-GAN for 16 kHz, 64 mels (audioldm HIFIGAN_16K_64): the parts the weights cannot tell
HIFIGAN_16K_64 = {"upsample_rates": [5, 4, 2, 2, 2], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]]}
# The SD 2.1 scheduler config Tango loads (stabilityai/stable-diffusion-2-1, subfolder scheduler)
SD21_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "steps_offset": 1,
                  "clip_sample": False}


class ConvertError(ValueError):
    """The source folder cannot be converted; the message names the file and what to do."""


def _load(path: Path) -> Dict[str, object]:
    import torch

    if not path.is_file():
        raise ConvertError(f"{path}: missing; --src must be a download of a declare-lab Tango repository")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConvertError(f"{path}: could not be read as a tensor-only checkpoint ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})") from None


def _json(path: Path) -> dict:
    if not path.is_file():
        raise ConvertError(f"{path}: missing; --src must be a download of a declare-lab Tango repository")
    return json.loads(path.read_text())


def _prefixed(state: Dict[str, object], prefix: str) -> Dict[str, object]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_strict(module, state, what: str, file: Path) -> None:
    from diffusion_pref.pipelines import summarize_mismatch

    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConvertError(f"{file}: the {what} weights do not fit the configuration "
                           f"({summarize_mismatch(str(err)) or str(err).splitlines()[0]})") from None


def convert_vae(vae_config: dict, state: Dict[str, object], file: Path):
    """AudioLDM's VAE (original names) -> diffusers ``AutoencoderKL``."""
    from diffusers import AutoencoderKL
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_vae_checkpoint

    dd = vae_config.get("ddconfig")
    if not dd:
        raise ConvertError(f"{file.parent / 'vae_config.json'}: no ddconfig")
    if vae_config.get("embed_dim", dd["z_channels"]) != dd["z_channels"]:
        raise ConvertError("vae_config.json: embed_dim differs from ddconfig.z_channels; diffusers' AutoencoderKL "
                           "has one latent width")
    if "scale_factor" not in vae_config:
        raise ConvertError(f"{file.parent / 'vae_config.json'}: no scale_factor (Tango's latent scaling); add it")
    blocks = len(dd["ch_mult"])
    vae = AutoencoderKL(
        in_channels=dd["in_channels"], out_channels=dd["out_ch"],
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]), layers_per_block=dd["num_res_blocks"],
        latent_channels=dd["z_channels"], sample_size=dd.get("resolution", 256),
        # latent-diffusion's Normalize is GroupNorm(32); a key of ours lets tiny test checkpoints say otherwise
        norm_num_groups=vae_config.get("norm_num_groups", 32),
        scaling_factor=float(vae_config["scale_factor"]),
    )
    vae_state = {k: v for k, v in state.items() if not k.startswith("vocoder.")}
    converted = convert_ldm_vae_checkpoint(vae_state, vae.config)
    _load_strict(vae, converted, "VAE", file)
    return vae.eval()


def convert_vocoder(state: Dict[str, object], hop_length: int, sampling_rate: int, file: Path):
    """AudioLDM's HiFi-GAN (``vocoder.*``, weight norm removed) -> transformers ``SpeechT5HifiGan``."""
    import torch
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    weights = _prefixed(state, "vocoder.")
    for key in [k for k in weights if k.endswith(".weight_v")]:  # weight norm not removed: fold it (dim 0)
        base = key[:-len("_v")]
        v, g = weights.pop(key), weights.pop(base + "_g")
        weights[base] = g * v / v.norm(dim=tuple(range(1, v.dim())), keepdim=True)
    if "conv_pre.weight" not in weights:
        raise ConvertError(f"{file}: no vocoder.* weights (Tango's VAE file holds the HiFi-GAN vocoder)")
    channels, n_mels, _ = weights["conv_pre.weight"].shape
    ups = sorted({int(k.split(".")[1]) for k in weights if k.startswith("ups.")})
    kernels = [int(weights[f"ups.{i}.weight"].shape[-1]) for i in ups]
    rates = HIFIGAN_16K_64["upsample_rates"]
    if len(rates) != len(ups) or int(torch.tensor(rates).prod()) != hop_length:
        raise ConvertError(f"{file}: a vocoder with {len(ups)} upsampling layers; AudioLDM's 16 kHz HiFi-GAN has "
                           f"rates {rates} (x{int(torch.tensor(rates).prod())} = the hop {hop_length})")
    resblocks = sorted({int(k.split(".")[1]) for k in weights if k.startswith("resblocks.")})
    per_stage = len(resblocks) // len(ups)
    res_kernels = [int(weights[f"resblocks.{j}.convs1.0.weight"].shape[-1]) for j in range(per_stage)]
    dilations = []
    for j in range(per_stage):
        count = len({k.split(".")[3] for k in weights if k.startswith(f"resblocks.{j}.convs1.")})
        dilations.append(HIFIGAN_16K_64["resblock_dilation_sizes"][0][:count])
    config = SpeechT5HifiGanConfig(model_in_dim=int(n_mels), sampling_rate=sampling_rate,
                                   upsample_initial_channel=int(channels), upsample_rates=rates,
                                   upsample_kernel_sizes=kernels, resblock_kernel_sizes=res_kernels,
                                   resblock_dilation_sizes=dilations, normalize_before=False)
    vocoder = SpeechT5HifiGan(config)
    for i in ups:
        weights[f"upsampler.{i}.weight"] = weights.pop(f"ups.{i}.weight")
        weights[f"upsampler.{i}.bias"] = weights.pop(f"ups.{i}.bias")
    weights["mean"] = torch.zeros(int(n_mels))  # unused with normalize_before=False
    weights["scale"] = torch.ones(int(n_mels))
    _load_strict(vocoder, weights, "vocoder", file)
    return vocoder.eval()


def _scheduler(name: str):
    from diffusers import DDPMScheduler

    if name == "stabilityai/stable-diffusion-2-1":
        return DDPMScheduler(**SD21_SCHEDULER)
    try:
        return DDPMScheduler.from_pretrained(name, subfolder="scheduler")
    except Exception as err:
        raise ConvertError(f"main_config.json scheduler_name={name!r}: could not load its scheduler "
                           f"({type(err).__name__})") from None


def _check_stft_buffers(src: Path, settings) -> None:
    path = src / "pytorch_model_stft.bin"
    if not path.is_file():
        return
    from diffusion_pref.audio import mel_basis

    buffers = _load(path)
    theirs = buffers.get("mel_basis")
    if theirs is None:
        return
    ours = mel_basis(settings)
    same_shape = tuple(theirs.shape) == tuple(ours.shape)
    gap = float((theirs.float() - ours).abs().max()) if same_shape else float("inf")
    if gap > 1e-5 * float(ours.abs().max()):  # float32 storage of the same filter bank: ~1e-7 relative
        logger.warning("%s: its mel filter bank differs from diffusion_pref.audio's (max difference %s); audio "
                       "encoded for training will not match Tango's exactly", path, gap if same_shape else "shape")


def convert_tango(src, dst, unet_config: Optional[str] = None, text_encoder: Optional[str] = None) -> Path:
    """Convert the declare-lab folder ``src`` into ``dst`` (see the module docstring); returns ``dst``."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoConfig, AutoTokenizer, T5EncoderModel

    from diffusion_pref.audio import MelSettings
    from diffusion_pref.fileio import atomic_write

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_dir():
        raise ConvertError(f"--src {src}: no such folder")
    main_config = _json(src / "main_config.json")
    vae_config = _json(src / "vae_config.json")
    stft = _json(src / "stft_config.json")
    settings = MelSettings.from_dict(stft)

    unet_path = Path(unet_config).expanduser() if unet_config else src / (main_config.get("unet_model_config_path")
                                                                           or "configs/diffusion_model_config.json")
    if not unet_path.is_file():
        raise ConvertError(f"the UNet config {unet_path} is missing: it is not on the hub; give --unet-config "
                           "<declare-lab/tango checkout>/configs/diffusion_model_config.json")
    main_file, vae_file = src / "pytorch_model_main.bin", src / "pytorch_model_vae.bin"
    main = _load(main_file)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(unet_path)))
    _load_strict(unet, _prefixed(main, "unet."), "UNet", main_file)

    name = text_encoder or main_config.get("text_encoder_name")
    if not name:
        raise ConvertError(f"{src / 'main_config.json'}: no text_encoder_name; give --text-encoder")
    try:
        t5_config = AutoConfig.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as err:
        raise ConvertError(f"text encoder {name!r}: could not load its config and tokenizer ({type(err).__name__}); "
                           "check the id and your network, or give --text-encoder <local folder>") from None
    encoder = T5EncoderModel(t5_config)
    text_state = _prefixed(main, "text_encoder.")
    # T5EncoderModel ties encoder.embed_tokens to shared: a checkpoint may hold either or both
    if "encoder.embed_tokens.weight" not in text_state and "shared.weight" in text_state:
        text_state["encoder.embed_tokens.weight"] = text_state["shared.weight"]
    _load_strict(encoder, text_state, "text encoder", main_file)
    other = sorted({k.split(".")[0] for k in main if not k.startswith(("unet.", "text_encoder."))})
    if other:
        raise ConvertError(f"{main_file}: unexpected weights {', '.join(other)} (a UNet initialised from Stable "
                           "Diffusion with group_in/group_out is not supported)")

    vae_state = _load(vae_file)
    vae = convert_vae(vae_config, vae_state, vae_file)
    vocoder = convert_vocoder(vae_state, settings.hop_length, settings.sampling_rate, vae_file)
    _check_stft_buffers(src, settings)

    dst.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(dst / "unet"), safe_serialization=True)
    encoder.save_pretrained(str(dst / "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(str(dst / "tokenizer"))
    vae.save_pretrained(str(dst / "vae"), safe_serialization=True)
    vocoder.save_pretrained(str(dst / "vocoder"), safe_serialization=True)
    _scheduler(main_config.get("scheduler_name", "stabilityai/stable-diffusion-2-1")).save_pretrained(
        str(dst / "scheduler"))
    atomic_write(dst / "stft_config.json", json.dumps(stft, indent=2) + "\n")
    return dst


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="diffusion-pref convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    tango = sub.add_parser("tango", help="declare-lab Tango / Tango 2 hub layout -> a Tango folder")
    tango.add_argument("--src", required=True, help="a download of declare-lab/tango2 (or tango, tango-full, ...)")
    tango.add_argument("--dst", required=True, help="the folder to write (model.pretrained for train/generate)")
    tango.add_argument("--unet-config", help="configs/diffusion_model_config.json of the declare-lab/tango repository")
    tango.add_argument("--text-encoder", help="instead of main_config.json's text_encoder_name (config + tokenizer)")
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = convert_tango(args.src, args.dst, unet_config=args.unet_config, text_encoder=args.text_encoder)
    print(f"converted {args.src} -> {out}; train or sample with model.pretrained={out}")
    return 0
