"""CLIP score: text-image cosine similarity of a transformers `CLIPModel`, in one of three conventions.

- `convention="cosine"` (default): the raw cosine, in [-1, 1].
- `convention="torchmetrics"`: `100 * max(cos, 0)` per image, the torchmetrics `CLIPScore` convention with
  its default model `openai/clip-vit-large-patch14` (our default too). torchmetrics clamps the *mean* over
  images instead; the two agree whenever every cosine is positive, which is the case for real CLIP models.
  torchmetrics slices token ids past 77 (dropping the end token); here the tokenizer truncates and keeps it,
  so prompts longer than 77 tokens can score differently.
- `convention="clip-s"`: Hessel et al.'s CLIP-S, `2.5 * max(cos, 0)`; the paper also prefixes each caption with
  "A photo depicts " (pass `prefix="A photo depicts "`) and uses ViT-B/32 (`openai/clip-vit-base-patch32`).

Images go through the model's CLIP processor with the PIL backend (shortest side to 224 bicubic, centre crop,
OpenAI mean/std), as torchmetrics' `CLIPProcessor` did. Numbers from different models, conventions or
preprocessing (e.g. open_clip ViT-H-14 with the HPS letterbox, as in Diffusion-DPO) are not comparable:
record all three with every reported "CLIP score".

Example:

    from diffusion_pref.reward_models import load_reward_model
    clip = load_reward_model("clip", convention="torchmetrics")
    scores = clip.score(prompts, images)  # [n], 0-100
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .base import default_device, load_hf_clip, score_clip_batches

if TYPE_CHECKING:
    import torch

CONVENTIONS = {
    "cosine": "cosine(text, image) in [-1, 1]",
    "torchmetrics": "100 * max(cosine, 0), 0-100 (torchmetrics CLIPScore)",
    "clip-s": "2.5 * max(cosine, 0), 0-2.5 (Hessel et al. CLIP-S)",
}


class CLIPScore:
    name = "clip"
    scale = CONVENTIONS["cosine"]

    def __init__(
        self,
        pretrained: str = "openai/clip-vit-large-patch14",
        convention: str = "cosine",
        prefix: str = "",
        device: Any = None,
        batch_size: int = 16,
    ):
        if convention not in CONVENTIONS:
            raise ValueError(f"clip: unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
        self.convention = convention
        self.scale = CONVENTIONS[convention]
        self.prefix = prefix
        self.device = default_device(device)
        self.batch_size = batch_size
        self.model, self.tokenizer, self.image_processor = load_hf_clip(pretrained, pretrained, self.device)

    def cosine(self, prompts: Sequence[str], media: Any) -> "torch.Tensor":
        """Raw cosine similarity, float32 [n]."""
        import torch

        return score_clip_batches(self, prompts, media, prefix=self.prefix,
                                  combine=lambda text, image: torch.nn.functional.cosine_similarity(text, image, dim=-1))

    def score(self, prompts: Sequence[str], media: Any) -> "torch.Tensor":
        cos = self.cosine(prompts, media)
        if self.convention == "torchmetrics":
            return 100.0 * cos.clamp(min=0)
        if self.convention == "clip-s":
            return 2.5 * cos.clamp(min=0)
        return cos
