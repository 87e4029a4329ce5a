"""The tones world: deterministic short clips of beeps, hums, chirps, hisses and clicks, with captions.

A clip is one or two *groups* played in order, e.g. "two high beeps then a low hum". A group is a count
(a / two / three) of one sound: ``beep`` (short tone), ``hum`` (long tone), ``chirp`` (rising sweep), each ``low``
(under 1 kHz) or ``high`` (over 1.5 kHz), or ``hiss`` (noise burst) and ``click`` (a few ms of noise), which have
no pitch. Loudness (per group), exact frequencies, gaps and start time are drawn from the seed and are not in the
caption. Same caption + seed -> the same samples, bit for bit. Clips are ``DURATION`` s at 16 kHz.

Prompt sets: ``train_captions()`` (pretraining) and ``eval_prompts()`` (held out: never seen in pretraining).

Example::

    from diffusion_pref.tones.render import Clip, render, caption
    clip = Clip.from_caption("two high beeps then a low hum", seed=0)
    wave = render(clip)          # np.float32 [20480], 1.28 s at 16 kHz
    caption(clip)                # 'two high beeps then a low hum'
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffusion_pref.tones.audio import DURATION, NUM_SAMPLES, SAMPLE_RATE

TONAL = ("beep", "hum", "chirp")
NOISY = ("hiss", "click")
KINDS = TONAL + NOISY
PITCHES = ("low", "high")
COUNTS = {1: "a", 2: "two", 3: "three"}
PLURAL = {"beep": "beeps", "hum": "hums", "chirp": "chirps", "hiss": "hisses", "click": "clicks"}
# Nominal length of each sound in seconds; frequencies in Hz (chirps sweep up by the ratio).
LENGTH = {"beep": 0.08, "hum": 0.30, "chirp": 0.16, "hiss": 0.20, "click": 0.015}
LOW_HZ = (330.0, 520.0)
HIGH_HZ = (1900.0, 2800.0)
CHIRP_RATIO = 2.2
CHIRP_START = {"low": (260.0, 300.0), "high": (1500.0, 1700.0)}  # ends at 570-660 Hz / 3.3-3.7 kHz
GAP = (0.12, 0.15)  # silence between sounds of a group
GROUP_GAP = (0.18, 0.22)  # silence between groups
START = (0.03, 0.08)
LAST_END = DURATION - 0.06  # every sound ends before this
LOUDNESS = (0.3, 0.9)  # peak amplitude of a group's sounds
NOISE_FLOOR = 0.001  # background noise amplitude, so silence is not digital zero
MAX_GROUPS = 2

_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_SINGULAR = {plural: kind for kind, plural in PLURAL.items()}


@dataclass(frozen=True)
class Group:
    count: int
    kind: str
    pitch: str | None = None  # "low" | "high" for tonal kinds, None for hiss and click

    def __post_init__(self):
        if self.count not in COUNTS:
            raise ValueError(f"tones: count {self.count} is not one of {sorted(COUNTS)}")
        if self.kind not in KINDS:
            raise ValueError(f"tones: sound {self.kind!r} is not one of {KINDS}")
        if (self.kind in TONAL) != (self.pitch in PITCHES):
            need = f"a pitch from {PITCHES}" if self.kind in TONAL else "no pitch"
            raise ValueError(f"tones: a {self.kind} takes {need}, got {self.pitch!r}")

    @property
    def label(self) -> tuple:
        return (self.kind, self.pitch)

    def text(self) -> str:
        noun = self.kind if self.count == 1 else PLURAL[self.kind]
        words = [COUNTS[self.count]] + ([self.pitch] if self.pitch else []) + [noun]
        return " ".join(words)


@dataclass(frozen=True)
class Clip:
    groups: tuple
    seed: int = 0

    def __post_init__(self):
        if not 1 <= len(self.groups) <= MAX_GROUPS:
            raise ValueError(f"tones: a clip has 1 to {MAX_GROUPS} groups, got {len(self.groups)}")
        for a, b in zip(self.groups, self.groups[1:]):
            if a.label == b.label:
                raise ValueError(f"tones: '{a.text()} then {b.text()}' repeats a sound; say it with one count")
        if nominal_length(self.groups) > LAST_END - START[1]:
            raise ValueError(f"tones: {caption(self)!r} does not fit in {DURATION} s")

    @classmethod
    def from_caption(cls, text: str, seed: int = 0) -> Clip:
        return cls(parse_caption(text), seed)

    def events(self) -> list:
        """The labels ``(kind, pitch)`` of every sound, in order."""
        return [g.label for g in self.groups for _ in range(g.count)]


def nominal_length(groups: Sequence[Group]) -> float:
    """Seconds from the first sound's start to the last one's end with the longest gaps."""
    total = sum(LENGTH[g.kind] * g.count + GAP[1] * (g.count - 1) for g in groups)
    return total + GROUP_GAP[1] * (len(groups) - 1)


def caption(clip: Clip) -> str:
    return " then ".join(g.text() for g in clip.groups)


def parse_caption(text: str) -> tuple:
    """'two high beeps then a low hum' -> (Group(2, 'beep', 'high'), Group(1, 'hum', 'low')); ValueError otherwise."""
    parts = [p.strip() for p in re.split(r"\bthen\b", text.strip().lower().rstrip("."))]
    groups = []
    for part in parts:
        words = part.replace(",", " ").split()
        if words and words[-1] == "and":
            words = words[:-1]
        group = None
        if 2 <= len(words) <= 3 and words[0] in _COUNT_WORDS:
            count, noun = _COUNT_WORDS[words[0]], words[-1]
            kind = noun if count == 1 else _SINGULAR.get(noun)
            pitch = words[1] if len(words) == 3 else None
            if kind in KINDS and (pitch is None or pitch in PITCHES):
                try:
                    group = Group(count, kind, pitch)
                except ValueError:
                    group = None
        if group is None:
            raise ValueError(
                f"tones: cannot read {part!r} in caption {text!r}; write '<a|two|three> [low|high] <sound>' "
                f"groups joined by 'then', sounds {KINDS} (beep, hum and chirp take low/high), "
                "e.g. 'two high beeps then a low hum'"
            )
        groups.append(group)
    if not 1 <= len(groups) <= MAX_GROUPS:
        raise ValueError(f"tones: caption {text!r} has {len(groups)} groups; use 1 to {MAX_GROUPS}")
    return tuple(groups)


def all_groups() -> list:
    return [Group(n, k, p) for k in KINDS for p in (PITCHES if k in TONAL else (None,)) for n in COUNTS]


def all_captions() -> list:
    """Every caption of the world that fits in a clip, in a fixed order."""
    out = []
    singles = all_groups()
    for g in singles:
        if nominal_length([g]) <= LAST_END - START[1]:
            out.append(g.text())
    for a in singles:
        for b in singles:
            if a.label != b.label and nominal_length([a, b]) <= LAST_END - START[1]:
                out.append(f"{a.text()} then {b.text()}")
    return out


def _held_out(text: str) -> bool:
    # About 1 in 8 two-group captions is held out; every sound and count still appears in training.
    return " then " in text and hashlib.sha256(text.encode()).digest()[0] % 8 == 0


def train_captions() -> list:
    return [c for c in all_captions() if not _held_out(c)]


def eval_prompts(limit: int = 40) -> list:
    """Held-out captions (never in pretraining), a fixed spread of ``limit`` of them."""
    held = [c for c in all_captions() if _held_out(c)]
    step = max(1, len(held) // limit)
    return held[::step][:limit]


def sample_clip(rng: random.Random, captions: Sequence[str] | None = None) -> Clip:
    """A random clip over ``captions`` (default: the training captions), seeded from ``rng``."""
    captions = captions or train_captions()
    return Clip.from_caption(captions[rng.randrange(len(captions))], seed=rng.randrange(2**31))


def _sound(kind: str, pitch: str | None, rng: np.random.Generator) -> np.ndarray:
    n = max(1, int(round(LENGTH[kind] * rng.uniform(0.9, 1.1) * SAMPLE_RATE)))
    t = np.arange(n) / SAMPLE_RATE
    if kind in TONAL:
        low, high = LOW_HZ if pitch == "low" else HIGH_HZ
        if kind == "chirp":
            f0 = rng.uniform(*CHIRP_START[pitch])
            f1 = f0 * CHIRP_RATIO
            phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1] if t[-1] > 0 else 1))
        else:
            phase = 2 * np.pi * rng.uniform(low, high) * t + rng.uniform(0, 2 * np.pi)
        wave = np.sin(phase)
        ramp = min(n // 4, int(0.005 * SAMPLE_RATE))
    else:
        wave = rng.standard_normal(n) / (2.5 if kind == "hiss" else 1.0)  # a click is short: louder per sample
        ramp = 0 if kind == "click" else min(n // 4, int(0.005 * SAMPLE_RATE))
    envelope = np.ones(n)
    if ramp:
        rise = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        envelope[:ramp], envelope[-ramp:] = rise, rise[::-1]
    if kind == "click":
        envelope = np.exp(-t / 0.004)
    return wave * envelope


def render(clip: Clip) -> np.ndarray:
    """The clip's waveform, ``np.float32 [NUM_SAMPLES]`` in [-1, 1]; deterministic in (caption, seed)."""
    key = hashlib.sha256(f"{caption(clip)}|{clip.seed}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    out = rng.standard_normal(NUM_SAMPLES) * NOISE_FLOOR
    position = rng.uniform(*START)
    for gi, group in enumerate(clip.groups):
        if gi:
            position += rng.uniform(*GROUP_GAP)
        loudness = rng.uniform(*LOUDNESS)
        for i in range(group.count):
            if i:
                position += rng.uniform(*GAP)
            sound = _sound(group.kind, group.pitch, rng) * loudness
            start = int(round(position * SAMPLE_RATE))
            end = min(NUM_SAMPLES, start + len(sound))
            out[start:end] += sound[: end - start]
            position += len(sound) / SAMPLE_RATE
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def render_batch(captions: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
    """``[n, NUM_SAMPLES]`` float32 waveforms for (caption, seed) pairs."""
    if len(captions) != len(seeds):
        raise ValueError(f"tones: {len(captions)} captions but {len(seeds)} seeds")
    return np.stack([render(Clip.from_caption(c, s)) for c, s in zip(captions, seeds)])


def category(text: str) -> str:
    """A prompt's category for reports: the first sound, e.g. 'beep'."""
    return parse_caption(text)[0].kind


__all__ = [
    "DURATION",
    "KINDS",
    "NOISY",
    "NUM_SAMPLES",
    "PITCHES",
    "TONAL",
    "Clip",
    "Group",
    "all_captions",
    "caption",
    "category",
    "eval_prompts",
    "parse_caption",
    "render",
    "render_batch",
    "sample_clip",
    "train_captions",
]
