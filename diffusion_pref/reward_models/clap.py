"""CLAP score for audio: cosine of the L2-normalised audio and text embeddings of a transformers `ClapModel`.

Default weights: `laion/clap-htsat-unfused` (HTSAT-tiny audio encoder + RoBERTa text encoder, no fusion), the
transformers port of LAION's non-fusion CLAP, the family Tango 2 and TangoFlux rank candidates with.

How this differs from `laion_clap.CLAP_Module(enable_fusion=False).load_ckpt()` (which Tango 2 / TangoFlux use),
so numbers are close but not identical:
- Weights: the model card does not say which laion checkpoint the port was converted from; a CLAP author says
  it is `630k-audioset-best.pt` (LAION-AI/CLAP issue #123), laion_clap's non-fusion default, so the weights
  should agree and only the code paths below differ (not checked numerically here).
- Mel front-end: transformers' numpy `ClapFeatureExtractor` (64 mels, hop 480, n_fft 1024, 50-14000 Hz) vs
  laion_clap's torchlibrosa layers; small numeric differences.
- Length: both repeat-pad clips shorter than 10 s. laion_clap randomly crops longer clips (`rand_trunc`); here
  clips are cut to their first 10 s before feature extraction, so scores are deterministic.
- laion_clap's README pipeline round-trips audio through int16 (`float32_to_int16` then back: clip to [-1, 1],
  x * 32767 truncated to int16, / 32767). That is reproduced (`quantize_int16=True`, the default).
- Sample rate: CLAP expects 48 kHz. laion_clap resamples files with librosa on load. Here audio at another rate
  is resampled only if `soxr` or `scipy` is installed (soxr, else scipy's polyphase `resample_poly`), and a
  different resampler gives slightly different numbers; with neither installed a wrong rate is an error.
- Text: RoBERTa tokenizer, truncated at 77 tokens (laion_clap pads to 77; the attention mask makes that moot).

Example:

    from diffusion_pref.reward_models import load_reward_model
    clap = load_reward_model("clap")
    scores = clap.score(["a dog barks"], [waveform], sample_rate=48000)  # [1], cosine in [-1, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .base import as_features, batch_slices, check_prompts, default_device

if TYPE_CHECKING:
    import numpy as np
    import torch


def _to_numpy_mono(audio: Any, index: int) -> "np.ndarray":
    import numpy as np
    import torch

    if isinstance(audio, torch.Tensor):
        audio = audio.detach().float().cpu().numpy()
    arr = np.asarray(audio, dtype=np.float32)
    if arr.ndim != 1:
        raise ValueError(
            f"clap: media[{index}] has shape {arr.shape}; pass 1-D mono waveforms (average the channels first)"
        )
    return arr


def _resample(audio: "np.ndarray", orig: int, target: int) -> "np.ndarray":
    import warnings

    import numpy as np

    note = f"clap: resampling audio from {orig} Hz to {target} Hz with %s; "
    note += "scores differ slightly from laion_clap's librosa resampling"
    try:
        import soxr

        warnings.warn(note % "soxr", stacklevel=3)
        return np.asarray(soxr.resample(audio, orig, target), dtype=np.float32)
    except ImportError:
        pass
    try:
        from math import gcd

        from scipy.signal import resample_poly

        warnings.warn(note % "scipy.signal.resample_poly", stacklevel=3)
        g = gcd(orig, target)
        return np.asarray(resample_poly(audio, target // g, orig // g), dtype=np.float32)
    except ImportError:
        raise ValueError(
            f"clap: audio is at {orig} Hz but the model expects {target} Hz, and no resampler is installed; "
            f"resample to {target} Hz first or `pip install soxr` (or scipy)"
        ) from None


def quantize_int16(audio: "np.ndarray") -> "np.ndarray":
    """laion_clap's int16 round trip: clip to [-1, 1], truncate x * 32767 to int16, divide by 32767."""
    import numpy as np

    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16).astype(np.float32) / np.float32(32767.0)


class CLAPScore:
    name = "clap"
    scale = "cosine(audio, text) in [-1, 1]; Tango 2 reports ~0.5-0.6 for good text-to-audio models"

    def __init__(
        self,
        pretrained: str = "laion/clap-htsat-unfused",
        quantize_int16: bool = True,
        device: Any = None,
        batch_size: int = 8,
    ):
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

        self.device = default_device(device)
        self.batch_size = batch_size
        self.quantize = quantize_int16
        self.model = ClapModel.from_pretrained(pretrained).float().to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        self.feature_extractor = ClapFeatureExtractor.from_pretrained(pretrained)
        self.sample_rate = int(self.feature_extractor.sampling_rate)
        self.max_samples = int(self.feature_extractor.nb_max_samples)

    def prepare_audio(self, media: Sequence[Any], sample_rate: int) -> list:
        """Mono float32 numpy arrays at the model's rate, cut to its window (first 10 s), int16-quantised."""
        if sample_rate is None:
            raise ValueError("clap.score: pass sample_rate= (Hz) with the audio")
        out = []
        for i, a in enumerate(media):
            arr = _to_numpy_mono(a, i)
            if int(sample_rate) != self.sample_rate:
                arr = _resample(arr, int(sample_rate), self.sample_rate)
            arr = arr[: self.max_samples]
            if arr.size == 0:
                raise ValueError(f"clap: media[{i}] is empty")
            out.append(quantize_int16(arr) if self.quantize else arr)
        return out

    def score(self, prompts: Sequence[str], media: Sequence[Any], sample_rate: int | None = None) -> "torch.Tensor":
        import torch

        if hasattr(media, "ndim") and media.ndim == 2:  # a [n, samples] batch of equal-length clips
            media = list(media)
        prompts = check_prompts(prompts, len(media), self.name)
        audio = self.prepare_audio(media, sample_rate)
        out = []
        with torch.no_grad():
            for sl in batch_slices(len(audio), self.batch_size):
                features = self.feature_extractor(audio[sl], sampling_rate=self.sample_rate, return_tensors="pt")
                is_longer = features.get("is_longer")
                audio_emb = as_features(
                    self.model.get_audio_features(
                        input_features=features["input_features"].to(self.device),
                        is_longer=None if is_longer is None else is_longer.to(self.device),
                    )
                )
                text = self.tokenizer(prompts[sl], padding=True, truncation=True, max_length=77, return_tensors="pt")
                text_emb = as_features(
                    self.model.get_text_features(
                        input_ids=text["input_ids"].to(self.device),
                        attention_mask=text["attention_mask"].to(self.device),
                    )
                )
                out.append(torch.nn.functional.cosine_similarity(audio_emb.float(), text_emb.float(), dim=-1))
        return torch.cat(out).float().cpu() if out else torch.zeros(0)
