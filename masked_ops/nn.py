"""Masked layers: the modules a layer-masked model is made of (docs/design.md, "Semantics").

A converted model (masked_ops.convert) is a torch.fx GraphModule whose generated forward
computes every mask first (the mask path, masked_ops.masks, once per distinct geometry) and
then calls these layers with their activations *and* the masks they need as arguments::

    conv1 = self.conv1(x, mask, keep_1)          # MaskedConv2d.forward(x, m, keep, scale=None)

Each layer class says which masks it needs in ``masks(mb, in_masks)``, called once at
conversion with a mask builder ``mb`` (it returns the mask arguments to pass and the output
mask); nothing about the graph is stored on the layer. The math of every op is its core in
masked_ops.ops, shared with the public functional ops.

Invariant of the activation path: every masked activation is exactly 0 at removed
positions and finite (the converted model selects its input once with ``torch.where``), so
layers may skip the zeroing prologue and 1x1 convs need neither fill nor zeroing. Layers
whose output could be non-zero at removed positions (bias, sigmoid, a changed mask)
re-zero with ``torch.where``, never by multiplying with the mask.

Masks are floating N x 1 x H x W tensors holding 0/1 in the activations' dtype.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks as C
from . import masks as M
from . import ops
from .activations import apply_activation, check_activation
from .modes import check_mode, fill_iters

# Activations with f(0) == 0: their output stays 0 where the input is 0 (no re-zeroing).
ZERO_PRESERVING = {"none", "relu", "relu6", "leaky_relu", "silu", "hardswish", "gelu", "tanh"}


def _zero_fresh(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """select_visible for a tensor this layer just allocated: in place where it may write it."""
    if ops.owns_for_writing(y):
        return y.masked_fill_(m <= 0, 0)  # a select, not a product: NaN/inf there are overwritten too
    return M.select_visible(y, m)


_INPLACE_ACT = {"relu": torch.relu_, "relu6": lambda y: y.clamp_(0, 6)}


def _act_fresh(y: torch.Tensor, name: str) -> torch.Tensor:
    if name == "none":
        return y
    if name in _INPLACE_ACT and ops.owns_for_writing(y):
        return _INPLACE_ACT[name](y)
    return apply_activation(y, name)


def layout_mask(m: torch.Tensor, layout: str) -> torch.Tensor:
    """A N x 1 x H x W mask laid out to broadcast against the activations (N x H x W x C for "nhwc",
    N x G x C/G x H x W for "ngchw": channels split into groups, as a channel shuffle does)."""
    if layout == "nhwc":
        return m.permute(0, 2, 3, 1)
    return m[:, :, None] if layout == "ngchw" else m


MaskArgs = Tuple[list, Optional[object]]


class Bound:
    """fn(x, *args, **kwargs) as a picklable callable (a function node's constant arguments)."""

    def __init__(self, fn: Callable, args=(), kwargs=None):
        self.fn, self.args, self.kwargs = fn, tuple(args), dict(kwargs or {})

    def __call__(self, x):
        return self.fn(x, *self.args, **self.kwargs)


# ----------------------------------------------------------------------------- base class
class MaskedLayer(nn.Module):
    """Base of all masked layers.

    ``masks(mb, in_masks) -> (mask_args, out_mask)``: the masks this layer's forward takes after
    its activation inputs, and the mask of its output (None: the output carries no mask, e.g.
    after a global pool). ``in_masks`` holds one entry per activation input (None for an
    unmasked one). The default passes the first input's mask and keeps it.
    """

    rule = "masked"
    # The output is a new tensor (never a view of an input): a consumer may write it in place.
    fresh_output = False
    # Soft masks (docs/design.md, "Soft masks"): None for hard 0/1 masks, else the rule of soft output
    # masks (masks.KEEP_RULES); fill_grad: whether fill values pass gradient to x.
    soft: Optional[str] = None
    fill_grad: bool = False

    def set_soft(self, rule: Optional[str], fill_grad: bool = False) -> "MaskedLayer":
        """Make this layer take soft masks in [0, 1] (rule: masks.KEEP_RULES) or hard ones (None)."""
        self.soft, self.fill_grad = M.check_keep_rule(rule), bool(fill_grad)
        return self

    def masks(self, mb, in_masks) -> MaskArgs:
        m = _first(in_masks)
        return [m], m

    def describe(self) -> str:
        return self.rule

    def extra_repr(self) -> str:
        return self.describe()


def _positive(count: torch.Tensor) -> torch.Tensor:
    """A mask sum as a denominator: itself where > 0, else 1 (its numerator is then 0)."""
    return torch.where(count > 0, count, torch.ones_like(count))


def _first(items):
    for k in items:
        if k is not None:
            return k
    return None


# ----------------------------------------------------------------------------- convolution
class MaskedConv2d(MaskedLayer):
    """Conv2d (+ folded eval BatchNorm + fused activation) in mode fill / renorm / zero.

    ``prepad`` is explicit zero padding applied before the conv (nn.ZeroPad2d, F.pad,
    TF "same"): a fixed (left, right, top, bottom) or "same". Like the conv's own padding,
    the padded border is never filled: fill runs on the unpadded input, then it is padded.
    forward(x, m, keep, scale=None): the masks from masked_ops.masks.conv_masks.
    """

    rule = "conv"
    fresh_output = True

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
        self.folded = False
        # Set by the converter when this conv is the only reader of a fresh activation: the fill
        # may then write into it instead of copying it.
        self.fill_in_place = False

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mode="fill", **kw):
        if conv.padding_mode != "zeros":
            raise ValueError(f"Conv2d with padding_mode={conv.padding_mode!r} is not supported by layer masking "
                             f"(only 'zeros': the padded border must not depend on removed pixels)")
        prepad = kw.pop("prepad", None)
        if isinstance(conv.padding, str):
            # "valid" pads nothing; "same" (stride 1) pads total//2 left and the rest right, as ATen.
            padding, prepad = (0, 0), ("same" if conv.padding == "same" else prepad)
        else:
            padding = conv.padding
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

    @property
    def can_fill_in_place(self) -> bool:
        return self.iters > 0 and self.soft is None

    def masks(self, mb, in_masks):
        m = in_masks[0]
        keep, scale = mb.conv(m, self.kernel, self.stride, self.padding, self.dilation, self.mode,
                              self.padding_visible, self.prepad)
        return ([m, keep] if scale is None else [m, keep, scale]), keep

    def forward(self, x, m, keep, scale=None):
        return ops.conv_core(x, m, keep, scale, self.weight, self.bias, self.stride, self.padding, self.dilation,
                             self.groups, self.iters, self.activation, prepad=self.prepad, zeroed=True,
                             in_place=self.fill_in_place, soft=self.soft is not None, fill_grad=self.fill_grad,
                             mode=self.mode)

    def describe(self):
        k, s, p = self.kernel, self.stride, self.padding
        extra = []
        if self.folded:
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

    def forward(self, x, m):
        scale, shift = ops.bn_affine(self.bn)
        return ops.affine_core(x, m, scale, shift, self.activation)

    def describe(self):
        return f"batchnorm(eval) {type(self.bn).__name__}({getattr(self.bn, 'num_features', '')})" \
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

    def forward(self, x, m):
        # Statistics weighted by the mask (x is 0 where m == 0): over the visible pixels for a 0/1 mask.
        count = _positive(m.sum())
        mean = (x * m).sum(dim=(0, 2, 3)) / count
        diff = x - mean.view(1, -1, 1, 1)
        var = (m * diff * diff).sum(dim=(0, 2, 3)) / count
        centered = M.select_visible(diff, m)
        y = centered * torch.rsqrt(var + self.bn.eps).view(1, -1, 1, 1)
        if self.bn.weight is not None:
            y = y * self.bn.weight.view(1, -1, 1, 1) + self.bn.bias.view(1, -1, 1, 1)
        return M.select_visible(apply_activation(y, self.activation), m)


class MaskedGroupNorm(MaskedLayer):
    """GroupNorm with per-sample, per-group statistics over the visible pixels only."""

    rule = "groupnorm(visible-pixel stats)"

    def __init__(self, num_groups, weight, bias, eps):
        super().__init__()
        self.num_groups, self.weight, self.bias, self.eps = num_groups, weight, bias, eps

    def forward(self, x, m):
        # Per-sample, per-group statistics weighted by the mask (x is 0 where m == 0).
        n, c, h, w = x.shape
        g = self.num_groups
        xg = x.reshape(n, g, c // g, h * w)
        mg = m.reshape(n, 1, 1, h * w)
        count = _positive(mg.sum(dim=(2, 3), keepdim=True) * (c // g))
        mean = (xg * mg).sum(dim=(2, 3), keepdim=True) / count
        diff = xg - mean
        var = (mg * diff * diff).sum(dim=(2, 3), keepdim=True) / count
        centered = torch.where(mg > 0, diff, torch.zeros((), dtype=x.dtype, device=x.device))
        y = (centered * torch.rsqrt(var + self.eps)).reshape(n, c, h, w)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return M.select_visible(y, m)


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

    def masks(self, mb, in_masks):
        m = _first(in_masks)
        return ([] if self.zero_preserving else [m]), m

    def forward(self, *args):
        if self.zero_preserving:
            return self.fn(*args)
        *inputs, m = args
        return M.select_visible(self.fn(*inputs), layout_mask(m, self.layout))

    def describe(self):
        return f"pointwise {self.name}"


class MaskedActivation(MaskedPointwise):
    rule = "activation"

    def __init__(self, activation: str, layout="nchw"):
        self.activation = check_activation(activation)
        super().__init__(self._activate, activation, zero_preserving=activation in ZERO_PRESERVING, layout=layout)

    def _activate(self, x):
        return apply_activation(x, self.activation)

    def describe(self):
        return f"activation {self.activation}"


class Identity(MaskedLayer):
    """Dropout / DropPath / StochasticDepth at eval, Identity, contiguous(): pass through."""

    rule = "identity"

    def __init__(self, name="identity"):
        super().__init__()
        self.name = name

    def masks(self, mb, in_masks):
        return [], _first(in_masks)

    def forward(self, x):
        return x

    def describe(self):
        return f"identity ({self.name})"


class MaskedReflectPadConv2d(MaskedConv2d):
    """A conv after reflect padding (timm's BlurPool2d: F.pad(x, pads, "reflect"), then a fixed depthwise
    binomial filter with stride 2; DenseNet-blur, TResNet).

    The activations and the mask are reflect-padded alike (a border pixel copies an interior pixel and its
    visibility, masks.pad_reflect), then an ordinary masked conv without padding runs on them: no removed
    value is copied into the border as if it were visible. With an all-ones mask it is the module exactly.
    """

    rule = "conv"

    def __init__(self, weight, bias, stride, pads, groups, mode="fill", *, source="BlurPool2d"):
        super().__init__(weight, bias, stride, 0, 1, groups, mode, source=source)
        self.pads = tuple(int(p) for p in pads)

    def masks(self, mb, in_masks):
        mp = mb._emit(M.pad_reflect, (in_masks[0], self.pads), name="reflect_padded_mask")
        keep, scale = mb.conv(mp, self.kernel, self.stride, self.padding, self.dilation, self.mode,
                              self.padding_visible, None)
        return ([mp, keep] if scale is None else [mp, keep, scale]), keep

    @property
    def can_fill_in_place(self) -> bool:
        return False  # the fill runs on the padded copy made here

    def forward(self, x, m, keep, scale=None):
        return super().forward(F.pad(x, self.pads, mode="reflect"), m, keep, scale)

    def describe(self):
        return f"reflect pad {self.pads}, then " + super().describe()


class MaskedSpaceToDepth(MaskedLayer):
    """A space-to-depth module (timm's SpaceToDepth: N x C x H x W -> N x C*b*b x H/b x W/b), run as it is.

    An output pixel holds a b x b square of input pixels in its channels; it is visible only where the
    whole square is (masks.space_to_depth), so no removed value reaches a visible pixel. Its input is 0 at
    removed pixels (the converted model selects its input once: masks.select_visible); the outputs that
    mixed one in are zeroed after. forward(x, m_out).
    """

    rule = "space to depth"

    def __init__(self, module: nn.Module, block: int):
        super().__init__()
        self.module, self.block = module, int(block)

    def masks(self, mb, in_masks):
        m = in_masks[0]
        out = mb._emit(M.space_to_depth, (m, self.block), name="space_to_depth_mask")
        return [out], out

    def forward(self, x, m_out):
        return M.select_visible(self.module(x), m_out)

    def describe(self):
        return f"space to depth {self.block}x{self.block} (visible where its whole square is)"


class MaskedConvMlp(MaskedLayer):
    """timm's VGG head (ConvMlp): a map smaller than the kernel is first pooled up to kernel x kernel by an
    adaptive average pool (a Python branch on the size, taken at run time here, as in the module), then
    a kernel x kernel conv without padding and a 1 x 1 conv, each with its activation. The pool is the
    masked mean per bin (as MaskedAdaptiveAvgPool2d), the convs are masked convs. forward(x, m, keep)."""

    rule = "conv mlp"

    def __init__(self, fc1: "MaskedConv2d", fc2: "MaskedConv2d", kernel: int):
        super().__init__()
        self.fc1, self.fc2, self.kernel = fc1, fc2, int(kernel)

    def set_soft(self, rule, fill_grad=False):
        super().set_soft(rule, fill_grad)
        self.fc1.set_soft(rule, fill_grad)
        self.fc2.set_soft(rule, fill_grad)
        return self

    def masks(self, mb, in_masks):
        m = in_masks[0]
        extra = (mb.soft,) if mb.soft is not None else ()
        keep = mb._emit(M.conv_mlp_keep, (m, self.kernel) + extra, name="conv_mlp_keep")
        return [m, keep], keep

    def forward(self, x, m, keep):
        frac, pooled = M.small_map_pool(m, self.kernel, self.soft)
        if frac is not None:  # the module's branch: the masked mean per bin
            num = F.adaptive_avg_pool2d(x if self.soft is None else x * m, tuple(frac.shape[-2:]))
            x = torch.where(frac > 0, num / frac.clamp_min(1e-12), torch.zeros((), dtype=x.dtype, device=x.device))
            m = pooled
        return self.fc2(self.fc1(x, m, keep), keep, keep)

    def describe(self):
        return (f"VGG head: masked adaptive mean up to {self.kernel}x{self.kernel} when smaller, then "
                f"{self.fc1.describe()}; {self.fc2.describe()}")


class MaskedGlobalContext(MaskedLayer):
    """timm's GlobalContext block (GCNet): attention pooling over the visible pixels only, then the module's
    own MLPs and gate on the pooled context, applied to the map per pixel. The softmax of the attention
    logits runs over visible positions (removed ones get -inf, as a ViT drops tokens); without an
    attention conv, the masked mean. Every written op is the module's, so an all-ones mask gives its bits.
    forward(x, m); the mask is unchanged."""

    rule = "global context"

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x, m):
        g = self.module
        b, c, h, w = x.shape
        visible = (m > 0).reshape(b, 1, h * w)
        if g.conv_attn is not None:
            logits = g.conv_attn(x).reshape(b, 1, h * w)
            logits = logits.masked_fill(~visible, float("-inf"))
            attn = F.softmax(logits, dim=-1)
            attn = torch.where(visible.any(-1, keepdim=True), attn, torch.zeros((), dtype=x.dtype, device=x.device))
            context = (x.reshape(b, c, h * w).unsqueeze(1) @ attn.unsqueeze(3)).view(b, c, 1, 1)
        else:
            context = ops.mean_core(x, m, soft=self.soft is not None)[:, :, None, None]
        if g.mlp_scale is not None:
            x = x * g.gate(g.mlp_scale(context))
        if g.mlp_add is not None:
            x = x + g.mlp_add(context)
        return M.select_visible(x, m)

    def describe(self):
        return "global context: attention pooling over visible pixels (softmax over them), gated per pixel"


class MaskedPixelShuffle(MaskedLayer):
    """Depth-to-space (nn.PixelShuffle, F.pixel_shuffle): every output pixel is one channel of one input
    pixel, removed ones as 0, so the output is exact and needs no re-zeroing; mask out = the mask
    upsampled by nearest-neighbour, r x r (masks.upsample_nearest). forward(x)."""

    rule = "pixel shuffle"

    def __init__(self, factor: int):
        super().__init__()
        self.factor = int(factor)

    def masks(self, mb, in_masks):
        return [], mb.upsample(in_masks[0], (self.factor, self.factor))

    def forward(self, x):
        return F.pixel_shuffle(x, self.factor)

    def describe(self):
        return f"pixel shuffle x{self.factor} (each output pixel from one input pixel)"


class ChannelGroups(Identity):
    """Channels split into groups and back (ShuffleNet's channel shuffle: view(N, G, C/G, H, W),
    transpose(1, 2), view(N, C, H, W)). Pixels stay where they are, so the mask passes unchanged; a
    removed pixel's channels are all 0 and stay 0 wherever they move.

    kind: "split" (N x C x H x W -> N x G x C/G x H x W; ``groups`` is G at ``position`` 1, or C/G at
    position 2), "swap" (transpose of the two channel dims) or "merge" (back to N x C x H x W).
    """

    rule = "channel groups"

    def __init__(self, kind: str, groups: int = 0, position: int = 1):
        super().__init__(f"channel groups: {kind}")
        self.kind, self.groups, self.position = kind, int(groups), int(position)

    def forward(self, x):
        if self.kind == "split":
            n, _, h, w = x.shape
            dims = (n, self.groups, -1, h, w) if self.position == 1 else (n, -1, self.groups, h, w)
            return x.reshape(dims)
        if self.kind == "swap":
            return x.transpose(1, 2)
        return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])

    def describe(self):
        what = {"split": f"split channels into {self.groups} {'groups' if self.position == 1 else 'per group'}",
                "swap": "swap the channel group dims", "merge": "merge channel groups"}[self.kind]
        return f"{what} (mask unchanged)"


class Relayout(Identity):
    """permute between N x C x H x W and N x H x W x C (ConvNeXt's permute + LayerNorm)."""

    rule = "permute"

    def __init__(self, dims):
        super().__init__("permute")
        self.dims = tuple(dims)

    def forward(self, x):
        return x.permute(self.dims)

    def describe(self):
        return f"permute {self.dims}"


# ----------------------------------------------------------------------------- pooling
class MaskedMaxPool2d(MaskedLayer):
    """Max pool of the masked input (removed = 0, as in the paper); mask out = maxpool(mask).

    With the activation-path invariant (removed = 0) this is the plain max pool: a window
    with no visible pixel yields 0, which is what the mask says. forward(x, m_out).
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

    def masks(self, mb, in_masks):
        out = mb.pool(in_masks[0], self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode,
                      self.prepad)
        return ([out] if self.prepad is not None else []), out

    def forward(self, x, *masks):
        # Soft masks too: a pool reads its pixels as they are (ops.pool_core); the mask path carries
        # the soft output mask and its gradient.
        if self.prepad is not None:
            (m_out,) = masks
            x = F.pad(x, M.explicit_pads(self.prepad, x, self.kernel, self.stride, self.dilation),
                      value=self.pad_value)
            # The padded border may hold -inf; a window of only border + removed pixels is removed.
            y = F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)
            return M.select_visible(y, m_out)
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

    def masks(self, mb, in_masks):
        out = mb.pool(in_masks[0], self.kernel, self.stride, self.padding, (1, 1), self.ceil_mode, None)
        return [], out

    def forward(self, x):
        # A window without visible pixels averages zeros: already 0. Soft masks: as MaskedMaxPool2d.
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)

    def describe(self):
        return f"avgpool k{self.kernel[0]} s{self.stride[0]} p{self.padding[0]}"


class MaskedAdaptiveAvgPool2d(MaskedLayer):
    """Adaptive average pool: masked mean per bin. Output size 1 (global) drops the mask.

    Global: sum over visible pixels / their count (0 if none), via the backend's
    masked_mean; forward(x, m). Other sizes: per bin, the mean over its visible pixels; a bin
    with none is removed in the output mask; forward(x, visible_fraction_per_bin).
    """

    rule = "adaptive_avgpool"

    def __init__(self, output_size, keepdim=True, name="adaptive_avg_pool2d"):
        super().__init__()
        self.output_size = C.pair(output_size, "output_size", minimum=1)
        self.keepdim, self.name = keepdim, name
        self.is_global = self.output_size == (1, 1)

    def masks(self, mb, in_masks):
        m = in_masks[0]
        if self.is_global:
            return [m], None
        frac, keep = mb.adaptive(m, self.output_size)
        return ([frac, m] if self.soft is not None else [frac]), keep

    def forward(self, x, m, m_in=None):
        if self.is_global:
            y = ops.mean_core(x, m, soft=self.soft is not None)
            return y[:, :, None, None] if self.keepdim else y
        # Per bin: mean of m * x over mean of m (x is 0 where m == 0, so hard masks need no product).
        num = F.adaptive_avg_pool2d(x if m_in is None else x * m_in, self.output_size)
        return torch.where(m > 0, num / m.clamp_min(1e-12), torch.zeros((), dtype=x.dtype, device=x.device))

    def describe(self):
        return f"{'global masked mean' if self.is_global else 'adaptive masked mean per bin'} ({self.name}) " \
               f"-> {self.output_size}" + (" (mask dropped)" if self.is_global else "")


class MaskedSpatialMean(MaskedAdaptiveAvgPool2d):
    """x.mean((2, 3)) / x.mean((-2, -1), keepdim) on a masked map: the global masked mean."""

    def __init__(self, keepdim, layout="nchw"):
        super().__init__(1, keepdim, name="mean over H, W")
        self.layout = layout

    def forward(self, x, m):
        if self.layout == "nhwc":
            x = x.permute(0, 3, 1, 2)
        y = ops.mean_core(x, m, soft=self.soft is not None)
        if not self.keepdim:
            return y
        return y[:, None, None, :] if self.layout == "nhwc" else y[:, :, None, None]


class FlattenHead(MaskedLayer):
    """flatten / view(n, -1) of a masked map into a linear head: removed positions enter as 0.

    This is the rule for VGG/AlexNet heads (an all-ones mask reproduces the model; removed
    values never reach the linear layer). The mask is dropped.
    """

    rule = "flatten head"

    def __init__(self, name="flatten"):
        super().__init__()
        self.name = name

    def masks(self, mb, in_masks):
        return [], None

    def forward(self, x):
        # Already 0 at removed positions; soft masks: pixels read as they are, as a pool reads them.
        return torch.flatten(x, 1)

    def describe(self):
        return f"flatten head ({self.name}; removed = 0, mask dropped)"


# ----------------------------------------------------------------------------- resampling
class MaskedUpsampleNearest(MaskedLayer):
    """Nearest-neighbour upsampling by integer factors (HRNet's fuse layers, FPN and segmentation heads):
    every output pixel copies one input pixel, removed ones as 0, so the output is exact and needs no
    re-zeroing; mask out = the mask upsampled the same way (masks.upsample_nearest). forward(x)."""

    rule = "upsample"

    def __init__(self, scale):
        super().__init__()
        self.scale = (int(scale[0]), int(scale[1]))

    def masks(self, mb, in_masks):
        return [], mb.upsample(in_masks[0], self.scale)

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")

    def describe(self):
        return f"nearest upsampling x{self.scale[0]}x{self.scale[1]}"


class MaskedUpsampleBilinear(MaskedLayer):
    """Bilinear upsampling by integer factors (segmentation heads, FPNs) that never reads a removed pixel.

    An output pixel averages up to 2 x 2 input pixels with bilinear weights w; here only the visible ones,
    renormalised: sum(w v over visible) / sum(w over visible). Where every contributing pixel is visible
    that is the plain bilinear value, bit for bit (the renormalisation is skipped there, so an all-ones mask
    reproduces the module exactly); where none is, the pixel is removed (masks.upsample_bilinear). Soft
    masks: values from the pixels with m > 0 (as the soft pools read them), the output mask the bilinear
    average of the mask (its gradient path). forward(x, divisor, partial, keep): masks.bilinear_weights, masks.upsample_bilinear.
    """

    rule = "upsample"

    def __init__(self, scale, align_corners: bool = False):
        super().__init__()
        self.scale = (int(scale[0]), int(scale[1]))
        self.align_corners = bool(align_corners)

    def masks(self, mb, in_masks):
        m = in_masks[0]
        geometry = (m, self.scale, self.align_corners)
        extra = (mb.soft,) if mb.soft is not None else ()
        out = mb._emit(M.upsample_bilinear, geometry + extra, name="bilinear_mask")
        # the renormalisation depends on the mask alone: in the mask path, once per geometry
        both = mb._emit(M.bilinear_weights, geometry, name="bilinear_weights")
        return [mb._emit(operator.getitem, (both, 0), name="bilinear_divisor"),
                mb._emit(operator.getitem, (both, 1), name="bilinear_partial"), out], out

    def forward(self, x, divisor, partial, keep):
        plain = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=self.align_corners)
        # removed pixels are 0: plain is the weighted sum over the visible contributors
        return M.select_visible(torch.where(partial, plain / divisor, plain), keep)

    def describe(self):
        return (f"bilinear upsampling x{self.scale[0]}x{self.scale[1]}"
                f"{' (align_corners)' if self.align_corners else ''}, over visible pixels only")


# ----------------------------------------------------------------------------- joins
# Out of place (an input may still be read by other layers); operator.* takes a scalar on either side.
_BINARY_FNS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}


class MaskedBinary(MaskedLayer):
    """Elementwise binary op (residual add, SE / layer-scale multiply, sub, div) [+ activation].

    Masked inputs' masks intersect. The result is re-zeroed wherever it might be non-zero
    at a removed position (different input masks, a plain addend, a division, an
    activation with f(0) != 0). A following activation (ResNet's add + ReLU) is fused.
    forward(a, b[, m_out]).
    """

    rule = "elementwise"
    fresh_output = True

    def __init__(self, kind: str, name: str, layout="nchw", activation="none"):
        super().__init__()
        if kind not in _BINARY_FNS:
            raise ValueError(f"kind must be one of {sorted(_BINARY_FNS)}, got {kind!r}")
        self.kind, self.name, self.layout = kind, name, layout
        self.activation = check_activation(activation)
        self.rezero = True
        # Which input (0 or 1) an add may write its sum into: a fresh tensor of a masked layer that
        # nothing else reads (set by the converter, as MaskedConv2d.fill_in_place); None: neither.
        self.add_into: Optional[int] = None

    def masks(self, mb, in_masks):
        masked = [k for k in in_masks if k is not None]
        out = mb.join(masked, "intersection")
        same = len(set(masked)) == 1
        n_plain = len(in_masks) - len(masked)
        # mul: 0 * finite = 0, and a product with both inputs masked is 0 where either is removed.
        self.rezero = not ((self.kind == "mul") or (self.kind == "add" and same and n_plain == 0)) \
            or self.activation not in ZERO_PRESERVING
        return ([out] if self.rezero else []), out

    def forward(self, a, b, m_out=None):
        y = self._sum_in_place(a, b)
        if y is None:
            y = _BINARY_FNS[self.kind](a, b)
        elif self.rezero and self.layout == "nchw" and self.soft is None and y.dim() == 4:
            # activation and selection in one pass over the sum (ResNet's add + ReLU)
            return ops.resolve(y.device).conv_epilogue_(y, m_out.to(y.dtype), None, None, self.activation)
        y = _act_fresh(y, self.activation)
        return _zero_fresh(y, layout_mask(m_out, self.layout)) if self.rezero else y

    def _sum_in_place(self, a, b) -> Optional[torch.Tensor]:
        """a + b written into the input the converter chose (add_into), or None where that is not
        allowed: no such input, a Python number (x + 1), inputs that broadcast or promote, or autograd
        recording."""
        if self.add_into is None or not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) \
                or a.shape != b.shape or a.dtype != b.dtype:
            return None
        dst, src = (a, b) if self.add_into == 0 else (b, a)
        return dst.add_(src) if ops.owns_for_writing(dst) else None

    def describe(self):
        act = f" +{self.activation}" if self.activation != "none" else ""
        return f"{self.name} (masks intersect){act}"


class MaskedStack(MaskedLayer):
    """``torch.stack`` of masked N x C x H x W maps along dim 1 (selective-kernel branches): an
    N x P x C x H x W map ("ngchw" layout, one mask for all). Its mask is the intersection of the inputs'
    (the branches are summed later, as a residual add); a pixel some branch had visible and the
    intersection removes is zeroed. forward(*xs, m_out)."""

    rule = "stack"

    def __init__(self, n_inputs: int):
        super().__init__()
        self.n_inputs = n_inputs

    def masks(self, mb, in_masks):
        if any(k is None for k in in_masks):
            raise ValueError("torch.stack mixes masked and unmasked tensors")
        out = mb.join(list(in_masks), "intersection")
        return [out], out

    def forward(self, *args):
        *xs, m = args
        return M.select_visible(torch.stack(xs, 1), layout_mask(m, "ngchw"))

    def describe(self):
        return f"stack ({self.n_inputs} inputs along dim 1, mask: intersection)"


class GroupSum(Identity):
    """The sum over dim 1 of an N x G x C x H x W map (the selective-kernel's sum of its branches) or of the
    channels of an N x C x H x W map (keepdim): per pixel, so the mask is unchanged and removed pixels
    stay 0."""

    rule = "sum over groups"

    def __init__(self, keepdim: bool = False):
        super().__init__("sum over dim 1")
        self.keepdim = bool(keepdim)

    def forward(self, x):
        return x.sum(1, keepdim=self.keepdim)

    def describe(self):
        return "sum over the group dim (mask unchanged)"


class MaskedConcat(MaskedLayer):
    """Channel concat. Output mask: majority vote (DenseNet), union (Fire) or intersection.

    forward(*xs[, m_out]).
    """

    rule = "concat"
    fresh_output = True

    def __init__(self, how: str, n_inputs: int):
        super().__init__()
        self.how, self.n_inputs = how, n_inputs
        self.rezero = True

    def masks(self, mb, in_masks):
        if any(k is None for k in in_masks):
            raise ValueError("torch.cat mixes masked and unmasked tensors")
        out = mb.join(list(in_masks), self.how)
        # Union: every input is already 0 wherever the output is removed.
        self.rezero = len(set(in_masks)) > 1 and self.how != "union"
        return ([out] if self.rezero else []), out

    def forward(self, *args):
        if self.rezero:
            *xs, m = args
            # Where the vote removes a pixel some input had visible, zero it.
            return _zero_fresh(torch.cat(xs, 1), m)
        return torch.cat(args, 1)

    def describe(self):
        return f"concat ({self.n_inputs} inputs, mask: {self.how})"
