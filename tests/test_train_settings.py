"""Training settings that cannot run here are refused before any data or model is loaded, with one line naming the
key and what to use instead: device-bound settings, resolutions the VAE cannot encode, sharded launches on CPUs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from diffusion_pref.config import ConfigError, load_config

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_pairs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOWHERE = ["model.pretrained=/nonexistent/model", "data.source=/nonexistent/pairs.parquet"]


def _run_cli(capsys, *argv):
    from diffusion_pref.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


# -- device-bound settings ------------------------------------------------------------------------------------


def _find_spec_without(*missing):
    real = importlib.util.find_spec
    return lambda name, *args: None if name in missing else (real(name, *args) or object())


def test_device_bound_settings_name_the_key_and_the_setting_that_works(monkeypatch):
    from diffusion_pref.training.setup import check_device_settings

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    train = load_config().train
    with pytest.raises(ConfigError, match=r"runtime\.dtype=fp16 needs a GPU.*use runtime\.dtype=fp32 \(or bf16\)"):
        check_device_settings(train, cpu, "fp16")
    for precision in ("no", "bf16"):
        check_device_settings(train, cpu, precision)
    check_device_settings(train, cuda, "fp16")

    monkeypatch.setattr(importlib.util, "find_spec", _find_spec_without("bitsandbytes", "xformers"))
    with pytest.raises(ConfigError, match=r"train\.optimizer=adamw8bit needs bitsandbytes.*use train\.optimizer=adamw"):
        check_device_settings(load_config(None, ["train.optimizer=adamw8bit"]).train, cuda)
    with pytest.raises(ConfigError, match=r"train\.attention=xformers but xformers is not installed"):
        check_device_settings(load_config(None, ["train.attention=xformers"]).train, cuda)
    monkeypatch.setattr(importlib.util, "find_spec", _find_spec_without())  # both installed
    check_device_settings(load_config(None, ["train.attention=xformers", "train.optimizer=adamw8bit"]).train, cuda)
    with pytest.raises(ConfigError, match=r"train\.attention=xformers needs a CUDA GPU \(this run is on cpu\)"):
        check_device_settings(load_config(None, ["train.attention=xformers"]).train, cpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shipped SD recipes are meant for this GPU")
def test_the_shipped_sd_recipe_on_a_cpu_says_what_to_change_before_reading_data(capsys, tmp_path):
    # Data and model do not exist: the device settings must be refused first, every one in the same line.
    code, err = _run_cli(capsys, "train", "--config", str(ROOT / "configs/sd15_dpo_lora.yaml"), *NOWHERE,
                         f"output.dir={tmp_path / 'out'}")
    assert code == 2 and len(err) == 1, err
    assert "runtime.dtype=fp16 needs a GPU" in err[0]
    assert ("train.optimizer=adamw8bit needs bitsandbytes" in err[0]) == (importlib.util.find_spec("bitsandbytes") is None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a CPU runs")
def test_on_a_cpu_fp16_fails_in_the_first_step_and_bf16_trains(tiny_sd_dir, tmp_path, monkeypatch):
    """Why the rule says fp16 -> no or bf16: without the check fp16 dies in the step, bf16 trains."""
    from diffusion_pref.training import setup as setup_module

    data = write_pairs(tmp_path / "p.parquet", n=2)

    def cfg(precision):
        return load_config(None, [f"model.pretrained={tiny_sd_dir}", f"data.source={data}", "data.resolution=32",
                                  "train.max_steps=1", "train.batch_size=2", "train.logger=none",
                                  "train.checkpoint_every=0", f"runtime.dtype={precision}",
                                  f"output.dir={tmp_path / precision}"])

    summary = setup_module.Trainer(cfg("bf16")).train(save_outputs=False)
    assert summary["steps"] == 1
    monkeypatch.setattr(setup_module, "check_device_settings", lambda *args: None)
    with pytest.raises(RuntimeError, match="dtype"):  # if torch learns fp16 on CPUs, the rule can go
        setup_module.Trainer(cfg("fp16")).train(save_outputs=False)


# -- resolution -----------------------------------------------------------------------------------------------


def test_vae_factor_is_read_from_the_vae_config_without_loading(tiny_sd_dir, tiny_sdxl_dir):
    from diffusers import AutoencoderKL

    from diffusion_pref.pipelines import vae_scale_factor

    def factor(*overrides):
        return vae_scale_factor(load_config(None, list(overrides)).model)

    assert factor(f"model.pretrained={tiny_sd_dir}") == 4  # three VAE blocks: two halvings
    assert factor(f"model.pretrained={tiny_sdxl_dir}") == 4
    assert factor("model.pretrained=toy") == 2
    assert factor("model.pretrained=/nonexistent/model") is None  # loading it will say what is wrong
    assert factor("model.pretrained=someone/not-downloaded-here") is None  # never asks the network
    assert factor("model.pretrained=/nonexistent/model", f"model.vae={tiny_sd_dir / 'vae'}") == 4
    vae = AutoencoderKL.from_pretrained(tiny_sd_dir / "vae")
    from diffusion_pref.testing import tiny_sd_pipeline

    assert factor(f"model.pretrained={tiny_sd_dir}") == tiny_sd_pipeline().vae_scale_factor  # diffusers' own number
    assert vae_scale_factor(load_config(None, ["model.pretrained=/nonexistent"]).model, vae=vae) == 4


def test_train_refuses_a_resolution_the_vae_cannot_encode_before_reading_data(tiny_sd_dir, tmp_path, capsys):
    code, err = _run_cli(capsys, "train", f"model.pretrained={tiny_sd_dir}", "data.source=/nonexistent/pairs.parquet",
                         "data.resolution=30", f"output.dir={tmp_path / 'out'}")
    assert code == 2 and len(err) == 1, err
    assert err[0].endswith(f"data.resolution=30 is not a multiple of 4, the downsampling factor of the VAE of "
                           f"model.pretrained={tiny_sd_dir}; use a multiple of 4, e.g. 28 or 32")
    code, err = _run_cli(capsys, "train", f"model.pretrained={tiny_sd_dir}", "data.source=/nonexistent/pairs.parquet",
                         "data.resolution=3", f"output.dir={tmp_path / 'out'}")
    assert "data.resolution=3 is not a multiple of 4" in err[0] and "e.g. 4" in err[0]


def test_the_check_after_loading_uses_the_loaded_vae(tiny_sd_dir):
    from diffusers import AutoencoderKL

    from diffusion_pref.pipelines import check_resolution

    vae = AutoencoderKL.from_pretrained(tiny_sd_dir / "vae")
    hub_model = load_config(None, ["model.pretrained=someone/not-downloaded-here"]).model  # factor unknown before
    check_resolution(hub_model, 36)
    check_resolution(hub_model, 36, vae=vae)
    with pytest.raises(ConfigError, match=r"data\.resolution=34 is not a multiple of 4.*someone/not-downloaded-here"):
        check_resolution(hub_model, 34, vae=vae)


# -- sharded launches -----------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.accelerator.is_available(), reason="accelerate shards on GPUs")
@pytest.mark.parametrize("env, name", [
    # what `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets (fsdp_sync_module_states: true)
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SYNC_MODULE_STATES": "true"}, "FSDP"),
    ({"ACCELERATE_USE_FSDP": "true", "ACCELERATE_USE_CPU": "true"}, "FSDP"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
])
def test_fsdp_and_deepspeed_launches_on_cpus_are_one_line_before_anything_loads(env, name, tmp_path, capsys,
                                                                                monkeypatch):
    """Without the check: FSDP stops in accelerate's plugin ("no available devices") or silently runs as plain
    data parallel; DeepSpeed needs the package, and with it every CPU process counts itself as process 0 of 1."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, err = _run_cli(capsys, "train", *NOWHERE, f"output.dir={tmp_path / 'out'}")
    assert code == 2 and len(err) == 1, err
    assert f"the accelerate config asks for {name}, which accelerate runs on GPUs only" in err[0]
    assert "ACCELERATE_USE_CPU=true torchrun --nproc_per_node N" in err[0]
