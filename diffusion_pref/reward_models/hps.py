"""HPS v2 / v2.1 (Human Preference Score, Wu et al. 2023) on stock open_clip, without the `hpsv2` package.

The model is open_clip `ViT-H-14` with the HPS weights (`xswu/HPSv2`: `HPS_v2_compressed.pt`,
`HPS_v2.1_compressed.pt`; a `state_dict` key holding fp16 tensors, loaded strictly into the fp32 model with
`torch.load(weights_only=True)`). The score is the raw cosine of the L2-normalised image and text embeddings,
as `hpsv2.score()` returns it (~0.25-0.35); the HPD benchmark reports 100 x that (`report_scale`).

Preprocessing is the official letterbox, done on tensors as the vendored open_clip does: RGB -> [0, 1] tensor ->
bicubic resize of the *tensor* so the longest side is 224 (new size = round(side * 224 / longest)) -> zero-pad
to 224 x 224 (left/top get floor(pad / 2)) -> OpenAI mean/std (so the padding becomes -mean/std).

Antialiasing: torchvision's tensor resize antialiased only from 0.17 on; HPS dates from 2023 (torchvision
<= 0.16), whose default for tensors was no antialiasing. `antialias=False` is therefore the default here,
pinned explicitly so results do not depend on the installed torchvision. Pass `antialias=True` to match
hpsv2 run on torchvision >= 0.17. Two deliberate deviations: the official transform skips padding when the
longest side is already 224 (then a non-square image crashes the model); here such images are padded. And the
forward pass runs in fp32 by default; the official `score()` runs under CUDA autocast fp16 (`amp=True` does the
same on a CUDA device), which moves the 3rd-4th decimal.

Example:

    from diffusion_pref.reward_models import load_reward_model
    hps = load_reward_model("hpsv21")                          # downloads HPS_v2.1_compressed.pt
    hps = load_reward_model("hpsv21", pretrained="/ckpt/HPS_v2.1_compressed.pt")
    cosines = hps.score(prompts, images)                       # [n], x100 for HPD-style reports
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    batch_slices,
    check_prompts,
    default_device,
    images_to_tensors,
    load_state_dict_file,
    resolve_file,
)

if TYPE_CHECKING:
    import torch

OFFICIAL_REPO = "xswu/HPSv2"
CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def hps_letterbox(image: "torch.Tensor", size: int = 224, antialias: bool = False) -> "torch.Tensor":
    """[3, H, W] in [0, 1] -> [3, size, size]: longest side to `size` (bicubic, on the tensor), zero-pad, normalise."""
    import torch
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    _, h, w = image.shape
    if (h, w) != (size, size):
        scale = size / max(h, w)
        new_h, new_w = round(h * scale), round(w * scale)
        if (new_h, new_w) != (h, w):
            image = TF.resize(image, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=antialias)
        pad_h, pad_w = size - new_h, size - new_w
        # [left, top, right, bottom], as the official F.pad call.
        image = TF.pad(image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=image.dtype).view(3, 1, 1)
    return (image - mean) / std


class HPSv2:
    name = "hpsv2"
    scale = "cosine(image, text) of the HPS-tuned CLIP, ~0.2-0.35; HPD benchmark tables report x100"
    version = "v2.0"
    report_scale = 100.0

    def __init__(
        self,
        pretrained: str = OFFICIAL_REPO,
        architecture: str | Mapping[str, Any] = "ViT-H-14",
        antialias: bool = False,
        amp: bool = False,
        device: Any = None,
        batch_size: int = 16,
    ):
        """`pretrained`: hub repo (the version's file is fetched), a local folder holding it, or the
        checkpoint file itself (.pt with a `state_dict` key, or .safetensors).

        `architecture`: an open_clip model name, or a config dict (`embed_dim`, `vision_cfg`, `text_cfg`)
        for a custom, e.g. tiny, model.
        """
        import open_clip

        self.device = default_device(device)
        if amp and self.device.type != "cuda":
            raise ValueError(f"{self.name}: amp=True reproduces the official CUDA fp16 autocast; it needs a CUDA device")
        self.amp = amp
        self.batch_size = batch_size
        self.antialias = antialias
        if isinstance(architecture, Mapping):
            cfg = dict(architecture)
            self.model = open_clip.CLIP(**cfg)
            context = cfg.get("text_cfg", {}).get("context_length", 77)
            self.tokenizer = open_clip.SimpleTokenizer(context_length=context)
        else:
            self.model = open_clip.create_model(architecture, pretrained=None)
            self.tokenizer = open_clip.get_tokenizer(architecture)
        self.image_size = self._image_size()
        path = resolve_file(pretrained, CHECKPOINTS[self.version], f"{self.name} checkpoint")
        state = load_state_dict_file(path)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            arch = architecture if isinstance(architecture, str) else "custom config"
            raise RuntimeError(
                f"{self.name}: checkpoint {path} does not match open_clip {arch}:"
                f" missing {list(missing)[:5]}..., unexpected {list(unexpected)[:5]}..."
            )
        self.model = self.model.float().to(self.device).eval()

    def _image_size(self) -> int:
        size = self.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return int(size)

    def score(self, prompts: Sequence[str], media: Any) -> "torch.Tensor":
        import torch

        images = images_to_tensors(media, self.name)
        prompts = check_prompts(prompts, len(images), self.name)
        out = []
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            for sl in batch_slices(len(images), self.batch_size):
                pixels = torch.stack([hps_letterbox(im, self.image_size, self.antialias) for im in images[sl]])
                tokens = self.tokenizer(prompts[sl])  # [b, 77]
                image_emb = self.model.encode_image(pixels.to(self.device), normalize=True)
                text_emb = self.model.encode_text(tokens.to(self.device), normalize=True)
                out.append((image_emb.float() * text_emb.float()).sum(-1))
        return torch.cat(out).float().cpu() if out else torch.zeros(0)


class HPSv21(HPSv2):
    name = "hpsv21"
    version = "v2.1"
