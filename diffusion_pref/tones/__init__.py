"""The tones world: a tiny text-to-audio world with known ground truth (the audio twin of the shapes world).

Importing this package (``diffusion_pref.plugins`` does, when a registry is first imported) registers:

- prompt sets ``tones`` (held-out evaluation captions) and ``tones-train`` (the pretraining captions), with the
  first sound as category: ``read_prompts("tones")``;
- the reward model ``tones-fidelity`` (:mod:`diffusion_pref.tones.rewards`): ``reward.models.tones-fidelity``;
- ``model.pretrained=tones``: the shipped Tango-structured model in :data:`WEIGHTS` (built by
  :mod:`diffusion_pref.tones.pretrain`), loaded by the Tango backbone.

Modules: ``render`` (clips and captions), ``audio`` (settings on the Tango front end), ``rewards``, ``vocoder``
(Griffin-Lim, no weights), ``model`` (build/save/load/sample), ``pretrain``. Only light modules load here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffusion_pref.pipelines import register_named_model, register_vocoder
from diffusion_pref.prompts import PromptRecord, register_prompt_set
from diffusion_pref.reward_models import register_reward_model

WEIGHTS = Path(__file__).resolve().parent / "weights"


def _records(captions: Sequence[str]) -> list[PromptRecord]:
    from diffusion_pref.tones.render import category

    return [PromptRecord(text, category(text)) for text in captions]


def eval_prompt_records() -> list[PromptRecord]:
    """The held-out captions (``read_prompts("tones")``)."""
    from diffusion_pref.tones.render import eval_prompts

    return _records(eval_prompts())


def train_prompt_records() -> list[PromptRecord]:
    """The pretraining captions (``read_prompts("tones-train")``)."""
    from diffusion_pref.tones.render import train_captions

    return _records(train_captions())


register_prompt_set("tones", eval_prompt_records)
register_prompt_set("tones-train", train_prompt_records)
register_reward_model("tones-fidelity", "diffusion_pref.tones.rewards:TonesFidelity")
register_vocoder("GriffinLimVocoder", "diffusion_pref.tones.vocoder:GriffinLimVocoder")  # vocoder.CLASS_NAME
register_named_model("tones", WEIGHTS, "build them with `python -m diffusion_pref.tones.pretrain --out DIR` and copy "
                     "DIR/final there")

__all__ = ["WEIGHTS", "eval_prompt_records", "train_prompt_records"]
