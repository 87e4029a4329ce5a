"""Tests for `diffusion-pref invert` on a saved tiny SD pipeline."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_pref.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
# The toy model's DDIM reconstruction of a 32 px scene (red circle on blue, seeds 0-2, measured on one CPU):
# 22.8-23.0 dB at 5 steps, 25.2-27.1 dB at 50, where the VAE round trip alone gives 25.5-27.4 dB. The bounds
# leave several dB for other float kernels; a broken sampler gives NaN or < 10 dB.
MIN_TOY_PSNR = {5: 19.0, 50: 23.0}


@pytest.fixture
def image_file(tmp_path):
    import numpy as np
    from PIL import Image

    # a smooth gradient, larger than the target size and not square, so resize and crop both run
    y, x = np.mgrid[0:40, 0:48]
    rgb = np.stack([x * 5, y * 6, (x + y) * 2], -1).clip(0, 255).astype("uint8")
    path = tmp_path / "input.png"
    Image.fromarray(rgb).save(path)
    return path


def test_invert_cli_writes_the_reconstruction_and_prints_psnr(tiny_sd_dir, image_file, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "diffusion_pref.cli", "invert", f"model.pretrained={tiny_sd_dir}",
         "trajectory.kind=renoise", f"invert.image={image_file}", "invert.prompt=a red cat",
         "trajectory.steps=5", "data.resolution=32", f"output.dir={out}"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "PSNR" in result.stdout and "dB" in result.stdout
    from PIL import Image

    reconstruction = Image.open(out / "reconstruction.png")
    assert reconstruction.size == (32, 32)
    metrics = json.loads((out / "invert_metrics.json").read_text())
    assert metrics["method"] == "renoise" and metrics["steps"] == 5 and metrics["renoise_iters"] == 1
    assert f"{metrics['psnr']:.2f} dB" in result.stdout
    # PSNR is computed against the resized input and cannot beat the VAE round trip by much
    assert 0 < metrics["psnr"] <= metrics["psnr_vae_round_trip"] + 1.0


def test_invert_run_ddim_and_config_errors(tiny_sd_dir, image_file, tmp_path, capsys):
    from diffusion_pref.commands.invert import psnr, run

    cfg = load_config(None, [f"model.pretrained={tiny_sd_dir}", "trajectory.kind=ddim",
                             f"invert.image={image_file}", "trajectory.steps=4", "data.resolution=32",
                             f"output.dir={tmp_path / 'ddim'}"])
    run(cfg)
    metrics = json.loads((tmp_path / "ddim" / "invert_metrics.json").read_text())
    assert metrics["grid"] == [1, 251, 501, 751] and metrics["renoise_iters"] == 0
    assert "PSNR" in capsys.readouterr().out

    import torch

    a = torch.zeros(1, 3, 4, 4)
    assert psnr(a, a + 0.1) == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    with pytest.raises(ConfigError, match="ddim or renoise"):
        run(load_config(None, ["trajectory.kind=forward", f"invert.image={image_file}"]))
    with pytest.raises(ConfigError, match="invert.image"):
        run(load_config(None, ["trajectory.kind=ddim"]))
    with pytest.raises(FileNotFoundError, match="no such file"):
        run(load_config(None, ["trajectory.kind=ddim", f"invert.image={tmp_path / 'nope.png'}"]))


def test_invert_on_sdxl_conditions_on_the_inverted_size(tiny_sdxl_dir, image_file, tmp_path, monkeypatch):
    from diffusion_pref.commands.invert import run
    from diffusion_pref.pipelines.sdxl import SDXLBackbone

    seen = []
    predict = SDXLBackbone.predict

    def spy(self, x_t, t, cond, denoiser=None):
        seen.append(cond["time_ids"].tolist())
        return predict(self, x_t, t, cond, denoiser=denoiser)

    monkeypatch.setattr(SDXLBackbone, "predict", spy)
    # 48 px: not the tiny SDXL UNet's default (8x8 latents = 32 px)
    cfg = load_config(None, [f"model.pretrained={tiny_sdxl_dir}", "trajectory.kind=ddim",
                             f"invert.image={image_file}", "trajectory.steps=3", "data.resolution=48",
                             f"output.dir={tmp_path / 'out'}"])
    run(cfg)
    assert seen and all(ids == [[48, 48, 0, 0, 48, 48]] for ids in seen)
    metrics = json.loads((tmp_path / "out" / "invert_metrics.json").read_text())
    assert metrics["psnr"] > 0


def test_a_resolution_the_vae_cannot_encode_is_one_line_before_loading(tiny_sd_dir, image_file, tmp_path, capsys):
    """The tiny VAE halves the size twice (factor 4): 34 px would reconstruct at 36 and fail on the size mismatch."""
    from diffusion_pref.cli import main

    code = main(["invert", f"model.pretrained={tiny_sd_dir}", "trajectory.kind=ddim", "trajectory.steps=2",
                 f"invert.image={image_file}", "data.resolution=34", f"output.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "data.resolution=34 is not a multiple of 4" in err[0] and "e.g. 32 or 36" in err[0]
    assert not (tmp_path / "out" / "reconstruction.png").exists()


def test_invert_on_the_toy_model_with_zero_terminal_snr_gives_a_finite_sane_psnr(tmp_path):
    """The shipped toy model: v-prediction on a zero-terminal-SNR schedule whose grid ends at t = 999 (abar = 0),
    where sampling used to divide by sqrt(abar) and print PSNR nan."""
    from diffusion_pref.commands.invert import run
    from diffusion_pref.toy.render import caption, place, render

    scene = place("red", "circle", "blue", seed=0)
    image = tmp_path / "scene.png"
    render(scene, 32).save(image)
    results = {}
    for steps in (5, 50):
        out = tmp_path / f"steps{steps}"
        cfg = load_config(None, ["model.pretrained=toy", "trajectory.kind=ddim", f"invert.image={image}",
                                 f"invert.prompt={caption(scene)}", f"trajectory.steps={steps}",
                                 "data.resolution=32", f"output.dir={out}"])
        run(cfg)
        results[steps] = json.loads((out / "invert_metrics.json").read_text())
    for steps, metrics in results.items():
        assert metrics["grid"][-1] == 999  # trailing spacing: the inversion reaches abar = 0
        assert math.isfinite(metrics["psnr"]) and math.isfinite(metrics["latent_rmse"])
        assert MIN_TOY_PSNR[steps] < metrics["psnr"] <= metrics["psnr_vae_round_trip"] + 1.0
    assert results[50]["psnr"] > results[5]["psnr"]  # a finer grid inverts more exactly
    assert results[50]["psnr"] > results[50]["psnr_vae_round_trip"] - 2.0
