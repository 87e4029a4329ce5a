"""The model-specific part of a training step, behind one small interface the loop calls.

An objective turns a pair batch into the four log-likelihood estimates every loss of ``losses.LOSSES`` reads, and
writes the trained model at the end:

    objective.module                                   # the trainable module accelerate prepared (accumulate())
    objective.metric                                   # "mse" | "nll": the loop logs <metric>_w = -policy_w.mean()
    objective.log_likelihoods(batch, generator) -> (policy_w, policy_l, ref_w, ref_l)   # [B] each; ref None if none
    objective.summary() -> dict                        # extra train_summary.json entries
    objective.save(out, save_outputs)                  # the LoRA / full weights (every process calls it)

:class:`DiffusionObjective` is the diffusion step (trajectory, ``backbone.predict``, ``denoising_log_likelihood``);
the language-model one is :class:`diffusion_pref.prompt_opt.train.LMObjective`. A run (``Trainer``) without an
``objective`` attribute trains through :class:`DiffusionObjective`.
"""

from __future__ import annotations

__all__ = ["DiffusionObjective"]


class DiffusionObjective:
    """Noise winner and loser with shared noise and timestep (the trajectory; ddim / renoise invert the pair
    first), run the reference once under ``no_grad``, the policy once over ``[w; l]``, and read the denoising
    log-likelihood estimates. ``run``: a :class:`~diffusion_pref.training.setup.Trainer` (its ``encode`` is read
    at each call, so a wrapped one is used)."""

    metric = "mse"

    def __init__(self, run):
        self.run = run
        self.module = run.unet
        self.policy = run.accelerator.unwrap_model(run.unet)
        if run.cfg.trajectory.invert_with == "reference":
            self.invert_predict = run.reference_predict
        else:
            def invert_predict(x, tt, c):
                return run.accel.predict("policy", run.backbone, self.policy, x, tt, c)
            self.invert_predict = invert_predict

    def log_likelihoods(self, batch, generator):
        import torch

        from diffusion_pref.losses import denoising_log_likelihood
        from diffusion_pref.pipelines.base import repeat_pair
        from diffusion_pref.trajectories import make_trajectory, trajectory_options

        run = self.run
        accelerator, backbone, cfg = run.accelerator, run.backbone, run.cfg
        latents_w, latents_l, text = run.encode(batch)
        cond = repeat_pair(backbone.conditioning(text, batch))
        # trajectory.cache_inverted: the reference's inversion of these pairs, read from the cache
        inverted = torch.cat([batch["inverted_w"], batch["inverted_l"]]) if "inverted_w" in batch else None
        with accelerator.autocast():
            # Noise and t of each pair do not depend on the process count; ddim / renoise invert x0 with
            # the current model (SmPO) or the reference (invert_with), under no_grad in make_trajectory.
            traj = make_trajectory(
                cfg.trajectory.kind, backbone.schedule, latents_w, latents_l,
                predict_fn=self.invert_predict, cond=cond, inverted=inverted,
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
            pred = backbone.predict(traj.x_t, traj.t, cond, denoiser=self.module)  # [2B, C, H, W], one pass over [w; l]
        policy_w, policy_l = denoising_log_likelihood(pred, traj.target).chunk(2)  # [B] each
        return policy_w, policy_l, ref_w, ref_l

    def summary(self) -> dict[str, object]:
        import torch

        run = self.run
        cut = run.pair_encoder.captions_cut  # pairs whose caption was cut, over every process (None: unknown)
        cut_total, cut_unknown = run.accelerator.reduce(
            torch.tensor([cut or 0, int(cut is None)], device=run.device), "sum").tolist()
        return {"output": "lora" if run.cfg.model.finetune == "lora" else "pipeline",
                "captions_cut": None if cut_unknown else int(cut_total)}

    def save(self, out, save_outputs: bool = True) -> None:
        run = self.run
        full = run.cfg.model.finetune == "full"
        # Full weights are gathered on every process (FSDP / ZeRO-3 shard them); LoRA weights are never sharded.
        full_state = run.accelerator.get_state_dict(self.module) if save_outputs and full else None
        if run.accelerator.is_main_process and save_outputs:
            if full:
                run.backbone.save_full(out, self.policy, full_state)
            else:
                run.backbone.save_lora(out, self.policy)
