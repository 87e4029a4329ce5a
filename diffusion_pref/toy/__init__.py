"""The shapes world: a tiny text-to-image world with known ground truth, plugged into the core from outside.

Importing this package (``diffusion_pref.plugins`` does, when a registry is first imported) registers:

- prompt sets ``toy`` (held-out evaluation prompts) and ``toy-train`` (the pretraining captions), with the shape
  as category: ``read_prompts("toy")``;
- reward models ``toy-fidelity`` and ``toy-size`` (:mod:`diffusion_pref.toy.rewards`): ``reward.models.toy-fidelity``;
- ``model.pretrained=toy``: the shipped model in :data:`WEIGHTS` (built by :mod:`diffusion_pref.toy.pretrain`).

Only light modules are imported here; the renderer and the rewards load when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from diffusion_pref.pipelines import register_named_model
from diffusion_pref.prompt_opt import register_named_policy
from diffusion_pref.prompts import PromptRecord, register_prompt_set
from diffusion_pref.reward_models import register_reward_model

WEIGHTS = Path(__file__).resolve().parent / "weights"


def _records(captions: Sequence[str]) -> List[PromptRecord]:
    from diffusion_pref.toy.render import parse_caption

    return [PromptRecord(text, parse_caption(text)[1]) for text in captions]


def eval_prompt_records() -> List[PromptRecord]:
    """The held-out prompts (``read_prompts("toy")``)."""
    from diffusion_pref.toy.render import eval_prompts

    return _records(eval_prompts())


def train_prompt_records() -> List[PromptRecord]:
    """The pretraining captions (``read_prompts("toy-train")``)."""
    from diffusion_pref.toy.render import train_captions

    return _records(train_captions())


register_prompt_set("toy", eval_prompt_records)
register_prompt_set("toy-train", train_prompt_records)
register_reward_model("toy-fidelity", "diffusion_pref.toy.rewards:ToyFidelity")
register_reward_model("toy-size", "diffusion_pref.toy.rewards:ToySize")
register_named_model("toy", WEIGHTS, "build them with `python -m diffusion_pref.toy.pretrain`")
# the prompt optimizer's starting policy (diffusion_pref.toy.rewriter.WEIGHTS; `python -m diffusion_pref.toy.rewriter`)
register_named_policy("toy", Path(__file__).resolve().parent / "rewriter_weights")

__all__ = ["WEIGHTS", "eval_prompt_records", "train_prompt_records"]
