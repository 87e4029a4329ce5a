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

from .base import (
    batch_slices,
    check_prompts,
    clip_image_processor,
    clip_text_image_features,
    default_device,
    images_to_pil,
)

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
        from transformers import AutoTokenizer, CLIPModel

        if convention not in CONVENTIONS:
            raise ValueError(f"clip: unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
        self.convention = convention
        self.scale = CONVENTIONS[convention]
        self.prefix = prefix
        self.device = default_device(device)
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(pretrained).float().to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        self.image_processor = clip_image_processor(pretrained)

    def cosine(self, prompts: Sequence[str], media: Any) -> "torch.Tensor":
        """Raw cosine similarity, float32 [n]."""
        import torch

        images = images_to_pil(media, self.name)
        prompts = [self.prefix + p for p in check_prompts(prompts, len(images), self.name)]
        out = []
        with torch.no_grad():
            for sl in batch_slices(len(images), self.batch_size):
                text_emb, image_emb = clip_text_image_features(
                    self.model, self.tokenizer, self.image_processor, prompts[sl], images[sl], self.device
                )
                out.append(torch.nn.functional.cosine_similarity(text_emb, image_emb, dim=-1))
        return torch.cat(out).float().cpu() if out else torch.zeros(0)

    def score(self, prompts: Sequence[str], media: Any) -> "torch.Tensor":
        cos = self.cosine(prompts, media)
        if self.convention == "torchmetrics":
            return 100.0 * cos.clamp(min=0)
        if self.convention == "clip-s":
            return 2.5 * cos.clamp(min=0)
        return cos
