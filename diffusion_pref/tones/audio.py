"""The tones world's audio settings and helpers, on the Tango front end of :mod:`diffusion_pref.audio`.

Clips are 1.28 s at 16 kHz (128 mel frames at hop 160); the mel has ``N_MELS`` = 32 bins instead of Tango's 64,
otherwise it is Tango's definition exactly (n_fft 1024, Hann, Slaney mel to 8 kHz, log of the magnitude clamped
at 1e-5). Waves go through Tango's peak normalisation (:func:`prepare`) before the mel, as the backbone does.

Light at import (numpy only); torch and the front end load when a function runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SAMPLE_RATE = 16000
HOP = 160
N_FFT = 1024
N_MELS = 32  # Tango uses 64; 32 separates two pitch classes and keeps the model tiny
FRAMES = 128
DURATION = FRAMES * HOP / SAMPLE_RATE  # 1.28 s
NUM_SAMPLES = FRAMES * HOP

# stft_config.json of the tones model: Tango's TacotronSTFT arguments, plus the clip length the backbone samples.
STFT_CONFIG = {
    "sampling_rate": SAMPLE_RATE,
    "filter_length": N_FFT,
    "hop_length": HOP,
    "win_length": N_FFT,
    "n_mel_channels": N_MELS,
    "mel_fmin": 0.0,
    "mel_fmax": 8000.0,
    "audio_seconds": DURATION,
}


def settings():
    """The :class:`diffusion_pref.audio.MelSettings` of the tones world."""
    from diffusion_pref.audio import MelSettings

    return MelSettings.from_dict(STFT_CONFIG)


def prepare(wave: Any) -> np.ndarray:
    """A 16 kHz clip -> the backbone's input waveform (Tango's mean removal and peak 0.5, fitted to 1.28 s)."""
    from diffusion_pref.audio import prepare_waveform

    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if not np.abs(wave).max() > 0:
        return np.zeros(NUM_SAMPLES, dtype=np.float32)
    return prepare_waveform(wave, SAMPLE_RATE, settings(), FRAMES)


def log_mel(waves: Any) -> Any:
    """Waveform(s) ``[T]`` or ``[B, T]`` -> log-mel ``[(B,) FRAMES, N_MELS]`` (torch float32), as the backbone."""
    import torch

    from diffusion_pref.audio import log_mel as front_end

    waves = torch.as_tensor(np.asarray(waves, dtype=np.float32)) if not torch.is_tensor(waves) else waves
    single = waves.dim() == 1
    mel = front_end(waves[None] if single else waves, settings(), FRAMES)
    return mel[0] if single else mel


def mel_centres_hz(n_mels: int = N_MELS) -> np.ndarray:
    """The centre frequency of each mel bin (Slaney scale, 0 to 8 kHz)."""
    from transformers.audio_utils import hertz_to_mel, mel_to_hertz

    edges = np.linspace(hertz_to_mel(0.0, "slaney"), hertz_to_mel(8000.0, "slaney"), n_mels + 2)
    return mel_to_hertz(edges, "slaney")[1:-1]


__all__ = [
    "DURATION",
    "FRAMES",
    "HOP",
    "NUM_SAMPLES",
    "N_FFT",
    "N_MELS",
    "SAMPLE_RATE",
    "STFT_CONFIG",
    "log_mel",
    "mel_centres_hz",
    "prepare",
    "settings",
]
