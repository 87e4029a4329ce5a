"""Programmatic rewards for the shapes world (`diffusion_pref.toy`): known ground truth, no weights to download.

- ``ToyFidelity`` ("toy-fidelity"): do the shape colour and the background colour match the caption?
- ``ToySize`` ("toy-size"): how much of the image the shape covers (a preference unrelated to the prompt, for
  multi-reward and prompt-optimizer experiments).

Both read pixel statistics that survive the blur of a tiny VAE: the background colour is the median of the
image border, shape pixels are those far from it, and colours are classified against the palette by distance.

Example::

    from diffusion_pref.toy.rewards import ToyFidelity
    from diffusion_pref.toy.render import render_batch
    images = render_batch(["a red circle on a blue background"], [0])   # [1, 3, 32, 32] in [0, 1]
    ToyFidelity().score(["a red circle on a blue background"], images)  # tensor([~1.0])
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from diffusion_pref.reward_models.base import check_prompts, images_to_tensors, num_media
from diffusion_pref.toy.render import COLOURS, PALETTE, SHAPES

# A pixel belongs to the shape when it is this far (Euclidean, RGB in [0, 1]) from the background colour.
# The closest palette pair (green/black) is ~0.6 apart, so 0.3 splits them while ignoring blur and noise.
SHAPE_DISTANCE = 0.3
# Fewer shape pixels than this fraction of the image means "no shape drawn".
MIN_SHAPE_FRACTION = 0.01
# Softmax temperature over negative squared colour distances: a colour 0.1 off its palette entry still
# classifies with probability ~1, a colour halfway between two palette entries gets ~0.5.
COLOUR_TEMPERATURE = 0.02

_COLOUR_ALT = "|".join(COLOURS)
_FG_RE = re.compile(rf"\b({_COLOUR_ALT})\s+({'|'.join(SHAPES)})\b")
_BG_RE = re.compile(rf"\b({_COLOUR_ALT})\s+background\b")


def parse_colours(prompt: str) -> tuple[str, str]:
    """The (shape colour, background colour) a prompt asks for, e.g. 'a red circle on a blue background'."""
    text = prompt.lower()
    fg, bg = _FG_RE.search(text), _BG_RE.search(text)
    if fg is None or bg is None:
        raise ValueError(
            f"toy-fidelity: cannot find the colours in prompt {prompt!r}; it needs '<colour> <shape>' and "
            f"'<colour> background' with colours from {COLOURS} and shapes from {SHAPES}, "
            "e.g. 'a red circle on a blue background'"
        )
    return fg[1], bg[1]


def segment(image: "Any") -> tuple["Any", "Any", "Any"]:
    """Split one image ``[3, H, W]`` in [0, 1] into background colour ``[3]``, shape mask ``[H, W]`` and
    shape colour ``[3]`` (None when no shape is visible)."""
    import torch

    border = torch.cat([image[:, 0, :], image[:, -1, :], image[:, 1:-1, 0], image[:, 1:-1, -1]], dim=1)  # [3, P]
    bg_rgb = border.median(dim=1).values  # [3]
    distance = (image - bg_rgb[:, None, None]).norm(dim=0)  # [H, W]
    mask = distance > SHAPE_DISTANCE
    if mask.float().mean() < MIN_SHAPE_FRACTION:
        return bg_rgb, mask, None
    fg_rgb = image[:, mask].median(dim=1).values  # [3]
    return bg_rgb, mask, fg_rgb


def colour_probabilities(rgb: "Any") -> dict[str, float]:
    """Soft nearest-palette-colour classification of one colour ``[3]`` in [0, 1]."""
    import torch

    palette = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32) / 255.0  # [K, 3]
    logits = -((palette - rgb[None].float()) ** 2).sum(dim=1) / COLOUR_TEMPERATURE  # [K]
    probs = logits.softmax(dim=0)
    return {c: float(p) for c, p in zip(COLOURS, probs)}


class ToyFidelity:
    """Shapes-world prompt fidelity: 0.5 x P(shape colour right) + 0.5 x P(background colour right)."""

    name = "toy-fidelity"
    scale = "[0, 1]; 0.5 per colour matched (shape, background), soft near palette boundaries; 1 = both right"
    # A known maximum lets evaluate count errors fixed and regressions; a wrong colour costs about 0.5, so a
    # sample within 0.25 of 1 has both colours right.
    max_score = 1.0
    max_tolerance = 0.25

    def __init__(self, device: Any = None, batch_size: Any = None):
        # Pixel statistics run on the CPU; device/batch_size are accepted so registry-wide kwargs work.
        del device, batch_size

    def score(self, prompts: Sequence[str], media: Any) -> "Any":
        import torch

        prompts = check_prompts(prompts, num_media(media), self.name)
        wanted = [parse_colours(p) for p in prompts]
        scores = []
        with torch.no_grad():
            for (fg, bg), image in zip(wanted, images_to_tensors(media, self.name)):
                bg_rgb, _, fg_rgb = segment(image)
                bg_right = colour_probabilities(bg_rgb)[bg]
                fg_right = 0.0 if fg_rgb is None else colour_probabilities(fg_rgb)[fg]
                scores.append(0.5 * fg_right + 0.5 * bg_right)
        return torch.tensor(scores, dtype=torch.float32)


class ToySize:
    """Shapes-world size preference: the fraction of the image the shape covers (bigger is better)."""

    name = "toy-size"
    scale = "[0, 1]; fraction of pixels that differ from the border colour; ground-truth shapes cover ~0.08-0.4"

    def __init__(self, device: Any = None, batch_size: Any = None):
        del device, batch_size

    def score(self, prompts: Sequence[str], media: Any) -> "Any":
        import torch

        check_prompts(prompts, num_media(media), self.name)
        with torch.no_grad():
            fractions = [float(segment(image)[1].float().mean()) for image in images_to_tensors(media, self.name)]
        return torch.tensor(fractions, dtype=torch.float32)
