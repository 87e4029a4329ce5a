"""The audio front end of Tango / Tango 2 (declare-lab/tango ``tools/torch_tools.py`` and AudioLDM's ``TacotronSTFT``),
without torchaudio: soundfile reads, soxr resamples.

Waveform path (``prepare_waveform``): resample to the model's rate (16 kHz), remove the mean, scale the peak to 0.5
(``x / (max|x| + 1e-8) * 0.5``), pad with zeros or cut to ``frames * hop`` samples, scale the peak to 0.5 again
(Tango's ``read_wav_file`` does both).

Mel path (``log_mel``): clip to [-1, 1] and replace NaN by 0, magnitude STFT (n_fft = win = ``filter_length`` 1024, hop
160, periodic Hann window, centred frames with reflect padding of n_fft / 2 on each side), Slaney-style mel filter
bank (``n_mel_channels`` 64 from ``mel_fmin`` 0 to ``mel_fmax`` 8000 Hz, Slaney area normalisation: librosa's default,
which AudioLDM's STFT uses), ``log(clamp(mel, 1e-5))``, frames first ``[B, T, n_mels]``; ``fit_frames`` pads with
zeros or crops to the frame count (Tango's ``_pad_spec``; 1024 frames = 10.24 s at hop 160).

The one deviation from Tango: resampling is soxr's (HQ) instead of torchaudio's sinc interpolation; both are
band-limited resamplers, so a 16 kHz input is untouched and other rates differ only near the band edge.

Example::

    from diffusion_pref.audio import MelSettings, prepare_waveform, log_mel, read_audio
    settings = MelSettings()                                   # Tango's: 16 kHz, 1024 / 160 / 1024, 64 mels, 0-8 kHz
    wave, rate = read_audio("dog.wav")                         # float32 [samples] or [samples, channels]
    x = prepare_waveform(wave, rate, settings, frames=1024)    # [163840] float32, peak 0.5
    mel = log_mel(torch.from_numpy(x)[None], settings, frames=1024)   # [1, 1024, 64]
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import numpy as np

TANGO_FRAMES = 1024  # Tango's target_length = int(10 * 102.4): 1024 mel frames = 163840 samples = 10.24 s at 16 kHz


@dataclass(frozen=True)
class MelSettings:
    """The STFT / mel settings, with the argument names of Tango's ``TacotronSTFT`` (its ``stft_config.json``)."""

    sampling_rate: int = 16000
    filter_length: int = 1024
    hop_length: int = 160
    win_length: int = 1024
    n_mel_channels: int = 64
    mel_fmin: float = 0.0
    mel_fmax: float = 8000.0

    @classmethod
    def from_dict(cls, values: dict) -> "MelSettings":
        """From a ``stft_config.json`` (unknown keys are ignored; missing ones keep Tango's values)."""
        known = {k: values[k] for k in asdict(cls()) if k in values}
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)

    def frames(self, seconds: float) -> int:
        """The mel frame count of a clip of ``seconds`` (``round(seconds * rate / hop)``; 10.24 s -> 1024)."""
        return int(round(seconds * self.sampling_rate / self.hop_length))


@dataclass(frozen=True)
class WaveSettings:
    """The front end of a model whose VAE encodes waveforms (TangoFlux's Oobleck VAE): resample to
    ``sampling_rate``, keep the first ``seconds`` (None: all), pad with zeros or cut to ``frames * hop_length``
    samples (``hop_length``: samples per latent frame); no mean removal or peak normalisation (TangoFlux's
    ``read_wav_file`` has none). ``prepare_waveform`` takes it in place of :class:`MelSettings`."""

    sampling_rate: int = 44100
    hop_length: int = 2048
    seconds: Optional[float] = None

    def to_dict(self) -> dict:
        return {"front_end": "waveform", **asdict(self)}


class AudioError(ValueError):
    """Audio that cannot be used; the message says why (callers add the file / row)."""


def read_audio(source) -> Tuple[np.ndarray, int]:
    """A file path, encoded bytes (wav, flac, ogg: whatever libsndfile reads) or a ``datasets`` Audio cell
    (``{"bytes": ...}``, ``{"path": ...}`` or ``{"array": ..., "sampling_rate": ...}``) -> (float32 array
    ``[samples]`` or ``[samples, channels]``, sample rate)."""
    import soundfile

    if isinstance(source, dict):
        if source.get("array") is not None:
            rate = source.get("sampling_rate")
            if rate is None:
                raise AudioError("an audio cell with an array but no sampling_rate")
            return np.asarray(source["array"], dtype=np.float32), int(rate)
        source = source.get("bytes") if source.get("bytes") is not None else source.get("path")
        if source is None:
            raise AudioError("an audio cell with neither bytes, path nor array")
    try:
        if isinstance(source, (bytes, bytearray)):
            data, rate = soundfile.read(io.BytesIO(bytes(source)), dtype="float32", always_2d=False)
        else:
            data, rate = soundfile.read(str(source), dtype="float32", always_2d=False)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioError(f"could not decode audio ({type(err).__name__}: {err})") from None
    return data, int(rate)


def check_audio(wave: np.ndarray, rate: int, model_rate: int) -> np.ndarray:
    """``wave`` as a 1-D float array, or an :class:`AudioError`: more than one channel, no samples, NaN or infinite
    samples, silence (all zeros: peak normalisation would divide by ~0), or a sample rate below the model's
    (upsampling cannot restore the band the model generates; resample such data offline if it is wanted)."""
    wave = np.asarray(wave)
    if wave.ndim == 2 and wave.shape[1] == 1:
        wave = wave[:, 0]
    if wave.ndim != 1:
        channels = wave.shape[1] if wave.ndim == 2 else "?"
        raise AudioError(f"has {channels} channels (shape {tuple(wave.shape)}); the model takes mono audio: mix it "
                         "down first")
    if wave.size == 0:
        raise AudioError("has no samples")
    if not np.isfinite(wave).all():
        raise AudioError("holds NaN or infinite samples")
    if not np.abs(wave).max() > 0:
        raise AudioError("is silent (every sample is 0)")
    if rate < model_rate:
        raise AudioError(f"is sampled at {rate} Hz, below the model's {model_rate} Hz; resample it offline if you "
                         "want band-limited audio in training")
    return wave


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``wave`` ``[samples]`` from ``rate`` to ``target`` Hz with soxr (unchanged when the rates match)."""
    if rate == target:
        return np.asarray(wave, dtype=np.float32)
    try:
        import soxr
    except ImportError:
        raise ImportError(f"audio at {rate} Hz must be resampled to {target} Hz, which needs soxr: "
                          'pip install "diffusion-pref[audio]"') from None

    return soxr.resample(np.asarray(wave, dtype=np.float32), rate, target).astype(np.float32)


def normalize_peak(wave: np.ndarray) -> np.ndarray:
    """Tango's ``normalize_wav``: remove the mean, then ``x / (max|x| + 1e-8) * 0.5``."""
    wave = wave - wave.mean()
    return (wave / (np.abs(wave).max() + 1e-8) * 0.5).astype(np.float32)


def fit_length(wave: np.ndarray, samples: int) -> np.ndarray:
    """Cut to ``samples`` or pad with zeros at the end (Tango's ``pad_wav``)."""
    if len(wave) >= samples:
        return wave[:samples]
    return np.concatenate([wave, np.zeros(samples - len(wave), dtype=wave.dtype)])


def prepare_waveform(wave: np.ndarray, rate: int, settings: MelSettings, frames: int) -> np.ndarray:
    """Decoded mono audio -> the model's input waveform ``[frames * hop]`` float32 (see the module docstring;
    :class:`WaveSettings`: resampled, cut to its ``seconds`` and padded, not normalised)."""
    wave = resample(np.asarray(wave, dtype=np.float32), rate, settings.sampling_rate)
    if isinstance(settings, WaveSettings):
        if settings.seconds is not None:
            wave = wave[:int(settings.seconds * settings.sampling_rate)]
        return fit_length(wave, frames * settings.hop_length)
    wave = fit_length(normalize_peak(wave), frames * settings.hop_length)
    return (wave / np.abs(wave).max() * 0.5).astype(np.float32)  # Tango's second peak scaling, after the padding


_MEL_BANKS: dict = {}


def mel_basis(settings: MelSettings):
    """The ``[n_mels, n_fft // 2 + 1]`` float32 Slaney mel filter bank (transformers' ``mel_filter_bank``, the same
    definition as librosa's default ``librosa.filters.mel``)."""
    import torch
    from transformers.audio_utils import mel_filter_bank

    key = (settings.filter_length, settings.n_mel_channels, settings.mel_fmin, settings.mel_fmax,
           settings.sampling_rate)
    if key not in _MEL_BANKS:
        bank = mel_filter_bank(num_frequency_bins=settings.filter_length // 2 + 1,
                               num_mel_filters=settings.n_mel_channels, min_frequency=float(settings.mel_fmin),
                               max_frequency=float(settings.mel_fmax), sampling_rate=settings.sampling_rate,
                               norm="slaney", mel_scale="slaney")
        _MEL_BANKS[key] = torch.from_numpy(np.ascontiguousarray(bank.T)).float()
    return _MEL_BANKS[key]


def log_mel(waves, settings: MelSettings, frames: Optional[int] = None):
    """Waveforms ``[B, samples]`` (a torch tensor) -> log-mel ``[B, T, n_mels]`` float32, fitted to ``frames``
    when given (zeros appended or frames cut, as Tango's ``_pad_spec``)."""
    import torch

    waves = torch.nan_to_num(waves.float().clamp(-1.0, 1.0))
    window = torch.hann_window(settings.win_length, periodic=True, device=waves.device)
    spec = torch.stft(waves, n_fft=settings.filter_length, hop_length=settings.hop_length,
                      win_length=settings.win_length, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # [B, n_fft / 2 + 1, T]
    mel = mel_basis(settings).to(waves.device) @ spec.abs()
    mel = torch.log(mel.clamp(min=1e-5)).transpose(1, 2)  # [B, T, n_mels]
    return mel if frames is None else fit_frames(mel, frames)


def fit_frames(mel, frames: int):
    """``[B, T, M]`` -> ``[B, frames, M]``: extra frames cut, missing ones appended as zeros (Tango's ``_pad_spec``)."""
    import torch

    have = mel.shape[1]
    if have >= frames:
        return mel[:, :frames]
    return torch.cat([mel, mel.new_zeros(mel.shape[0], frames - have, mel.shape[2])], 1)


def write_wav(path, wave, rate: int) -> None:
    """A 1-D float waveform as a 16-bit PCM wav file."""
    import soundfile

    soundfile.write(str(path), np.asarray(wave, dtype=np.float32), rate, subtype="PCM_16")


def wav_bytes(wave, rate: int, format: str = "WAV") -> bytes:
    """A 1-D float waveform encoded as wav (16-bit PCM) or flac bytes, e.g. for a parquet audio column."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(wave, dtype=np.float32), rate, format=format, subtype="PCM_16")
    return buffer.getvalue()
