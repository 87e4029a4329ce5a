"""diffusion_pref.training.transfer.to_device: host-to-device copies without a host wait."""

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
