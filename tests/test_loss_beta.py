"""loss.beta: unset means the loss's own starting beta (losses.DIFFUSION_DEFAULT_BETA), written into the config so
--print-config and the saved config.yaml record the number; an explicit value wins; the trainer uses and logs it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from diffusion_pref.config import load_config, save_config, to_yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_pairs  # noqa: E402
from test_train import make_cfg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("loss, beta", [("dpo", 2500.0), ("smpo", 1000.0), ("kto", 1000.0), ("ipo", 2500.0)])
def test_unset_beta_is_the_losss_default_and_is_recorded(loss, beta, tmp_path):
    cfg = load_config(None, [f"loss.name={loss}"])
    assert cfg.loss.beta == beta
    assert f"beta: {beta}" in to_yaml(cfg)  # what --print-config shows
    saved = save_config(cfg, tmp_path)
    assert load_config(saved, ["loss.name=dpo"]).loss.beta == beta  # the saved run keeps its number
    assert load_config(None, [f"loss.name={loss}", "loss.beta=300"]).loss.beta == 300.0


@pytest.mark.parametrize("recipe, beta", [
    ("configs/sd15_smpo.yaml", 1000.0), ("configs/sdxl_smpo.yaml", 2500.0), ("configs/toy_train_smpo.yaml", 1000.0),
    ("configs/sd15_dpo_lora.yaml", 2500.0), ("configs/sdxl_dpo_full.yaml", 2500.0),
])
def test_recipes_keep_their_beta(recipe, beta):
    assert load_config(ROOT / recipe).loss.beta == beta


def test_quickstart_keeps_its_explicit_beta_for_any_loss():
    from omegaconf import OmegaConf

    defaults = ROOT / "diffusion_pref" / "quickstart.yaml"
    explicit = OmegaConf.load(defaults).loss.beta  # the recipe's own number, not smpo's default (1000)
    assert explicit != 1000.0
    assert load_config(None, ["loss.name=smpo"], defaults=defaults).loss.beta == explicit


@pytest.mark.parametrize("overrides, beta", [([], 1000.0), (["loss.beta=300"], 300.0)])
def test_trainer_uses_and_logs_the_beta(overrides, beta, tiny_sd_dir, tmp_path, caplog):
    from diffusion_pref.training.setup import Trainer

    data = write_pairs(tmp_path / "p.parquet", n=2, scores=[(0.9, 0.1), (0.2, 0.6)])
    trainer = Trainer(make_cfg(tiny_sd_dir, data, tmp_path / "out", "loss.name=smpo", "train.max_steps=1",
                               *overrides))
    seen = []
    loss_fn = trainer.loss_fn

    def spy(*args, beta, **kwargs):
        seen.append(beta)
        return loss_fn(*args, beta=beta, **kwargs)

    trainer.loss_fn = spy
    with caplog.at_level("INFO"):
        summary = trainer.train()
    assert seen == [beta] and summary["beta"] == beta
    assert any(f"loss smpo: beta {beta:g}" in r.getMessage() for r in caplog.records)
