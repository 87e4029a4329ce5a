"""A vocoder with no weights, for the tones world only: log-mel -> waveform by fast Griffin-Lim.

``GriffinLimVocoder`` is a parameter-free ``torch.nn.Module`` with ``SpeechT5HifiGan``'s call (``[B, frames,
n_mels]`` natural-log mel magnitudes -> ``[B, frames * hop]`` samples), ``device``/``dtype`` and
``from_pretrained``/``save_pretrained``, so the Tango backbone can hold it where Tango has its HiFi-GAN. The
model folder marks it in ``vocoder/config.json`` with ``"_class_name": "GriffinLimVocoder"``. It inverts the mel
filterbank with its pseudo-inverse (magnitudes clipped at 0), then runs ``n_iter`` iterations of Griffin-Lim with
momentum (Perraudin et al. 2013), from a fixed initial phase: deterministic. Good enough for pure tones, sweeps and
noise bursts; speech or music would need the real vocoder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

CLASS_NAME = "GriffinLimVocoder"


def is_griffin_lim(folder) -> bool:
    """Whether ``folder`` (a model's ``vocoder/``) holds this vocoder's config rather than a HiFi-GAN."""
    config = Path(folder) / "config.json"
    try:
        return json.loads(config.read_text()).get("_class_name") == CLASS_NAME
    except (OSError, ValueError):
        return False


class GriffinLimVocoder(torch.nn.Module):
    def __init__(self, sampling_rate: int = 16000, filter_length: int = 1024, hop_length: int = 160,
                 win_length: int = 1024, n_mel_channels: int = 32, mel_fmin: float = 0.0, mel_fmax: float = 8000.0,
                 n_iter: int = 16, momentum: float = 0.99, seed: int = 0):
        super().__init__()
        from diffusion_pref.audio import MelSettings, mel_basis

        self.settings = MelSettings(sampling_rate, filter_length, hop_length, win_length, n_mel_channels,
                                    mel_fmin, mel_fmax)
        self.sampling_rate = sampling_rate
        self.n_iter, self.momentum, self.seed = int(n_iter), float(momentum), int(seed)
        bank = mel_basis(self.settings).double()  # [n_mels, F]
        self.register_buffer("inverse_bank", torch.linalg.pinv(bank).float(), persistent=False)  # [F, n_mels]
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.window.device

    @property
    def dtype(self) -> torch.dtype:
        return self.window.dtype

    def config(self) -> dict:
        return {"_class_name": CLASS_NAME, **self.settings.to_dict(), "n_iter": self.n_iter,
                "momentum": self.momentum, "seed": self.seed}

    def save_pretrained(self, folder, **_) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder, torch_dtype=None, **_) -> GriffinLimVocoder:
        del torch_dtype  # it computes in float32
        config = json.loads((Path(folder) / "config.json").read_text())
        if config.pop("_class_name", None) != CLASS_NAME:
            raise ValueError(f"{folder}/config.json: _class_name is not {CLASS_NAME!r}")
        return cls(**config).eval()

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        single = mel.dim() == 2
        mel = (mel[None] if single else mel).float().to(self.device)  # [B, frames, n_mels]
        s = self.settings
        frames = mel.shape[1]
        length = frames * s.hop_length
        magnitude = (self.inverse_bank @ mel.exp().transpose(1, 2)).clamp(min=0.0)  # [B, F, frames]
        magnitude = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)  # a centred STFT of `length` has frames + 1
        gen = torch.Generator().manual_seed(self.seed)
        angles = torch.exp(2j * math.pi * torch.rand(magnitude.shape, generator=gen)).to(self.device)
        stft = dict(n_fft=s.filter_length, hop_length=s.hop_length, win_length=s.win_length, window=self.window)
        previous = torch.zeros_like(angles)
        for _ in range(max(1, self.n_iter)):
            wave = torch.istft(magnitude * angles, length=length, **stft)
            rebuilt = torch.stft(wave, return_complex=True, **stft)
            accelerated = rebuilt - (self.momentum / (1 + self.momentum)) * previous
            previous = rebuilt
            angles = accelerated / accelerated.abs().clamp(min=1e-8)
        wave = torch.istft(magnitude * angles, length=length, **stft)
        return wave[0] if single else wave


__all__ = ["CLASS_NAME", "GriffinLimVocoder", "is_griffin_lim"]
