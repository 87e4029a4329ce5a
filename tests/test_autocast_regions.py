"""SmPO under mixed precision: the no-grad inversion with the policy must not share an autocast region with the
policy's gradient forward. Autocast caches its fp32 -> half weight casts per region; on torch before PR #165068 a
cast cached under no_grad is reused by the later forward, which then has no gradient path to those weights (full
fine-tuning would update only the norm layers, LoRA would raise)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_pairs  # noqa: E402
from test_train import make_cfg  # noqa: E402


def test_smpo_bf16_full_finetune_inverts_in_its_own_autocast_region_and_trains_conv_and_linear_weights(
        tiny_sd_dir, tmp_path, monkeypatch):
    from diffusion_pref.pipelines.stable_diffusion import StableDiffusionBackbone
    from diffusion_pref.training.setup import Trainer

    data = write_pairs(tmp_path / "p.parquet", n=2)
    trainer = Trainer(make_cfg(tiny_sd_dir, data, tmp_path / "out", "loss.name=smpo", "data.soft_labels=label",
                               "trajectory.kind=renoise",
                               "trajectory.steps=5", "runtime.dtype=bf16", "model.finetune=full",
                               "model.reference=copy", "train.learning_rate=1e-2", "train.max_steps=1",
                               "train.batch_size=1"))
    policy = trainer.accelerator.unwrap_model(trainer.unet)
    policy_weights = {id(p) for p in policy.parameters()}
    events = []
    predict, clear = StableDiffusionBackbone.predict, torch.clear_autocast_cache

    def spy_predict(self, x_t, t, cond, denoiser=None):
        module = self.denoiser if denoiser is None else trainer.accelerator.unwrap_model(denoiser)
        uses_policy = any(id(p) in policy_weights for p in module.parameters())
        events.append(("predict", torch.is_grad_enabled(), uses_policy, torch.is_autocast_enabled("cpu")))
        return predict(self, x_t, t, cond, denoiser=denoiser)

    def spy_clear():
        events.append(("clear",))
        clear()

    monkeypatch.setattr(StableDiffusionBackbone, "predict", spy_predict)
    monkeypatch.setattr(torch, "clear_autocast_cache", spy_clear)
    layers = {n: m.weight for n, m in policy.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    norms = {n: m.weight for n, m in policy.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    before = {n: w.detach().clone() for n, w in {**layers, **norms}.items()}
    trainer.train(save_outputs=False)

    grad_calls = [i for i, e in enumerate(events) if e[0] == "predict" and e[1]]
    inversion_calls = [i for i, e in enumerate(events) if e[0] == "predict" and not e[1] and e[2]]
    assert len(grad_calls) == 1 and inversion_calls and max(inversion_calls) < grad_calls[0]
    assert all(events[i][3] for i in grad_calls + inversion_calls)  # both ran under CPU autocast (bf16)
    # the region of the inversion was left (clearing the cast cache) before the policy's gradient forward
    assert ("clear",) in events[max(inversion_calls) + 1:grad_calls[0]]
    # and the step trained the conv / linear weights that autocast casts, not only the (fp32) norms
    unchanged = [n for n, w in layers.items() if torch.equal(w.detach(), before[n])]
    assert not unchanged, f"conv/linear weights without an update: {unchanged[:5]}"
    assert any(not torch.equal(w.detach(), before[n]) for n, w in norms.items())
