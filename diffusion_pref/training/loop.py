"""The training loop: one function for every loss, backbone and trajectory.

Per micro-step: move the pair batch to the device, get the policy's and the reference's log-likelihood estimates
of winner and loser from the run's objective (:mod:`diffusion_pref.training.objectives`; the diffusion one:
encode the batch, noise winner and loser with shared noise and timestep, run the reference once under
``no_grad`` and the policy once over ``[w; l]``; the language model's: completion log-probabilities) and hand
them to ``LOSSES[loss.name]``, with the batch's per-pair ``weight`` when it has one. Per optimizer step: gather the metrics from every process, log them, update the loss's
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
    from diffusion_pref.training.metrics_log import MetricsLog
    from diffusion_pref.training.objectives import DiffusionObjective

    cfg, t = run.cfg, run.cfg.train
    accelerator, accel = run.accelerator, run.accel
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
    # The model-specific part of a step (training/objectives.py): the diffusion one unless the run brings its own.
    objective = getattr(run, "objective", None) or DiffusionObjective(run)

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
        with accelerator.accumulate(objective.module):
            policy_w, policy_l, ref_w, ref_l = objective.log_likelihoods(batch, generator)
            inputs = dict(run.loss_params)
            if run.takes_soft:
                inputs["soft_label"] = batch["soft_label"]
            if loss_state is not None:
                inputs.update(loss_state.loss_kwargs())
            if "weight" in batch:  # per-pair loss weights (Sem-DPO's semantic weight), the same for every loss
                inputs["weight"] = batch["weight"]
            loss_per_pair, metrics = run.loss_fn(policy_w, policy_l, ref_w, ref_l, beta=run.beta, **inputs)
            loss = loss_per_pair.mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.trainable, t.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)

        m = objective.metric  # mse (diffusion) | nll (language model): minus the log-likelihood estimates
        values = {"loss": loss.detach(), f"{m}_w": -policy_w.detach().mean(), f"{m}_l": -policy_l.detach().mean()}
        if ref_w is not None:
            values.update({f"ref_{m}_w": -ref_w.mean(), f"ref_{m}_l": -ref_l.mean()})
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
    summary = {"steps": step, "data": run.source.summary(), "skipped_rows": skipped_total, "reference": run.reference,
               "beta": run.beta, **objective.summary()}
    if run.soft_label_summary is not None:
        summary["soft_labels"] = run.soft_label_summary
    objective.save(run.out, save_outputs)
    if accelerator.is_main_process and save_outputs:
        atomic_write(run.out / "train_summary.json", json.dumps(summary, indent=2))
        logger.info("done: %s written to %s", summary["output"], run.out)
    accelerator.end_training()
    return summary
