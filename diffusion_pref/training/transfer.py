"""Host-to-device copies that do not make the host wait for the GPU.

A copy from ordinary (pageable) host memory may synchronise with the stream: the host then waits for every
kernel already queued, which in a training step means the previous step, before it can queue the next one. From
page-locked (pinned) memory the copy is a plain asynchronous DMA; torch's pinned allocator keeps the source alive
until the copy is done. Tensors from the trainer's DataLoader are pinned already (``pin_memory`` on CUDA); values
made on the host during a step (noise draws, soft labels) go through :func:`to_device`.
"""

from __future__ import annotations

__all__ = ["to_device"]


def to_device(tensor, device, dtype=None):
    """``tensor.to(device, dtype)`` without a host wait: pinned first when a CPU tensor goes to a CUDA device."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)  # on the host: a copy that converts would go through pageable memory again
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
    return tensor.to(device=device, dtype=dtype, non_blocking=True)
