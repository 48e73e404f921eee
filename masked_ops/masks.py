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
def input_mask(x: torch.Tensor, mask: Optional[torch.Tensor], soft: bool = False) -> torch.Tensor:
    """The checked float mask of a converted model's input (``mask=None``: NaN pixels are removed).
    ``soft``: a mask in [0, 1] (a degree of visibility), kept differentiable."""
    C.check_input(x)
    if mask is None:
        return (~torch.isnan(x).any(dim=1, keepdim=True)).to(x.dtype)
    C.check_mask(mask, x, soft=soft)
    return op_mask(mask, x, soft)


def soft_floor_value(dtype: torch.dtype) -> float:
    """The smallest soft mask value that counts as (partly) visible: 1e-6, or the dtype's epsilon
    where that is larger (float16, bfloat16)."""
    return max(1e-6, torch.finfo(dtype).eps)


def soft_floor(m: torch.Tensor) -> torch.Tensor:
    """A soft mask with every value below ``soft_floor_value`` set to 0 (removed).

    Why: the soft fill divides by box3(k), the knownness around a pixel, and its gradient by that
    sum again; a mask value of 1e-30 (soft residual joins multiply masks, so values shrink fast in a
    deep network) made those quotients overflow to inf and the mask gradient NaN. Below the floor a
    pixel is removed (no gradient there); at or above it the quotients stay below 1 / floor. 0/1
    masks are unchanged (the hard rules, bit for bit).
    """
    return torch.where(m >= soft_floor_value(m.dtype), m, torch.zeros((), dtype=m.dtype, device=m.device))


def op_mask(mask: torch.Tensor, x: torch.Tensor, soft: bool) -> torch.Tensor:
    """The canonical internal mask of an op's checked mask argument (soft: floored, see soft_floor)."""
    m = C.as_float_mask(mask, x)
    return soft_floor(m) if soft else m


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


# ----------------------------------------------------------------------------- windows
# ----------------------------------------------------------------------------- soft semantics
# What a soft model's forward computes from a mask in [0, 1] (``layer_mask(model, soft=...)``;
# docs/design.md, "Soft masks"). "blend": every layer reads a pixel blended with its fill by its mask
# value (the soft rules below and the soft ops). "threshold": the forward is the hard model at
# m >= 1/2; the backward is the blend's gradient at that 0/1 mask (straight-through). "sample": the
# forward is the hard model at a 0/1 mask drawn pixel by pixel with P(visible) = m (a fresh draw per
# forward, from torch's global generator), the backward straight-through as for "threshold". At a 0/1
# mask all three are the hard model, bit for bit. ``soft=True`` takes DEFAULT_SOFT, chosen by measured
# faithfulness (bench/README.md, "Soft semantics").
SOFT_SEMANTICS = ("blend", "threshold", "sample")
DEFAULT_SOFT = "blend"
STRAIGHT_THROUGH = ("threshold", "sample")


def check_soft(soft) -> Optional[str]:
    """None for hard masks (``soft`` False/None), else the name of the soft semantics (True: DEFAULT_SOFT)."""
    if soft is None or soft is False:
        return None
    if soft is True:
        return DEFAULT_SOFT
    if isinstance(soft, str) and soft in SOFT_SEMANTICS:
        return soft
    raise ValueError(f"soft must be False (hard 0/1 masks), True (the default soft semantics, "
                     f"{DEFAULT_SOFT!r}) or one of {SOFT_SEMANTICS}, got {soft!r}")


def straight_through(m: torch.Tensor, semantics: str) -> torch.Tensor:
    """The 0/1 mask a straight-through soft model runs at, carrying m's gradient unchanged.

    Its value is exactly 0 or 1 (hard + (m - m.detach()): the difference is exactly 0), so every layer
    takes its hard path's values; its gradient is the identity to m, so the backward is the soft
    rules' gradient at that 0/1 mask. "threshold": m >= 1/2; "sample": visible with probability m
    (m = 1 always, m = 0 never, so a 0/1 mask is kept as it is).
    """
    if semantics == "threshold":
        hard = m >= 0.5
    elif semantics == "sample":
        hard = torch.rand_like(m) < m
    else:
        raise ValueError(f"straight_through: semantics must be one of {STRAIGHT_THROUGH}, got {semantics!r}")
    return hard.to(m.dtype) + (m - m.detach())


# ----------------------------------------------------------------------------- windows
# Output masks of soft layers, by rule (``soft_keep=``): "max", the hard rule's maxpool(m) itself (the
# gradient goes to each window's largest mask value). It is depth-consistent: a spatially constant
# mask c keeps the value c through any stack of convs and pools, and raising m never lowers it.
# (An earlier "prob" rule, 1 - prod(1 - m) over the window, was removed: a constant mask c became
# 1 - (1 - c)^(k*k) at every conv, so soft values drifted towards 1 with depth.) None: hard masks.
KEEP_RULES = ("max",)


def check_keep_rule(soft) -> Optional[str]:
    if soft == "prob":
        raise ValueError("soft_keep='prob' was removed: 1 - prod(1 - m) over a window is not depth-consistent "
                         "(a constant mask c grows towards 1 at every conv); use soft_keep='max'")
    if soft is not None and soft not in KEEP_RULES:
        raise ValueError(f"soft_keep must be one of {KEEP_RULES}, got {soft!r}")
    return soft


def _pool_output_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """ATen's pooling_output_shape."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def window_sum(m: torch.Tensor, kernel, stride, padding, dilation, ceil_mode: bool = False) -> torch.Tensor:
    """Sum of m over each window of a conv (or, with ceil_mode, a pool) of this geometry; zero padding."""
    kernel, stride, padding, dilation = tuple(kernel), tuple(stride), tuple(padding), tuple(dilation)
    if ceil_mode:  # pad the far side so the last, partial windows exist (they sum what they cover)
        extra = []
        for size, k, s, p, d in zip(m.shape[-2:], kernel, stride, padding, dilation):
            out = _pool_output_size(size, k, s, p, d, True)
            extra.append(max(0, (out - 1) * s + d * (k - 1) + 1 - (size + 2 * p)))
        m = F.pad(m, (padding[1], padding[1] + extra[1], padding[0], padding[0] + extra[0]))
        padding = (0, 0)
    ones = torch.ones(1, 1, kernel[0], kernel[1], dtype=m.dtype, device=m.device)
    return F.conv2d(m, ones, None, stride, padding, dilation)


def window_keep(mask: torch.Tensor, kernel, stride, padding, dilation, ceil_mode: bool = False) -> torch.Tensor:
    """maxpool(m) over each window: 1 where it holds a visible pixel (hard), its largest value (soft)."""
    kernel, stride, padding, dilation = tuple(kernel), tuple(stride), tuple(padding), tuple(dilation)
    if ceil_mode:  # a pool's geometry (its padding is at most half its kernel): max pooling itself
        return F.max_pool2d(mask, kernel, stride, padding, dilation, True)
    # A conv's geometry (any padding): maxpool(m) with zero padding (m >= 0: the same as max
    # pooling's -inf padding wherever a window holds an image pixel, and 0 for a window of
    # padding only, as the window sum says).
    padded = F.pad(mask, (padding[1], padding[1], padding[0], padding[0]))
    return F.max_pool2d(padded, kernel, stride, 0, dilation)


# ----------------------------------------------------------------------------- conv
def conv_keep(mask: torch.Tensor, kernel, stride, padding, dilation, prepad: Prepad = None,
              soft: Optional[str] = None) -> torch.Tensor:
    """Output mask of a masked conv: maxpool(m) with the conv's geometry, i.e. 1 where the window
    holds a visible pixel (soft: its relaxation, KEEP_RULES). ``prepad``: explicit zero padding applied
    before the conv (None, (left, right, top, bottom) or "same")."""
    return conv_masks(mask, kernel, stride, padding, dilation, "fill", False, prepad, soft)[0]


def renorm_masks(mask: torch.Tensor, kernel, stride, padding, dilation, padding_visible: bool = False,
                 prepad: Prepad = None, soft: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(keep, scale) of a renorm-mode (partial) conv; see conv_masks."""
    return conv_masks(mask, kernel, stride, padding, dilation, "renorm", padding_visible, prepad, soft)


def conv_masks(mask: torch.Tensor, kernel, stride, padding, dilation, mode: str = "fill",
               padding_visible: bool = False, prepad: Prepad = None,
               soft: Optional[str] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(keep, scale) of a masked conv: the output mask and, in renorm mode, the renorm factor.

    keep = maxpool(m) with the conv's geometry (1 where the window holds a visible pixel), hard:
    computed as window_sum(m) > 0 so that one window sum serves keep and scale (under torch.compile, in
    fill and zero modes, as window_keep: the same 0/1 values); soft: window_keep.
    scale = k_h*k_w / window_sum(m) where that sum is > 0, 0 elsewhere (mode "renorm" only; None
    otherwise): partial convolution's factor, differentiable in a soft mask. With ``padding_visible``
    the zero-padded border, explicit ``prepad`` included, counts as visible in that denominator (an
    all-ones mask then reproduces the plain conv exactly); by default it counts as removed, as in
    partial convolution.
    """
    kernel, stride, padding, dilation = tuple(kernel), tuple(stride), tuple(padding), tuple(dilation)
    m = mask
    if prepad is not None:
        m = F.pad(m, explicit_pads(prepad, m, kernel, stride, dilation))
    wsum = None
    if soft is None and mode != "renorm" and C.is_compiling():
        # The same 0/1 keep as a max pool: inductor lowers it to its own loops, where the window sum is a
        # one-channel oneDNN conv (compiled Lite0, batch 4: 4%-9% faster per forward; eager the conv is
        # the faster of the two, 2x at 224 px, so eager keeps it).
        keep = window_keep(m, kernel, stride, padding, dilation)
    elif soft is None:
        wsum = window_sum(m, kernel, stride, padding, dilation)
        keep = (wsum > 0).to(mask.dtype)
    else:
        keep = window_keep(m, kernel, stride, padding, dilation)
    if mode != "renorm":
        return keep, None
    if padding_visible and (prepad is not None or padding[0] or padding[1]):
        full = mask
        if prepad is not None:
            full = F.pad(full, explicit_pads(prepad, mask, kernel, stride, dilation), value=1.0)
        full = F.pad(full, (padding[1], padding[1], padding[0], padding[0]), value=1.0)
        wsum = window_sum(full, kernel, stride, (0, 0), dilation)
    elif wsum is None:
        wsum = window_sum(m, kernel, stride, padding, dilation)
    # The ratio in at least float32 (fp16 would round k*k/ws); float64 stays float64. A hard window
    # sum is an integer >= 1 where it is > 0; a soft one may be any positive number.
    ws = wsum.to(torch.promote_types(wsum.dtype, torch.float32))
    scale = (kernel[0] * kernel[1]) / ws.clamp_min(1.0 if soft is None else torch.finfo(ws.dtype).tiny)
    scale = torch.where(ws > 0, scale, torch.zeros((), dtype=scale.dtype, device=scale.device))
    return keep, scale.to(mask.dtype)


def conv_keeps_input_mask(kernel, stride, padding, prepad: Prepad, mode: str) -> bool:
    """A 1x1, stride-1, unpadded conv (not renorm) keeps exactly its input mask: keep = m."""
    return tuple(kernel) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) \
        and prepad is None and mode != "renorm"


# ----------------------------------------------------------------------------- pooling
def pool_mask(mask: torch.Tensor, kernel, stride, padding, dilation=(1, 1), ceil_mode: bool = False,
              prepad: Prepad = None, soft: Optional[str] = None) -> torch.Tensor:
    """Output mask of a max or average pool: maxpool(m), 1 where the window holds a visible pixel
    (soft: its relaxation, KEEP_RULES).

    (The paper writes the average pool's as avgpool(m) > 0; for a 0/1 mask that is the same set.)
    """
    kernel, stride, padding, dilation = tuple(kernel), tuple(stride), tuple(padding), tuple(dilation)
    if prepad is not None:
        mask = F.pad(mask, explicit_pads(prepad, mask, kernel, stride, dilation))
    if soft is None:
        return F.max_pool2d(mask, kernel, stride, padding, dilation, ceil_mode)
    return window_keep(mask, kernel, stride, padding, dilation, ceil_mode)


def adaptive_fraction(mask: torch.Tensor, output_size) -> torch.Tensor:
    """Per bin of an adaptive average pool, the mean mask value (the fraction of visible pixels):
    the denominator of the masked mean per bin."""
    return F.adaptive_avg_pool2d(mask, tuple(output_size))


def adaptive_keep(mask: torch.Tensor, output_size, soft: Optional[str] = None) -> torch.Tensor:
    """Output mask of an adaptive average pool: 1 where the bin holds a visible pixel (soft: the bin's
    largest mask value)."""
    if soft is None:
        return indicator(adaptive_fraction(mask, output_size))
    return F.adaptive_max_pool2d(mask, tuple(output_size))


def upsample_nearest(mask: torch.Tensor, scale) -> torch.Tensor:
    """Output mask of a nearest-neighbour upsampling by integer factors (sh, sw): every output pixel
    copies one input pixel, and its mask value with it (soft masks alike: idempotent and monotone)."""
    return mask.repeat_interleave(int(scale[0]), dim=2).repeat_interleave(int(scale[1]), dim=3)


def space_to_depth(mask: torch.Tensor, block: int) -> torch.Tensor:
    """Output mask of a space-to-depth by ``block`` (TResNet's stem): an output pixel stacks a block x block
    square into its channels, so it is visible only as far as every pixel of the square is (the minimum;
    soft masks alike: idempotent and monotone, the rule of the soft joins)."""
    return -F.max_pool2d(-mask, int(block), int(block))


def small_map_pool(mask: torch.Tensor, kernel: int, soft: Optional[str] = None):
    """timm's VGG head pools a map smaller than its kernel up to kernel x kernel (adaptive average pooling)
    before its first conv. (visible fraction per bin, the pooled mask), or (None, mask) for a large map."""
    h, w = mask.shape[-2:]
    if h >= kernel and w >= kernel:
        return None, mask
    size = (max(kernel, h), max(kernel, w))
    return adaptive_fraction(mask, size), adaptive_keep(mask, size, soft)


def conv_mlp_keep(mask: torch.Tensor, kernel: int, soft: Optional[str] = None) -> torch.Tensor:
    """Output mask of timm's VGG head (ConvMlp): the small-map pool if any, then its kernel x kernel conv
    without padding (its 1 x 1 conv keeps that mask)."""
    _, m = small_map_pool(mask, kernel, soft)
    return conv_keep(m, (kernel, kernel), (1, 1), (0, 0), (1, 1), soft=soft)


def pad_reflect(mask: torch.Tensor, pads) -> torch.Tensor:
    """A mask reflect-padded like its activations (``F.pad(x, pads, mode="reflect")``): a border pixel is a
    copy of an interior pixel, so it is visible exactly as far as that pixel is."""
    return F.pad(mask, tuple(int(p) for p in pads), mode="reflect")


def upsample_bilinear(mask: torch.Tensor, scale, align_corners: bool, soft: Optional[str] = None) -> torch.Tensor:
    """Output mask of a bilinear upsampling by integer factors: visible where any input pixel that contributes
    (with a positive weight) is visible. Soft masks: the bilinear average of the mask values, which keeps a
    constant mask constant and never lowers a value when an input rises."""
    up = F.interpolate(mask, scale_factor=tuple(int(s) for s in scale), mode="bilinear",
                       align_corners=bool(align_corners))
    return up if soft is not None else (up > 0).to(mask.dtype)


def bilinear_weights(mask: torch.Tensor, scale, align_corners: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """What a bilinear upsampling over visible pixels divides by: (divisor, partial). divisor is the sum of
    the bilinear weights of the visible contributors (1 where it would be 0, so the division is safe; the
    output mask removes those pixels); partial is True where a removed pixel contributes, the only places
    that need the division (elsewhere the plain value stays, bit for bit). Soft masks: visibility is m > 0."""
    visible = (mask > 0).to(mask.dtype)
    up = lambda t: F.interpolate(t, scale_factor=tuple(int(s) for s in scale), mode="bilinear",  # noqa: E731
                                 align_corners=bool(align_corners))
    weight, missing = up(visible), up(1 - visible)
    return torch.where(weight > 0, weight, torch.ones((), dtype=mask.dtype, device=mask.device)), missing > 0


def indicator(t: torch.Tensor) -> torch.Tensor:
    """1 where t > 0, else 0, in t's dtype (the mask of a bin with any visible pixel)."""
    return (t > 0).to(t.dtype)


# ----------------------------------------------------------------------------- joins
JOINS = ("majority", "union", "intersection")


def join(masks: Sequence[torch.Tensor], how: str) -> torch.Tensor:
    """Mask of a join of several masked maps, for hard and soft masks alike.

    "intersection" (residual add, any elementwise op): the elementwise minimum (visible where every
    input is); "union" (Fire's concat): the maximum; "majority" (DenseNet's concat): the
    ceil(n/2)-th largest, i.e. visible where at least half the inputs are (a tie counts as visible,
    so a two-way majority is the union). At 0/1 masks these are exactly the set operations. All three
    are idempotent (a join of a mask with itself, or with masks derived from it by the depth-consistent
    keep rule, gives it back), so soft values do not decay with depth; the product, used before as the
    soft intersection, turned m into about m^(2^k) after k residual blocks (docs/design.md, "Soft masks").
    """
    masks = list(masks)
    if how not in JOINS:
        raise ValueError(f"concat must be one of {JOINS}, got {how!r}")
    if len(masks) == 1:
        return masks[0]
    out = masks[0]
    if how in ("intersection", "union"):
        combine = torch.minimum if how == "intersection" else torch.maximum
        for m in masks[1:]:
            out = combine(out, m)
        return out
    k = (len(masks) + 1) // 2
    if k == 1:
        return join(masks, "union")
    return torch.stack(masks).topk(k, dim=0).values[k - 1]
