"""DiffMask's training data: photos augmented into batches, or a DataLoader of ready batches.

``training_batches`` returns (steps per epoch, ``get(epoch, index) -> batch``): random access by step, so
a fit resumed from a checkpoint continues with exactly the batches it would have seen (each epoch's
order comes from (seed, epoch); the crops from the DiffMask's generator, saved in the checkpoint).
``data_fingerprint`` ties a checkpoint to its data.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from .._util.fingerprint import fingerprint


def random_resized_crop(image: torch.Tensor, size: int, generator: torch.Generator,
                        scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """A random crop of ``scale`` of the area and ``ratio`` aspect, resized to size x size, maybe flipped."""
    _, h, w = image.shape
    area = h * w
    for _ in range(10):
        a = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=generator)))
        logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * float(torch.rand((), generator=generator))
        r = math.exp(logr)
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        ch = cw = min(h, w)
    top = int(torch.randint(0, h - ch + 1, (), generator=generator))
    left = int(torch.randint(0, w - cw + 1, (), generator=generator))
    crop = image[None, :, top:top + ch, left:left + cw]
    out = F.interpolate(crop.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        out = out.flip(-1)
    return out.clamp(0, 1)


def resize_view(image: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(image.shape[-2:]) == (size, size):
        return image.float()
    return F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(0, 1)


def training_batches(data, *, batch_size: int, augment: bool, image_size: int, seed: int,
                     generator: torch.Generator, device, check: Callable[[torch.Tensor], torch.Tensor]
                     ) -> Tuple[int, Callable[[int, int], torch.Tensor]]:
    """(steps per epoch, function(epoch, index) -> batch) for a tensor/list of photos or a DataLoader.

    Photos are cropped at random (``augment``) or resized to ``image_size``; a DataLoader's batches
    pass through ``check`` (the caller's image check) on ``device``.
    """
    if isinstance(data, torch.utils.data.DataLoader):
        n = len(data)
        if n == 0:
            raise ValueError("data: the DataLoader is empty (no training batches)")
        state = {"epoch": None, "it": None, "i": 0}

        def get_loaded(epoch, index):
            if state["epoch"] != epoch or state["i"] > index:
                state.update(epoch=epoch, it=iter(data), i=0)
            while True:
                b = next(state["it"])
                state["i"] += 1
                if state["i"] - 1 == index:
                    break
            b = b[0] if isinstance(b, (tuple, list)) else b
            return check(b.to(device))
        return n, get_loaded
    photos = list(data) if isinstance(data, (list, tuple)) else (
        list(data) if isinstance(data, torch.Tensor) and data.dim() == 4 else None)
    if photos is None:
        raise ValueError("data must be an N x 3 x H x W tensor, a list of 3 x H x W tensors, or a DataLoader")
    if not photos:
        raise ValueError("data: empty training set (no images)")
    for i, p in enumerate(photos):
        if not isinstance(p, torch.Tensor) or p.dim() != 3 or p.shape[0] != 3 or not p.is_floating_point():
            raise ValueError(f"data[{i}] must be a 3 x H x W float tensor in [0, 1], got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
    steps = math.ceil(len(photos) / batch_size)
    orders: Dict[int, torch.Tensor] = {}

    def get(epoch, index):
        if epoch not in orders:  # each epoch's order from (seed, epoch): the same after a resume
            orders.clear()
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            orders[epoch] = torch.randperm(len(photos), generator=g)
        idx = orders[epoch][index * batch_size:(index + 1) * batch_size]
        views = [random_resized_crop(photos[j], image_size, generator) if augment
                 else resize_view(photos[j], image_size) for j in idx.tolist()]
        return torch.stack(views).to(device)
    return steps, get


def data_fingerprint(data) -> str:
    """Which training data a checkpoint belongs to (a DataLoader: only its length can be known)."""
    if isinstance(data, torch.utils.data.DataLoader):
        return f"dataloader:{len(data)}"
    return fingerprint(list(data))
