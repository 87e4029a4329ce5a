"""The shapes world: a deterministic renderer of one coloured shape on a coloured background, with captions.

Every scene is a shape (circle, square, triangle) of one palette colour on a background of another, at a
position and size drawn from a seed. The same seed always gives the same pixels, so rewards have a known
ground truth and experiments are repeatable.

Prompt sets:
- ``train_captions()``: the (colour, shape, colour) triples the shipped model was pretrained on.
- ``eval_prompts()``: held-out triples never shown in pretraining (each of their colour pairs and shapes was
  seen, only the combination is new), used to measure fidelity and alignment.

Example::

    from diffusion_pref.toy.render import Scene, render, caption, eval_prompts
    scene = Scene.from_caption("a red circle on a blue background", seed=0)
    image = render(scene)            # PIL.Image, 32x32 RGB
    caption(scene)                   # 'a red circle on a blue background'
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

# Colours are far apart in RGB so that a blurry sample is still classifiable by nearest palette colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 50),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CAPTION_TEMPLATE = "a {fg} {shape} on a {bg} background"
RESOLUTION = 32

# Shape half-size in pixels at 32x32: the shape covers roughly 8% to 40% of the image.
MIN_HALF_SIZE = 5.0
MAX_HALF_SIZE = 11.0
_SUPERSAMPLE = 4  # anti-aliasing: render 4x larger, then box-downsample

_CAPTION_RE = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


@dataclass(frozen=True)
class Scene:
    """One shape on a background; ``cx, cy, half_size`` are fractions of the image side."""

    fg: str
    shape: str
    bg: str
    cx: float
    cy: float
    half_size: float

    def __post_init__(self):
        for role, colour in (("fg", self.fg), ("bg", self.bg)):
            if colour not in PALETTE:
                raise ValueError(f"Scene.{role}={colour!r} is not a palette colour; use one of {COLOURS}")
        if self.shape not in SHAPES:
            raise ValueError(f"Scene.shape={self.shape!r} is not a known shape; use one of {SHAPES}")
        if self.fg == self.bg:
            raise ValueError(f"Scene has fg == bg == {self.fg!r}; the shape would be invisible")

    @classmethod
    def from_caption(cls, text: str, seed: int) -> "Scene":
        """The scene a caption describes, with position and size drawn from ``seed``."""
        fg, shape, bg = parse_caption(text)
        return place(fg, shape, bg, seed)


def parse_caption(text: str) -> tuple[str, str, str]:
    """``'a red circle on a blue background'`` -> ``('red', 'circle', 'blue')``; a clear error otherwise."""
    match = _CAPTION_RE.match(text.strip().lower())
    if not match or match[1] not in PALETTE or match[2] not in SHAPES or match[3] not in PALETTE:
        raise ValueError(
            f"cannot parse shapes-world caption {text!r}; expected {CAPTION_TEMPLATE!r} "
            f"with colours from {COLOURS} and shapes from {SHAPES}"
        )
    return match[1], match[2], match[3]


def caption(scene: Scene) -> str:
    return CAPTION_TEMPLATE.format(fg=scene.fg, shape=scene.shape, bg=scene.bg)


def place(fg: str, shape: str, bg: str, seed: int) -> Scene:
    """Position and size from ``seed`` (a private RNG, so global random state is untouched)."""
    rng = random.Random(f"place:{seed}")
    half = rng.uniform(MIN_HALF_SIZE, MAX_HALF_SIZE) / RESOLUTION
    # Keep the whole shape inside the image, with a 1-pixel margin, so the border is pure background.
    margin = half + 1.0 / RESOLUTION
    cx = rng.uniform(margin, 1.0 - margin)
    cy = rng.uniform(margin, 1.0 - margin)
    return Scene(fg, shape, bg, cx, cy, half)


def all_triples() -> list[tuple[str, str, str]]:
    """Every (fg, shape, bg) with fg != bg, in a fixed order."""
    return [(fg, shape, bg) for fg in COLOURS for bg in COLOURS if fg != bg for shape in SHAPES]


def _held_out_triples() -> set[tuple[str, str, str]]:
    # One shape per (fg, bg) pair for a third of the pairs (10 of 30), so every colour pair and every
    # (colour, shape) combination in each role still occurs in training: only the triple is new.
    held = set()
    pairs = [(fg, bg) for fg in COLOURS for bg in COLOURS if fg != bg]
    for index, (fg, bg) in enumerate(pairs):
        if index % 3 == 0:
            held.add((fg, SHAPES[(index // 3) % len(SHAPES)], bg))
    return held


def train_triples() -> list[tuple[str, str, str]]:
    held = _held_out_triples()
    return [t for t in all_triples() if t not in held]


def eval_triples() -> list[tuple[str, str, str]]:
    held = _held_out_triples()
    return [t for t in all_triples() if t in held]


def train_captions() -> list[str]:
    return [CAPTION_TEMPLATE.format(fg=fg, shape=s, bg=bg) for fg, s, bg in train_triples()]


def eval_prompts() -> list[str]:
    """Held-out prompts: triples never shown in pretraining."""
    return [CAPTION_TEMPLATE.format(fg=fg, shape=s, bg=bg) for fg, s, bg in eval_triples()]


def _inside(shape: str, x, y, half: float):
    """Boolean mask of points (x, y) (numpy arrays, centred coordinates in pixels) inside the shape."""
    import numpy as np

    if shape == "circle":
        return x * x + y * y <= half * half
    if shape == "square":
        side = half * 0.9  # a square of the same half-size looks much bigger than the circle
        return (np.abs(x) <= side) & (np.abs(y) <= side)
    # Upward equilateral-ish triangle inscribed in the square of side 2*half.
    top, bottom = -half, half * 0.8
    within_rows = (y >= top) & (y <= bottom)
    half_width = (y - top) / (bottom - top) * half
    return within_rows & (np.abs(x) <= half_width)


def render(scene: Scene, resolution: int = RESOLUTION):
    """The scene as a ``PIL.Image`` (RGB, ``resolution`` square). Pure function of the scene."""
    import numpy as np
    from PIL import Image

    size = resolution * _SUPERSAMPLE
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size  # pixel centres in [0, 1]
    y, x = np.meshgrid(coords, coords, indexing="ij")
    mask = _inside(scene.shape, (x - scene.cx) * size, (y - scene.cy) * size, scene.half_size * size)
    fg = np.asarray(PALETTE[scene.fg], dtype=np.float64)
    bg = np.asarray(PALETTE[scene.bg], dtype=np.float64)
    big = np.where(mask[..., None], fg, bg)  # [size, size, 3]
    small = big.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.round(small).astype(np.uint8), mode="RGB")


def sample_scene(rng: random.Random, triples: Sequence[tuple[str, str, str]] | None = None) -> Scene:
    """A random scene from ``triples`` (default: the training triples), placed by a seed drawn from ``rng``."""
    triples = train_triples() if triples is None else triples
    fg, shape, bg = triples[rng.randrange(len(triples))]
    return place(fg, shape, bg, rng.randrange(2**31))


def render_batch(prompts: Sequence[str], seeds: Sequence[int], resolution: int = RESOLUTION):
    """Ground-truth renders of ``prompts`` at ``seeds`` as a float tensor ``[n, 3, H, W]`` in [0, 1]."""
    import numpy as np
    import torch

    if len(prompts) != len(seeds):
        raise ValueError(f"render_batch got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    arrays = [np.asarray(render(Scene.from_caption(p, s), resolution)) for p, s in zip(prompts, seeds)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
