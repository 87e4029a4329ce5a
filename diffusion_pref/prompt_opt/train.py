"""``prompt-opt train``: a causal LM trained on rewrite pairs through the same loop as the diffusion models.

:class:`LMTrainer` sets up what :func:`diffusion_pref.training.loop.train` reads from a run (accelerate, the
optimizer and learning-rate schedule of ``train.*``, checkpoints, ``train.resume``) with the language model's
pieces in place of the diffusion ones: the pairs (:func:`.pairs.read_pairs`, tokenised by :class:`.pairs.PairCollator`)
and :class:`LMObjective`, whose ``log_likelihoods`` are the completion log-probabilities of
:class:`.model.CausalLMPolicy` under the policy and the reference. Every loss of ``losses.LOSSES`` trains it;
Sem-DPO is any loss with the per-pair weight ``exp(-alpha (1 - similarity))`` (``prompt_opt.alpha``) computed
from the pair file's ``similarity`` column when it is read, handed to the loss as ``weight=``. The losses that take
soft labels (smpo, sppo) get SmPO's ``p = sigmoid(r'_chosen - r'_rejected)`` from the pair file's ``score_chosen`` /
``score_rejected`` (:meth:`.pairs.PairSet.soft_labels`, the formula of :mod:`diffusion_pref.soft_labels`; settings
``loss.soft_label_winner`` / ``soft_label_range``; ``data.soft_labels=label``: p = 1), written to the run folder.

    from diffusion_pref.config import load_config
    from diffusion_pref.prompt_opt.train import LMTrainer
    cfg = load_config(None, ["prompt_opt.pairs=out/pairs", "prompt_opt.alpha=1", "output.dir=out/sem_dpo"])
    LMTrainer(cfg).train()   # out/sem_dpo: the LoRA adapter (peft) + tokenizer, train_summary.json, metrics.jsonl
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["LMObjective", "LMPairSource", "LMTrainer", "load_policy", "sft_model_dir", "train_with_warm_start"]


def policy_location(pretrained: str) -> str:
    """A registered short name (``toy``: the shipped shapes-world rewriter) -> its folder; anything else as given."""
    from diffusion_pref.prompt_opt import NAMED_POLICIES

    return str(NAMED_POLICIES[pretrained]) if pretrained in NAMED_POLICIES else pretrained


def load_policy(cfg, *, device: str = "cpu", train: bool = True, adapter: str | None = None):
    """The :class:`~.model.CausalLMPolicy` of ``prompt_opt.policy`` with ``model.finetune`` (LoRA: a new adapter
    with ``model.lora_rank`` / ``lora_alpha``, or ``adapter`` continued); ``train=False``: sampling only."""
    from diffusion_pref.prompt_opt.model import CausalLMPolicy, LoraSettings

    po, model = cfg.prompt_opt, cfg.model
    pretrained = policy_location(po.policy)
    if adapter is not None:  # an adapter trained after an SFT warm start sits on the SFT'd model, not on po.policy
        warm = warm_start_of(adapter)
        if warm and warm.get("from") == po.policy:
            logger.info("%s was trained after an SFT warm start: loading it on %s", adapter, warm["model"])
            pretrained = warm["model"]
    lora = None
    if train and adapter is None and model.finetune == "lora":
        lora = LoraSettings(rank=model.lora_rank,
                            alpha=float(model.lora_alpha if model.lora_alpha is not None else model.lora_rank))
    return CausalLMPolicy.load(pretrained, lora=lora, adapter=adapter, device=device,
                               average=po.average, with_reference=train)


def warm_start_of(folder) -> dict | None:
    """The ``warm_start`` entry of a trained folder's ``train_summary.json`` (``from``: the policy the SFT started
    from, ``model``: the SFT'd model its adapter sits on), or None."""
    import json

    summary = Path(folder) / "train_summary.json"
    return json.loads(summary.read_text()).get("warm_start") if summary.is_file() else None


class LMPairSource:
    """A checked :class:`~.pairs.PairSet` in the loop's data protocol: ``len``, ``order(epoch)`` (a permutation
    from ``derive_rng(seed, epoch)``, so a resumed run continues it), ``summary()``, and ``make_batch(items)``."""

    def __init__(self, pairs, collator, seed: int):
        self.pairs, self.collator, self.seed = pairs, collator, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def order(self, epoch: int) -> list:
        from diffusion_pref.seeding import derive_rng

        return [int(i) for i in derive_rng(self.seed, epoch).permutation(len(self.pairs))]

    def summary(self) -> str:
        skipped = sum(self.pairs.skipped.values())
        weighted = "weighted" if self.pairs.has_weight else "unweighted"
        return f"{len(self.pairs)} {weighted} pairs from {self.pairs.source}" + (f", {skipped} skipped" if skipped else "")

    def make_batch(self, items) -> dict:
        import torch

        batch = self.collator([self.pairs[i] for i in items])
        batch.update(size=len(items), skipped=0, rows=torch.tensor(list(items), dtype=torch.long))
        return batch


class LMObjective:
    """Completion log-probabilities of the chosen and rejected rewrites under the policy (gradient) and the
    reference (the LoRA adapter off, or the frozen copy; None for reference-free losses)."""

    metric = "nll"

    def __init__(self, policy, module, accelerator, reference: bool, alpha: float = 0.0):
        self.policy, self.module, self.accelerator, self.reference = policy, module, accelerator, reference
        self.alpha = alpha
        self.extra: dict = {}  # more train_summary.json entries (warm_start)

    def log_likelihoods(self, batch, generator):
        ref_w = ref_l = None
        with self.accelerator.autocast():
            if self.reference:
                ref_w, ref_l = self.policy.log_likelihoods(batch, reference=True, model=self.module)
            policy_w, policy_l = self.policy.log_likelihoods(batch, model=self.module)
        return policy_w, policy_l, ref_w, ref_l

    def summary(self) -> dict:
        return {"output": "lora" if self.policy.is_lora else "full", "policy": self.policy.name, "alpha": self.alpha,
                **self.extra}

    def save(self, out, save_outputs: bool = True) -> None:
        full_state = None
        if save_outputs and not self.policy.is_lora:
            full_state = self.accelerator.get_state_dict(self.module)
        if self.accelerator.is_main_process and save_outputs:
            if self.policy.is_lora:
                self.policy.save_lora(out)
            else:
                self.policy.save_full(out, full_state)


class LMTrainer:
    """A prompt-opt training run: ``LMTrainer(cfg).train()``. The attributes are the ones the loop reads from a
    diffusion :class:`~diffusion_pref.training.setup.Trainer`."""

    def __init__(self, cfg, pairs_path: str | None = None):
        from accelerate.utils import set_seed

        from diffusion_pref.config import ConfigError, resolve_runtime, validate
        from diffusion_pref.losses import (
            LOSS_STATE,
            LOSSES,
            REFERENCE_FREE,
            TAKES_SOFT_LABEL,
            check_loss_params,
        )
        from diffusion_pref.prompt_opt.pairs import PairCollator, read_pairs
        from diffusion_pref.training.accel import StepAccel
        from diffusion_pref.training.checkpoint import Checkpointer
        from diffusion_pref.training.setup import (
            check_run,
            make_accelerator,
            make_lr_scheduler,
            make_optimizer,
        )

        self.cfg = cfg
        validate(cfg, loss=True)
        t, po = cfg.train, cfg.prompt_opt
        if cfg.loss.name in TAKES_SOFT_LABEL and cfg.loss.soft_label_scores == "reward_model":
            raise ConfigError("loss.soft_label_scores=reward_model: prompt-opt train takes P(chosen preferred) from the "
                              "pair file's score_chosen / score_rejected; use auto or dataset")
        if t.validate_every and t.validation_prompts:
            raise ConfigError("train.validate_every renders validation images: prompt-opt train has none; set it to 0")
        resolve_runtime(cfg.runtime)
        self.reference = "none" if cfg.loss.name in REFERENCE_FREE else (
            "adapter" if cfg.model.finetune == "lora" else "copy")
        check_run(cfg, self.reference)
        self.out = out = Path(cfg.output.dir)
        self.accelerator = accelerator = make_accelerator(t, cfg.runtime, out)
        logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")
        set_seed(cfg.runtime.seed)  # the LoRA's initial weights
        self.loss_fn = LOSSES[cfg.loss.name]
        self.loss_params = check_loss_params(cfg.loss.name, dict(cfg.loss.params))
        self.beta = po.beta
        self.takes_soft = cfg.loss.name in TAKES_SOFT_LABEL
        self.soft_labels = self.soft_label_summary = None
        self.loss_state = LOSS_STATE[cfg.loss.name]() if cfg.loss.name in LOSS_STATE else None
        self.checkpointer = Checkpointer(accelerator, out, keep=t.keep_checkpoints, config=cfg)
        resume_from = self.checkpointer.find(t.resume)
        if resume_from is not None:
            self.checkpointer.check_config(resume_from, force=t.resume_force)

        self.device = accelerator.device
        self.policy = policy = load_policy(cfg, device=str(self.device), adapter=po.adapter)
        collator = PairCollator.for_policy(policy)
        path = pairs_path or po.pairs or str(out / "pairs")
        pairs = read_pairs(path, tokenizer=policy.tokenizer, max_length=policy.context_length,
                           chat_template=policy.chat_template, prompt_template=policy.prompt_template,
                           on_bad_row=cfg.data.on_bad_row, semantic_alpha=po.alpha if po.alpha > 0 else None)
        self.source = LMPairSource(pairs, collator, cfg.runtime.seed)
        if self.takes_soft:  # SmPO's p from the pair file's scores (data.soft_labels=label: p = 1)
            from diffusion_pref.soft_labels import soft_label_summary

            loss = cfg.loss
            try:
                self.soft_labels = pairs.soft_labels(winner=loss.soft_label_winner, score_range=loss.soft_label_range,
                                                     hard=cfg.data.soft_labels == "label")
            except ValueError as err:
                raise ConfigError(f"loss.name={loss.name}: {err}") from None
            self.soft_label_summary = soft_label_summary(None, self.soft_labels)
            if accelerator.is_main_process:
                self.soft_labels.save(out, extra_meta={"pairs_file": pairs.source})
        self.make_batch, self.num_workers = self.source.make_batch, 0
        self.accel = StepAccel(self.device)
        self.trainable = policy.trainable_parameters()
        optimizer = make_optimizer(t, self.trainable)
        lr_scheduler = make_lr_scheduler(t, optimizer, accelerator.num_processes)
        self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(policy.module, optimizer, lr_scheduler)
        if policy.is_lora:
            self.checkpointer.register_trainable_only(self.unet)
        self.objective = LMObjective(policy, self.unet, accelerator, reference=self.reference != "none",
                                      alpha=po.alpha)
        warm = warm_start_of(po.adapter) if po.adapter is not None else None
        if warm:  # continuing an adapter that sits on an SFT'd model: so does this run's
            self.objective.extra["warm_start"] = warm

        self.step, self.epoch, self.next_index, self.skipped_total = 0, 0, 0, 0
        if resume_from is not None:
            state = self.checkpointer.load(resume_from)
            self.step, self.epoch, self.next_index = int(state["step"]), int(state["epoch"]), int(state["next_index"])
            if self.loss_state is not None and state.get("loss_state"):
                self.loss_state.load_state_dict(state["loss_state"])
            logger.info("resumed from %s at step %d", resume_from, self.step)

    def checkpoint_state(self, epoch: int, next_index: int, skipped_rows: int) -> dict:
        return {"epoch": epoch, "next_index": next_index, "skipped_rows": skipped_rows,
                "loss_state": self.loss_state.state_dict() if self.loss_state is not None else None}

    def validate(self, step: int):  # never called: LMTrainer refuses train.validate_every
        raise RuntimeError("prompt-opt train has no validation images")

    def train(self, save_outputs: bool = True) -> dict:
        from diffusion_pref.training.loop import train

        return train(self, save_outputs=save_outputs)


def sft_model_dir(out) -> Path:
    """The SFT warm start's model (a complete ``AutoModelForCausalLM`` folder, a LoRA merged in) of a run in ``out``."""
    return Path(out) / "sft" / "model"


def train_with_warm_start(cfg, pairs_path: str | None = None) -> dict:
    """``prompt-opt train``: with ``prompt_opt.sft_steps`` > 0 first that many steps of loss ``sft`` on (prompt,
    chosen) through the same loop into ``<output.dir>/sft`` (its merged model in ``sft/model``), then the
    preference loss (``loss.name``, ``train.max_steps``) starting from that model, which is also the reference
    (the adapter disabled, or the frozen copy), as in DPO practice. A finished warm start is kept when the run is
    started again (``train.resume`` resumes either stage). The run's ``train_summary.json`` names the SFT'd model
    under ``warm_start``, and :func:`load_policy` loads the adapter on it."""
    import copy
    import shutil

    po = cfg.prompt_opt
    if po.sft_steps == 0:
        return LMTrainer(cfg, pairs_path=pairs_path).train()
    out = Path(cfg.output.dir)
    pairs_path = pairs_path or po.pairs or str(out / "pairs")
    model_dir = sft_model_dir(out)
    if not (model_dir / "config.json").is_file():
        sft_cfg = copy.deepcopy(cfg)
        sft_cfg.loss.name, sft_cfg.loss.params = "sft", {}
        sft_cfg.train.max_steps, sft_cfg.prompt_opt.alpha, sft_cfg.prompt_opt.sft_steps = po.sft_steps, 0.0, 0
        sft_cfg.output.dir, sft_cfg.prompt_opt.mode = str(out / "sft"), "train"
        trainer = LMTrainer(sft_cfg, pairs_path=pairs_path)
        trainer.train()
        if trainer.accelerator.is_main_process:
            partial = model_dir.with_name(model_dir.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            trainer.policy.save_full(partial)
            partial.rename(model_dir)  # complete or absent
        trainer.accelerator.wait_for_everyone()
        del trainer
    else:
        logger.info("SFT warm start: %s is there already; training the preference loss from it", model_dir)
    pref_cfg = copy.deepcopy(cfg)
    pref_cfg.prompt_opt.policy, pref_cfg.prompt_opt.adapter = str(model_dir), None
    pref_cfg.prompt_opt.mode = "train"  # a stage of train / iterate / quickstart; the policy is a folder now
    trainer = LMTrainer(pref_cfg, pairs_path=pairs_path)
    trainer.objective.extra["warm_start"] = {"from": po.policy, "model": str(model_dir), "steps": po.sft_steps}
    return trainer.train()
