"""Per-step training metrics, read on the host one step late.

Reading a GPU value on the host (``.tolist()``, ``float()``) waits for every kernel queued before it. Done at the
end of each step, that makes the host wait for the step it has just queued, and only then start on the next one
(reading the batch, drawing noise, launching the first kernels) while the GPU sits idle. Instead, each step's
metrics are copied into pinned host memory without waiting (a CUDA event marks when the copy is done) and read at
the end of the next step, when the GPU has long finished them and the next step is already queued behind them.

On a CPU everything runs in order anyway; the same code keeps the values as they are.

Example::

    readout = DeferredReadout()
    finished = readout.put(values, info)      # queue this step's [n] values; get the previous step's, if any
    last = readout.take()                     # at the end (or wherever a value is needed now): wait for it
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

__all__ = ["DeferredReadout"]


class DeferredReadout:
    """Holds at most one step's values in flight; ``put`` returns the one before, ``take`` the one queued."""

    def __init__(self):
        self._pending = None

    def put(self, values, info: Any = None) -> Optional[Tuple[List[float], Any]]:
        """Queue a 1-D tensor of this step's values (and host-side ``info``); returns the previous step's
        ``(values as floats, info)`` or None when nothing was queued."""
        import torch

        previous = self.take()
        event = None
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = values.detach()
        self._pending = (host, event, info)
        return previous

    def take(self) -> Optional[Tuple[List[float], Any]]:
        """The queued step's ``(values, info)``, waiting only for its own copy; None when nothing is queued."""
        if self._pending is None:
            return None
        host, event, info = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        return [float(v) for v in host.tolist()], info
