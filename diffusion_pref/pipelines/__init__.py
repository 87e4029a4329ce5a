"""Backbones: one class per model family over its diffusers pipeline, each implementing the protocol of
:mod:`diffusion_pref.pipelines.base` (``Backbone``).

``load_backbone(model_cfg)`` reads ``model.pretrained`` (a short name from :data:`NAMED_MODELS` such as "toy", a
hub id, or a local diffusers folder), decides the family (``model.family``, or ``auto`` from ``model_index.json``)
and returns the backbone.

Example::

    from diffusion_pref.pipelines import load_backbone
    backbone = load_backbone(cfg.model)   # StableDiffusionBackbone, SDXLBackbone or SD3Backbone
    images = backbone.sample(["a red cat"], [0], steps=25, guidance_scale=7.5)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, NamedTuple, Optional


class NamedModel(NamedTuple):
    folder: Path  # a diffusers pipeline folder (with model_index.json)
    how_to_build: str  # said when the folder is missing, e.g. "build them with `python -m ...`"


# Short names for model.pretrained that stand for a local folder; plugins fill it through register_named_model
# (the shapes world registers "toy"; see diffusion_pref.plugins).
NAMED_MODELS: Dict[str, NamedModel] = {}


# Vocoder classes a Tango-layout folder may name in vocoder/config.json ("_class_name" -> "module:Class") besides
# Tango's HiFi-GAN; plugins fill it through register_vocoder (the tones world's weight-free Griffin-Lim).
VOCODERS: Dict[str, str] = {}


def register_vocoder(class_name: str, target: str) -> None:
    """Make a Tango folder whose ``vocoder/config.json`` says ``_class_name: <class_name>`` load ``target``."""
    VOCODERS[class_name] = target


def register_named_model(name: str, folder: Path, how_to_build: str) -> None:
    """Make ``model.pretrained=<name>`` load the pipeline folder ``folder``."""
    NAMED_MODELS[name] = NamedModel(Path(folder), how_to_build)


def named_model_folder(name: str) -> Optional[Path]:
    """The folder a registered short name stands for, or None for any other ``model.pretrained``."""
    named = NAMED_MODELS.get(name)
    return named.folder if named else None


def _named_choices() -> str:
    """" or 'toy'" (the registered short names, for messages), or "" when there are none."""
    return f" or {', '.join(repr(name) for name in sorted(NAMED_MODELS))}" if NAMED_MODELS else ""


def torch_dtype(name: str):
    """A precision name -> torch dtype: fp32 (or accelerate's mixed_precision "no"), fp16, bf16."""
    import torch

    return {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def summarize_mismatch(text: str) -> Optional[str]:
    """PyTorch's load_state_dict error (one line per tensor: 128 lines for an SD LoRA on another base model) -> one
    line with the counts and one example; None when ``text`` is not such an error."""
    shapes = re.findall(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                        r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", text)
    missing = re.search(r"Missing key\(s\) in state_dict: ([^\n]*)", text)
    unexpected = re.search(r"Unexpected key\(s\) in state_dict: ([^\n]*)", text)
    parts = []
    if shapes:
        name, old, new = shapes[0]
        parts.append(f"{len(shapes)} tensors differ in shape (e.g. {name}: {old} saved, {new} in this model)")
    for label, match in (("missing", missing), ("unexpected", unexpected)):
        if match:
            names = re.findall(r'"([^"]+)"', match.group(1))
            if names:
                parts.append(f"{len(names)} {label} (e.g. {names[0]})")
    return "; ".join(parts) or None


def resolve_pretrained(pretrained: str) -> str:
    """A registered short name ("toy") -> its folder; an existing folder -> its path; anything else is a hub id."""
    from diffusion_pref.pipelines.stable_diffusion import ModelLoadError

    if pretrained in NAMED_MODELS:
        folder, how_to_build = NAMED_MODELS[pretrained]
        if not ((folder / "model_index.json").is_file() or (folder / "stft_config.json").is_file()):
            raise ModelLoadError(f"model.pretrained={pretrained}: the shipped {pretrained} weights are missing at "
                                 f"{folder}; {how_to_build} or set model.pretrained")
        return str(folder)
    path = Path(pretrained).expanduser()
    if path.exists():
        if not any((path / f).is_file() for f in ("model_index.json", "stft_config.json", "tangoflux.safetensors")):
            raise ModelLoadError(f"model.pretrained={pretrained}: the folder has no model_index.json; give a diffusers "
                                 "pipeline folder (pipe.save_pretrained(...) writes one)")
        return str(path)
    if pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1:
        raise ModelLoadError(f"model.pretrained={pretrained}: no such folder; give a diffusers pipeline folder, a "
                             f"hub id{_named_choices()}")
    return pretrained


def vae_scale_factor(model_cfg, vae=None):
    """Pixels per latent along a side, ``2 ** (len(block_out_channels) - 1)`` as diffusers pipelines compute it.

    From ``vae`` once it is loaded; before that from the VAE's config.json alone (``model.vae``, else
    ``<model.pretrained>/vae``), read from a local folder or the hub cache, never the network. None when that
    file is not on this machine yet (a hub id not downloaded): the check after loading covers that case.
    """
    if vae is not None:
        blocks = vae.config.block_out_channels
    else:
        where, name = (model_cfg.vae, "config.json") if model_cfg.vae else (model_cfg.pretrained, "vae/config.json")
        folder = named_model_folder(where) or Path(where).expanduser()
        file = folder / name
        if not folder.is_dir():
            from huggingface_hub import try_to_load_from_cache

            try:
                found = try_to_load_from_cache(where, name, revision=None if model_cfg.vae else model_cfg.revision)
            except ValueError:  # not a valid hub id either: loading the model will say so
                return None
            if not isinstance(found, str):
                return None
            file = Path(found)
        try:
            blocks = json.loads(file.read_text()).get("block_out_channels")
        except (OSError, ValueError):
            return None
    return 2 ** (len(blocks) - 1) if blocks else None


def check_resolution(model_cfg, resolution: int, vae=None, key: str = "data.resolution") -> None:
    """Refuse a resolution the VAE cannot encode exactly: latents of a size that is not a multiple of its factor
    decode to another size (invert's reconstruction no longer matches the image; training would learn from
    latents of a padded image)."""
    factor = vae_scale_factor(model_cfg, vae)
    if factor and resolution % factor:
        from diffusion_pref.config import ConfigError

        below = resolution - resolution % factor
        near = f"{below} or {below + factor}" if below else str(factor)
        model = f"model.vae={model_cfg.vae}" if model_cfg.vae else f"model.pretrained={model_cfg.pretrained}"
        raise ConfigError(f"{key}={resolution} is not a multiple of {factor}, the downsampling factor of the VAE of "
                          f"{model}; use a multiple of {factor}, e.g. {near}")


class Family(NamedTuple):
    backbone: str  # "module:Class" of its Backbone subclass, imported when the family is first used
    pipelines: tuple  # prefixes of the diffusers pipeline class names (model_index.json "_class_name") it loads


# model.family -> its backbone. A new model family is one file in pipelines/ and one line here; detection walks the
# table in order, so a more specific pipeline name (StableDiffusionXL..., StableDiffusion3...) comes before "sd".
FAMILIES: Dict[str, Family] = {
    "sdxl": Family("diffusion_pref.pipelines.sdxl:SDXLBackbone", ("StableDiffusionXL",)),
    "sd3": Family("diffusion_pref.pipelines.sd3:SD3Backbone", ("StableDiffusion3",)),
    "sd": Family("diffusion_pref.pipelines.stable_diffusion:StableDiffusionBackbone", ("StableDiffusion",)),
    "tango": Family("diffusion_pref.pipelines.tango:TangoBackbone", ("Tango", "AudioLDM")),
    "tangoflux": Family("diffusion_pref.pipelines.tangoflux:TangoFluxBackbone", ()),  # detected by its weights file
}


def _class_name(model_cfg) -> str:
    """The pipeline class ``model_index.json`` of ``model.pretrained`` names (local folder or hub cache)."""
    location = resolve_pretrained(model_cfg.pretrained)
    index = Path(location) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("_class_name", "")
    from diffusers import DiffusionPipeline

    from diffusion_pref.pipelines.stable_diffusion import ModelLoadError

    try:
        return DiffusionPipeline.load_config(location, revision=model_cfg.revision).get("_class_name", "")
    except Exception as err:
        raise ModelLoadError(f"could not read model_index.json of model.pretrained={model_cfg.pretrained!r} "
                             f"({type(err).__name__}); check the id and your network, or set model.family") from None


def detect_family(model_cfg) -> str:
    """``model.family``, or for ``auto`` the family whose pipeline class ``model_index.json`` names."""
    if model_cfg.family != "auto":
        return model_cfg.family
    folder = named_model_folder(model_cfg.pretrained) or Path(model_cfg.pretrained).expanduser()
    if (folder / "stft_config.json").is_file():  # Tango has no model_index.json (a folder, or a name like "tones")
        return "tango"
    from diffusion_pref.pipelines.tangoflux import is_tangoflux

    if is_tangoflux(model_cfg.pretrained):  # the declare-lab hub layout: tangoflux.safetensors, no model_index.json
        return "tangoflux"
    class_name = _class_name(model_cfg)
    if "Tango" in class_name or "AudioLDM" in class_name:
        return "tango"
    for family, entry in FAMILIES.items():
        if class_name.startswith(entry.pipelines):
            return family
    return "sd"  # any other pipeline class is tried as SD1.x/2.x, as before


def load_backbone(model_cfg, dtype=None):
    """The backbone of ``model_cfg``; ``dtype`` loads every module in that precision (sampling), None in the
    checkpoint's (training casts per module itself)."""
    import importlib

    family = detect_family(model_cfg)
    if family not in FAMILIES:
        raise ValueError(f"model.family={family}: no backbone for it in this version (there are: "
                         f"{', '.join(FAMILIES)})")
    module_name, class_name = FAMILIES[family].backbone.split(":")
    return getattr(importlib.import_module(module_name), class_name).load(model_cfg, dtype=dtype)


from diffusion_pref.plugins import load_plugins  # noqa: E402  (after the registry it fills)

load_plugins()
