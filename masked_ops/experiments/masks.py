"""Masks for the experiments (1 = visible, 0 = removed; N x 1 x H x W float).

- patch grids and random removal orders (removal curves, linearity);
- fixed shapes of equal area (the shape probe);
- a blob over the salient region and the same blob moved away from it (leakage).

Randomness always comes from an explicit ``torch.Generator`` so that every strategy sees the
very same masks, and a resumed run recomputes the same ones.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F


def generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded from several integers (run seed, image index, repeat...)."""
    s = 0
    for v in seeds:
        s = (s * 1_000_003 + int(v) + 1) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(s)


def patch_grid(size: Tuple[int, int], patch: int) -> Tuple[int, int]:
    h, w = size
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"patch must divide the image size {h} x {w}, got {patch}")
    return h // patch, w // patch


def patches_to_mask(removed: torch.Tensor, size: Tuple[int, int], patch: int) -> torch.Tensor:
    """removed: B x (gh*gw) bool (True = patch removed) -> B x 1 x H x W float mask (1 = visible)."""
    gh, gw = patch_grid(size, patch)
    vis = (~removed).float().view(-1, 1, gh, gw)
    return vis.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def ranked_first(order: torch.Tensor, fractions: Sequence[float]) -> torch.Tensor:
    """F x n bool: for each fraction f, True at the first round(f * n) items of ``order`` (a ranking of
    n items). Rows are nested: a larger fraction selects a superset. Every removal and insertion curve
    (removal_masks here, the faithfulness experiments' MoRF / LeRF / deletion / insertion) uses it."""
    n = order.numel()
    first = torch.zeros(len(fractions), n, dtype=torch.bool)
    for i, f in enumerate(fractions):
        first[i, order[:int(round(float(f) * n))]] = True
    return first


def removal_masks(size: Tuple[int, int], patch: int, fractions: Sequence[float], order: torch.Tensor
                  ) -> torch.Tensor:
    """F x 1 x H x W masks: the first round(f * P) patches of ``order`` removed, for each fraction f.

    Masks of one order are nested (a larger fraction removes a superset), as in the paper's
    progressive removal.
    """
    gh, gw = patch_grid(size, patch)
    if order.numel() != gh * gw:
        raise ValueError(f"order must rank the {gh * gw} patches of a {size[0]} x {size[1]} image, "
                         f"got {order.numel()} items")
    return patches_to_mask(ranked_first(order, fractions), size, patch)


def random_orders(n_patches: int, repeats: int, g: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(n_patches, generator=g) for _ in range(repeats)])


# ----------------------------------------------------------------------------- shapes
def _area_scaled(kind: str, size: int, area: float) -> torch.Tensor:
    """A centred shape of the given kind covering about ``area`` of a size x size canvas."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5 - size / 2, torch.arange(size) + 0.5 - size / 2,
                            indexing="ij")
    a = area * size * size
    if kind == "square":
        r = math.sqrt(a) / 2
        inside = (yy.abs() <= r) & (xx.abs() <= r)
    elif kind == "disk":
        inside = yy ** 2 + xx ** 2 <= a / math.pi
    elif kind == "hbar":
        hh = a / (0.9 * size) / 2
        inside = (yy.abs() <= hh) & (xx.abs() <= 0.45 * size)
    elif kind == "vbar":
        hw = a / (0.9 * size) / 2
        inside = (xx.abs() <= hw) & (yy.abs() <= 0.45 * size)
    elif kind == "triangle":
        # isosceles, apex up: height = base = s, area s^2/2
        s = math.sqrt(2 * a)
        inside = (yy >= -s / 2) & (yy <= s / 2) & (xx.abs() <= (yy + s / 2) / 2)
    elif kind == "cross":
        # plus sign of arm width t and span L = 3t: area 5 t^2
        t = math.sqrt(a / 5)
        inside = ((yy.abs() <= t / 2) & (xx.abs() <= 1.5 * t)) | ((xx.abs() <= t / 2) & (yy.abs() <= 1.5 * t))
    else:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")
    return inside


SHAPES = ("square", "disk", "hbar", "vbar", "triangle", "cross")


def shape_mask(kind: str, size: int, area: float, shift: Tuple[int, int] = (0, 0)) -> torch.Tensor:
    """1 x 1 x size x size mask with a removed ``kind`` shape (about ``area`` of the image), shifted."""
    removed = _area_scaled(kind, size, area)
    removed = torch.roll(removed, shifts=tuple(int(s) for s in shift), dims=(0, 1))
    return (~removed).float()[None, None]


# ----------------------------------------------------------------------------- salient blob
def salient_blob(saliency: torch.Tensor, area: float, smooth: int = 31) -> torch.Tensor:
    """H x W bool: the region of about ``area`` of the image where the smoothed saliency is highest."""
    s = saliency.float()[None, None]
    s = F.avg_pool2d(s, smooth, stride=1, padding=smooth // 2, count_include_pad=False)[0, 0]
    k = max(1, int(round(area * s.numel())))
    thresh = s.flatten().kthvalue(s.numel() - k + 1).values
    return s >= thresh


def move_away(region: torch.Tensor, step: int = 8) -> Tuple[torch.Tensor, float]:
    """The same shape translated (no wrap-around) to where it overlaps ``region`` least.

    Returns (moved region, overlap as a fraction of the region's area). The shape is kept
    exactly: its bounding box is placed at every position on a ``step`` grid that fits.
    """
    h, w = region.shape
    ys, xs = torch.nonzero(region, as_tuple=True)
    if ys.numel() == 0:
        return region.clone(), 0.0
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    shape = region[y0:y1, x0:x1]
    bh, bw = shape.shape
    best, best_pos = None, (y0, x0)
    area = float(region.sum())
    for ty in list(range(0, h - bh + 1, step)) + [h - bh]:
        for tx in list(range(0, w - bw + 1, step)) + [w - bw]:
            ov = float((region[ty:ty + bh, tx:tx + bw] & shape).sum())
            # prefer the least overlap, then the largest displacement
            key = (ov, -((ty - y0) ** 2 + (tx - x0) ** 2))
            if best is None or key < best:
                best, best_pos = key, (ty, tx)
    moved = torch.zeros_like(region)
    ty, tx = best_pos
    moved[ty:ty + bh, tx:tx + bw] = shape
    return moved, best[0] / area


def region_to_mask(region: torch.Tensor) -> torch.Tensor:
    """H x W bool region (True = removed) -> 1 x 1 x H x W float mask (1 = visible)."""
    return (~region).float()[None, None]


def describe_shapes(size: int, area: float) -> Dict[str, float]:
    """Actual removed area fraction of each probe shape (they are equal up to rasterisation)."""
    return {k: float(_area_scaled(k, size, area).float().mean()) for k in SHAPES}
