"""PickScore v1 (Kirstain et al. 2023): a CLIP-H/14 fine-tuned on Pick-a-Pic preferences.

Score = `logit_scale.exp() * cos(text_emb, image_emb)`, with `logit_scale` read from the checkpoint. The
softmax of the scores of one prompt's candidates is the model's preference probability (`probabilities`).

Matches the official `PickScore` README code: a transformers `CLIPModel` from `yuvalkirstain/PickScore_v1`, the
processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` with the PIL ("slow") image processor (shortest side to
224 bicubic, centre crop 224, OpenAI mean/std), text padded to the longest prompt and truncated at 77 tokens,
run in fp32.

Example:

    from diffusion_pref.reward_models import load_reward_model
    pick = load_reward_model("pickscore")                 # or pretrained="/models/PickScore_v1"
    scores = pick.score(["a corgi"] * 2, [img_a, img_b])  # [2]
    probs = pick.probabilities("a corgi", [img_a, img_b]) # [2], sums to 1
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .base import default_device, load_hf_clip, score_clip_batches

if TYPE_CHECKING:
    import torch

OFFICIAL_MODEL = "yuvalkirstain/PickScore_v1"
OFFICIAL_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore:
    name = "pickscore"
    scale = "logit_scale * cosine(text, image); logit_scale from the checkpoint (~100 for CLIP), so roughly 15-25"

    def __init__(
        self,
        pretrained: str = OFFICIAL_MODEL,
        processor: str | None = None,
        device: Any = None,
        batch_size: int = 16,
    ):
        """`pretrained`: hub id or a local `CLIPModel` folder (save_pretrained layout).

        `processor`: where the tokenizer and image processor come from. Default: the official LAION
        processor, or `pretrained` itself when it is a local folder that holds a `preprocessor_config.json`
        (a PickScore_v1 snapshot ships one; offline use needs it).
        """
        if processor is None:
            local = os.path.isdir(pretrained) and os.path.isfile(os.path.join(pretrained, "preprocessor_config.json"))
            processor = pretrained if local else OFFICIAL_PROCESSOR
        self.device = default_device(device)
        self.batch_size = batch_size
        self.model, self.tokenizer, self.image_processor = load_hf_clip(pretrained, processor, self.device)

    def score(self, prompts: Sequence[str], media: Any) -> "torch.Tensor":
        import torch

        with torch.no_grad():
            logit_scale = self.model.logit_scale.exp().float()

        def combine(text_emb, image_emb):
            text_emb = torch.nn.functional.normalize(text_emb, dim=-1)
            image_emb = torch.nn.functional.normalize(image_emb, dim=-1)
            return logit_scale * (text_emb * image_emb).sum(-1)

        return score_clip_batches(self, prompts, media, combine)

    def probabilities(self, prompt: str, images: Any) -> "torch.Tensor":
        """P(each candidate is preferred) for one prompt: softmax of its candidates' scores, [n]."""
        import torch

        n = len(images)
        return torch.softmax(self.score([prompt] * n, images), dim=0)
