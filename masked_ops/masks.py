"""The mask path: every rule that turns input masks into output masks, in one place.

A layer-masked model computes its masks from the input mask alone, before and independently
of the activations, so each function here is called once per forward per distinct geometry
(the converted model's graph shares them; see masked_ops.convert). The public ops
(masked_ops.ops), the masked layers (masked_ops.nn) and the reference backend
(masked_ops.backends.reference) all call these functions; nothing else computes a mask.

Masks are floating N x 1 x H x W tensors, 1 = visible, 0 = removed, in the activations' dtype
(N x 1 x H x W bool or float at the public API; ``input_mask`` canonicalises them).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import _checks as C

Prepad = Union[None, str, Tuple[int, int, int, int]]


# ----------------------------------------------------------------------------- the input
def input_mask(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The checked float mask of a converted model's input (``mask=None``: NaN pixels are removed)."""
    C.check_input(x)
    if mask is None:
        return (~torch.isnan(x).any(dim=1, keepdim=True)).to(x.dtype)
    C.check_mask(mask, x)
    return C.as_float_mask(mask, x)


def select_visible(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where the mask is visible, exactly 0 elsewhere: NaN/inf there are selected away, never
    multiplied by zero. A converted model does this once to its input, so that every later
    activation is 0 at removed positions (the activation-path invariant)."""
    return torch.where(mask > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ----------------------------------------------------------------------------- explicit padding
def same_pads(size_hw, kernel, stride, dilation) -> Tuple[int, int, int, int]:
    """TensorFlow "SAME" padding (left, right, top, bottom) for an input of size ``size_hw``."""
    pads = []
    for size, k, s, d in zip(size_hw, kernel, stride, dilation):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


def explicit_pads(prepad: Prepad, t: torch.Tensor, kernel, stride, dilation) -> Tuple[int, int, int, int]:
    """Explicit padding before a conv/pool: a fixed (left, right, top, bottom) or "same" (from t's size)."""
    if prepad == "same":
        return same_pads(t.shape[-2:], kernel, stride, dilation)
    return prepad


# ----------------------------------------------------------------------------- conv
def _window_sum(m: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    ones = torch.ones(1, 1, kernel[0], kernel[1], dtype=m.dtype, device=m.device)
    return F.conv2d(m, ones, None, stride, padding, dilation)


def conv_keep(mask: torch.Tensor, kernel, stride, padding, dilation, prepad: Prepad = None) -> torch.Tensor:
    """Output mask of a masked conv: maxpool(m) with the conv's geometry, i.e. 1 where the window
    holds a visible pixel (window_sum(m) > 0). ``prepad``: explicit zero padding applied before
    the conv (None, (left, right, top, bottom) or "same")."""
    return conv_masks(mask, kernel, stride, padding, dilation, "fill", False, prepad)[0]


def renorm_masks(mask: torch.Tensor, kernel, stride, padding, dilation, padding_visible: bool = False,
                 prepad: Prepad = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(keep, scale) of a renorm-mode (partial) conv; see conv_masks."""
    return conv_masks(mask, kernel, stride, padding, dilation, "renorm", padding_visible, prepad)


def conv_masks(mask: torch.Tensor, kernel, stride, padding, dilation, mode: str = "fill",
               padding_visible: bool = False, prepad: Prepad = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(keep, scale) of a masked conv: the output mask and, in renorm mode, the renorm factor.

    keep = maxpool(m) with the conv's geometry (1 where the window holds a visible pixel),
    computed as window_sum(m) > 0 so that one window sum serves keep and scale.
    scale = k_h*k_w / window_sum(m) on kept positions, 0 elsewhere (mode "renorm" only;
    None otherwise). With ``padding_visible`` the zero-padded border, explicit ``prepad``
    included, counts as visible in that denominator (an all-ones mask then reproduces the
    plain conv exactly); by default it counts as removed, as in partial convolution.
    """
    kernel, stride, padding, dilation = tuple(kernel), tuple(stride), tuple(padding), tuple(dilation)
    m = mask
    if prepad is not None:
        m = F.pad(m, explicit_pads(prepad, m, kernel, stride, dilation))
    wsum = _window_sum(m, kernel, stride, padding, dilation)
    keep = (wsum > 0.5).to(mask.dtype)
    if mode != "renorm":
        return keep, None
    if padding_visible and (prepad is not None or padding[0] or padding[1]):
        full = mask
        if prepad is not None:
            full = F.pad(full, explicit_pads(prepad, mask, kernel, stride, dilation), value=1.0)
        full = F.pad(full, (padding[1], padding[1], padding[0], padding[0]), value=1.0)
        wsum = _window_sum(full, kernel, stride, (0, 0), dilation)
    # The ratio in at least float32 (fp16 would round k*k/ws); float64 stays float64.
    scale = (kernel[0] * kernel[1]) / wsum.to(torch.promote_types(wsum.dtype, torch.float32)).clamp_min(1.0)
    scale = torch.where(keep > 0, scale, torch.zeros((), dtype=scale.dtype, device=scale.device))
    return keep, scale.to(mask.dtype)


def conv_keeps_input_mask(kernel, stride, padding, prepad: Prepad, mode: str) -> bool:
    """A 1x1, stride-1, unpadded conv (not renorm) keeps exactly the visible pixels: keep = m."""
    return tuple(kernel) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) \
        and prepad is None and mode != "renorm"


# ----------------------------------------------------------------------------- pooling
def pool_mask(mask: torch.Tensor, kernel, stride, padding, dilation=(1, 1), ceil_mode: bool = False,
              prepad: Prepad = None) -> torch.Tensor:
    """Output mask of a max or average pool: maxpool(m), 1 where the window holds a visible pixel.

    (The paper writes the average pool's as avgpool(m) > 0; for a 0/1 mask that is the same set.)
    """
    kernel, stride, padding, dilation = tuple(kernel), tuple(stride), tuple(padding), tuple(dilation)
    if prepad is not None:
        mask = F.pad(mask, explicit_pads(prepad, mask, kernel, stride, dilation))
    return F.max_pool2d(mask, kernel, stride, padding, dilation, ceil_mode)


def adaptive_fraction(mask: torch.Tensor, output_size) -> torch.Tensor:
    """Per bin of an adaptive average pool, the fraction of visible pixels (its denominator)."""
    return F.adaptive_avg_pool2d(mask, tuple(output_size))


def indicator(t: torch.Tensor) -> torch.Tensor:
    """1 where t > 0, else 0, in t's dtype (the mask of a bin with any visible pixel)."""
    return (t > 0).to(t.dtype)


# ----------------------------------------------------------------------------- joins
JOINS = ("majority", "union", "intersection")


def join(masks: Sequence[torch.Tensor], how: str) -> torch.Tensor:
    """Mask of a join of several masked maps.

    "intersection" (residual add, any elementwise op): visible where every input is;
    "union" (Fire's concat): where any input is; "majority" (DenseNet's concat): where at
    least half the inputs are (a tie counts as visible, so a two-way majority is the union).
    """
    masks = list(masks)
    if how not in JOINS:
        raise ValueError(f"concat must be one of {JOINS}, got {how!r}")
    if len(masks) == 1:
        return masks[0]
    if how == "intersection":
        out = masks[0]
        for m in masks[1:]:
            out = torch.minimum(out, m)
        return out
    if how == "union":
        out = masks[0]
        for m in masks[1:]:
            out = torch.maximum(out, m)
        return out
    n = len(masks)
    return ((2 * sum(masks)) >= n).to(masks[0].dtype)
