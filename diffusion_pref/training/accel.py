"""The trainer's GPU speed machinery, behind one object the loop calls in two places.

- :meth:`StepAccel.to_device`: a batch's floating-point tensors (latents, text encodings, pixels, cached
  inversions) go to the device; soft labels, integer and boolean tensors (row ids, sizes, flags) stay on the
  host, where the loop and the backbone's conditioning read them.
- :meth:`StepAccel.predict`: a no-grad denoiser call (the reference pass, SmPO's inversion with the policy),
  replayed from a CUDA graph under ``train.cuda_graphs`` (:mod:`diffusion_pref.training.cuda_graphs`; measured
  1.9-2.7x on a SmPO step on an H200) and run eagerly otherwise.

On a CPU both are plain calls: the same numbers as without this object. Two pieces of earlier versions are gone,
never measured to help on a GPU: the one-step-late metric readout (it needed a flush wherever a value was needed
at once: BCO's running shift, validation, checkpoints, the end; metrics are now read at the end of each optimizer
step) and the copies of host-made tensors through pinned memory (the DataLoader's own ``pin_memory`` stays).

Example::

    accel = StepAccel.for_run(cfg.train, accelerator)
    batch = accel.to_device(batch)
    pred = accel.predict("adapter off", backbone, unet, x_t, t, cond)   # under torch.no_grad()
"""

from __future__ import annotations

import logging


logger = logging.getLogger(__name__)

__all__ = ["StepAccel"]


class StepAccel:
    """Batch transfer and no-grad denoiser calls for one training run on ``device``; ``graphs``: a
    :class:`~diffusion_pref.training.cuda_graphs.CudaGraphCalls` or None (eager)."""

    def __init__(self, device, graphs=None):
        self.device = device
        self.graphs = graphs

    @classmethod
    def for_run(cls, train_cfg, accelerator) -> "StepAccel":
        """The settings of ``train_cfg`` on ``accelerator``'s device: CUDA graphs where they can work, cuDNN's
        algorithm search on CUDA (the training shapes are fixed, so timing the convolutions once pays off)."""
        import torch
        from accelerate.utils import DistributedType

        from diffusion_pref.training.cuda_graphs import CudaGraphCalls

        device = accelerator.device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if not train_cfg.cuda_graphs:
            return cls(device)
        if device.type != "cuda":
            logger.warning("train.cuda_graphs=true has no effect on %s: the denoiser calls run eagerly", device)
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            # Sharded parameters are gathered into fresh memory for each call: a recorded graph would read
            # whatever occupied the memory it saw while recording.
            logger.warning("train.cuda_graphs=true is ignored under %s", accelerator.distributed_type)
            return cls(device)
        if train_cfg.compile and train_cfg.compile_mode in ("reduce-overhead", "max-autotune"):
            logger.info("train.cuda_graphs: torch.compile's %s mode records CUDA graphs itself", train_cfg.compile_mode)
            return cls(device)
        return cls(device, CudaGraphCalls())

    # Stay on the host: the loss range-checks soft labels there before moving them (on the device the check would
    # make the host wait for the GPU in the middle of every step).
    HOST_KEYS = frozenset({"soft_label"})

    def to_device(self, batch: dict) -> dict:
        """``batch`` with its floating-point tensors on the device (but :attr:`HOST_KEYS`); everything else as it
        was. The DataLoader pins its batches on CUDA (``pin_memory``), so these copies need not make the host wait."""
        import torch

        return {key: value.to(self.device, non_blocking=True)
                if isinstance(value, torch.Tensor) and value.is_floating_point() and key not in self.HOST_KEYS
                else value for key, value in batch.items()}

    def predict(self, name: str, backbone, module, x_t, t, cond):
        """``backbone.predict(x_t, t, cond, denoiser=module)`` for a no-grad call, from a CUDA graph when enabled.

        ``name`` tells apart the states one module is called in (its LoRA adapter on or off): each has its own
        graphs."""
        if self.graphs is None:
            return backbone.predict(x_t, t, cond, denoiser=module)
        return self.graphs(name, lambda *args: backbone.predict(*args, denoiser=module), x_t, t, cond)
