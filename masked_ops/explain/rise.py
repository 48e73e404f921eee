"""RISE (Petsiuk, Das & Saenko, BMVC 2018): saliency from random smooth masks, with any strategy.

    from masked_ops.explain import explain_rise, get_strategy
    exp = explain_rise(get_strategy("grey", model), image, n_masks=4000)
    exp.heatmap()      # H x W saliency of the top-1 class

Masks: ``n_masks`` random ``cells`` x ``cells`` grids, each cell kept with probability ``p``,
upsampled bilinearly so that the grid spans the image plus one cell size c = ceil(H / cells)
(the paper's (cells + 1) c; a one-cell reflected border, as in TorchRay, instead of the
paper's skimage "reflect" resize), then cropped to H x W at a random shift in [0, c) per axis,
so that the smooth blobs fall anywhere. They are soft (values in [0, 1]) and go through the strategy as they are; the
saliency of class c is ``sum_i f_c(image under mask i) * mask_i / (n_masks * p)``, with f the
class probability (``output="prob"``, the paper's) or the logit. ``binary=True`` thresholds
the masks at 0.5 (for a strategy that takes hard masks only, e.g. layer masking before the soft
layer ops). The grids and shifts are drawn up front from a generator seeded with ``seed`` (the
same masks for every strategy and batch size); the full-size masks are made batch by batch,
never all held in memory.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .maps import MapExplanation, map_explanation
from .._util.progress import progress_bar
from .perturb import check_output, check_positive, prepare_image, resolve_batch_size, resolve_targets
from .soft import require_soft
from .strategies import Strategy, bound_forward


def check_probability(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
        raise ValueError(f"p must be a probability in (0, 1) (a cell's chance to stay visible), got {p!r}")
    return float(p)


def rise_draw(n: int, size: Tuple[int, int], cells: int = 7, p: float = 0.5, *,
              generator: Optional[torch.Generator] = None):
    """The random part of n RISE masks: (n x 1 x cells x cells 0/1 grids, row shifts, column shifts)."""
    h, w = size
    grid = (torch.rand(n, 1, cells, cells, generator=generator) < p).float()
    dy = torch.randint(0, math.ceil(h / cells), (n,), generator=generator)
    dx = torch.randint(0, math.ceil(w / cells), (n,), generator=generator)
    return grid, dy, dx


def rise_upsample(grid: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, size: Tuple[int, int], *,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """n x 1 x H x W masks in [0, 1] from drawn grids and shifts (see the module docstring)."""
    h, w = size
    n, _, cells, _ = grid.shape
    cell_h, cell_w = math.ceil(h / cells), math.ceil(w / cells)
    padded = F.pad(grid.to(dtype), (1, 1, 1, 1), mode="reflect" if cells > 1 else "replicate")
    # the cells grid spans H + c pixels: cells of s = ceil((H + c) / cells) pixels, upsampled with
    # the reflected border cell on each side, then the window [s + shift, s + shift + H)
    span_h, span_w = math.ceil((h + cell_h) / cells), math.ceil((w + cell_w) / cells)
    up = F.interpolate(padded, size=(span_h * (cells + 2), span_w * (cells + 2)), mode="bilinear",
                       align_corners=False)
    rows = span_h + dy[:, None] + torch.arange(h)[None, :]            # n x H
    cols = span_w + dx[:, None] + torch.arange(w)[None, :]            # n x W
    out = up[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]]  # n x H x W
    return out[:, None].to(device)


def rise_masks(n: int, size: Tuple[int, int], cells: int = 7, p: float = 0.5, *,
               generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """n x 1 x H x W RISE masks in [0, 1] (see the module docstring)."""
    return rise_upsample(*rise_draw(n, size, cells, p, generator=generator), size, device=device, dtype=dtype)


def explain_rise(strategy: Strategy, image: torch.Tensor, *, targets: Union[None, int, Sequence[int]] = None,
                 n_masks: int = 4000, cells: int = 7, p: float = 0.5, seed: int = 0, binary: bool = False,
                 batch_size: Optional[int] = None, output: str = "prob",
                 progress: Optional[bool] = None) -> MapExplanation:
    """RISE saliency maps (T x H x W as a MapExplanation) of ``image`` (3 x H x W in [0, 1])."""
    image = prepare_image(image)
    check_positive(n_masks, "n_masks")
    check_positive(cells, "cells")
    p = check_probability(p)
    check_output(output)
    if not binary:
        require_soft(strategy, "explain_rise (binary=False)")
    batch_size = resolve_batch_size(batch_size, image.device)
    h, w = image.shape[1:]
    if cells > min(h, w):
        raise ValueError(f"cells must be at most the image's shorter side ({min(h, w)} px), got {cells}")
    targets, _ = resolve_targets(strategy, image, targets, output)
    idx = torch.as_tensor(targets, device=image.device)
    # every random number drawn up front (tiny): the masks do not depend on the batch size
    grid, dys, dxs = rise_draw(n_masks, (h, w), cells, p, generator=torch.Generator().manual_seed(int(seed)))
    if not isinstance(batch_size, int):
        from .batching import batch_size_for

        def first_masks(b):  # the run's own first masks (repeated when there are fewer)
            rows = torch.arange(b) % n_masks
            m = rise_upsample(grid[rows], dys[rows], dxs[rows], (h, w), device=image.device, dtype=image.dtype)
            return m > 0.5 if binary else m

        batch_size = batch_size_for(batch_size, strategy, image, first_masks, n_masks)
    forward = bound_forward(strategy, image)
    saliency = torch.zeros(len(targets), h * w, dtype=torch.float64, device=image.device)
    with torch.inference_mode(), progress_bar(n_masks, f"rise ({strategy.name})", "mask", enabled=progress,
                                                     auto_min=256) as bar:
        for start in range(0, n_masks, batch_size):
            b = min(batch_size, n_masks - start)
            sl = slice(start, start + b)
            masks = rise_upsample(grid[sl], dys[sl], dxs[sl], (h, w), device=image.device, dtype=image.dtype)
            if binary:
                masks = masks > 0.5
            logits = forward(masks).float()
            vals = logits.softmax(1) if output == "prob" else logits
            saliency += vals[:, idx].double().T @ masks.reshape(b, h * w).double()
            bar.update(b)
    saliency /= n_masks * p
    info = {"n_masks": n_masks, "cells": cells, "p": p, "seed": int(seed), "binary": bool(binary),
            "output": output}
    return map_explanation("rise", strategy.name, targets, saliency.view(len(targets), h, w), info=info)
