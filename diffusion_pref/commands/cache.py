"""``diffusion-pref cache``: VAE latents and text embeddings of a pair dataset (and, for soft-label losses, the
reward scores; with ``trajectory.cache_inverted``, the reference's inversion of every pair), computed once into
the cache that ``train`` with ``data.cache=true`` reads (:mod:`diffusion_pref.data.cache`).

Run it::

    diffusion-pref cache --config configs/sd15_dpo_lora.yaml data.source=/data/pickapic_v2 data.cache_dir=/fast/cache
"""

from __future__ import annotations

import logging


def run(cfg) -> None:
    """``diffusion-pref cache``: build the cache for this config (same key as ``train`` with ``data.cache=true``)."""
    from diffusion_pref.config import resolve_runtime
    from diffusion_pref.data.cache import build_cache, cache_spec, grid_inverter, soft_label_scores_dir
    from diffusion_pref.data.pairs import PairSource, scores_used
    from diffusion_pref.losses import TAKES_SOFT_LABEL
    from diffusion_pref.pipelines import check_resolution, load_backbone
    from diffusion_pref.soft_labels import needs_front_end, soft_labels_for_run
    from diffusion_pref.training.setup import fresh_accelerator

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_resolution(cfg.model, cfg.data.resolution)
    runtime = resolve_runtime(cfg.runtime)  # as training resolves it, so train finds this cache
    spec = cache_spec(cfg)
    accelerator = fresh_accelerator(cfg.runtime)
    source = PairSource(cfg.data, seed=spec.seed, check_scores=scores_used(cfg.loss, cfg.data.soft_labels))

    def score_pairs():
        # Scored here, before the diffusion model takes memory, so that a distributed training run finds them
        # stored instead of waiting on its main process (a long wait hits the process group's timeout).
        with accelerator.main_process_first():
            labels = soft_labels_for_run(source, cfg.output.dir, cfg.loss, cfg.reward, device=accelerator.device,
                                         score_cache_dir=soft_label_scores_dir(spec, source))
        if accelerator.is_main_process:
            print(f"soft labels ready: {len(labels)} pairs, p from {labels.scores}")

    soft = cfg.loss.name in TAKES_SOFT_LABEL and cfg.data.soft_labels != "label"
    late = soft and needs_front_end(source, cfg.loss)  # audio scored by a reward model: with the model's front end
    if soft and not late:
        score_pairs()
    backbone = load_backbone(cfg.model)
    audio = backbone.audio_front_end(cfg.data.audio_seconds)  # (mel settings, frames) of an audio model
    if audio is not None:
        source.use_audio(*audio)
    else:
        check_resolution(cfg.model, cfg.data.resolution, vae=backbone.frozen["vae"])
    if late:  # still before the model moves to the device
        score_pairs()
    for name, module in backbone.frozen.items():
        module.to(accelerator.device, backbone.frozen_dtype.get(name, runtime.dtype))
    invert = None
    if cfg.trajectory.cache_inverted:  # the pretrained denoiser is the reference model the trainer would invert with
        backbone.denoiser.to(accelerator.device, runtime.dtype).eval()
        invert = grid_inverter(cfg.trajectory, backbone, lambda x, t, c: backbone.predict(x, t, c), accelerator.autocast)
    cached = build_cache(spec, source, backbone, accelerator, invert=invert)
    if accelerator.is_main_process:
        print(f"cache ready: {cached.directory} ({len(source)} pairs; {source.summary()})")
