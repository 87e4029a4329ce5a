"""The tones world's mel front end and its training-free vocoder (numpy/torch only; no librosa, no torchaudio).

The definition is Tango's ``TacotronSTFT`` (the same numbers as the audio front end of the Tango backbone, at
``N_MELS`` bins instead of 64): reflect-pad ``(n_fft - hop) / 2`` on both sides, periodic Hann window, magnitude
STFT without centring, Slaney-style mel filterbank (librosa's default: Slaney mel scale, area normalisation),
natural log of the mel magnitude clamped at 1e-5. ``samples / hop`` frames.

``GriffinLimVocoder`` inverts such log-mels to waveforms with no weights: pseudo-inverse of the filterbank, then
fast Griffin-Lim (momentum 0.99). It is only good enough for the tones world (pure tones, sweeps, noise bursts),
which is why it lives here and not in the Tango backbone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 1024
HOP = 160
N_MELS = 32  # Tango uses 64; 32 is enough for two pitch classes and keeps the model tiny
FMIN = 0.0
FMAX = 8000.0
LOG_FLOOR = 1e-5

STFT_CONFIG = {
    "sampling_rate": SAMPLE_RATE,
    "filter_length": N_FFT,
    "hop_length": HOP,
    "win_length": N_FFT,
    "n_mel_channels": N_MELS,
    "mel_fmin": FMIN,
    "mel_fmax": FMAX,
}

# Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4).
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(hz):
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log, linear)


def mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    linear = _F_SP * mel
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log, linear)


def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS, fmin: float = FMIN,
                   fmax: float = FMAX) -> np.ndarray:
    """``[n_mels, n_fft // 2 + 1]`` triangular filters, Slaney scale and area normalisation (librosa's default)."""
    fft_hz = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # [n_mels + 2]
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


def mel_centres_hz(n_mels: int = N_MELS) -> np.ndarray:
    """The centre frequency of each mel bin."""
    return mel_to_hz(np.linspace(hz_to_mel(FMIN), hz_to_mel(FMAX), n_mels + 2))[1:-1]


def log_mel(wave: Any) -> "Any":
    """Waveform(s) ``[T]`` or ``[B, T]`` at 16 kHz -> log-mel ``[(B,) T // HOP, N_MELS]`` (torch float32)."""
    import torch

    wave = torch.as_tensor(np.asarray(wave, dtype=np.float32) if not torch.is_tensor(wave) else wave).float()
    single = wave.dim() == 1
    batch = wave[None] if single else wave
    pad = (N_FFT - HOP) // 2
    padded = torch.nn.functional.pad(batch[:, None], (pad, pad), mode="reflect")[:, 0]
    spec = torch.stft(padded, N_FFT, hop_length=HOP, win_length=N_FFT, window=torch.hann_window(N_FFT),
                      center=False, return_complex=True).abs()  # [B, F, frames]
    basis = torch.from_numpy(mel_filterbank())
    mel = torch.log(torch.clamp(basis @ spec, min=LOG_FLOOR)).transpose(1, 2)  # [B, frames, n_mels]
    return mel[0] if single else mel


class GriffinLimVocoder:
    """Log-mel ``[B, frames, n_mels]`` -> waveform ``[B, frames * hop]`` by fast Griffin-Lim; no weights.

    The call signature is ``SpeechT5HifiGan``'s (the Tango vocoder), so a backbone can use either. Saved as
    ``vocoder/config.json`` with ``"_class_name": "GriffinLimVocoder"``; deterministic (fixed initial phase).
    """

    config_name = "config.json"

    def __init__(self, n_iter: int = 32, momentum: float = 0.99, seed: int = 0):
        self.n_iter, self.momentum, self.seed = int(n_iter), float(momentum), int(seed)
        self.sampling_rate = SAMPLE_RATE
        self.stft = dict(STFT_CONFIG)

    def to_config(self) -> dict:
        return {"_class_name": "GriffinLimVocoder", "_module": "diffusion_pref.tones.audio",
                "n_iter": self.n_iter, "momentum": self.momentum, "seed": self.seed, **self.stft}

    def save_pretrained(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.config_name).write_text(json.dumps(self.to_config(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder, **_: Any) -> "GriffinLimVocoder":
        config = json.loads((Path(folder) / cls.config_name).read_text())
        if config.get("_class_name") != "GriffinLimVocoder":
            raise ValueError(f"{folder}/config.json: _class_name is {config.get('_class_name')!r}, not 'GriffinLimVocoder'")
        for key, value in STFT_CONFIG.items():
            if config.get(key, value) != value:
                raise ValueError(f"{folder}/config.json: {key}={config[key]!r}; the tones vocoder supports {value!r}")
        return cls(config.get("n_iter", 32), config.get("momentum", 0.99), config.get("seed", 0))

    # torch-module-like no-ops so a backbone can treat it like the other frozen modules
    def to(self, *_, **__):
        return self

    def eval(self):
        return self

    def requires_grad_(self, *_):
        return self

    def parameters(self):
        return iter(())

    def __call__(self, mel: "Any") -> "Any":
        import torch

        mel = torch.as_tensor(mel).detach().float().cpu()
        single = mel.dim() == 2
        mel = mel[None] if single else mel  # [B, frames, n_mels]
        frames = mel.shape[1]
        length = frames * HOP
        pinv = torch.from_numpy(np.linalg.pinv(mel_filterbank()))  # [F, n_mels]
        magnitude = (pinv @ mel.exp().transpose(1, 2)).clamp(min=0.0)  # [B, F, frames]
        magnitude = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)  # centred STFT has frames + 1 columns
        window = torch.hann_window(N_FFT)
        gen = torch.Generator().manual_seed(self.seed)
        angles = torch.exp(2j * math.pi * torch.rand(magnitude.shape, generator=gen))
        previous = torch.zeros_like(angles)
        wave = None
        for _ in range(max(1, self.n_iter)):
            wave = torch.istft(magnitude * angles, N_FFT, hop_length=HOP, window=window, length=length)
            rebuilt = torch.stft(wave, N_FFT, hop_length=HOP, window=window, return_complex=True)
            accelerated = rebuilt - (self.momentum / (1 + self.momentum)) * previous
            previous = rebuilt
            angles = accelerated / accelerated.abs().clamp(min=1e-8)
        wave = torch.istft(magnitude * angles, N_FFT, hop_length=HOP, window=window, length=length)
        return wave[0] if single else wave


__all__ = ["SAMPLE_RATE", "N_FFT", "HOP", "N_MELS", "STFT_CONFIG", "mel_filterbank", "mel_centres_hz", "log_mel",
           "hz_to_mel", "mel_to_hz", "GriffinLimVocoder"]
