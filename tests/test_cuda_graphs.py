"""train.cuda_graphs: the no-grad UNet calls (reference, SmPO's inversion) replayed from CUDA graphs.

The replay tests need a GPU and are skipped without one (benchmarks/gpu_check.sh runs them on the device); the
fallback and the trainer's wiring are tested everywhere."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_pairs  # noqa: E402
from test_train import make_cfg, read_metrics  # noqa: E402

# smpo on pairs without score columns: the human labels and beta 2500, the settings these tolerances were set for
HARD_LABELS = ["data.soft_labels=label", "loss.beta=2500"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_cpu_and_grad_calls_run_eagerly_and_record_nothing():
    from diffusion_pref.training.cuda_graphs import CudaGraphCalls

    graphs, calls = CudaGraphCalls(), []

    def fn(x, c):
        calls.append(x.shape[0])
        return x * c["scale"]

    x = torch.arange(6.0).reshape(3, 2)
    with torch.no_grad():
        out = graphs("cpu", fn, x, {"scale": torch.tensor(2.0)})
    assert torch.equal(out, 2 * x) and calls == [3] and graphs.num_graphs == 0


def test_trainer_sends_the_no_grad_calls_through_the_graphs_by_name(tiny_sd_dir, tmp_path, monkeypatch):
    """Which calls go through the graphs: ReNoise's inversion ("policy"), the adapter-off reference; never the
    policy's own grad-enabled forward. Same losses as without the option (on a CPU the calls run eagerly; on a
    GPU, cuDNN's autotuning may pick other kernels for the second run, hence the tolerance)."""
    from diffusion_pref.training import cuda_graphs
    from diffusion_pref.training.setup import Trainer

    seen = []

    def spy(self, name, fn, *args):
        seen.append((name, args[0].shape[0], torch.is_grad_enabled()))
        return fn(*args)

    data = write_pairs(tmp_path / "p.parquet", n=4)
    flags = ["loss.name=smpo", *HARD_LABELS, "trajectory.kind=renoise", "trajectory.steps=5",
             "train.learning_rate=1e-2"]
    losses = {}
    for name, extra in (("eager", []), ("graphs", ["train.cuda_graphs=true"])):
        if extra:
            monkeypatch.setattr(cuda_graphs.CudaGraphCalls, "__call__", spy)
        Trainer(make_cfg(tiny_sd_dir, data, tmp_path / name, *flags, *extra)).train()
        losses[name] = [v for r in read_metrics(tmp_path / name) for v in (r["loss"], r["ref_mse_w"])]
    assert losses["graphs"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-6)
    names = {n for n, _, _ in seen}
    assert names == {"policy", "adapter off"} and not any(grad for _, _, grad in seen)
    batch = make_cfg(tiny_sd_dir, data, tmp_path / "x").train.batch_size
    assert all(n == 2 * batch for name, n, _ in seen if name == "adapter off")  # the whole [w; l] batch
    assert {n for name, n, _ in seen if name == "policy"} <= set(range(2, 2 * batch + 1, 2))  # pairs invert together


def _tiny_unet():
    from diffusion_pref.testing import tiny_sd_pipeline

    unet = tiny_sd_pipeline(seed=0).unet.cuda().train()
    width = unet.config.cross_attention_dim
    return unet, width


@needs_cuda
def test_replay_matches_eager_per_shape_and_follows_in_place_weight_updates():
    """fp32 weights that require grad under bf16 autocast: the case where autocast's cast cache could leave a
    graph reading stale weights. Replays must follow optimizer steps, and eager calls made in the same autocast
    region after a recording must not read a graph's memory."""
    from diffusion_pref.training.cuda_graphs import CudaGraphCalls

    unet, width = _tiny_unet()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    graphs = CudaGraphCalls()
    g = torch.Generator(device="cuda").manual_seed(0)

    def call(x, t, c):
        return unet(x, t, encoder_hidden_states=c["encoder_hidden_states"]).sample

    def inputs(n):
        return (torch.randn(n, 4, 8, 8, device="cuda", generator=g),
                torch.randint(0, 1000, (n,), device="cuda", generator=g),
                {"encoder_hidden_states": torch.randn(n, 7, width, device="cuda", generator=g)})

    for step in range(3):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for n in (4, 2, 4):
                args = inputs(n)
                replayed = graphs("policy", call, *args)
                eager = call(*args)
                torch.testing.assert_close(replayed, eager, rtol=2e-2, atol=2e-2)
                assert (replayed - eager).abs().max() < 0.1 * eager.abs().max()
        # a training step that changes the weights in place
        with torch.autocast("cuda", dtype=torch.bfloat16):
            x, t, c = inputs(2)
            call(x, t, c).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert graphs.num_graphs == 2  # batch 4 and batch 2, recorded once each


@needs_cuda
def test_replay_is_bitwise_the_recorded_kernels_in_fp32():
    """Without autocast and with cuDNN's choice fixed, a replay runs exactly the kernels of an eager call."""
    from diffusion_pref.training.cuda_graphs import CudaGraphCalls

    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        unet, width = _tiny_unet()
        graphs = CudaGraphCalls()
        x = torch.randn(2, 4, 8, 8, device="cuda")
        t = torch.tensor([10, 500], device="cuda")
        c = {"encoder_hidden_states": torch.randn(2, 7, width, device="cuda")}
        call = lambda x, t, c: unet(x, t, encoder_hidden_states=c["encoder_hidden_states"]).sample  # noqa: E731
        with torch.no_grad():
            first, eager = graphs("p", call, x, t, c), call(x, t, c)
            torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)
            again = graphs("p", call, x + 1, t, c)
            torch.testing.assert_close(again, call(x + 1, t, c), rtol=1e-5, atol=1e-5)
        with torch.enable_grad():  # grad-enabled calls are never recorded
            graphs("p", call, x, t, c)
        assert graphs.num_graphs == 1
    finally:
        torch.backends.cudnn.deterministic = False


@needs_cuda
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_smpo_training_with_cuda_graphs_matches_eager(tiny_sd_dir, tmp_path, finetune):
    """The trainer on a GPU: ReNoise SmPO with bf16 autocast, with and without graphs, gives the same losses (to
    bf16 rounding) and records graphs for the inversion's sub-batch sizes and the reference."""
    from diffusion_pref.training.setup import Trainer

    assert torch.cuda.is_available()
    data = write_pairs(tmp_path / "p.parquet", n=4)
    extra = ["model.finetune=full", "model.reference=copy"] if finetune == "full" else []
    flags = ["loss.name=smpo", *HARD_LABELS, "trajectory.kind=renoise", "trajectory.steps=5",
             "runtime.dtype=bf16",
             "train.max_steps=3", *extra]
    runs = {}
    for name, option in (("eager", []), ("graphs", ["train.cuda_graphs=true"])):
        trainer = Trainer(make_cfg(tiny_sd_dir, data, tmp_path / name, *flags, *option))
        assert trainer.device.type == "cuda"
        trainer.train()
        if option:
            assert trainer.accel.graphs.num_graphs >= 2
        runs[name] = [v for r in read_metrics(tmp_path / name) for v in (r["loss"], r["mse_w"], r["ref_mse_l"])]
    assert runs["graphs"] == pytest.approx(runs["eager"], rel=2e-2, abs=1e-3)


def test_building_the_inversion_cache_records_no_graphs(tiny_sd_dir, tmp_path, monkeypatch):
    """The cache's one-off inversion calls run eagerly (a graph per chunk shape would only cost recordings);
    training then sends its reference calls through the graphs."""
    from diffusion_pref.training import cuda_graphs
    from diffusion_pref.training.setup import Trainer

    seen = []

    def spy(self, name, fn, *args):
        seen.append(name)
        return fn(*args)

    monkeypatch.setattr(cuda_graphs.CudaGraphCalls, "__call__", spy)
    data = write_pairs(tmp_path / "p.parquet", n=4)
    trainer = Trainer(make_cfg(tiny_sd_dir, data, tmp_path / "out", "loss.name=smpo", *HARD_LABELS,
                               "trajectory.kind=renoise",
                               "trajectory.steps=5", "trajectory.t_mode=grid_below", "trajectory.invert_with=reference",
                               "data.cache=true", "trajectory.cache_inverted=true", "train.cuda_graphs=true"))
    assert seen == []  # the cache (with its inversion) is built by now
    trainer.train()
    assert set(seen) == {"adapter off"}  # the reference pass; grid_below reads x_t from the cache
