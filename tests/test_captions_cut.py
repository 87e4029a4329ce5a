"""The trainer's count of captions cut at the text encoder's token limit asks the backbone about each caption once.

A fake backbone (no model): ``prompts_cut`` records what it is asked and flags captions of more than three words.
The count must equal a count that asks about every caption of every batch, as the trainer did before.
"""

from __future__ import annotations

import torch

from diffusion_pref.training.setup import PairEncoder


class _Backbone:
    def __init__(self):
        self.asked = []

    def encode(self, media):
        return media

    def encode_prompts(self, prompts):
        return {"encoder_hidden_states": torch.zeros(len(prompts), 2, 3)}

    def prompts_cut(self, prompts):
        self.asked.extend(prompts)
        return [len(p.split()) > 3 for p in prompts]

    def token_limit(self):
        return 3


def _batch(captions):
    pixels = torch.zeros(len(captions), 3, 4, 4)
    return {"pixels_w": pixels, "pixels_l": pixels, "captions": list(captions)}


BATCHES = [["a cat", "a very long red cat", "a cat"], ["a dog", "a very long red cat"], [],
           ["a very long red cat", "a cat", "a very long blue dog"]] * 2  # two epochs


def test_each_caption_is_checked_once_and_the_count_is_the_per_batch_count(caplog):
    import logging

    backbone = _Backbone()
    encoder = PairEncoder(backbone, torch.float32)
    with caplog.at_level(logging.WARNING, logger="diffusion_pref.training.setup"):
        for captions in BATCHES:
            latents_w, latents_l, text = encoder(_batch(captions))
            assert latents_w.shape[0] == len(captions) == text["encoder_hidden_states"].shape[0]
    per_batch = sum(len(c.split()) > 3 for captions in BATCHES for c in captions)
    assert encoder.captions_cut == per_batch == 8
    assert backbone.asked == ["a cat", "a very long red cat", "a dog", "a very long blue dog"]
    assert len([r for r in caplog.records if "cut to that length" in r.getMessage()]) == 1


def test_past_the_memo_size_new_captions_are_checked_each_time(monkeypatch):
    monkeypatch.setattr(PairEncoder, "CUT_MEMO_SIZE", 2)
    backbone = _Backbone()
    encoder = PairEncoder(backbone, torch.float32)
    for captions in BATCHES:
        encoder(_batch(captions))
    assert encoder.captions_cut == 8
    # the first batch's two captions fill the memo; the others are asked about each time they come
    assert backbone.asked.count("a cat") == 1 and backbone.asked.count("a very long red cat") == 1
    assert backbone.asked.count("a dog") == 2 and backbone.asked.count("a very long blue dog") == 2
