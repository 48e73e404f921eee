"""Masked layers: the building blocks of a layer-masked model (DESIGN.md section 2).

Every layer splits its work into two paths, so that a converted model computes all the
masks of a forward pass once, before any activation, and shares them between layers of
the same geometry (the "mask pyramid"):

- ``plan(mg, in_masks) -> out_mask_key`` runs once, at conversion. It registers the mask
  computations the layer needs in a :class:`MaskGraph` (keys are structural, so two layers
  with the same input mask and the same geometry share one computation) and remembers the
  keys it will read. ``None`` as the result means "the output carries no mask" (after a
  global pool or a flatten head). An input that carries no mask has key ``None``.
- ``run(inputs, masks) -> tensor`` runs every forward. ``inputs`` are the runtime values
  of the layer's inputs, ``masks`` the evaluated mask graph (key -> tensor).

Invariant of the activation path: every masked activation is exactly 0 at removed
positions and finite (the converted model zeroes its input once with ``torch.where``), so
layers may skip the zeroing prologue and 1x1 convs need neither fill nor zeroing. Layers
whose output could be non-zero at removed positions (bias, sigmoid, a changed mask)
re-zero with ``torch.where``, never by multiplying with the mask.

Masks are floating N x 1 x H x W tensors holding 0/1 in the activations' dtype. A layer
instance belongs to one position in one converted graph (``plan`` stores keys on it);
``forward(x, mask)`` runs a single layer on its own for tests and experiments.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks as C
from .activations import apply_activation, check_activation
from .backends import resolve
from .modes import check_mode, fill_iters
from .ops import bn_affine, conv_mask_path, epilogue_of_fresh

Key = int  # masks are named by small ints; structural tuples of ints map to them
INPUT: Key = 0

# Activations with f(0) == 0: their output stays 0 where the input is 0 (no re-zeroing).
ZERO_PRESERVING = {"none", "relu", "relu6", "leaky_relu", "silu", "hardswish", "gelu", "tanh"}


def _zero(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x where m is visible, exactly 0 elsewhere (NaN/inf there are selected away)."""
    return torch.where(m > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _zero_fresh(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """_zero for a tensor this layer just allocated: in place when autograd does not need it."""
    if y.requires_grad and torch.is_grad_enabled():
        return _zero(y, m)
    return y.masked_fill_(m <= 0, 0)  # a select, not a product: NaN/inf there are overwritten too


_INPLACE_ACT = {"relu": torch.relu_, "relu6": lambda y: y.clamp_(0, 6)}


def _act_fresh(y: torch.Tensor, name: str) -> torch.Tensor:
    if name == "none":
        return y
    if name in _INPLACE_ACT and not (y.requires_grad and torch.is_grad_enabled()):
        return _INPLACE_ACT[name](y)
    return apply_activation(y, name)


def nhwc(m: torch.Tensor) -> torch.Tensor:
    """A N x 1 x H x W mask laid out to broadcast against N x H x W x C activations."""
    return m.permute(0, 2, 3, 1)


def layout_mask(m: torch.Tensor, layout: str) -> torch.Tensor:
    return nhwc(m) if layout == "nhwc" else m


# ----------------------------------------------------------------------------- mask graph
class MaskGraph:
    """The mask path of a converted model: structural keys -> functions of other masks.

    A mask is requested by a structural tuple (operation, geometry, source ids); a second
    request for the same tuple returns the existing id. Insertion order is topological.
    """

    def __init__(self):
        self.ids: Dict[tuple, Key] = {}
        self.ops: Dict[Key, Tuple[Callable, Tuple[Key, ...]]] = {}

    def add(self, structure: tuple, fn: Callable, srcs: Sequence[Key]) -> Key:
        key = self.ids.get(structure)
        if key is None:
            key = self.ids[structure] = len(self.ops) + 1
            self.ops[key] = (fn, tuple(srcs))
        return key

    def __len__(self):
        return len(self.ops)

    def evaluate(self, mask: torch.Tensor) -> Dict[Key, torch.Tensor]:
        values = {INPUT: mask}
        for key, (fn, srcs) in self.ops.items():
            values[key] = fn(*[values[s] for s in srcs])
        return values

    # --- the operations the built-in layers need
    def conv(self, src: Key, kernel, stride, padding, dilation, prepad, mode: str,
             padding_visible: bool) -> Tuple[Key, Optional[Key]]:
        """(keep key, renorm scale key or None) of a conv reading mask ``src``."""
        renorm = mode == "renorm"
        if tuple(kernel) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) \
                and prepad is None and not renorm:
            return src, None  # a 1x1 stride-1 conv keeps exactly the visible pixels
        geo = (tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), prepad,
               renorm, renorm and padding_visible)
        both = self.add(("conv",) + geo + (src,),
                        lambda m: _conv_masks(m, kernel, stride, padding, dilation, prepad, mode,
                                              padding_visible), [src])
        keep = self.add(("item0", both), lambda t: t[0], [both])
        scale = self.add(("item1", both), lambda t: t[1], [both]) if renorm else None
        return keep, scale

    def pool(self, src: Key, kind: str, kernel, stride, padding, dilation, ceil_mode, prepad) -> Key:
        """Output mask of a max/avg pool: 1 where the window holds a visible pixel."""
        geo = (kind, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), bool(ceil_mode), prepad)

        def fn(m):
            if prepad is not None:
                m = F.pad(m, _pads(prepad, m, kernel, stride, dilation))
            if kind == "max":
                return F.max_pool2d(m, kernel, stride, padding, dilation, ceil_mode)
            return (F.avg_pool2d(m, kernel, stride, padding, ceil_mode, True) > 0).to(m.dtype)

        return self.add(("pool",) + geo + (src,), fn, [src])

    def adaptive(self, src: Key, output_size) -> Tuple[Key, Key]:
        """(visible count per bin / bin size, its indicator) of an adaptive average pool."""
        frac = self.add(("adaptive_frac", output_size, src), lambda m: F.adaptive_avg_pool2d(m, output_size), [src])
        ind = self.add(("adaptive_keep", frac), lambda f: (f > 0).to(f.dtype), [frac])
        return frac, ind

    def combine(self, srcs: Sequence[Key], how: str) -> Key:
        """Mask of a join of several masked inputs: intersection, union or majority vote."""
        uniq = tuple(dict.fromkeys(srcs))
        if len(uniq) == 1:
            return uniq[0]
        if how == "intersection":
            return self.add(("and",) + tuple(sorted(uniq)),
                            lambda *ms: _reduce(torch.minimum, ms), uniq)
        if how == "union":
            return self.add(("or",) + tuple(sorted(uniq)),
                            lambda *ms: _reduce(torch.maximum, ms), uniq)
        if how == "majority":
            n = len(srcs)
            # "At least half the inputs": ties count as visible, so a two-way join is the union.
            return self.add(("vote",) + tuple(srcs),
                            lambda *ms: ((2 * sum(ms)) >= n).to(ms[0].dtype), list(srcs))
        raise ValueError(f"concat must be 'majority', 'union' or 'intersection', got {how!r}")


def _reduce(op, ms):
    out = ms[0]
    for m in ms[1:]:
        out = op(out, m)
    return out


def same_pads(size_hw, kernel, stride, dilation) -> Tuple[int, int, int, int]:
    """TensorFlow "SAME" padding (left, right, top, bottom) for an input of size_hw."""
    pads = []
    for size, k, s, d in zip(size_hw, kernel, stride, dilation):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


def _pads(prepad, t: torch.Tensor, kernel, stride, dilation):
    """Explicit padding before a conv/pool: a fixed (l, r, t, b) or "same" (from t's size)."""
    if prepad == "same":
        return same_pads(t.shape[-2:], kernel, stride, dilation)
    return prepad


def _conv_masks(m, kernel, stride, padding, dilation, prepad, mode, padding_visible):
    if prepad is None:
        return conv_mask_path(m, kernel, stride, padding, dilation, mode, padding_visible)
    pads = _pads(prepad, m, kernel, stride, dilation)
    keep, scale = conv_mask_path(F.pad(m, pads), kernel, stride, padding, dilation, mode, False)
    if scale is not None and padding_visible:
        # Explicit and implicit padding both count as visible in the renorm denominator.
        kh, kw = kernel
        ph, pw = padding
        full = F.pad(F.pad(m, pads, value=1.0), (pw, pw, ph, ph), value=1.0)
        wsum = F.conv2d(full, torch.ones(1, 1, kh, kw, dtype=m.dtype, device=m.device), None, stride, 0, dilation)
        scale = torch.where(keep > 0, (kh * kw) / wsum.float().clamp_min(1.0),
                            torch.zeros((), device=m.device)).to(m.dtype)
    return keep, scale


# ----------------------------------------------------------------------------- base class
class MaskedLayer(nn.Module):
    """Base of all masked layers; see the module docstring for plan/run."""

    rule = "masked"

    def plan(self, mg: MaskGraph, in_masks: List[Optional[Key]]) -> Optional[Key]:
        self.in_key = _first(in_masks)
        return self.in_key

    def run(self, inputs: list, masks: Dict[Key, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.rule

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        """Run this layer alone: (y, mask_out); mask_out is None where the mask is dropped."""
        C.check_input(x)
        C.check_mask(mask, x)
        m = C.as_float_mask(mask, x)
        mg = MaskGraph()
        out_key = self.plan(mg, [INPUT])
        masks = mg.evaluate(m)
        y = self.run([_zero(x, m)], masks)
        return y, (None if out_key is None else C.restore_mask_dtype(masks[out_key], mask))


def _first(keys):
    for k in keys:
        if k is not None:
            return k
    return None


# ----------------------------------------------------------------------------- convolution
class MaskedConv2d(MaskedLayer):
    """Conv2d (+ folded eval BatchNorm + fused activation) in mode fill / renorm / zero.

    ``prepad`` is explicit zero padding applied before the conv (nn.ZeroPad2d, F.pad,
    TF "same"): a fixed (left, right, top, bottom) or "same". Like the conv's own padding,
    the padded border is never filled: fill runs on the unpadded input, then it is padded.
    """

    rule = "conv"

    def __init__(self, weight, bias, stride, padding, dilation, groups, mode="fill", *, prepad=None,
                 activation="none", padding_visible=False, source="Conv2d"):
        super().__init__()
        self.weight, self.bias = weight, bias  # shared with the original model unless folded
        self.stride, self.padding = C.pair(stride, "stride", minimum=1), C.pair(padding, "padding", minimum=0)
        self.dilation = C.pair(dilation, "dilation", minimum=1)
        self.groups = groups
        self.mode = check_mode(mode)
        if isinstance(prepad, tuple) and prepad[0] == prepad[1] and prepad[2] == prepad[3]:
            # Symmetric explicit zero padding is the conv's own padding: no padded copy needed.
            self.padding = (self.padding[0] + prepad[2], self.padding[1] + prepad[0])
            prepad = None
        self.prepad = prepad
        self.activation = check_activation(activation)
        self.padding_visible = padding_visible
        self.source = source
        self.kernel = (weight.shape[2], weight.shape[3])
        self.iters = fill_iters(self.kernel, self.dilation) if mode == "fill" else 0

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mode="fill", **kw):
        if conv.padding_mode != "zeros":
            raise ValueError(f"Conv2d with padding_mode={conv.padding_mode!r} is not supported by layer masking "
                             f"(only 'zeros': the padded border must not depend on removed pixels)")
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                padding, prepad = (0, 0), kw.pop("prepad", None)
            else:  # "same" with stride 1: ATen pads (total//2 left, rest right)
                padding, prepad = (0, 0), "same"
        else:
            padding, prepad = conv.padding, kw.pop("prepad", None)
        return cls(conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups, mode,
                   prepad=prepad, source=type(conv).__name__, **kw)

    def fold_bn(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold an eval-mode BatchNorm (y*scale + shift) into this conv (exact; copies weights)."""
        with torch.no_grad():
            w = self.weight * scale.view(-1, 1, 1, 1).to(self.weight.dtype)
            b = shift if self.bias is None else self.bias * scale + shift
        self.weight = nn.Parameter(w.detach(), requires_grad=self.weight.requires_grad)
        self.bias = nn.Parameter(b.detach().to(w.dtype), requires_grad=self.weight.requires_grad)
        self.folded = True

    def plan(self, mg, in_masks):
        self.in_key = in_masks[0]
        self.keep_key, self.scale_key = mg.conv(self.in_key, self.kernel, self.stride, self.padding,
                                                self.dilation, self.prepad, self.mode, self.padding_visible)
        return self.keep_key

    # Set by the converter when this conv is the only reader of a freshly computed activation
    # (masked_ops.convert): the fill may then overwrite it instead of copying it.
    fill_in_place = False
    # The output is a new tensor (never a view of an input): the converter may hand it to a
    # consumer that writes it in place.
    fresh_output = True

    @property
    def can_fill_in_place(self) -> bool:
        return self.iters > 0 and self.prepad is None

    def _fill(self, x, m, backend):
        """The conv's input, filled and explicitly padded (the conv's own padding comes later).

        Without autograd the fill writes in place where it can: into the activation itself
        when this layer owns it, or into the padded copy that explicit padding makes anyway,
        touching only the pixels it reaches. Unreached removed pixels then keep their 0
        (the activation-path invariant), exactly as the copying fill leaves them.
        """
        in_place_ok = not (x.requires_grad and torch.is_grad_enabled())
        if self.prepad is not None:
            pads = _pads(self.prepad, x, self.kernel, self.stride, self.dilation)
            if self.iters and in_place_ok and min(pads) >= 0:
                left, _, top, _ = pads
                h, w = x.shape[-2:]
                x = F.pad(x, pads)
                backend.neighbor_fill_(x[:, :, top:top + h, left:left + w], m, self.iters)
                return x
            if self.iters:
                x = backend.neighbor_fill(x, m, self.iters)
            return F.pad(x, pads)
        if not self.iters:
            return x  # already 0 at removed positions (the activation-path invariant)
        if self.fill_in_place and in_place_ok:
            return backend.neighbor_fill_(x, m, self.iters)
        return backend.neighbor_fill(x, m, self.iters)

    def run(self, inputs, masks):
        x = inputs[0]
        backend = resolve(x.device)
        x = self._fill(x, masks[self.in_key], backend)
        keep = masks[self.keep_key]
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.scale_key is None:
            # fill / zero: the bias rides in the vendor conv (fused there for free).
            y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
            return epilogue_of_fresh(backend, y, keep, None, None, self.activation)
        y = F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)
        return epilogue_of_fresh(backend, y, keep, masks[self.scale_key], b, self.activation)

    def describe(self):
        k, s, p = self.kernel, self.stride, self.padding
        extra = []
        if getattr(self, "folded", False):
            extra.append("+bn(folded)")
        if self.activation != "none":
            extra.append(f"+{self.activation}")
        if self.fill_in_place:
            extra.append("(fills its input in place)")
        pad = f" prepad={self.prepad}" if self.prepad is not None else ""
        return (f"conv[{self.mode}] {self.source} {self.weight.shape[1] * self.groups}->{self.weight.shape[0]} "
                f"k{k[0]}x{k[1]} s{s[0]} p{p[0]}{pad} g{self.groups} fill_iters={self.iters}"
                + (" " + " ".join(extra) if extra else ""))


# ----------------------------------------------------------------------------- normalisation
class MaskedAffine(MaskedLayer):
    """Eval-mode BatchNorm / FrozenBatchNorm (+ activation): act(x*scale + shift) on visible pixels."""

    rule = "batchnorm(eval)"
    fresh_output = True  # masked_affine_act allocates its result

    def __init__(self, bn, activation="none"):
        super().__init__()
        self.bn = bn  # shared; the affine is recomputed from its buffers each forward
        self.activation = check_activation(activation)

    def run(self, inputs, masks):
        x = inputs[0]
        scale, shift = bn_affine(self.bn)
        return resolve(x.device).masked_affine_act(x, masks[self.in_key], scale.to(x.dtype), shift.to(x.dtype),
                                                   self.activation)

    def describe(self):
        return f"batchnorm(eval) {type(self.bn).__name__}({self.bn.num_features if hasattr(self.bn, 'num_features') else ''})" \
            + (f" +{self.activation}" if self.activation != "none" else "")


class MaskedBatchNormTrain(MaskedLayer):
    """Train-mode BatchNorm: batch statistics over the visible pixels only.

    Documented choice: the running statistics of the original model are *not* updated
    (the original model is never modified); gradients flow as for any autograd op.
    """

    rule = "batchnorm(train, visible-pixel stats)"

    def __init__(self, bn, activation="none"):
        super().__init__()
        self.bn = bn
        self.activation = check_activation(activation)

    def run(self, inputs, masks):
        x, m = inputs[0], masks[self.in_key]
        count = (m.sum() * 1.0).clamp_min(1.0)
        mean = x.sum(dim=(0, 2, 3)) / count  # x is 0 at removed positions
        centered = _zero(x - mean.view(1, -1, 1, 1), m)
        var = (centered * centered).sum(dim=(0, 2, 3)) / count
        y = centered * torch.rsqrt(var + self.bn.eps).view(1, -1, 1, 1)
        if self.bn.weight is not None:
            y = y * self.bn.weight.view(1, -1, 1, 1) + self.bn.bias.view(1, -1, 1, 1)
        return _zero(apply_activation(y, self.activation), m)


class MaskedGroupNorm(MaskedLayer):
    """GroupNorm with per-sample, per-group statistics over the visible pixels only."""

    rule = "groupnorm(visible-pixel stats)"

    def __init__(self, num_groups, weight, bias, eps):
        super().__init__()
        self.num_groups, self.weight, self.bias, self.eps = num_groups, weight, bias, eps

    def run(self, inputs, masks):
        x, m = inputs[0], masks[self.in_key]
        n, c, h, w = x.shape
        g = self.num_groups
        xg = x.reshape(n, g, c // g, h * w)
        mg = m.reshape(n, 1, 1, h * w)
        count = (mg.sum(dim=(2, 3), keepdim=True) * (c // g)).clamp_min(1.0)
        mean = xg.sum(dim=(2, 3), keepdim=True) / count
        centered = torch.where(mg > 0, xg - mean, torch.zeros((), dtype=x.dtype, device=x.device))
        var = (centered * centered).sum(dim=(2, 3), keepdim=True) / count
        y = (centered * torch.rsqrt(var + self.eps)).reshape(n, c, h, w)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return _zero(y, m)


class MaskedPointwise(MaskedLayer):
    """A per-pixel function (activation, channel LayerNorm, per-pixel Linear, dropout ...).

    Output: fn(x) on visible pixels, 0 elsewhere; the mask is unchanged. ``zero_preserving``
    (fn maps a 0 pixel to 0) skips the re-zeroing. Use it in custom rules for any module
    that never mixes spatial positions.
    """

    rule = "pointwise"

    def __init__(self, fn: Callable, name: str = "", zero_preserving: bool = False, layout: str = "nchw"):
        super().__init__()
        self.fn, self.name, self.zero_preserving, self.layout = fn, name, zero_preserving, layout
        if isinstance(fn, nn.Module):
            self.module = fn  # registered so parameters show up (shared)

    def run(self, inputs, masks):
        y = self.fn(*inputs)
        if self.zero_preserving:
            return y
        return _zero(y, layout_mask(masks[self.in_key], self.layout))

    def describe(self):
        return f"pointwise {self.name}"


class MaskedActivation(MaskedPointwise):
    rule = "activation"

    def __init__(self, activation: str, layout="nchw"):
        self.activation = check_activation(activation)
        super().__init__(lambda x: apply_activation(x, activation), activation,
                         zero_preserving=activation in ZERO_PRESERVING, layout=layout)

    def describe(self):
        return f"activation {self.activation}"


class Identity(MaskedLayer):
    """Dropout / DropPath / StochasticDepth at eval, Identity, contiguous(): pass through."""

    rule = "identity"

    def __init__(self, name="identity"):
        super().__init__()
        self.name = name

    def run(self, inputs, masks):
        return inputs[0]

    def describe(self):
        return f"identity ({self.name})"


class Relayout(MaskedLayer):
    """permute between N x C x H x W and N x H x W x C (ConvNeXt's permute + LayerNorm)."""

    rule = "permute"

    def __init__(self, dims):
        super().__init__()
        self.dims = tuple(dims)

    def run(self, inputs, masks):
        return inputs[0].permute(self.dims)

    def describe(self):
        return f"permute {self.dims}"


# ----------------------------------------------------------------------------- pooling
class MaskedMaxPool2d(MaskedLayer):
    """Max pool of the masked input (removed = 0, as in the paper); mask out = maxpool(mask).

    With the activation-path invariant (removed = 0) this is the plain max pool: a window
    with no visible pixel yields 0, which is what the mask says.
    """

    rule = "maxpool"

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, *, prepad=None,
                 pad_value=float("-inf")):
        super().__init__()
        self.kernel = C.pair(kernel_size, "kernel_size", minimum=1)
        self.stride = self.kernel if stride is None or stride == [] else C.pair(stride, "stride", minimum=1)
        self.padding = C.pair(padding, "padding", minimum=0)
        self.dilation = C.pair(dilation, "dilation", minimum=1)
        self.ceil_mode, self.prepad, self.pad_value = bool(ceil_mode), prepad, pad_value

    def plan(self, mg, in_masks):
        self.in_key = in_masks[0]
        self.out_key = mg.pool(self.in_key, "max", self.kernel, self.stride, self.padding, self.dilation,
                               self.ceil_mode, self.prepad)
        return self.out_key

    def run(self, inputs, masks):
        x = inputs[0]
        if self.prepad is not None:
            x = F.pad(x, _pads(self.prepad, x, self.kernel, self.stride, self.dilation), value=self.pad_value)
            # The padded border may hold -inf; a window of only border + removed pixels is removed.
            y = F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)
            return _zero(y, masks[self.out_key])
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)

    def describe(self):
        return f"maxpool k{self.kernel[0]} s{self.stride[0]} p{self.padding[0]}" + (" ceil" if self.ceil_mode else "")


class MaskedAvgPool2d(MaskedLayer):
    """avgpool(x*m) where the window holds a visible pixel, 0 elsewhere (the paper's rule)."""

    rule = "avgpool"

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
        super().__init__()
        if divisor_override is not None:
            raise ValueError("AvgPool2d(divisor_override=...) is not supported by layer masking")
        self.kernel = C.pair(kernel_size, "kernel_size", minimum=1)
        self.stride = self.kernel if stride is None or stride == [] else C.pair(stride, "stride", minimum=1)
        self.padding = C.pair(padding, "padding", minimum=0)
        self.ceil_mode, self.count_include_pad = bool(ceil_mode), bool(count_include_pad)

    def plan(self, mg, in_masks):
        self.in_key = in_masks[0]
        self.out_key = mg.pool(self.in_key, "avg", self.kernel, self.stride, self.padding, (1, 1),
                               self.ceil_mode, None)
        return self.out_key

    def run(self, inputs, masks):
        x = inputs[0]
        y = F.avg_pool2d(x, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)
        return y  # a window without visible pixels averages zeros: already 0

    def describe(self):
        return f"avgpool k{self.kernel[0]} s{self.stride[0]} p{self.padding[0]}"


class MaskedAdaptiveAvgPool2d(MaskedLayer):
    """Adaptive average pool: masked mean per bin. Output size 1 (global) drops the mask.

    Global: sum over visible pixels / their count (0 if none), via the backend's
    masked_mean. Other sizes: per bin, the mean over its visible pixels; a bin with none
    is removed in the output mask.
    """

    rule = "adaptive_avgpool"

    def __init__(self, output_size, keepdim=True, name="adaptive_avg_pool2d"):
        super().__init__()
        self.output_size = C.pair(output_size, "output_size", minimum=1)
        self.keepdim, self.name = keepdim, name
        self.is_global = self.output_size == (1, 1)

    def plan(self, mg, in_masks):
        self.in_key = in_masks[0]
        if self.is_global:
            return None
        self.frac_key, self.out_key = mg.adaptive(self.in_key, self.output_size)
        return self.out_key

    def run(self, inputs, masks):
        x = inputs[0]
        if self.is_global:
            y = resolve(x.device).masked_mean(x, masks[self.in_key])
            return y[:, :, None, None] if self.keepdim else y
        num = F.adaptive_avg_pool2d(x, self.output_size)
        frac = masks[self.frac_key]
        return torch.where(frac > 0, num / frac.clamp_min(1e-12), torch.zeros((), dtype=x.dtype, device=x.device))

    def describe(self):
        return f"{'global masked mean' if self.is_global else 'adaptive masked mean per bin'} ({self.name}) " \
               f"-> {self.output_size}" + (" (mask dropped)" if self.is_global else "")


class MaskedSpatialMean(MaskedAdaptiveAvgPool2d):
    """x.mean((2, 3)) / x.mean((-2, -1), keepdim) on a masked map: the global masked mean."""

    def __init__(self, keepdim, layout="nchw"):
        super().__init__(1, keepdim, name="mean over H, W")
        self.layout = layout

    def run(self, inputs, masks):
        x = inputs[0]
        if self.layout == "nhwc":
            x = x.permute(0, 3, 1, 2)
        y = resolve(x.device).masked_mean(x, masks[self.in_key])
        if not self.keepdim:
            return y
        return y[:, None, None, :] if self.layout == "nhwc" else y[:, :, None, None]


class FlattenHead(MaskedLayer):
    """flatten / view(n, -1) of a masked map into a linear head: removed positions enter as 0.

    This is the rule for VGG/AlexNet heads (an all-ones mask reproduces the model; removed
    values never reach the linear layer). The mask is dropped.
    """

    rule = "flatten head"

    def __init__(self, fn: Callable, name="flatten"):
        super().__init__()
        self.fn, self.name = fn, name

    def plan(self, mg, in_masks):
        self.in_key = in_masks[0]
        return None

    def run(self, inputs, masks):
        return self.fn(*inputs)  # already 0 at removed positions

    def describe(self):
        return f"flatten head ({self.name}; removed = 0, mask dropped)"


# ----------------------------------------------------------------------------- joins
class MaskedBinary(MaskedLayer):
    """Elementwise binary op (residual add, SE / layer-scale multiply, sub, div) [+ activation].

    Masked inputs' masks intersect. The result is re-zeroed wherever it might be non-zero
    at a removed position (different input masks, a plain addend, a division, an
    activation with f(0) != 0). A following activation (ResNet's add + ReLU) is fused.
    """

    rule = "elementwise"

    def __init__(self, fn: Callable, name: str, kind: str, layout="nchw", activation="none"):
        super().__init__()
        self.fn, self.name, self.kind, self.layout = fn, name, kind, layout
        self.activation = check_activation(activation)

    def plan(self, mg, in_masks):
        masked = [k for k in in_masks if k is not None]
        self.out_key = mg.combine(masked, "intersection")
        same = len(set(masked)) == 1
        n_plain = len(in_masks) - len(masked)
        # mul: 0 * finite = 0, and a product with both inputs masked is 0 where either is removed.
        self.rezero = not ((self.kind == "mul") or (self.kind == "add" and same and n_plain == 0)) \
            or self.activation not in ZERO_PRESERVING
        return self.out_key

    def run(self, inputs, masks):
        y = _act_fresh(self.fn(*inputs), self.activation)
        return _zero_fresh(y, layout_mask(masks[self.out_key], self.layout)) if self.rezero else y

    def describe(self):
        act = f" +{self.activation}" if self.activation != "none" else ""
        return f"{self.name} (masks intersect){act}"


class MaskedConcat(MaskedLayer):
    """Channel concat. Output mask: majority vote (DenseNet), union (Fire) or intersection."""

    rule = "concat"

    def __init__(self, how: str, dim: int, n_inputs: int):
        super().__init__()
        self.how, self.dim, self.n_inputs = how, dim, n_inputs

    def plan(self, mg, in_masks):
        if any(k is None for k in in_masks):
            raise ValueError("torch.cat mixes masked and unmasked tensors")
        self.in_keys = list(in_masks)
        self.out_key = mg.combine(in_masks, self.how)
        # Union: every input is already 0 wherever the output is removed.
        self.rezero = len(set(in_masks)) > 1 and self.how != "union"
        return self.out_key

    def run(self, inputs, masks):
        y = torch.cat(list(inputs), self.dim)
        # Where the vote removes a pixel some input had visible, zero it.
        return _zero_fresh(y, masks[self.out_key]) if self.rezero else y

    def describe(self):
        return f"concat ({self.n_inputs} inputs, mask: {self.how})"
