"""Programmatic reward for the tones world: does a clip contain the sounds its caption asks for, in order?

``TonesFidelity`` ("tones-fidelity") detects the sounds in the clip's log-mel (after Tango's peak normalisation, through the Tango front
end: :func:`diffusion_pref.tones.audio.log_mel`), labels each one, and compares the detected sequence with the caption's:

- a sound is a run of frames whose energy is ``ABOVE_FLOOR`` nats above the quiet frames and within
  ``ACTIVE_RANGE`` nats of the loudest frame (runs split by short dips are merged);
- tonal (beep, hum, chirp) when most of its energy sits in a few neighbouring mel bins, else noise;
- noise: ``click`` when shorter than ``CLICK_FRAMES``, else ``hiss``; tonal: ``chirp`` when the peak bin rises by
  ``CHIRP_RISE_BINS`` or more, else ``beep`` when shorter than ``HUM_FRAMES``, else ``hum``;
  pitch ``low`` when the median peak is under ``PITCH_SPLIT_HZ``.

Score = 1 - (weighted edit distance) / max(len(wanted), len(found)); inserting or dropping a sound costs 1,
a wrong sound type 0.5, a wrong pitch 0.5. 1 = every sound right in order; a wrong count of n sounds costs 1/n.

Example::

    from diffusion_pref.tones.render import render_batch
    from diffusion_pref.tones.rewards import TonesFidelity
    waves = render_batch(["two high beeps then a low hum"], [0])
    TonesFidelity().score(["two high beeps then a low hum"], list(waves), sample_rate=16000)  # tensor([1.])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diffusion_pref.reward_models.base import check_prompts

ACTIVE_RANGE = 6.0  # nats below the loudest frame's energy (about 52 dB in power)
ABOVE_FLOOR = 2.5  # nats above the quiet frames' level (the 10th percentile of frame energies)
MERGE_GAP = 2  # frames: dips this short inside a sound do not split it
MIN_FRAMES = 2  # shorter runs are noise
TONAL_CONCENTRATION = 0.6  # fraction of a frame's mel energy within +-1 bin of its peak bin
CLICK_FRAMES = 12
HUM_FRAMES = 24
CHIRP_RISE_BINS = 3.0
PITCH_SPLIT_HZ = 1000.0


def detect(wave: Any) -> list:
    """The sounds of one 16 kHz waveform: a list of dicts ``kind, pitch, start, frames`` in time order."""
    from diffusion_pref.tones.audio import log_mel, mel_centres_hz, prepare

    mel = log_mel(prepare(wave)).numpy()  # [frames, n_mels]
    power = np.exp(2 * mel.astype(np.float64))  # [frames, n_mels]
    energy = np.log(power.sum(axis=1)) / 2  # [frames], nats of magnitude
    floor = float(np.percentile(energy, 10))
    active = energy > max(floor + ABOVE_FLOOR, float(energy.max()) - ACTIVE_RANGE)
    runs, start = [], None
    for i, on in enumerate(list(active) + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append([start, i])
            start = None
    merged = []
    for run in runs:
        if merged and run[0] - merged[-1][1] <= MERGE_GAP:
            merged[-1][1] = run[1]
        else:
            merged.append(run)
    centres = mel_centres_hz(mel.shape[1])
    sounds = []
    for a, b in merged:
        if b - a < MIN_FRAMES:
            continue
        seg = power[a:b]  # [n, n_mels]
        peaks = seg.argmax(axis=1)
        padded = np.pad(seg, ((0, 0), (1, 1)))
        near = np.stack([padded[np.arange(len(seg)), peaks + k] for k in range(3)]).sum(axis=0)
        concentration = float(np.median(near / seg.sum(axis=1)))
        frames = b - a
        if concentration < TONAL_CONCENTRATION:
            kind, pitch = ("click" if frames < CLICK_FRAMES else "hiss"), None
        else:
            quarter = max(1, frames // 4)
            rise = float(np.median(peaks[-quarter:]) - np.median(peaks[:quarter]))
            if rise >= CHIRP_RISE_BINS:
                kind = "chirp"
            else:
                kind = "beep" if frames < HUM_FRAMES else "hum"
            pitch = "low" if float(np.median(centres[peaks])) < PITCH_SPLIT_HZ else "high"
        sounds.append({"kind": kind, "pitch": pitch, "start": a, "frames": frames})
    return sounds


def _cost(a: tuple, b: tuple) -> float:
    return 0.5 * (a[0] != b[0]) + 0.5 * (a[1] != b[1])


def sequence_score(wanted: Sequence[tuple], found: Sequence[tuple]) -> float:
    """1 - weighted edit distance / max length (labels ``(kind, pitch)``)."""
    n, m = len(wanted), len(found)
    if max(n, m) == 0:
        return 1.0
    d = np.zeros((n + 1, m + 1))
    d[:, 0], d[0, :] = np.arange(n + 1), np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + _cost(wanted[i - 1], found[j - 1]))
    return float(1.0 - d[n, m] / max(n, m))


def _waves(media: Any) -> list:
    import torch

    if torch.is_tensor(media) or isinstance(media, np.ndarray):
        array = media.detach().cpu().numpy() if torch.is_tensor(media) else media
        if array.ndim == 3 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 2:
            raise ValueError(f"tones-fidelity: expected waveforms [n, samples], got shape {tuple(array.shape)}")
        return list(array)
    return [w.detach().cpu().numpy() if torch.is_tensor(w) else np.asarray(w) for w in media]


class TonesFidelity:
    """Tones-world prompt fidelity: the detected sounds against the caption's, as a sequence score in [0, 1]."""

    name = "tones-fidelity"
    scale = "[0, 1]; 1 = every sound right (type, pitch, count, order); a missing/extra sound costs 1/n"
    max_score = 1.0
    max_tolerance = 0.2  # one wrong pitch among 3 sounds costs 0.17

    def __init__(self, device: Any = None, batch_size: Any = None):
        del device, batch_size  # numpy on the CPU

    def score(self, prompts: Sequence[str], media: Any, sample_rate: Any = None) -> Any:
        import torch

        from diffusion_pref.tones.audio import SAMPLE_RATE
        from diffusion_pref.tones.render import parse_caption

        waves = _waves(media)
        prompts = check_prompts(prompts, len(waves), self.name)
        if sample_rate is not None and int(sample_rate) != SAMPLE_RATE:
            raise ValueError(f"tones-fidelity: sample_rate={sample_rate}; the tones world is {SAMPLE_RATE} Hz")
        scores = []
        for prompt, wave in zip(prompts, waves):
            wanted = [g.label for g in parse_caption(prompt) for _ in range(g.count)]
            found = [(s["kind"], s["pitch"]) for s in detect(wave)]
            scores.append(sequence_score(wanted, found))
        return torch.tensor(scores, dtype=torch.float32)


__all__ = ["TonesFidelity", "detect", "sequence_score"]
