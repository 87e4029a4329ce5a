"""Validation images during training (``train.validation_prompts`` every ``train.validate_every`` steps)."""

from __future__ import annotations

from pathlib import Path


def validate(run, step: int) -> Path:
    """Images for ``train.validation_prompts`` (seed i for prompt i), with and without the adapter (an audio
    model: wav clips).

    Written as PNGs to ``output.dir/validation/step-N/`` and logged to TensorBoard. Runs on the main process only;
    the fixed seeds make the images of different steps comparable. ``run``: the :class:`~.setup.Trainer`.
    """
    import numpy as np
    import torch

    accelerator, cfg = run.accelerator, run.cfg
    folder = run.out / "validation" / f"step-{step:08d}"
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(run.unet)
        prompts = list(cfg.train.validation_prompts)
        seeds = list(range(len(prompts)))
        rate = run.backbone.sample_rate  # an audio model: clips of data.audio_seconds, written as wav
        size = dict(duration=cfg.data.audio_seconds) if rate else dict(
            resolution=cfg.sample.resolution or cfg.data.resolution)
        kwargs = dict(steps=cfg.sample.steps, guidance_scale=cfg.sample.guidance_scale, scheduler=cfg.sample.scheduler,
                      safety_checker=bool(cfg.sample.safety_checker), **size)
        unwrapped.eval()
        panels = {}
        with torch.no_grad(), accelerator.autocast():
            panels["tuned"] = run.backbone.sample(prompts, seeds, **kwargs)
            if cfg.model.finetune == "lora":
                unwrapped.disable_adapters()
                panels["base"] = run.backbone.sample(prompts, seeds, **kwargs)
                unwrapped.enable_adapters()
        unwrapped.train()
        folder.mkdir(parents=True, exist_ok=True)
        for name, images in panels.items():
            for i, image in enumerate(images):
                if rate:
                    from diffusion_pref.audio import write_wav

                    write_wav(folder / f"{i:02d}_{name}.wav", image, rate)
                else:
                    image.save(folder / f"{i:02d}_{name}.png")
        if cfg.train.logger == "tensorboard" and rate:
            writer = accelerator.get_tracker("tensorboard", unwrap=True)
            for name, clips in panels.items():
                for i, clip in enumerate(clips):
                    writer.add_audio(f"validation/{name}/{i}", np.asarray(clip), step, sample_rate=rate)
        elif cfg.train.logger == "tensorboard":
            writer = accelerator.get_tracker("tensorboard", unwrap=True)
            for name, images in panels.items():
                writer.add_images(f"validation/{name}", np.stack([np.asarray(im) for im in images]), step,
                                  dataformats="NHWC")
    accelerator.wait_for_everyone()
    return folder
