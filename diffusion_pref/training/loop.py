"""The training loop: one function for every loss, backbone and trajectory.

Per micro-step: move the pair batch to the device, encode it (or read it from the cache), noise winner and
loser with shared noise and timestep (the trajectory; ddim / renoise invert the pair first), run the reference
once under ``no_grad`` (the policy with its LoRA adapter off, a frozen copy, or nothing for reference-free
losses), the policy once over ``[w; l]``, turn both into log-likelihood estimates and hand them to
``LOSSES[loss.name]``. Per optimizer step: gather the metrics from every process, log them, update the loss's
state when it declares one (``losses.LOSS_STATE``: bco's running reward shift), validate and checkpoint.

What runs on a GPU faster goes through ``run.accel`` (:mod:`diffusion_pref.training.accel`); everything set up
before the first step is in :mod:`diffusion_pref.training.setup` (``run`` is its :class:`~.setup.Trainer`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Dict

from diffusion_pref.fileio import atomic_write
from diffusion_pref.seeding import derive_seed

logger = logging.getLogger(__name__)


def train(run, save_outputs: bool = True) -> Dict[str, object]:
    """Run ``run`` (a :class:`~.setup.Trainer`) to ``train.max_steps``; returns the summary also written to
    ``train_summary.json``. ``save_outputs=False`` skips writing the final LoRA / pipeline."""
    import torch

    from diffusion_pref.data.loader import PairBatches, make_loader
    from diffusion_pref.losses import denoising_log_likelihood
    from diffusion_pref.pipelines.base import repeat_pair
    from diffusion_pref.training.metrics_log import MetricsLog
    from diffusion_pref.trajectories import make_trajectory, trajectory_options

    cfg, t = run.cfg, run.cfg.train
    accelerator, backbone, accel, unet = run.accelerator, run.backbone, run.accel, run.unet
    loss_state = run.loss_state  # None, or the state a stateful loss declares (losses.LOSS_STATE)
    step, epoch, next_index, skipped_total = run.step, run.epoch, run.next_index, run.skipped_total

    batches = PairBatches(run.source, run.make_batch, t.batch_size, rank=accelerator.process_index,
                          world=accelerator.num_processes, start_epoch=epoch, start_index=next_index)
    data_iter = iter(make_loader(batches, run.num_workers))
    log = MetricsLog(cfg, accelerator, run.out, start_step=step)
    if accelerator.is_main_process:
        logger.info("data: %s; reference: %s; trainable parameters: %d", run.source.summary(), run.reference,
                    sum(p.numel() for p in run.trainable))
        logger.info("loss %s: beta %g", cfg.loss.name, run.beta)
    policy = accelerator.unwrap_model(unet)
    if cfg.trajectory.invert_with == "reference":
        invert_predict = run.reference_predict
    else:
        def invert_predict(x, tt, c):
            return accel.predict("policy", backbone, policy, x, tt, c)

    sums: Dict[str, torch.Tensor] = {}  # this optimizer step's metrics, summed over its micro-steps on the device
    micro_in_step = pairs_in_step = 0
    last_time = time.perf_counter()
    while step < t.max_steps:
        batch = next(data_iter)
        skipped_total += int(batch["skipped"])
        if batch["size"] == 0:  # every row of this batch was undecodable and skipped
            epoch, next_index = batch["epoch"], batch["next_index"]
            continue
        if run.soft_labels is not None:  # p from reward scores, looked up by the pairs' row ids
            batch["soft_label"] = run.soft_labels.lookup(batch["rows"])
        batch = accel.to_device(batch)
        micro = step * t.grad_accum + micro_in_step
        generator = torch.Generator().manual_seed(derive_seed(cfg.runtime.seed, micro))  # any process count, resume
        with accelerator.accumulate(unet):
            latents_w, latents_l, text = run.encode(batch)
            cond = repeat_pair(backbone.conditioning(text, batch))
            # trajectory.cache_inverted: the reference's inversion of these pairs, read from the cache
            inverted = torch.cat([batch["inverted_w"], batch["inverted_l"]]) if "inverted_w" in batch else None
            with accelerator.autocast():
                # Noise and t of each pair do not depend on the process count; ddim / renoise invert x0 with
                # the current model (SmPO) or the reference (invert_with), under no_grad in make_trajectory.
                traj = make_trajectory(
                    cfg.trajectory.kind, backbone.schedule, latents_w, latents_l,
                    predict_fn=invert_predict, cond=cond, inverted=inverted,
                    generator=generator, process_index=accelerator.process_index,
                    num_processes=accelerator.num_processes, **trajectory_options(cfg.trajectory),
                )
            # The gradient forward gets its own autocast region: leaving this one clears autocast's weight-cast
            # cache. Torch before PR #165068 would otherwise hand the policy forward the casts the no-grad
            # inversion cached, without gradient (full fine-tuning would train only the norms).
            with accelerator.autocast():
                ref_w = ref_l = None
                if run.reference_predict is not None:
                    with torch.no_grad():
                        ref_pred = run.reference_predict(traj.x_t, traj.t, cond)
                        ref_w, ref_l = denoising_log_likelihood(ref_pred, traj.target).chunk(2)
                pred = backbone.predict(traj.x_t, traj.t, cond, denoiser=unet)  # [2B, C, H, W], one pass over [w; l]
            policy_w, policy_l = denoising_log_likelihood(pred, traj.target).chunk(2)  # [B] each
            inputs = dict(run.loss_params)
            if run.takes_soft:
                inputs["soft_label"] = batch["soft_label"]
            if loss_state is not None:
                inputs.update(loss_state.loss_kwargs())
            loss_per_pair, metrics = run.loss_fn(policy_w, policy_l, ref_w, ref_l, beta=run.beta, **inputs)
            loss = loss_per_pair.mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.trainable, t.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)

        values = {"loss": loss.detach(), "mse_w": -policy_w.detach().mean(), "mse_l": -policy_l.detach().mean()}
        if ref_w is not None:
            values.update(ref_mse_w=-ref_w.mean(), ref_mse_l=-ref_l.mean())
        values.update({k: v for k, v in metrics.items() if v.ndim == 0})
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float().to(accelerator.device)
        micro_in_step += 1
        pairs_in_step += int(batch["size"])
        epoch, next_index = batch["epoch"], batch["next_index"]
        if not accelerator.sync_gradients:
            continue

        # ---- one optimizer step done: metrics over every process, log, loss state, validation, checkpoint
        step += 1
        local = torch.stack([*(v / micro_in_step for v in sums.values()),
                             torch.full((), float(pairs_in_step), device=accelerator.device)])
        *totals, pairs = accelerator.reduce(local, "sum").tolist()
        logs = {k: v / accelerator.num_processes for k, v in zip(sums, totals)}
        if not math.isfinite(logs["loss"]):
            raise FloatingPointError(f"loss is {logs['loss']} at step {step}; lower train.learning_rate or loss.beta, "
                                     "or use runtime.dtype=bf16 instead of fp16")
        if loss_state is not None:
            loss_state.observe(logs, pairs=int(pairs))
        now = time.perf_counter()
        logs.update(lr=run.lr_scheduler.get_last_lr()[0], pairs_per_s=pairs / max(now - last_time, 1e-9),
                    skipped_rows=skipped_total, epoch=epoch)
        log.write(step, logs)
        last_time, sums, micro_in_step, pairs_in_step = now, {}, 0, 0
        if t.validate_every > 0 and t.validation_prompts and step % t.validate_every == 0:
            run.validate(step)
        if t.checkpoint_every > 0 and step % t.checkpoint_every == 0 and step < t.max_steps:
            run.checkpointer.save(step, run.checkpoint_state(epoch, next_index, skipped_total))
    log.close()
    run.step, run.epoch, run.next_index, run.skipped_total = step, epoch, next_index, skipped_total

    # ---- the outputs: summary, LoRA or pipeline
    accelerator.wait_for_everyone()
    cut = run.pair_encoder.captions_cut  # pairs whose caption was cut, over every process (None: unknown)
    cut_total, cut_unknown = accelerator.reduce(torch.tensor([cut or 0, int(cut is None)], device=run.device),
                                                "sum").tolist()
    summary = {"steps": step, "data": run.source.summary(), "skipped_rows": skipped_total, "reference": run.reference,
               "output": "lora" if cfg.model.finetune == "lora" else "pipeline", "beta": run.beta,
               "captions_cut": None if cut_unknown else int(cut_total)}
    if run.soft_label_summary is not None:
        summary["soft_labels"] = run.soft_label_summary
    # Full weights are gathered on every process (FSDP / ZeRO-3 shard them); LoRA weights are never sharded.
    full_state = accelerator.get_state_dict(unet) if save_outputs and cfg.model.finetune == "full" else None
    if accelerator.is_main_process and save_outputs:
        if cfg.model.finetune == "lora":
            backbone.save_lora(run.out, policy)
        else:
            backbone.save_full(run.out, policy, full_state)
        atomic_write(run.out / "train_summary.json", json.dumps(summary, indent=2))
        logger.info("done: %s written to %s", summary["output"], run.out)
    accelerator.end_training()
    return summary
