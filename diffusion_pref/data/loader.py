"""Batches of preference pairs for one process, in a reproducible order that a resumed run continues exactly.

The epoch order of :class:`~diffusion_pref.data.pairs.PairSource` is split between processes by striding
(process ``r`` of ``W`` takes items ``r, r+W, ...``), then cut into batches. A batch is named by
``(epoch, index)``, so the data position saved in a checkpoint is two integers, and DataLoader workers can build
batches independently (worker ``k`` builds every ``k``-th batch; the DataLoader returns them in order).
Undecodable rows skipped under ``data.on_bad_row=skip`` make their batch smaller and are counted in ``skipped``.
A bad row met in a worker stops the run with the same one-line :class:`DataError` as without workers (not
torch's re-raise of it, which prepends the worker's traceback to the message).

Example::

    loader = make_loader(source, cfg.data, batch_size=4, seed=0)
    for batch in loader:   # pixels_w/pixels_l [4, 3, R, R], captions, soft_label [4], epoch, next_index, ...
        ...
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

from diffusion_pref.data.pairs import DataError

_DATA_ERROR = "data_error"  # the key of the one batch a worker sends in place of raising


def batches_per_epoch(num_items: int, batch_size: int, rank: int = 0, world: int = 1) -> int:
    per_rank = num_items // world
    # A dataset smaller than one batch still trains (tests, tiny experiments): it becomes one short batch.
    return max(1, per_rank // batch_size) if per_rank else 0


def pair_media(batch: Dict[str, object]):
    """The batch's decoded media as one ``[w; l]`` tensor: pixels ``[2B, 3, R, R]`` or waveforms ``[2B, samples]``."""
    import torch

    if "audio_w" in batch:
        return torch.cat([batch["audio_w"], batch["audio_l"]])
    return torch.cat([batch["pixels_w"], batch["pixels_l"]])


def collate_audio(source, data_cfg, items: Sequence[Tuple[int, int]], seed: int) -> Dict[str, object]:
    """Decode pairs of audio into one batch of model-ready waveforms ``audio_w``/``audio_l`` ``[B, frames * hop]``
    (Tango's front end: :func:`diffusion_pref.audio.prepare_waveform`); the uncached path. No augmentation but
    caption dropout (decided once per pair, as for images)."""
    import numpy as np
    import torch

    from diffusion_pref.audio import prepare_waveform
    from diffusion_pref.seeding import derive_rng

    settings, frames = source.audio
    pairs, skipped = source.read(items)
    waves_w, waves_l, captions = [], [], []
    for pair in pairs:
        waves_w.append(torch.from_numpy(prepare_waveform(pair.image_w[0], pair.image_w[1], settings, frames)))
        waves_l.append(torch.from_numpy(prepare_waveform(pair.image_l[0], pair.image_l[1], settings, frames)))
        # the same stream as the image path's first draw (augment_pair), so a pair drops its caption alike
        drop = derive_rng(seed, pair.row, 0x5EED).random() < data_cfg.caption_dropout
        captions.append("" if drop else pair.caption)
    batch: Dict[str, object] = {"captions": captions, "skipped": skipped, "size": len(pairs)}
    if not pairs:
        return batch
    batch.update(
        audio_w=torch.stack(waves_w),  # [B, frames * hop]
        audio_l=torch.stack(waves_l),
        soft_label=torch.tensor([p.soft_label for p in pairs], dtype=torch.float32),
        rows=torch.tensor([p.row for p in pairs], dtype=torch.long),
        # image-only metadata (SDXL's micro-conditioning), kept as zeros so cached shards have the same fields
        original_size=torch.from_numpy(np.zeros((len(pairs), 2), dtype=np.int64)),
        crop_top_left=torch.from_numpy(np.zeros((len(pairs), 2), dtype=np.int64)),
    )
    if pairs[0].score_w is not None:
        batch["score_w"] = torch.tensor([p.score_w for p in pairs], dtype=torch.float32)
        batch["score_l"] = torch.tensor([p.score_l for p in pairs], dtype=torch.float32)
    return batch


def collate_pixels(source, data_cfg, items: Sequence[Tuple[int, int]], seed: int) -> Dict[str, object]:
    """Decode and augment pairs into one batch of pixels; the uncached path. Audio data
    (``source.media == "audio"``) goes to :func:`collate_audio`."""
    import torch

    from diffusion_pref.data.augment import augment_pair

    if source.media == "audio":
        return collate_audio(source, data_cfg, items, seed)
    pairs, skipped = source.read(items)
    pix_w, pix_l, captions, sizes, crops = [], [], [], [], []
    for pair in pairs:
        w, l, caption, meta = augment_pair(pair, data_cfg.resolution, data_cfg.random_flip, data_cfg.random_crop,
                                           data_cfg.caption_dropout, seed)
        pix_w.append(w)
        pix_l.append(l)
        captions.append(caption)
        sizes.append(meta["original_size"])
        crops.append(meta["crop_top_left"])
    batch: Dict[str, object] = {"captions": captions, "skipped": skipped, "size": len(pairs)}
    if not pairs:
        return batch
    batch.update(
        pixels_w=torch.stack(pix_w),  # [B, 3, R, R]
        pixels_l=torch.stack(pix_l),
        soft_label=torch.tensor([p.soft_label for p in pairs], dtype=torch.float32),
        rows=torch.tensor([p.row for p in pairs], dtype=torch.long),
        original_size=torch.tensor(sizes, dtype=torch.long),  # [B, 2] (h, w)
        crop_top_left=torch.tensor(crops, dtype=torch.long),  # [B, 2] (y, x)
    )
    if pairs[0].score_w is not None:
        batch["score_w"] = torch.tensor([p.score_w for p in pairs], dtype=torch.float32)
        batch["score_l"] = torch.tensor([p.score_l for p in pairs], dtype=torch.float32)
    return batch


class PairBatches:
    """An endless iterable of this process's batches, starting at ``(start_epoch, start_index)``."""

    def __init__(self, source, make_batch: Callable[[List[Tuple[int, int]]], Dict[str, object]], batch_size: int,
                 rank: int = 0, world: int = 1, start_epoch: int = 0, start_index: int = 0):
        self.source = source
        self.make_batch = make_batch
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.start_epoch, self.start_index = start_epoch, start_index
        self.num_batches = batches_per_epoch(len(source), batch_size, rank, world)
        if self.num_batches == 0:
            raise ValueError(f"{len(source)} pairs cannot be split over {world} processes; use more pairs")

    def _epoch_items(self, epoch: int) -> List[Tuple[int, int]]:
        order = self.source.order(epoch)
        per_rank = len(order) // self.world
        return order[self.rank::self.world][:per_rank]

    def __iter__(self):
        import torch

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, index, k = self.start_epoch, self.start_index, 0
        while True:
            items = self._epoch_items(epoch)
            while index < self.num_batches:
                if k % workers == worker:
                    try:
                        batch = self.make_batch(items[index * self.batch_size:(index + 1) * self.batch_size])
                    except DataError as err:
                        if info is None:
                            raise
                        yield {_DATA_ERROR: str(err)}  # raised again, message alone, by the main process
                        return
                    batch["epoch"], batch["next_index"] = epoch, index + 1
                    yield batch
                index += 1
                k += 1
            epoch, index = epoch + 1, 0


def make_loader(batches: PairBatches, num_workers: int = 0):
    """An iterable over ``batches`` through a torch DataLoader with ``num_workers`` worker processes."""
    import torch

    class _Dataset(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(batches)

    loader = torch.utils.data.DataLoader(_Dataset(), batch_size=None, num_workers=num_workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=False)
    return _WorkerErrors(loader)


class _WorkerErrors:
    """Iterates a DataLoader, raising a worker's :class:`DataError` again with its message alone."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            if _DATA_ERROR in batch:
                raise DataError(batch[_DATA_ERROR])
            yield batch
