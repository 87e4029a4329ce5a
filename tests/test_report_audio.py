"""Spectrograms in the evaluation report, checked against the mel scale computed by hand."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from diffusion_pref.evaluation.report import spectrogram_png


def _slaney_mel(hz: float) -> float:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    if hz < min_log_hz:
        return hz / f_sp
    return min_log_hz / f_sp + math.log(hz / min_log_hz) / (math.log(6.4) / 27.0)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def test_a_pure_tone_is_brightest_in_the_rows_of_its_mel_bin():
    rate, hz = 16000, 1500.0
    tone = 0.5 * np.sin(2 * np.pi * hz * np.arange(rate) / rate)
    pixels = _pixels(spectrogram_png(tone, rate, height=128, width=200))
    assert pixels.shape == (128, 200, 3)
    # 64 bins from 0 to 8 kHz, equally spaced in mels: centres at the 64 inner points of 66
    points = np.linspace(_slaney_mel(0.0), _slaney_mel(8000.0), 66)
    bin_ = int(np.argmin(np.abs(points[1:-1] - _slaney_mel(hz))))
    brightness = pixels.sum(axis=(1, 2))
    top_row = int(np.argmax(brightness))
    # 2 px per bin, bin 0 at the bottom: bin b covers rows 126 - 2b and 127 - 2b
    assert top_row in (126 - 2 * bin_, 127 - 2 * bin_)


def test_time_runs_left_to_right_and_silence_is_dark():
    rate = 16000
    clip = np.zeros(rate, dtype=np.float32)
    clip[rate // 2:] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate // 2) / rate)
    pixels = _pixels(spectrogram_png(clip, rate, width=100))
    # the tone's row reaches the peak colour (255, 250, 190) in the right half only
    assert pixels[:, 60:].sum(axis=2).max() == 695 and pixels[:, :40].sum(axis=2).max() < 60
    assert np.all(pixels[:, :40] == pixels[0, 0])  # the floor colour: exact silence is one flat colour
    silent = _pixels(spectrogram_png(np.zeros(8000, dtype=np.float32), 8000))
    assert np.all(silent == silent[0, 0]) and silent[0, 0].sum() < 60  # dark, not the peak colour


def test_other_rates_and_stereo_are_accepted():
    rate = 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * np.arange(rate // 4) / rate)] * 2, 1) * 0.3
    png = spectrogram_png(stereo, rate)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
