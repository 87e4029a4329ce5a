"""The trainer's step seam (diffusion_pref.training.accel.StepAccel.to_device): which tensors of a batch go to the
device and which stay on the host."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_the_step_seam_moves_a_batchs_floating_tensors_and_leaves_the_rest_on_the_host(device):
    """StepAccel.to_device: latents and text to the device; soft labels (the loss range-checks them on the host),
    row ids, flags, sizes and plain values stay (the loop and the SDXL conditioning read them on the host). On a
    CPU: the very same tensors."""
    from diffusion_pref.training.accel import StepAccel

    batch = {"latents_w": torch.randn(2, 4, 8, 8), "text.encoder_hidden_states": torch.randn(2, 7, 16),
             "soft_label": torch.tensor([0.2, 1.0]), "rows": torch.tensor([3, 5]),
             "caption_cut": torch.tensor([True, False]), "original_size": torch.tensor([[32, 32], [40, 32]]),
             "size": 2, "captions": ["a", "b"]}
    moved = StepAccel(torch.device(device)).to_device(batch)
    assert moved.keys() == batch.keys()
    for key in ("latents_w", "text.encoder_hidden_states"):
        assert moved[key].device.type == device and torch.equal(moved[key].cpu(), batch[key])
        assert (moved[key] is batch[key]) == (device == "cpu")
    for key in ("soft_label", "rows", "caption_cut", "original_size", "size", "captions"):
        assert moved[key] is batch[key]
