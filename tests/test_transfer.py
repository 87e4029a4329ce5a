"""diffusion_pref.training.transfer.to_device (host-to-device copies without a host wait) and the trainer's step seam
that uses it (diffusion_pref.training.accel.StepAccel.to_device)."""

from __future__ import annotations

import pytest
import torch

from diffusion_pref.training.transfer import to_device


def test_on_a_cpu_it_is_a_plain_conversion():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    out = to_device(x, "cpu", torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x.to(torch.bfloat16))
    assert to_device(x, torch.device("cpu")) is x  # nothing to do: the same tensor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copies_equal_a_blocking_copy_and_leave_the_source_alone():
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    for dtype in (None, torch.bfloat16, torch.float16):
        out = to_device(x, "cuda", dtype)
        assert out.is_cuda and out.dtype == (dtype or x.dtype)
        torch.testing.assert_close(out.cpu(), x.to("cuda", dtype).cpu(), rtol=0, atol=0)
    assert not x.is_pinned() and torch.equal(x, before)  # pinned copies are made on the side
    pinned = x.pin_memory()
    torch.testing.assert_close(to_device(pinned, "cuda").cpu(), x, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_the_step_seam_moves_a_batchs_floating_tensors_and_leaves_the_rest_on_the_host(device):
    """StepAccel.to_device: latents, text, soft labels to the device; row ids, flags, sizes and plain values stay
    (the loop and the SDXL conditioning read them on the host). On a CPU: the very same tensors."""
    from diffusion_pref.training.accel import StepAccel

    batch = {"latents_w": torch.randn(2, 4, 8, 8), "text.encoder_hidden_states": torch.randn(2, 7, 16),
             "soft_label": torch.tensor([0.2, 1.0]), "rows": torch.tensor([3, 5]),
             "caption_cut": torch.tensor([True, False]), "original_size": torch.tensor([[32, 32], [40, 32]]),
             "size": 2, "captions": ["a", "b"]}
    moved = StepAccel(torch.device(device)).to_device(batch)
    assert moved.keys() == batch.keys()
    for key in ("latents_w", "text.encoder_hidden_states", "soft_label"):
        assert moved[key].device.type == device and torch.equal(moved[key].cpu(), batch[key])
        assert (moved[key] is batch[key]) == (device == "cpu")
    for key in ("rows", "caption_cut", "original_size", "size", "captions"):
        assert moved[key] is batch[key]
