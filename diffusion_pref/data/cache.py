"""The data cache (``diffusion-pref cache``, :mod:`diffusion_pref.commands.cache`, and ``data.cache=true`` in train): VAE latents and text embeddings, computed once.

For a loss that takes soft labels (smpo, sppo) the command also scores the pairs with ``reward.models`` when the
data has no score columns (:mod:`diffusion_pref.soft_labels`), stored under the same root and reused by training.

The pairs are decoded, augmented (the same deterministic paired augmentation as uncached training) and encoded
once; training then reads latents and embeddings and never runs the VAE or the text encoder. One safetensors
shard per streaming block (a parquet row group's kept rows), so the cached run sees its pairs in exactly the
order, and with exactly the values, of the uncached run.

The cache lives in ``<data.cache_dir or output.dir/cache>/<key>/`` where ``key`` hashes everything that changes
its content: the data files (path, size, mtime), column mapping and row filter, the model (``model.pretrained``,
revision, variant, VAE), the resolution and the augmentation settings and seed. Change any of them and a new
cache is built beside the old one; ``manifest.json`` is written last, so a half-written cache is rebuilt.

Run it::

    diffusion-pref cache --config configs/sd15_dpo_lora.yaml data.source=/data/pickapic_v2 data.cache_dir=/fast/cache
    diffusion-pref train --config configs/sd15_dpo_lora.yaml data.source=/data/pickapic_v2 data.cache_dir=/fast/cache data.cache=true
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from diffusion_pref.fileio import atomic_write

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True)
class CacheSpec:
    """What the cache layer needs, as values: the sections it reads whole and the run's values it keys on.

    ``mixed_precision`` is accelerate's word ("no" | "fp16" | "bf16"; the latents are stored in that dtype and the
    cache key holds it), ``seed`` the augmentation seed, ``root`` the folder the keyed caches live in.
    """

    model: Any  # ModelConfig
    data: Any  # DataConfig
    trajectory: Any  # TrajectoryConfig
    reward: Any  # RewardConfig (the soft-label scores' key)
    seed: int
    mixed_precision: str
    root: Path


def cache_spec(cfg) -> CacheSpec:
    """The command layer's one read of the config for the cache: ``data.cache_dir`` or ``<output.dir>/cache``,
    training's seed and precision (:func:`diffusion_pref.config.resolve_runtime`)."""
    from diffusion_pref.config import resolve_runtime

    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.output.dir) / "cache"
    return CacheSpec(model=cfg.model, data=cfg.data, trajectory=cfg.trajectory, reward=cfg.reward,
                     seed=cfg.runtime.seed, mixed_precision=resolve_runtime(cfg.runtime).mixed_precision, root=root)


def model_identity(model_cfg) -> Dict[str, object]:
    from diffusion_pref.pipelines import resolve_pretrained

    location = resolve_pretrained(model_cfg.pretrained)
    ident: Dict[str, object] = {"pretrained": location, "revision": model_cfg.revision, "variant": model_cfg.variant,
                                "vae": model_cfg.vae, "family": model_cfg.family}
    if Path(location).is_dir():  # a local folder (any family's layout): weights rewritten in place change the key too
        ident["mtimes"] = sorted(int(p.stat().st_mtime) for p in Path(location).rglob("*.safetensors"))
    return ident


def inversion_identity(traj_cfg) -> Dict[str, object]:
    """What the cached inverted latents depend on besides the model and data (exact and grid_below share every
    grid point; smpo_released inverts with other arithmetic, so it keys its own cache)."""
    from diffusion_pref.trajectories import trajectory_options

    options = trajectory_options(traj_cfg)
    if options["t_mode"] != "smpo_released":
        options.pop("t_mode")
    return {"kind": traj_cfg.kind, "with": traj_cfg.invert_with, **options}


def cache_key(spec: CacheSpec, source) -> Dict[str, object]:
    from diffusion_pref.data.augment import augmentation_identity

    key = {"version": CACHE_VERSION, "data": source.identity(), "model": model_identity(spec.model),
           "augmentation": augmentation_identity(spec.data, spec.seed),
           "mixed_precision": spec.mixed_precision}
    if spec.trajectory.cache_inverted:
        key["inversion"] = inversion_identity(spec.trajectory)
    return key


def cache_dir(spec: CacheSpec, key: Dict[str, object]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(spec.root) / digest


def soft_label_scores_dir(spec: CacheSpec, source) -> Path:
    """Where a reward model's raw scores of ``source``'s pairs are kept for soft labels: beside the data cache,
    keyed by the data and the reward model, so every later run on the same data reuses them."""
    from diffusion_pref.reward_models import reward_spec
    from diffusion_pref.soft_labels import ScoreCache

    return cache_dir(spec, ScoreCache.make_key(reward_spec(spec.reward), source.identity()))


class CachedPairs:
    """Reads batches from the cache; items are the same (block, index) pairs as :class:`PairSource` uses."""

    def __init__(self, directory: Path, num_blocks: int):
        self.directory = directory
        self.num_blocks = num_blocks
        self._loaded: Tuple[int, Dict[str, object]] = (-1, {})

    def _shard(self, block: int) -> Dict[str, object]:
        from safetensors.torch import load_file

        if self._loaded[0] != block:
            self._loaded = (block, load_file(str(self.directory / f"shard-{block:06d}.safetensors")))
        return self._loaded[1]

    def read_batch(self, items: Sequence[Tuple[int, int]]) -> Dict[str, object]:
        import torch

        rows: Dict[str, List[object]] = {}
        skipped = 0
        for b, i in items:
            shard = self._shard(b)
            if not bool(shard["valid"][i]):
                skipped += 1
                continue
            for key, value in shard.items():
                if key not in ("valid", "target_size"):
                    rows.setdefault(key, []).append(value[i])
            target_size = int(shard["target_size"])
        batch: Dict[str, object] = {"skipped": skipped, "size": len(rows.get("rows", [])), "captions": None}
        if batch["size"]:
            batch.update({k: torch.stack(v) for k, v in rows.items()})
            batch["target_size"] = target_size
        return batch


def _encode_block(spec: CacheSpec, source, backbone, block_index: int, device, weight_dtype,
                  invert=None) -> Dict[str, object]:
    import torch

    from diffusion_pref.data.loader import collate_pixels, pair_media

    block = source.blocks[block_index]
    items = [(block_index, i) for i in range(len(block.rows))]
    chunk = 16  # pairs encoded at once: bounded memory whatever the row-group size
    parts: Dict[str, List[object]] = {}
    valid: List[bool] = []
    for start in range(0, len(items), chunk):
        sub = items[start:start + chunk]
        batch = collate_pixels(source, spec.data, sub, spec.seed)
        kept = set(batch["rows"].tolist()) if batch["size"] else set()
        valid.extend(block.rows[i] in kept for _, i in sub)
        if not batch["size"]:
            continue
        with torch.no_grad():
            media = pair_media(batch).to(device)  # pixels or waveforms, [w; l]
            latents_w, latents_l = backbone.encode(media).to(weight_dtype).chunk(2)
            text = backbone.encode_prompts(batch["captions"])
        # whether the text encoder cut each caption, for the trainer's count (the captions are not stored)
        cut = torch.tensor(backbone.prompts_cut(batch["captions"]), dtype=torch.bool)
        fields = {"latents_w": latents_w, "latents_l": latents_l, "soft_label": batch["soft_label"],
                  "rows": batch["rows"], "caption_cut": cut, "original_size": batch["original_size"],
                  "crop_top_left": batch["crop_top_left"], **{f"text.{k}": v for k, v in text.items()}}
        if "score_w" in batch:
            fields.update(score_w=batch["score_w"], score_l=batch["score_l"])
        if invert is not None:  # [2B, G, C, H, W] float32: every grid point of the inversion of [w; l]
            fields["inverted_w"], fields["inverted_l"] = invert(latents_w, latents_l, text, batch).chunk(2)
        for key, value in fields.items():
            parts.setdefault(key, []).append(value.detach().cpu())
    n = len(items)
    out: Dict[str, object] = {"valid": torch.tensor(valid, dtype=torch.bool),
                              "target_size": torch.tensor(spec.data.resolution)}
    valid_idx = torch.tensor([k for k, ok in enumerate(valid) if ok], dtype=torch.long)
    for key, chunks in parts.items():
        stacked = torch.cat(chunks)
        # Skipped rows keep their slot (zeros, valid=False) so shard index i is still block row i.
        full = torch.zeros((n,) + tuple(stacked.shape[1:]), dtype=stacked.dtype)
        full[valid_idx] = stacked
        out[key] = full.contiguous()
    return out


def grid_inverter(traj_cfg, backbone, predict_fn, autocast=contextlib.nullcontext):
    """The ``invert`` function of :func:`build_cache`: ``predict_fn`` (the frozen reference model) inverts each
    pair to every point of ``traj_cfg``'s grid, under ``autocast`` (the training precision)."""
    import torch

    from diffusion_pref.pipelines.base import repeat_pair
    from diffusion_pref.trajectories import invert_grid, trajectory_options

    def invert(latents_w, latents_l, text, batch):
        cond = repeat_pair(backbone.conditioning(text, batch))
        with autocast():
            return invert_grid(traj_cfg.kind, backbone.schedule, predict_fn, torch.cat([latents_w, latents_l]),
                               cond, **trajectory_options(traj_cfg))

    return invert


def build_cache(spec: CacheSpec, source, backbone, accelerator=None, invert=None) -> CachedPairs:
    """Compute the missing cache for (spec, source) and return a reader; reuses a complete cache with the same key.

    ``invert(latents_w, latents_l, text, batch) -> [2B, G, C, H, W]`` (required when
    ``trajectory.cache_inverted``): the grid latents stored as ``inverted_w`` / ``inverted_l``.
    """
    if spec.trajectory.cache_inverted != (invert is not None):  # the key says whether the shards hold inversions
        raise ValueError("build_cache: pass the invert function exactly when trajectory.cache_inverted is true")
    from safetensors.torch import save_file

    from diffusion_pref.pipelines import torch_dtype

    key = cache_key(spec, source)
    directory = cache_dir(spec, key)
    manifest = directory / "manifest.json"
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if manifest.is_file() and json.loads(manifest.read_text()).get("key") == json.loads(json.dumps(key, default=str)):
        logger.info("cache: using %s", directory)
        return CachedPairs(directory, len(source.blocks))
    directory.mkdir(parents=True, exist_ok=True)
    weight_dtype = torch_dtype(spec.mixed_precision)
    device = backbone.frozen["vae"].device
    logger.info("cache: encoding %d pairs into %s", len(source), directory)
    skipped = 0
    for b in range(rank, len(source.blocks), world):
        shard = _encode_block(spec, source, backbone, b, device, weight_dtype, invert=invert)
        skipped += int((~shard["valid"]).sum())
        atomic_write(directory / f"shard-{b:06d}.safetensors", lambda tmp: save_file(shard, str(tmp)))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if rank == 0:
        atomic_write(manifest, json.dumps({"key": key, "blocks": len(source.blocks), "pairs": len(source)},
                                          indent=2, default=str))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if skipped:
        logger.info("cache: %d undecodable rows skipped (data.on_bad_row=skip)", skipped)
    return CachedPairs(directory, len(source.blocks))
