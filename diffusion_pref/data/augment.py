"""Paired augmentation: both images of a pair get the same resize, crop and flip; caption dropout once per pair.

Every random choice for a pair comes from a generator seeded by ``(seed, dataset row)``, so a pair is augmented
the same way in every epoch, in every process and on resume, and cached latents equal what the uncached path
computes. (With the dataset sizes preference training uses, a run rarely sees a pair twice.)

Example::

    from diffusion_pref.data.augment import augment_pair
    pix_w, pix_l, caption, meta = augment_pair(pair, resolution=512, flip=True, crop=False,
                                               caption_dropout=0.1, seed=0)
    # pix_*: float tensors [3, 512, 512] in [-1, 1]; meta: original_size (h, w), crop_top_left (y, x)
"""

from __future__ import annotations

from typing import Dict, Tuple

from diffusion_pref.seeding import derive_rng


def _to_tensor(image):
    import numpy as np
    import torch

    # One float copy, made from the uint8 pixels in place of numpy float arithmetic and a layout copy; the
    # arithmetic (float32 / 127.5 - 1) is the same, so the values are bit for bit those of the plain formula.
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # [3, H, W] uint8 (a writable copy)
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)  # in [-1, 1]


def augment_pair(pair, resolution: int, flip: bool, crop: bool, caption_dropout: float, seed: int):
    """-> (pixels_w [3,R,R], pixels_l [3,R,R], caption, {"original_size": (h, w), "crop_top_left": (y, x)})."""
    from PIL import Image

    rng = derive_rng(seed, pair.row, 0x5EED)  # the third part keeps it apart from the epoch order's (seed, epoch)
    # Draw every choice up front in a fixed order, so one setting never shifts another's random numbers.
    drop_caption = rng.random() < caption_dropout
    do_flip = flip and rng.random() < 0.5
    crop_u = (rng.random(), rng.random())

    image_w = pair.image_w
    # The loser is brought to the winner's size first (as the SDXL reference does), so one crop box fits both.
    image_l = pair.image_l if pair.image_l.size == image_w.size else pair.image_l.resize(image_w.size, Image.BILINEAR)
    width, height = image_w.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image_w = image_w.resize((new_w, new_h), Image.BILINEAR)
        image_l = image_l.resize((new_w, new_h), Image.BILINEAR)
    if crop:
        top = int(crop_u[0] * (new_h - resolution + 1))
        left = int(crop_u[1] * (new_w - resolution + 1))
    else:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    box = (left, top, left + resolution, top + resolution)
    image_w, image_l = image_w.crop(box), image_l.crop(box)
    if do_flip:  # on the uint8 image, a quarter of the bytes of the float tensor
        image_w = image_w.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image_l = image_l.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pix_w, pix_l = _to_tensor(image_w), _to_tensor(image_l)
    meta: Dict[str, Tuple[int, int]] = {"original_size": (height, width), "crop_top_left": (top, left)}
    return pix_w, pix_l, ("" if drop_caption else pair.caption), meta


def augmentation_identity(data_cfg, seed: int) -> Dict[str, object]:
    """The settings that change augmented pixels or captions; part of the cache key."""
    return {"resolution": data_cfg.resolution, "random_flip": data_cfg.random_flip, "random_crop": data_cfg.random_crop,
            "caption_dropout": data_cfg.caption_dropout, "seed": seed}
