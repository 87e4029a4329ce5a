"""Backbone adapters: one thin class per model family over its diffusers pipeline.

``load_backbone(model_cfg)`` reads ``model.pretrained`` ("toy", a hub id, or a local diffusers folder), decides
the family (``model.family``, or ``auto`` from ``model_index.json``) and returns the adapter.

Example::

    from diffusion_pref.pipelines import load_backbone
    backbone = load_backbone(cfg.model)   # StableDiffusionBackbone or SDXLBackbone
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

TOY_WEIGHTS = Path(__file__).resolve().parent.parent / "toy" / "weights"


def torch_dtype(name: str):
    """A precision name -> torch dtype: fp32 (or accelerate's mixed_precision "no"), fp16, bf16."""
    import torch

    return {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def texts_cut(model, texts) -> list:
    """Per text, whether a text encoder of ``model`` sees it cut: more tokens than its tokenizer's
    ``model_max_length`` (the tokenizers of a backbone or diffusers pipeline: ``tokenizer``, and SDXL's
    ``tokenizer_2``). Encoding truncates such a text without a word, so callers count these."""
    flags = [False] * len(texts)
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(model, name, None)
        limit = getattr(tokenizer, "model_max_length", None)
        if not texts or not isinstance(limit, int) or limit > 1_000_000:  # transformers' "no limit" is int(1e30)
            continue
        # verbose=False: no per-call "sequence length is longer than the maximum" warning; the caller counts
        ids = tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        flags = [flag or len(row) > limit for flag, row in zip(flags, ids)]
    return flags


def token_limit(model):
    """The smallest ``model_max_length`` of ``model``'s tokenizers (for messages), or None."""
    limits = [getattr(getattr(model, name, None), "model_max_length", None) for name in ("tokenizer", "tokenizer_2")]
    limits = [limit for limit in limits if isinstance(limit, int) and limit <= 1_000_000]
    return min(limits) if limits else None


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
    """"toy" -> the shipped shapes-world weights; an existing folder -> its path; anything else is a hub id."""
    from diffusion_pref.pipelines.stable_diffusion import ModelLoadError

    if pretrained == "toy":
        if not (TOY_WEIGHTS / "model_index.json").is_file():
            raise ModelLoadError(f"model.pretrained=toy: the shipped toy weights are missing at {TOY_WEIGHTS}; "
                                 "build them with `python -m diffusion_pref.toy.pretrain` or set model.pretrained")
        return str(TOY_WEIGHTS)
    path = Path(pretrained).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"model.pretrained={pretrained}: the folder has no model_index.json; give a diffusers "
                                 "pipeline folder (pipe.save_pretrained(...) writes one)")
        return str(path)
    if pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1:
        raise ModelLoadError(f"model.pretrained={pretrained}: no such folder; give a diffusers pipeline folder, a hub id or 'toy'")
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
        folder = TOY_WEIGHTS if where == "toy" else Path(where).expanduser()
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


def detect_family(model_cfg) -> str:
    if model_cfg.family != "auto":
        return model_cfg.family
    if (Path(model_cfg.pretrained).expanduser() / "stft_config.json").is_file():  # Tango has no model_index.json
        return "tango"
    location = resolve_pretrained(model_cfg.pretrained)
    index = Path(location) / "model_index.json"
    if index.is_file():
        class_name = json.loads(index.read_text()).get("_class_name", "")
    else:
        from diffusers import DiffusionPipeline

        from diffusion_pref.pipelines.stable_diffusion import ModelLoadError

        try:
            class_name = DiffusionPipeline.load_config(location, revision=model_cfg.revision).get("_class_name", "")
        except Exception as err:
            raise ModelLoadError(f"could not read model_index.json of model.pretrained={model_cfg.pretrained!r} "
                                 f"({type(err).__name__}); check the id and your network, or set model.family") from None
    if "XL" in class_name:
        return "sdxl"
    if "Tango" in class_name or "AudioLDM" in class_name:
        return "tango"
    return "sd"


def load_backbone(model_cfg):
    family = detect_family(model_cfg)
    if family == "sd":
        from diffusion_pref.pipelines.stable_diffusion import StableDiffusionBackbone

        return StableDiffusionBackbone.load(model_cfg)
    if family == "sdxl":
        from diffusion_pref.pipelines.sdxl import SDXLBackbone

        return SDXLBackbone.load(model_cfg)
    import importlib

    try:
        module = importlib.import_module(f"diffusion_pref.pipelines.{family}")
    except ImportError:
        raise ValueError(f"model.family={family}: no backbone adapter for it in this version") from None
    return module.load_backbone(model_cfg)
