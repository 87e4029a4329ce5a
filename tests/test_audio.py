"""The audio front end (diffusion_pref.audio) against an independent numpy computation of Tango's definition."""

import math

import numpy as np
import pytest
import torch

from diffusion_pref.audio import (AudioError, MelSettings, check_audio, fit_frames, log_mel, mel_basis,
                                  prepare_waveform, read_audio, wav_bytes)


def _hz_to_mel(f):
    """Slaney's mel scale (librosa htk=False), written out: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def _numpy_filterbank(sr, n_fft, n_mels, fmin, fmax):
    """Triangles between consecutive mel-spaced edge frequencies, each scaled to unit area (Slaney norm)."""
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    bank = np.zeros((n_mels, len(freqs)))
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        for k, f in enumerate(freqs):
            if lo < f < hi:
                bank[i, k] = (f - lo) / (mid - lo) if f <= mid else (hi - f) / (hi - mid)
        bank[i] *= 2.0 / (hi - lo)
    return bank


def _numpy_log_mel(wave, s: MelSettings):
    """Frames of the reflect-padded signal times a periodic Hann window, |rfft|, filter bank, log(max(x, 1e-5))."""
    n_fft, hop = s.filter_length, s.hop_length
    x = np.clip(np.nan_to_num(wave.astype(np.float64)), -1, 1)
    x = np.pad(x, n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    count = 1 + (len(x) - n_fft) // hop
    frames = np.stack([x[i * hop:i * hop + n_fft] * window for i in range(count)])
    magnitude = np.abs(np.fft.rfft(frames, axis=1))  # [T, n_fft / 2 + 1]
    mel = magnitude @ _numpy_filterbank(s.sampling_rate, n_fft, s.n_mel_channels, s.mel_fmin, s.mel_fmax).T
    return np.log(np.maximum(mel, 1e-5))  # [T, n_mels]


def test_filter_bank_matches_slaney_formula():
    s = MelSettings()  # Tango's: 16 kHz, n_fft 1024, 64 mels, 0-8 kHz
    expected = _numpy_filterbank(s.sampling_rate, s.filter_length, s.n_mel_channels, s.mel_fmin, s.mel_fmax)
    got = mel_basis(s).numpy()
    assert got.shape == (64, 513)
    # float32 storage of weights of order 1e-3: relative 1e-6
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)


def test_log_mel_matches_numpy_definition():
    s = MelSettings()
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))
    frames = 96
    got = log_mel(torch.tensor(wave[None], dtype=torch.float32), s, frames=frames)[0].numpy()
    expected = _numpy_log_mel(wave, s)
    assert expected.shape[0] == 101  # 1 + 16000 / 160 centred frames
    assert got.shape == (frames, 64)
    # float32 STFT sums of 1024 terms of order 0.3 against float64: magnitudes agree to ~1e-5 relative, so the logs
    # to ~1e-5 where the mel energy is well above the 1e-5 floor (all bins here, with the noise floor)
    np.testing.assert_allclose(got, expected[:frames], atol=2e-4)


def test_fit_frames_pads_with_zeros_and_crops():
    mel = torch.randn(2, 5, 4)
    padded = fit_frames(mel, 8)
    assert padded.shape == (2, 8, 4) and torch.equal(padded[:, :5], mel) and not padded[:, 5:].any()
    assert torch.equal(fit_frames(mel, 3), mel[:, :3])


def test_prepare_waveform_as_tango():
    s = MelSettings()
    rng = np.random.default_rng(1)
    wave = (0.2 + 0.1 * rng.standard_normal(8000)).astype(np.float32)  # 0.5 s with a DC offset
    out = prepare_waveform(wave, 16000, s, frames=64)  # 64 frames = 10240 samples
    centred = wave.astype(np.float64) - wave.mean()
    expected = centred / (np.abs(centred).max() + 1e-8) * 0.5
    expected = np.concatenate([expected, np.zeros(10240 - 8000)])
    expected = expected / np.abs(expected).max() * 0.5
    assert out.shape == (10240,) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert np.isclose(np.abs(out).max(), 0.5)
    long = prepare_waveform(np.tile(wave, 3), 16000, s, frames=64)
    assert long.shape == (10240,)


def test_resampling_to_16k_keeps_a_tone():
    s = MelSettings()
    t = np.arange(48000) / 48000  # 1 s at 48 kHz
    out = prepare_waveform(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 48000, s, frames=100)
    expected = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    # away from the edges (the resampler's filter transient) the 1 kHz tone is the same tone at 16 kHz
    np.testing.assert_allclose(out[500:15500], expected[500:15500], atol=2e-3)


def test_read_and_check_audio(tmp_path):
    tone = (0.3 * np.sin(np.arange(1600) / 5)).astype(np.float32)
    for fmt in ("WAV", "FLAC"):
        data, rate = read_audio(wav_bytes(tone, 16000, fmt))
        assert rate == 16000
        np.testing.assert_allclose(data, tone, atol=1 / 32767)  # 16-bit PCM
    data, rate = read_audio({"array": tone, "sampling_rate": 22050})
    assert rate == 22050 and data.shape == tone.shape
    with pytest.raises(AudioError, match="could not decode"):
        read_audio(b"not audio")
    with pytest.raises(AudioError, match="2 channels"):
        check_audio(np.zeros((10, 2)) + 0.1, 16000, 16000)
    with pytest.raises(AudioError, match="silent"):
        check_audio(np.zeros(100), 16000, 16000)
    with pytest.raises(AudioError, match="NaN"):
        check_audio(np.array([0.1, np.nan]), 16000, 16000)
    with pytest.raises(AudioError, match="8000 Hz"):
        check_audio(tone, 8000, 16000)
    assert check_audio(tone[:, None], 44100, 16000).shape == tone.shape
