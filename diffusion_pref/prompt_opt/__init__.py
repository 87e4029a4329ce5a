"""The prompt optimizer's building blocks: a small causal LM that rewrites prompts, trained with Sem-DPO.

``diffusion-pref prompt-opt generate | train | evaluate | iterate | quickstart`` (:mod:`diffusion_pref.commands.prompt_opt`).

- :mod:`diffusion_pref.prompt_opt.logprobs`: tokenise (prompt, completion) pairs with the chat template where the
  tokenizer has one, and compute the completion's log-probability under any ``AutoModelForCausalLM`` (prompt and
  padding masked; summed or length-normalised; optional per-token weights).
- :mod:`diffusion_pref.prompt_opt.semantic`: the Sem-DPO weight ``exp(-alpha (1 - cos(e(x), e(y_w))))`` with a
  frozen embedder, computed once for a pair file and stored beside it.
- :mod:`diffusion_pref.prompt_opt.model`: :class:`~diffusion_pref.prompt_opt.model.CausalLMPolicy`, the LM as a
  policy (full or peft LoRA): ``log_likelihoods(batch, reference=...) -> (w, l)``, seeded ``sample``,
  ``save_lora`` / ``save_full``. The LM's counterpart of a diffusion backbone's denoising log-likelihood.
- :mod:`diffusion_pref.prompt_opt.pairs`: read and check pair files (parquet / JSON lines / a folder of shards;
  errors name the file and row, or ``on_bad_row="skip"`` counts), and collate rows into ``[chosen; rejected]``
  token batches.
- :mod:`diffusion_pref.prompt_opt.generate`: ``prompt-opt generate``'s pieces: sample rewrites, render them and
  the original with an image backbone, score against the original prompt, write best-vs-worst pair shards
  (resumable).
- :mod:`diffusion_pref.prompt_opt.train`: :class:`~diffusion_pref.prompt_opt.train.LMTrainer`, the LM trained
  through the shared loop (:func:`diffusion_pref.training.loop.train`) with its ``LMObjective`` (soft labels for
  smpo / sppo from the pair scores), and ``train_with_warm_start`` (the optional SFT stage first).
- :mod:`diffusion_pref.prompt_opt.evaluate`: reward of rewrites vs the original prompts, similarity, drift rate
  and win rate with bootstrap intervals on held-out prompts; :mod:`diffusion_pref.prompt_opt.report` writes its
  HTML report (examples with both images when an image backbone rendered them).
- :mod:`diffusion_pref.toy.rewriter`: the shapes world's tiny rewriter LM (shipped weights), its grammar, the
  text-side rewrite reward and the drift test.

The per-pair weight reaches every loss through ``LOSSES[name](..., weight=w)``.
"""

from pathlib import Path
from typing import Dict

# Short names for prompt_opt.policy that stand for a local causal-LM folder; plugins fill it through
# register_named_policy (the shapes world registers "toy", its rewriter).
NAMED_POLICIES: Dict[str, Path] = {}


def register_named_policy(name: str, folder) -> None:
    """Make ``prompt_opt.policy=<name>`` load the causal-LM folder ``folder``."""
    NAMED_POLICIES[name] = Path(folder)


from diffusion_pref.plugins import load_plugins  # noqa: E402  (after the registry it fills)

load_plugins()
