"""CUDA-graph replay of the trainer's no-grad UNet calls (the reference pass and SmPO's inversion).

Why: on a GPU these calls are small (SmPO's inversion runs the UNet on 2..2B images per call, several calls per
step) and eager PyTorch spends more time launching the UNet's ~1,000 kernels than the GPU spends running them.
A CUDA graph records the kernels of one call once and replays them with one launch. This is torch's own
mechanism (``torch.cuda.CUDAGraph``); the wrapper only decides when to record and keeps one graph per input
signature.

What stays correct and why:

- Weights: a graph reads parameters from their storage at replay time; optimizers update parameters in place,
  so every replay uses the current weights (a parameter *replaced* by a new tensor would not be seen; the trainer
  never does that after setup).
- Autocast: casts of fp32 weights to half precision are cached by autocast within a region. A graph recorded
  while the cache held a cast made before recording would read that stale copy forever, and casts cached while
  recording live in the graph's memory, which later replays overwrite. So the cache is cleared before and after
  each recording: the graph casts the weights itself, and eager calls never see a graph's copies.
- Shapes and flags: one graph per signature (the name, the shapes/dtypes/devices of the tensor arguments, the
  other arguments' values, the autocast state). Anything else the call depends on (e.g. a LoRA adapter switched
  off) must be part of the name the caller gives.
- Only no-grad calls on CUDA tensors are recorded; everything else (CPU, grad enabled) runs eagerly, and a call
  that cannot be recorded (e.g. it synchronises with the host) falls back to eager for its signature, with a
  warning.

All graphs share one memory pool: they replay one at a time on the same stream and each output is copied out
right after its replay, so they can share their intermediate memory.

Example::

    graphs = CudaGraphCalls()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eps = graphs("policy", lambda x, t, c: unet(x, t, **c).sample, x, t, cond)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

logger = logging.getLogger(__name__)

__all__ = ["CudaGraphCalls"]


@dataclass
class _Recorded:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: list  # the static input leaves (tensors are copied into; other leaves are part of the signature)
    output: Any  # the static output, overwritten by every replay


class CudaGraphCalls:
    """Run ``fn(*args)`` by replaying a CUDA graph recorded for the arguments' signature.

    ``args`` may be tensors, and lists / tuples / dicts of them (torch pytrees); ``fn`` must return a tensor or a
    pytree of tensors. ``warmup`` eager calls (on a side stream, as torch's docs ask) precede each recording, so
    lazy initialisation and cuDNN's autotuning happen outside the graph.
    """

    def __init__(self, warmup: int = 2):
        self.warmup = int(warmup)
        self._recorded: Dict[tuple, Optional[_Recorded]] = {}  # None: could not be recorded, runs eagerly
        self._pool = None

    @property
    def num_graphs(self) -> int:
        return sum(entry is not None for entry in self._recorded.values())

    def __call__(self, name: str, fn: Callable, *args):
        import torch
        from torch.utils._pytree import tree_flatten, tree_map

        leaves, spec = tree_flatten(args)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if torch.is_grad_enabled() or not tensors or not all(t.is_cuda for t in tensors):
            return fn(*args)
        key = (name, str(spec), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
               *(_leaf_signature(leaf) for leaf in leaves))
        if key not in self._recorded:
            self._recorded[key] = self._record(name, fn, leaves, spec)
        entry = self._recorded[key]
        if entry is None:
            return fn(*args)
        for static, leaf in zip(entry.inputs, leaves):
            if isinstance(leaf, torch.Tensor):
                static.copy_(leaf)
        entry.graph.replay()
        return tree_map(lambda out: out.clone() if isinstance(out, torch.Tensor) else out, entry.output)

    def _record(self, name, fn, leaves, spec) -> Optional[_Recorded]:
        import torch
        from torch.utils._pytree import tree_unflatten

        inputs = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

        def call():
            return fn(*tree_unflatten(inputs, spec))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        torch.clear_autocast_cache()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                output = call()
        except RuntimeError as err:  # e.g. a host synchronisation inside fn: not recordable
            logger.warning("CUDA graph for %r could not be recorded (%s); that call runs eagerly", name,
                           str(err).splitlines()[0] if str(err) else type(err).__name__)
            return None
        finally:
            torch.clear_autocast_cache()
        self._pool = graph.pool()
        logger.info("recorded a CUDA graph for %r (%d so far)", name, self.num_graphs + 1)
        return _Recorded(graph=graph, inputs=inputs, output=output)


def _leaf_signature(leaf):
    import torch

    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, str(leaf.device), leaf.stride())
    return ("value", repr(leaf))
