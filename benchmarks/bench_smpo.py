"""Training-step time of SmPO (ReNoise-inverted trajectories) relative to Diffusion-DPO (not a test).

One optimizer step on a batch of pairs, same UNet, same batch, same timesteps (the same generator seeds):

- ``dpo``: forward trajectory; reference UNet forward (no_grad) and policy forward + backward over ``[w; l]``;
- ``smpo-exact`` / ``smpo-grid_below``: the same step plus ReNoise inversion of x0 with the policy under no_grad
  (K = 1, both predictions averaged, the 5-point grid [1, 201, 401, 601, 801] of SD1.5), with
  ``trajectory.t_mode`` exact (one more step to t) or grid_below (stops at the grid point below t; the released
  SmPO code, ``smpo_released``, runs one step more for most t);
- ``smpo-cached-exact`` / ``smpo-cached-grid_below``: ``trajectory.invert_with=reference`` with
  ``trajectory.cache_inverted``: the frozen reference's ReNoise inversion of the batch to every grid point is
  made once before the timed steps (its time is ``precompute_s``), as the data cache does; a step reads x_t
  (grid_below) or inverts one step from the grid point below t (exact).

The step is written out here (policy, frozen reference copy, AdamW) instead of running the trainer, so the
ratio measures the trajectory and nothing else. Models: ``tiny`` (the tiny random-weight SD UNet of
``diffusion_pref.testing``, 8x8 latents; per-call overhead dominates), ``small`` (the SD1.5 layout at a fifth
of the width, 32x32 latents, FLOP-bound on a CPU) and ``sd15`` (a UNet with the SD1.5 architecture, random
weights, 768-wide text states; meant for a GPU). Prints a markdown table and writes JSON.

Run::

    python benchmarks/bench_smpo.py --models tiny --steps 5                     # CPU smoke run
    python benchmarks/bench_smpo.py --models sd15 --latent 64 --batch-size 4 --dtype bf16 --steps 10 \\
        --out bench_smpo.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import code_identity  # noqa: E402


def build_unet(name: str):
    """-> (UNet2DConditionModel, cross-attention width, latent size default)."""
    from diffusers import UNet2DConditionModel

    if name == "tiny":
        from diffusion_pref.testing import tiny_sd_pipeline

        pipe = tiny_sd_pipeline(seed=0)
        return pipe.unet, pipe.unet.config.cross_attention_dim, 8
    if name == "sd15":
        unet = UNet2DConditionModel(  # the SD1.5 UNet architecture (860M parameters), random weights
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        return unet, 768, 64
    if name == "small":  # the SD1.5 layout at a fifth of the width: FLOP-bound on a CPU, unlike tiny
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(64, 128, 256, 256), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        return unet, 768, 32
    raise SystemExit(f"unknown model {name!r}; choose tiny, small or sd15")


def bench(model: str, method: str, steps: int, batch_size: int, latent: int, dtype_name: str, device: str,
          built=None, finetune: str = "full", compile_mode: str | None = None, warmup: int = 1,
          cuda_graphs: bool = False) -> dict:
    import torch

    from diffusion_pref.losses import LOSSES, denoising_log_likelihood
    from diffusion_pref.schedules import DDPMSchedule
    from diffusion_pref.trajectories import make_trajectory

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    base, width, default_latent = built or build_unet(model)
    latent = latent or default_latent
    unet = copy.deepcopy(base).to(device).train()  # every method starts from the same weights
    ref_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    if finetune == "lora":  # rank-8 adapter on the attention projections, the frozen UNet in the autocast dtype
        from peft import LoraConfig

        unet.requires_grad_(False).to(dtype=dtype)
        ref_unet.to(dtype=dtype)
        unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        for module in unet.modules():  # as the trainer does under mixed precision: no peft input casts
            if dtype != torch.float32 and hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    if compile_mode:  # in place, as train.compile does: policy, inversion and reference calls all compiled
        unet.compile(mode=compile_mode)
        ref_unet.compile(mode=compile_mode)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-6)
    scheduler = DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    g = torch.Generator().manual_seed(0)
    latents_w = torch.randn(batch_size, 4, latent, latent, generator=g).to(device)
    latents_l = torch.randn(batch_size, 4, latent, latent, generator=g).to(device)
    hidden = torch.randn(batch_size, 16, width, generator=g).to(device)
    cond = {"encoder_hidden_states": torch.cat([hidden, hidden])}  # [2B, L, D]
    # on the host, as the trainer keeps it (StepAccel.HOST_KEYS): the loss range-checks it there before the copy
    soft_label = torch.full((batch_size,), 0.8)

    def eager_predict(x, t, c, net=None):
        return (net or unet)(x, t.to(device), encoder_hidden_states=c["encoder_hidden_states"]).sample

    graphs = None
    if cuda_graphs:  # as train.cuda_graphs: the no-grad calls (inversion, reference) replay CUDA graphs
        from diffusion_pref.training.cuda_graphs import CudaGraphCalls

        graphs = CudaGraphCalls()

    def predict(x, t, c, net=None):
        if graphs is None or torch.is_grad_enabled():
            return eager_predict(x, t, c, net)
        name = "reference" if net is ref_unet else "policy"
        return graphs(name, lambda *args: eager_predict(*args, net=net), x, t, c)

    def no_grad_policy(x, t, c):
        with torch.no_grad():
            return predict(x, t, c)

    def no_grad_reference(x, t, c):
        with torch.no_grad():
            return predict(x, t, c, ref_unet)

    inverted, precompute_s = None, None
    if method.startswith("smpo-cached-"):  # trajectory.cache_inverted: the reference's grid latents, made once
        from diffusion_pref.trajectories import invert_grid

        start = time.perf_counter()
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            inverted = invert_grid("renoise", scheduler, no_grad_reference, torch.cat([latents_w, latents_l]), cond,
                                   steps=5, renoise_iters=1, average_window=[0, 2])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        precompute_s = time.perf_counter() - start

    def one_step(i: int):
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            if method == "dpo":
                traj = make_trajectory("forward", scheduler, latents_w, latents_l, generator=generator)
            elif inverted is not None:  # smpo-cached-<t_mode>: read x_t; exact inverts one step with the reference
                traj = make_trajectory("renoise", scheduler, latents_w, latents_l, predict_fn=no_grad_reference,
                                       cond=cond, generator=generator, steps=5, renoise_iters=1,
                                       average_window=[0, 2], t_mode=method.rsplit("-", 1)[1], inverted=inverted)
            else:  # smpo-<t_mode> (ReNoise K = 1) or smpo-ddim-<t_mode>
                kind = "ddim" if method.startswith("smpo-ddim-") else "renoise"
                traj = make_trajectory(kind, scheduler, latents_w, latents_l, predict_fn=no_grad_policy,
                                       cond=cond, generator=generator, steps=5, renoise_iters=1,
                                       average_window=[0, 2], t_mode=method.rsplit("-", 1)[1])
            with torch.no_grad():
                ref_w, ref_l = denoising_log_likelihood(predict(traj.x_t, traj.t, cond, ref_unet), traj.target).chunk(2)
            policy_w, policy_l = denoising_log_likelihood(predict(traj.x_t, traj.t, cond), traj.target).chunk(2)
        if method == "dpo":
            loss, _ = LOSSES["dpo"](policy_w, policy_l, ref_w, ref_l, beta=2500.0)
        else:
            loss, _ = LOSSES["smpo"](policy_w, policy_l, ref_w, ref_l, beta=1000.0, soft_label=soft_label)
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for i in range(warmup):  # allocator, kernels; compilation when compiled (new shapes may still compile later)
        one_step(-1 - i)
    times = []
    for i in range(steps):
        sync()
        start = time.perf_counter()
        one_step(i)
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    unet = ref_unet = optimizer = None  # the closures above hold these names: emptied, not deleted, to free memory
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"model": model, "method": method, "finetune": finetune, "compile": compile_mode, "warmup": warmup,
            "cuda_graphs": cuda_graphs, "graphs_recorded": graphs.num_graphs if graphs is not None else 0,
            "precompute_s": precompute_s,
            "batch_pairs": batch_size, "latent": latent,
            "dtype": dtype_name, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "steps": steps, "median_s": statistics.median(times), "min_s": min(times), "peak_gib": peak}


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny"])
    parser.add_argument("--methods", nargs="+", default=["dpo", "smpo-exact", "smpo-grid_below"],
                        help="dpo, smpo-exact, smpo-grid_below (ReNoise K=1), smpo-ddim-exact, smpo-ddim-grid_below, "
                             "smpo-cached-exact, smpo-cached-grid_below (the reference's ReNoise inversion made once "
                             "before the timed steps, as trajectory.cache_inverted)")
    parser.add_argument("--finetune", nargs="+", default=["full"], choices=["full", "lora"],
                        help="full UNet (the SmPO recipes) and/or a rank-8 LoRA")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (more with --compile)")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="torch.compile both UNets in place with this mode (default, reduce-overhead, ...)")
    parser.add_argument("--cuda-graphs", nargs="+", default=["off"], choices=["off", "on"],
                        help="replay CUDA graphs for the no-grad calls (inversion, reference), as train.cuda_graphs; "
                             "'off on' measures both")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument("--latent", type=int, default=0, help="latent side (0 = the model's default)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import platform

    import diffusers

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "command": " ".join(["python", *sys.argv]), **code_identity()}
    rows = []

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

    for model in args.models:
        built = build_unet(model)  # once: every method and fine-tune mode copies the same random weights
        for finetune in args.finetune:
            for graphs in args.cuda_graphs:
                for method in args.methods:
                    rows.append(bench(model, method, args.steps, args.batch_size, args.latent, args.dtype, device,
                                      compile_mode=args.compile, warmup=args.warmup, built=built,
                                      finetune=finetune, cuda_graphs=graphs == "on"))
                    save()  # after every row, so a run cut short still leaves what it measured
    base = {(r["model"], r["finetune"], r["cuda_graphs"]): r["median_s"] for r in rows if r["method"] == "dpo"}
    print("| model | finetune | CUDA graphs | method | pairs | latent | dtype | device | median s/step | x dpo "
          "| x eager dpo |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        key = (r["model"], r["finetune"], r["cuda_graphs"])
        eager = (r["model"], r["finetune"], False)
        r["ratio_to_dpo"] = r["median_s"] / base[key] if key in base else None
        r["ratio_to_eager_dpo"] = r["median_s"] / base[eager] if eager in base else None
        ratios = [f"{x:.2f}" if x is not None else "-" for x in (r["ratio_to_dpo"], r["ratio_to_eager_dpo"])]
        print(f"| {r['model']} | {r['finetune']} | {'on' if r['cuda_graphs'] else 'off'} | {r['method']} "
              f"| {r['batch_pairs']} | {r['latent']} | {r['dtype']} | {r['device']} | {r['median_s']:.4f} "
              f"| {ratios[0]} | {ratios[1]} |")
    save()


if __name__ == "__main__":
    main()
