"""LAION aesthetic predictor v2 ("improved aesthetic predictor"): an MLP on the L2-normalised CLIP ViT-L/14
image embedding, trained to predict AVA-style ratings (~1-10). The prompt is ignored.

Matches `simple_inference.py` of christophschuhmann/improved-aesthetic-predictor: OpenAI `clip` preprocessing
(torchvision Resize 224 bicubic, CenterCrop 224, OpenAI mean/std), `encode_image`, L2 normalisation (a zero
norm is left unscaled), then the MLP in fp32. The CLIP is the transformers port `openai/clip-vit-large-patch14`
in fp32, where the official script runs OpenAI's package (fp16 on CUDA), as DDPO's port does; expect
differences in the 2nd-3rd decimal from that.

Checkpoints (state_dict of the MLP, loaded with weights_only=True):
- `sac+logos+ava1-l14-linearMSE.pth` (default, what everyone uses): keys `layers.{0,2,4,6,7}` = Linear
  768->1024 -> Dropout -> 1024->128 -> Dropout -> 128->64 -> Dropout -> 64->16 -> 16->1, no activations.
- `ava+logos-l14-reluMSE.pth`: keys `layers.{0,3,6,9,11}`, a ReLU after each of the first four Linears.
The layout is recognised from the keys. The files live in the GitHub repo, not on the hub; the default is the
raw GitHub URL, cached under torch.hub's directory.

Example:

    from diffusion_pref.reward_models import load_reward_model
    aes = load_reward_model("aesthetic", pretrained="/ckpt/sac+logos+ava1-l14-linearMSE.pth")
    ratings = aes.score(prompts, images)  # [n], ~1-10
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .base import (
    as_features,
    batch_slices,
    build_rating_mlp,
    check_prompts,
    default_device,
    images_to_pil,
    load_state_dict_file,
    openai_clip_pixels,
    resolve_file,
)

if TYPE_CHECKING:
    import torch

OFFICIAL_CHECKPOINT = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)


class LaionAesthetic:
    name = "aesthetic"
    scale = "predicted AVA aesthetic rating, ~1-10 (typical photos 4-7); ignores the prompt"

    def __init__(
        self,
        pretrained: str = OFFICIAL_CHECKPOINT,
        clip_model: str = "openai/clip-vit-large-patch14",
        device: Any = None,
        batch_size: int = 16,
    ):
        """`pretrained`: the predictor's own weights, the MLP .pth/.safetensors file (or a URL, or a folder holding
        the default file name). `clip_model`: the CLIP ViT-L/14 as a transformers hub id or local folder."""
        from transformers import CLIPModel

        self.device = default_device(device)
        self.batch_size = batch_size
        path = resolve_file(pretrained, "sac+logos+ava1-l14-linearMSE.pth", "aesthetic MLP checkpoint")
        self.mlp = build_rating_mlp(load_state_dict_file(path), self.name).to(self.device)
        self.model = CLIPModel.from_pretrained(clip_model).float().to(self.device).eval()
        in_dim = self.mlp.layers[0].in_features
        if self.model.config.projection_dim != in_dim:
            raise ValueError(
                f"aesthetic: MLP expects {in_dim}-d embeddings but {clip_model} projects to "
                f"{self.model.config.projection_dim}; the official MLPs need CLIP ViT-L/14 (768)"
            )

    def score(self, prompts: Sequence[str], media: Any) -> "torch.Tensor":
        import torch

        images = images_to_pil(media, self.name)
        check_prompts(prompts, len(images), self.name)
        out = []
        with torch.no_grad():
            for sl in batch_slices(len(images), self.batch_size):
                pixels = openai_clip_pixels(images[sl]).to(self.device)
                emb = as_features(self.model.get_image_features(pixel_values=pixels)).float()  # [b, 768]
                norm = emb.norm(dim=-1, keepdim=True)
                emb = emb / torch.where(norm == 0, torch.ones_like(norm), norm)
                out.append(self.mlp.layers(emb)[:, 0])
        return torch.cat(out).float().cpu() if out else torch.zeros(0)
