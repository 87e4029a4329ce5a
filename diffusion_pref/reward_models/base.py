"""The reward-model protocol, the media conversion the image scorers share, and weighted combinations.

A scorer is any object with

    name: str                      # registry name, e.g. "pickscore"
    scale: str                     # human-readable range/units of its scores
    score(prompts, media) -> Tensor  # float32 [n] on CPU, higher is better

`media` is, for images, a list of `PIL.Image.Image` or a float tensor `[n, 3, H, W]` with values in [0, 1];
for audio, a list of 1-D float arrays/tensors plus a `sample_rate=` keyword.

Example:

    from diffusion_pref.reward_models import load_reward
    reward = load_reward({"pickscore": 1.0, "clip": 0.5})
    total = reward.score(["a red cube"] * 2, images)          # [2]
    parts = reward.score_components(["a red cube"] * 2, images)  # {"pickscore": [2], "clip": [2]}
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # heavy imports stay out of CLI start-up
    import torch
    from PIL import Image

# The OpenAI CLIP normalisation constants used by every official image scorer here.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class RewardModel(Protocol):
    name: str
    scale: str

    def score(self, prompts: Sequence[str], media: Any) -> "torch.Tensor": ...


def default_device(device: "str | torch.device | None") -> "torch.device":
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_prompts(prompts: Sequence[str], n_media: int, scorer: str) -> list[str]:
    """One prompt per media item; a bare string is a common mistake, so it gets its own message."""
    if isinstance(prompts, str):
        raise TypeError(f"{scorer}.score: `prompts` must be a list of strings, one per item, not a single string")
    prompts = list(prompts)
    if len(prompts) != n_media:
        raise ValueError(
            f"{scorer}.score: got {len(prompts)} prompts for {n_media} media items; pass one prompt per item "
            "(repeat the prompt for several candidates of the same prompt)"
        )
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{scorer}.score: prompts[{i}] is {type(p).__name__}, expected str")
    return prompts


def _check_image_tensor(media: "torch.Tensor", scorer: str) -> None:
    import torch

    if media.ndim != 4 or media.shape[1] != 3:
        raise ValueError(f"{scorer}: image tensor must have shape [n, 3, H, W], got {list(media.shape)}")
    if not torch.is_floating_point(media):
        raise TypeError(f"{scorer}: image tensor must be float in [0, 1], got dtype {media.dtype}; divide uint8 by 255")
    if media.numel():
        lo, hi = float(media.min()), float(media.max())
        # Small tolerance: VAE decodes overshoot by rounding error.
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"{scorer}: image tensor values must be in [0, 1], got min {lo:.3f} max {hi:.3f}; "
                "if your images are in [-1, 1] pass (x + 1) / 2"
            )


def num_media(media: Any) -> int:
    """Number of items in `media` (a list, or a tensor's first dimension)."""
    return len(media)


def images_to_pil(media: Any, scorer: str) -> list["Image.Image"]:
    """RGB PIL images, for scorers whose official preprocessing starts from PIL.

    Float tensors are quantised with round(x * 255) (diffusers' `numpy_to_pil` convention), so a tensor that
    came from a PIL image round-trips exactly. Non-RGB images are converted with `.convert("RGB")`, as the
    official scorers do (alpha is dropped, not composited).
    """
    import torch
    from PIL import Image

    if isinstance(media, torch.Tensor):
        _check_image_tensor(media, scorer)
        arr = (media.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
    out = []
    for i, im in enumerate(media):
        if not isinstance(im, Image.Image):
            raise TypeError(
                f"{scorer}: media[{i}] is {type(im).__name__}; pass a list of PIL images or a float tensor [n, 3, H, W]"
            )
        out.append(im if im.mode == "RGB" else im.convert("RGB"))
    return out


def images_to_tensors(media: Any, scorer: str) -> list["torch.Tensor"]:
    """Float [3, H, W] tensors in [0, 1], for scorers whose official preprocessing runs on tensors (HPS).

    PIL images go through the same path as torchvision's ToTensor (uint8 / 255); tensors are used as given,
    so float images from a decoder are not quantised.
    """
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(media, torch.Tensor):
        _check_image_tensor(media, scorer)
        return [m.detach().float() for m in media]
    out = []
    for i, im in enumerate(media):
        if not isinstance(im, Image.Image):
            raise TypeError(
                f"{scorer}: media[{i}] is {type(im).__name__}; pass a list of PIL images or a float tensor [n, 3, H, W]"
            )
        arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255))
    return out


def as_features(output: Any) -> "torch.Tensor":
    """transformers < 5 returns projected features as a tensor, 5.x as a ModelOutput's `pooler_output`."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def clip_text_image_features(model, tokenizer, image_processor, prompts: Sequence[str], images: Sequence["Image.Image"],
                             device: "torch.device") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Unnormalised float32 text and image features ``([b, d], [b, d])`` of a transformers ``CLIPModel``.

    Text padded to the longest prompt and truncated at CLIP's 77 tokens; images through ``image_processor``.
    """
    text = tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
    pixels = image_processor(images=list(images), return_tensors="pt")["pixel_values"]  # [b, 3, 224, 224]
    text_emb = as_features(
        model.get_text_features(input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device))
    )
    image_emb = as_features(model.get_image_features(pixel_values=pixels.to(device)))
    return text_emb.float(), image_emb.float()


def load_hf_clip(pretrained: str, processor: str, device: "torch.device") -> tuple:
    """``(model, tokenizer, image_processor)``: a transformers ``CLIPModel`` from ``pretrained`` (float32, eval,
    on ``device``) with the tokenizer and PIL image processor of ``processor``."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(pretrained).float().to(device).eval()
    return model, AutoTokenizer.from_pretrained(processor), clip_image_processor(processor)


def score_clip_batches(scorer, prompts: Sequence[str], media: Any, combine, prefix: str = "") -> "torch.Tensor":
    """Float32 CPU scores ``[n]`` of a scorer holding a transformers CLIP (``model``, ``tokenizer``,
    ``image_processor``, ``device``, ``batch_size``, ``name``): ``combine(text_emb, image_emb) -> [b]`` per batch of
    :func:`clip_text_image_features`, without gradients; ``prefix`` goes before every prompt."""
    import torch

    images = images_to_pil(media, scorer.name)
    prompts = [prefix + p for p in check_prompts(prompts, len(images), scorer.name)]
    out = []
    with torch.no_grad():
        for sl in batch_slices(len(images), scorer.batch_size):
            text_emb, image_emb = clip_text_image_features(scorer.model, scorer.tokenizer, scorer.image_processor,
                                                           prompts[sl], images[sl], scorer.device)  # [b, d] each
            out.append(combine(text_emb, image_emb))
    return torch.cat(out).float().cpu() if out else torch.zeros(0)


def resolve_file(pretrained: str, filename: str, what: str) -> str:
    """A local file, a file `filename` inside a local folder, or `filename` from the hub repo `pretrained`."""
    if os.path.isfile(pretrained):
        return pretrained
    if os.path.isdir(pretrained):
        path = os.path.join(pretrained, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: folder {pretrained} has no {filename}; pass the checkpoint file itself")
        return path
    if pretrained.startswith(("http://", "https://")):
        import torch

        # The official file of some scorers lives on GitHub, not the hub; torch.hub caches it.
        target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(pretrained))
        if not os.path.isfile(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            torch.hub.download_url_to_file(pretrained, target)
        return target
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(pretrained, filename)
    except Exception as err:  # offline, missing repo, ...: say what was tried
        raise FileNotFoundError(
            f"{what}: {pretrained!r} is neither a local file/folder nor a reachable hub repo with {filename} ({err})"
        ) from err


def load_state_dict_file(path: str) -> dict[str, "torch.Tensor"]:
    """Tensors from a .safetensors file or a torch pickle loaded with weights_only=True.

    A top-level `state_dict` key (HPS releases) is unwrapped and a DDP `module.` prefix is stripped.
    """
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path, device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RuntimeError(
                f"could not load {path} with torch.load(weights_only=True) ({err}); only plain tensor "
                "checkpoints are accepted; convert it to safetensors"
            ) from err
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise TypeError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def batch_slices(n: int, batch_size: int) -> list[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


class WeightedReward:
    """Sum of weighted scores of several reward models; each component's raw scores stay available.

    Raw scores are summed as they are (no normalisation); the scales differ, so choose weights with
    `scale` of each component in mind (e.g. PickScore ~20, HPS cosine ~0.3).
    """

    def __init__(self, components: Mapping[str, tuple[Any, float]]):
        if not components:
            raise ValueError("WeightedReward needs at least one reward model")
        self.components = dict(components)
        self.weights = {k: float(w) for k, (_, w) in self.components.items()}
        if len(self.components) == 1 and next(iter(self.weights.values())) == 1.0:
            model = next(iter(self.components.values()))[0]
            self.name, self.scale = model.name, model.scale
        else:
            self.name = "+".join(f"{w:g}*{k}" for k, w in self.weights.items())
            self.scale = "weighted sum of: " + "; ".join(f"{k}: {m.scale}" for k, (m, _) in self.components.items())

    def score_components(self, prompts: Sequence[str], media: Any, **kwargs: Any) -> dict[str, "torch.Tensor"]:
        """Each component's raw (unweighted) scores, float32 [n]."""
        return {k: m.score(prompts, media, **kwargs) for k, (m, _) in self.components.items()}

    def combine(self, components: Mapping[str, "torch.Tensor"]) -> "torch.Tensor":
        total = None
        for k, s in components.items():
            term = self.weights[k] * s
            total = term if total is None else total + term
        return total.float()

    def score(self, prompts: Sequence[str], media: Any, **kwargs: Any) -> "torch.Tensor":
        return self.combine(self.score_components(prompts, media, **kwargs))


def clip_image_processor(path: str):
    """The PIL-backed ("slow") CLIP image processor, as the official scorers used it (transformers 4.2x).

    transformers 5 defaults to a torchvision backend with documented small output differences; its PIL
    backend is `CLIPImageProcessorPil`. Before 5, `CLIPImageProcessor` is the PIL one.
    """
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls.from_pretrained(path)


def openai_clip_pixels(images: Sequence["Image.Image"], size: int = 224) -> "torch.Tensor":
    """OpenAI `clip` preprocessing, as the aesthetic predictor and ImageReward call it: torchvision
    Resize(size, bicubic) on the PIL image, CenterCrop(size), ToTensor, OpenAI mean/std -> [n, 3, size, size].

    Not the transformers processor: torchvision's centre crop rounds the offset (round((h - size) / 2)), the
    processor floors it, a one-pixel shift for odd margins.
    """
    import torch
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )
    if not images:
        return torch.zeros(0, 3, size, size)
    return torch.stack([transform(im) for im in images])


# Linear-layer positions in `layers` -> whether a ReLU follows each hidden Linear.
_LAYOUTS = {(0, 2, 4, 6, 7): False, (0, 3, 6, 9, 11): True}


def build_rating_mlp(state: Mapping[str, "torch.Tensor"], scorer: str) -> "torch.nn.Module":
    """The `MLP` head of the LAION aesthetic predictor and ImageReward (attribute `layers`, same indices, so the
    official state_dict loads strictly): Linear -> Dropout -> ... with no activations (keys layers.0,2,4,6,7),
    or the aesthetic reluMSE variant with a ReLU after each hidden Linear (keys layers.0,3,6,9,11)."""
    from torch import nn

    weights = [k for k in state if k.startswith("layers.") and k.endswith(".weight")]
    linear_ids = tuple(sorted({int(k.split(".")[1]) for k in weights}))
    if linear_ids not in _LAYOUTS:
        raise ValueError(
            f"{scorer}: unrecognised MLP checkpoint layout, Linear layers at layers.{linear_ids}; expected "
            "layers.(0,2,4,6,7) (linearMSE) or layers.(0,3,6,9,11) (reluMSE)"
        )
    relu = _LAYOUTS[linear_ids]
    dropouts = [0.2, 0.2, 0.1]
    modules: list[nn.Module] = []
    for j, idx in enumerate(linear_ids):
        out_dim, in_dim = state[f"layers.{idx}.weight"].shape
        modules.append(nn.Linear(in_dim, out_dim))
        if j < len(linear_ids) - 1:
            if relu:
                modules.append(nn.ReLU())
            if j < len(dropouts):
                modules.append(nn.Dropout(dropouts[j]))
    mlp = nn.Module()
    mlp.layers = nn.Sequential(*modules)
    assert tuple(i for i, m in enumerate(mlp.layers) if isinstance(m, nn.Linear)) == linear_ids
    mlp.load_state_dict(dict(state), strict=True)
    return mlp.float().eval()
