"""Occlusion / feature ablation over a grid, superpixels or sliding windows, batched through any strategy.

The attribution of segment k is f(full image) - f(image with segment k removed), for each
target: one forward pass per segment, all in batches. A grid of patches is occlusion in the
sense of Zeiler & Fergus (non-overlapping windows); superpixels make it feature ablation.

Sliding windows (``window``, ``stride``; as Captum's ``Occlusion``): windows start every
``stride`` pixels, ``ceil((size - window) / stride) + 1`` of them per axis (the last one clipped
at the border, so every pixel is covered), and a pixel's attribution is the mean drop over the
windows that cover it. Pixels covered by the same windows form one segment of the returned
Explanation (rows and columns separate, so these cells are rectangles), which keeps it a
segment map plus per-segment weights like the other explainers.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .perturb import (Explanation, check_output, forward_samples, get_segments, prepare_image,
                      resolve_batch_size, resolve_targets)
from .strategies import Strategy

Size = Union[int, Sequence[int]]


def _pair(value: Size, name: str) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be an int >= 1 or a pair of them (height, width), got {value!r}")
    return pair


def _axis_cover(size: int, window: int, stride: int) -> torch.Tensor:
    """P x size bool: window p (starting at p * stride, clipped at the border) covers pixel y."""
    count = math.ceil((size - window) / stride) + 1
    starts = torch.arange(count)[:, None] * stride
    y = torch.arange(size)[None, :]
    return (y >= starts) & (y < starts + window)


def window_cells(height: int, width: int, window: Size, stride: Optional[Size] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(segments H x W, cover P x K bool) of sliding windows: segment k = the pixels covered by exactly
    the same windows; cover[p, k] = window p covers segment k. Windows are numbered row-major."""
    wh, ww = _pair(window, "window")
    sh, sw = _pair(window if stride is None else stride, "stride")
    if wh > height or ww > width:
        raise ValueError(f"window {wh} x {ww} is larger than the image ({height} x {width})")
    for s, w, d in ((sh, wh, height), (sw, ww, width)):
        if s > w and w < d:
            raise ValueError(f"stride {s} is larger than the window {w}: pixels between windows would never be "
                             f"removed (use a stride <= the window)")
    rows, cols = _axis_cover(height, wh, sh), _axis_cover(width, ww, sw)
    row_classes, row_of = torch.unique(rows.T, dim=0, return_inverse=True)  # classes x P_rows
    col_classes, col_of = torch.unique(cols.T, dim=0, return_inverse=True)
    segments = row_of[:, None] * col_classes.shape[0] + col_of[None, :]
    cover = row_classes.T[:, None, :, None] & col_classes.T[None, :, None, :]  # Pr x Pc x Kr x Kc
    return segments, cover.reshape(rows.shape[0] * cols.shape[0], -1)


def explain_occlusion(strategy: Strategy, image: torch.Tensor, *, targets: Union[None, int, Sequence[int]] = None,
                      segments: Union[str, torch.Tensor, None] = None, n_segments: int = 64,
                      window: Optional[Size] = None, stride: Optional[Size] = None,
                      batch_size: Optional[int] = None, output: str = "prob", seed: int = 0,
                      incremental: bool = False, progress: Optional[bool] = None) -> Explanation:
    """Drop in output when each segment (or each sliding window) is removed; T x K weights.

    Default: an 8 x 8 grid of segments. ``window`` (and ``stride``, default = window) switch to
    sliding windows (see the module docstring); they exclude ``segments``.

    ``incremental``: recompute only what each removal changes, on top of one clean forward
    (masked_ops.explain.incremental: Krypton's exact incremental inference; equal to full forwards to
    rounding). For strategies that paint the removed pixels (grey, black, blur, ...) and hard layer
    masking, on models torch.fx can trace; it pays for small windows on models whose early layers hold
    the time (ResNet-50, 32 px windows, grey fill: 1.7x-2.0x on CPU; layer masking 1.05x-1.5x;
    bench/README.md). Default batch 8 (``batch_size`` None or "auto"). Where the engine would compute
    no conv on a changed region alone (EfficientNet-Lite under layer masking: its first conv has no rule),
    full forwards run instead and ``meta["incremental"]`` is False.
    """
    image = prepare_image(image)
    check_output(output)
    if not isinstance(incremental, bool):
        raise TypeError(f"incremental must be True or False, got {incremental!r}")
    batch_size = resolve_batch_size(batch_size, image.device)
    if window is None:
        if stride is not None:
            raise ValueError("stride applies to sliding windows: give window too")
        seg = get_segments(image, "grid" if segments is None else segments, n_segments, seed)
        samples = 1.0 - torch.eye(int(seg.max()) + 1, dtype=torch.float64)  # row k: everything but segment k
        cover = None
    else:
        if segments is not None:
            raise ValueError("occlusion takes either segments or a sliding window, not both")
        seg, cover = window_cells(image.shape[1], image.shape[2], window, stride)
        seg = seg.to(image.device)
        samples = 1.0 - cover.double()  # row p: everything but window p
    targets, full = resolve_targets(strategy, image, targets, output)
    outputs = None
    if incremental:
        from .incremental import incremental_outputs

        outputs = incremental_outputs(strategy, image, seg, samples, targets, batch_size=batch_size, output=output,
                                      progress=progress, desc=f"occlusion ({strategy.name}, incremental)")
    outputs_incremental = outputs is not None
    if outputs is None:  # not asked, or the engine would save nothing for this model (it said so)
        outputs = forward_samples(strategy, image, seg, samples, targets, batch_size=batch_size, output=output,
                                  progress=progress, desc=f"occlusion ({strategy.name})")
    drops = full.double().cpu()[None, :] - outputs  # P x T
    if cover is None:
        weights = drops.T
        meta = {}
    else:
        c = cover.double()
        weights = (c.T @ drops / c.sum(0)[:, None]).T  # mean drop over the windows covering each cell
        meta = {"window": list(_pair(window, "window")), "stride": list(_pair(window if stride is None else stride,
                                                                                "stride"))}
    if incremental:  # True, or False where the engine would have saved nothing and full forwards ran
        meta["incremental"] = outputs_incremental
    return Explanation("occlusion", strategy.name, targets, weights.float(), seg.cpu(), samples=samples,
                       outputs=outputs, output=output, meta=meta)
