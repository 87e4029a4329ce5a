"""``diffusion-pref invert``: invert an image with DDIM or ReNoise, reconstruct it, and report the PSNR.

The image is resized (shorter side) and centre-cropped to ``data.resolution``, encoded to latents, inverted along
the ``trajectory.steps`` grid (``DDIMInverseScheduler`` spacing) up to its last point, then sampled back with
deterministic DDIM on the same grid, conditioned on ``invert.prompt`` without guidance (CFG = 1, as
in SmPO and ReNoise's reconstructions). The method is ``trajectory.kind``: ``ddim`` or ``renoise`` (with
``trajectory.renoise_iters``, ``trajectory.average_window`` and the noise regularisation settings).

Run it::

    diffusion-pref invert model.pretrained=runwayml/stable-diffusion-v1-5 trajectory.kind=renoise \\
        invert.image=cat.png invert.prompt="a photo of a cat" trajectory.steps=50 \\
        output.dir=outputs/invert

Writes ``reconstruction.png``, ``input.png`` (the resized input) and ``invert_metrics.json`` into
``output.dir`` and prints the PSNR, next to the PSNR of the VAE round trip alone (the ceiling any inversion can
reach through this autoencoder).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from diffusion_pref.fileio import atomic_write


def _load_image(path: str, resolution: int):
    """-> (PIL image resized and centre-cropped, pixels [1, 3, R, R] in [-1, 1])."""
    import numpy as np
    import torch
    from PIL import Image

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"invert.image={path}: no such file; give the path of an image to invert.")
    try:
        image = Image.open(file).convert("RGB")
    except Exception as err:
        raise ValueError(f"invert.image={path}: could not read it as an image "
                         f"({type(err).__name__}: {err})") from None
    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    return image, pixels


def _decode(backbone, latents):
    """Scaled latents -> pixels [N, 3, H, W] in [0, 1]."""
    return ((backbone.decode(latents).float() + 1) / 2).clamp(0, 1)


def psnr(a, b) -> float:
    """PSNR in dB of two image tensors in [0, 1]."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def run(cfg) -> None:
    """``diffusion-pref invert``: see the module docstring."""
    import torch
    from PIL import Image

    from diffusion_pref.config import ConfigError, resolve_runtime
    from diffusion_pref.pipelines import check_resolution, load_backbone
    from diffusion_pref.trajectories import ddim_sample, inversion_grid, invert_latents

    traj = cfg.trajectory
    if traj.kind not in ("ddim", "renoise"):
        raise ConfigError(f"invert needs trajectory.kind=ddim or renoise (got {traj.kind}); forward noising is random "
                          "and cannot be reconstructed.")
    if not cfg.invert.image:
        raise ConfigError("invert needs an image: invert.image=path/to/image.png "
                          "(and its caption: invert.prompt=\"...\")")
    check_resolution(cfg.model, cfg.data.resolution)
    image, pixels = _load_image(cfg.invert.image, cfg.data.resolution)
    backbone = load_backbone(cfg.model)
    check_resolution(cfg.model, cfg.data.resolution, vae=backbone.frozen["vae"])
    # dtype auto: fp32 (inversion is sensitive to precision); fp16 / bf16: the denoiser calls under autocast
    runtime = resolve_runtime(cfg.runtime)
    device = runtime.device
    backbone.to(device)
    schedule = backbone.schedule
    grid = inversion_grid(schedule, traj.steps)

    x0 = backbone.encode(pixels.to(device)).float()  # [1, C, h, w]
    # SDXL's size / crop micro-conditioning: the image as it is fed, uncropped, as SDXL's pipeline generates at R
    # (SD1.x ignores it). Without it the UNet would be told its default size, whatever data.resolution is.
    size = torch.tensor([[cfg.data.resolution, cfg.data.resolution]])
    cond = backbone.conditioning(backbone.encode_prompts([cfg.invert.prompt]),
                                 {"original_size": size, "crop_top_left": torch.zeros_like(size),
                                  "target_size": cfg.data.resolution})

    def predict(x, t, c):
        with torch.no_grad(), torch.autocast(device.type, runtime.dtype, enabled=runtime.mixed_precision != "no"):
            return backbone.predict(x.to(backbone.denoiser.dtype), t.to(device), c).float()

    options = {}
    if traj.kind == "renoise":
        options = dict(renoise_iters=traj.renoise_iters, average_window=list(traj.average_window),
                       noise_reg_steps=traj.noise_reg_steps, noise_reg_lambda_kl=traj.noise_reg_lambda_kl,
                       noise_reg_lambda_ac=traj.noise_reg_lambda_ac, noise_reg_ac_rolls=traj.noise_reg_ac_rolls)
    generator = torch.Generator().manual_seed(cfg.runtime.seed)  # CPU: the regulariser draws its shifts there
    z_top = invert_latents(schedule, predict, x0, cond, grid, generator=generator, **options)
    x0_rec = ddim_sample(schedule, predict, z_top, cond, grid)

    target = (pixels.to(device) + 1) / 2
    reconstruction = _decode(backbone, x0_rec)
    vae_only = _decode(backbone, x0)
    metrics = {
        "method": traj.kind, "steps": len(grid), "grid": grid,
        "renoise_iters": traj.renoise_iters if traj.kind == "renoise" else 0,
        "psnr": psnr(reconstruction, target),
        "psnr_vae_round_trip": psnr(vae_only, target),
        "latent_rmse": float(((x0_rec - x0) ** 2).mean().sqrt()),
    }
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    array = (reconstruction[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    Image.fromarray(array).save(out / "reconstruction.png")
    image.save(out / "input.png")
    atomic_write(out / "invert_metrics.json", json.dumps(metrics, indent=2))
    print(f"{traj.kind} inversion, {len(grid)} steps: PSNR {metrics['psnr']:.2f} dB "
          f"(VAE round trip alone: {metrics['psnr_vae_round_trip']:.2f} dB); latent RMSE {metrics['latent_rmse']:.4f}")
    print(f"wrote {out / 'reconstruction.png'}")
