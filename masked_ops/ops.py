"""Public functional ops of masked_ops (docs/design.md, "Semantics").

Each op validates its arguments (masked_ops._checks), canonicalises the mask, computes
its mask path (masked_ops.masks, which depends on the mask alone) and calls the op's *core*:
the unchecked activation path that takes precomputed masks. The converted models
(masked_ops.nn, built by masked_ops.convert) call the same cores with the masks their graph
computes once per forward, so every op's math lives in one place. The cores hand the fused
work to the selected backend's primitives (masked_ops.backends); the heavy convolution itself
stays with ATen (oneDNN / cuDNN).

Masks: N x 1 x H x W, 1 = visible, 0 = removed, bool or float. Output masks come back in
the dtype of the mask that was passed in.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _checks as C
from . import masks as M
from .activations import check_activation
from .backends import UNDER_COMPILE, resolve
from .modes import fill_iters


# ----------------------------------------------------------------------------- in place or not
def owns_for_writing(t: torch.Tensor) -> bool:
    """Whether a tensor the caller owns may be written in place: not when autograd records it (it
    may be saved for backward). Under torch.compile too: inductor writes a mutating op into the
    buffer when nothing else reads it, and copies first otherwise (auto_functionalize), and the
    in-place fill touches only the ring pixels where the functional one writes a whole new tensor
    (EfficientNet-Lite0, NCHW, batch 32, compiled: 1.69 s -> 1.2-1.3 s)."""
    return not (t.requires_grad and torch.is_grad_enabled())


def epilogue_of_fresh(backend, y, keep, scale, bias, activation):
    """conv_epilogue of a conv output nobody else holds: written over y where that is allowed
    (on CPU, faulting in a large new buffer costs more than the epilogue's pass itself)."""
    if owns_for_writing(y):
        return backend.conv_epilogue_(y, keep, scale, bias, activation)
    return backend.conv_epilogue(y, keep, scale, bias, activation)


# ----------------------------------------------------------------------------- conv
def conv_input(backend, x, m, iters: int, kernel, stride, dilation, *, prepad: M.Prepad = None,
               zeroed: bool = False, in_place: bool = False, grad_through_zeros: bool = True) -> torch.Tensor:
    """The input the vendor conv reads: x filled ``iters`` rings deep, explicitly padded.

    ``zeroed``: x is already exactly 0 at removed pixels (a converted model's activations), so a
    fill of 0 rings has nothing to do. ``in_place``: the caller owns x (nobody else reads it), so
    the fill may write the ring pixels into x itself. Explicit padding (``prepad``) is applied
    after the fill, like the conv's own padding: the padded border is never filled. An owned x is
    filled in place and then padded; otherwise the fill writes into the padded copy that F.pad makes
    anyway. Unreached removed pixels keep 0.
    """
    if prepad is not None:
        pads = M.explicit_pads(prepad, x, kernel, stride, dilation)
        if iters and zeroed and in_place and owns_for_writing(x):
            # Fill first, pad after: under torch.compile the pad is a pointwise copy whose layout
            # inductor chooses (channels_last around its channels_last convs), where a fill into a
            # view of the padded buffer pins that buffer to NCHW (two transposes per conv).
            return F.pad(backend.neighbor_fill_(x, m, iters), pads)
        if iters and zeroed and owns_for_writing(x) and min(pads) >= 0:
            left, _, top, _ = pads
            h, w = x.shape[-2:]
            xp = F.pad(x, pads)
            backend.neighbor_fill_(xp[:, :, top:top + h, left:left + w], m, iters)
            return xp
        if iters or not zeroed:
            x = backend.neighbor_fill(x, m, iters)
        return F.pad(x, pads)
    if iters == 0:
        if zeroed:
            return x
        if tuple(kernel) == (1, 1) and not grad_through_zeros:
            # A 1x1 conv reads only its own pixel and the epilogue selects removed positions away,
            # so zeroing is not needed, unless gradients flow: NaN there would reach weight.grad.
            return x
        return backend.neighbor_fill(x, m, 0)
    if in_place and zeroed and owns_for_writing(x):
        return backend.neighbor_fill_(x, m, iters)
    return backend.neighbor_fill(x, m, iters)


def soft_conv_input(backend, x, m, iters: int, kernel, stride, dilation, *, prepad: M.Prepad = None,
                    fill_grad: bool = False) -> torch.Tensor:
    """The input a soft-masked conv reads: every pixel blended with the fill by its mask value
    (``iters == 0``: m * x, the zero and renorm modes), then explicitly padded. At a 0/1 mask this
    is the hard conv_input, bit for bit. Zero padding goes into the fill op (the CPU kernel writes the
    fill into the padded buffer: no padded copy); cropping (negative pads) stays with F.pad."""
    if prepad is None:
        return backend.soft_fill(x, m, iters, fill_grad)
    pads = M.explicit_pads(prepad, x, kernel, stride, dilation)
    if min(pads) >= 0:
        return backend.soft_fill(x, m, iters, fill_grad, pads)
    return F.pad(backend.soft_fill(x, m, iters, fill_grad), pads)


def conv_core(x: torch.Tensor, m: torch.Tensor, keep: torch.Tensor, scale: Optional[torch.Tensor],
              weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation, groups: int,
              iters: int, activation: str = "none", *, prepad: M.Prepad = None, zeroed: bool = False,
              in_place: bool = False, soft: bool = False, fill_grad: bool = False,
              mode: str = "fill") -> torch.Tensor:
    """The masked conv after its checks and its mask path (``keep``, ``scale`` from masks.conv_masks).

    fill -> vendor conv -> fused epilogue. In fill/zero modes the bias rides in the vendor
    conv (under torch.compile, backends.UNDER_COMPILE["conv_bias"] may move it to the epilogue, which
    inductor fuses into one pointwise pass), except for unpadded 1x1 convs of zeroed inputs (no fill;
    see below); in renorm mode it is added after the scale, in the epilogue. ``soft``: the mask is a
    degree of visibility (soft_conv_input), and gradients reach it.

    A soft mask weighs a pixel only where the conv mixes it with something: with its fill (fill mode
    with rings: the blend, whose two weights sum to 1) or as the zero and renorm modes' m * x. A
    fill-mode conv without rings (1x1) reads its pixels as they are, like every pointwise layer: m * x
    there shrank a constant mask c's activations by c at every 1x1 conv, c^33 through
    EfficientNet-Lite0, so its output stopped depending on any mask below about 0.3 (docs/design.md).
    """
    backend = resolve(x.device)
    weigh = soft and (iters > 0 or mode != "fill")
    kernel = (weight.shape[2], weight.shape[3])
    w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    if (zeroed and scale is None and kernel == (1, 1) and tuple(padding) == (0, 0) and prepad is None
            and (soft or not C.is_compiling())):
        # A 1x1 conv reads each pixel alone, so conv(m * x) = m_s * conv(x) (m_s: m at the output
        # pixels): a soft conv applies its mask as the epilogue's per-pixel scale instead of a fill
        # pass over the (wider) input, and its mask gradient comes out of the epilogue's backward.
        # Only for zeroed inputs (a converted model's activations: 0 and finite where m == 0), since
        # conv(x) must not read NaN that m * x would have removed (the weight gradient would see it).
        # The bias goes to the epilogue in the hard case too, so that soft equals hard bit for bit at
        # a 0/1 mask (y * 1 + b, where a conv with its bias may round differently); compiled hard
        # models keep the measured compile policy (UNDER_COMPILE["conv_bias"]).
        y = F.conv2d(x, w, None, stride, padding, dilation, groups)
        ms = m[:, :, ::stride[0], ::stride[1]] if weigh else None  # 1x1, no padding: the output grid
        return epilogue_of_fresh(backend, y, keep, None if ms is None else ms.contiguous(), b, activation)
    if weigh:
        xin = soft_conv_input(backend, x, m, iters, kernel, stride, dilation, prepad=prepad, fill_grad=fill_grad)
    else:
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        xin = conv_input(backend, x, m, iters, kernel, stride, dilation, prepad=prepad, zeroed=zeroed,
                         in_place=in_place, grad_through_zeros=grad)
    if scale is None and not (C.is_compiling() and UNDER_COMPILE.get("conv_bias") == "epilogue"):
        y = F.conv2d(xin, w, b, stride, padding, dilation, groups)
        return epilogue_of_fresh(backend, y, keep, None, None, activation)
    y = F.conv2d(xin, w, None, stride, padding, dilation, groups)
    return epilogue_of_fresh(backend, y, keep, scale, b, activation)


def masked_conv2d(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, stride=1, padding=0, dilation=1, groups: int = 1,
                  mode: str = "fill", *, padding_visible: bool = False, activation: str = "none",
                  soft: bool = False, fill_grad: bool = False,
                  soft_keep: str = "max") -> Tuple[torch.Tensor, torch.Tensor]:
    """Layer-masked Conv2d. Returns (y, mask_out).

    mode "fill" (the paper's layer masking): removed pixels are filled from visible
    neighbours (d*(k-1) rings) before the ordinary conv; "renorm" (partial convolution):
    conv(x*m) * k_h*k_w / window_sum(m) + bias; "zero": conv(x*m) + bias. In every mode the
    output is act(...) on kept positions and 0 elsewhere, and mask_out = maxpool(m) with
    the conv's kernel, stride, padding and dilation. ``activation`` fuses an activation
    into the epilogue (see masked_ops.activations).

    ``soft=True``: the mask is a degree of visibility in [0, 1] and the op is differentiable in it
    (docs/design.md, "Soft masks"): the conv reads each pixel blended with its fill by its mask
    value (the "blend" semantics; a converted model offers others, see layer_mask), mask_out is
    maxpool(m) (``soft_keep="max"``). At a 0/1 mask it equals the hard op bit for bit. ``fill_grad``: whether fill
    values pass gradient to x (default False, as in the paper; the mask always gets its gradient).
    """
    C.check_input(x)
    C.check_mask(mask, x, soft=soft)
    kernel, stride, padding, dilation = C.check_conv_args(x, weight, bias, stride, padding, dilation,
                                                          groups, mode)
    check_activation(activation)
    keep_rule = M.check_keep_rule(soft_keep) if soft else None
    m = M.op_mask(mask, x, soft)
    keep, scale = M.conv_masks(m, kernel, stride, padding, dilation, mode, padding_visible, soft=keep_rule)
    iters = fill_iters(kernel, dilation) if mode == "fill" else 0
    y = conv_core(x, m, keep, scale, weight, bias, stride, padding, dilation, groups, iters, activation,
                  soft=soft, fill_grad=fill_grad, mode=mode)
    return y, C.restore_mask_dtype(keep, mask)


def neighbor_fill(x: torch.Tensor, mask: torch.Tensor, iters: int, *, soft: bool = False,
                  fill_grad: bool = False) -> torch.Tensor:
    """Fill removed pixels from visible neighbours, ``iters`` rings deep (0 = zero them).

    See masked_ops.backends.reference.neighbor_fill for the exact rule. Rings beyond what
    covers the image change nothing, so ``iters`` is capped at max(H, W) - 1 (any larger
    count gives the same result at no extra cost). ``soft=True``: the mask is a degree of
    visibility in [0, 1] and every pixel is blended with its fill by it (reference.soft_fill;
    ``iters == 0`` gives m * x), differentiable in the mask; equal to the hard fill at a 0/1 mask.
    """
    C.check_input(x)
    C.check_mask(mask, x, soft=soft)
    iters = C.check_iters(iters, x)
    m = M.op_mask(mask, x, soft)
    if soft:
        return resolve(x.device).soft_fill(x, m, iters, bool(fill_grad))
    return resolve(x.device).neighbor_fill(x, m, iters)


# ----------------------------------------------------------------------------- normalisation
def affine_core(x: torch.Tensor, m: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                activation: str = "none") -> torch.Tensor:
    """act(x * scale + shift) on visible pixels, 0 elsewhere (scale/shift cast to x's dtype)."""
    return resolve(x.device).masked_affine_act(x, m, scale.to(x.dtype), shift.to(x.dtype), activation)


def masked_affine_act(x: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      activation: str = "none", *, soft: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm folded to a per-channel affine, plus activation, on visible pixels.

    y = act(x * scale + shift) where mask > 0, 0 elsewhere. Returns (y, mask) (the mask is unchanged).
    ``soft=True`` accepts a mask in [0, 1]: a pointwise layer does not weight its pixels (they are
    weighted once, where a conv, pool or mean consumes them), so the rule is the same.
    """
    C.check_input(x)
    C.check_mask(mask, x, soft=soft)
    C.check_channel_vector(scale, "scale", x)
    C.check_channel_vector(shift, "shift", x)
    check_activation(activation)
    return affine_core(x, C.as_float_mask(mask, x), scale, shift, activation), mask


def masked_batch_norm_act(x: torch.Tensor, mask: torch.Tensor, bn: torch.nn.modules.batchnorm._BatchNorm,
                          activation: str = "none") -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm2d module + activation, on visible pixels (folds bn to an affine)."""
    scale, shift = bn_affine(bn)
    return masked_affine_act(x, mask, scale.to(x.dtype), shift.to(x.dtype), activation)


def bn_affine(bn) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm: y = x * scale + shift."""
    var, mean = bn.running_var, bn.running_mean
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


# ----------------------------------------------------------------------------- pooling
def pool_core(x: torch.Tensor, m: torch.Tensor, kind: str, kernel, stride, padding, dilation, ceil_mode: bool,
              count_include_pad: bool = True, soft: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A masked max or average pool of a checked input: (y, mask_out).

    Hard: the backend's fused pool (removed = 0, zeroed where no visible pixel). Soft (``soft`` the
    keep rule): the same pool of the pixels with m > 0, read as they are (a pool mixes no fill into a
    pixel, so its mask value does not weigh it: see conv_core), and mask_out = masks.pool_mask, which
    carries the mask's gradient. At a 0/1 mask both agree bit for bit.
    """
    backend = resolve(x.device)
    h = m if soft is None else (m > 0).to(m.dtype)
    if kind == "max":
        y, m2 = backend.masked_max_pool2d(x, h, kernel, stride, padding, dilation, ceil_mode)
    else:
        y, m2 = backend.masked_avg_pool2d(x, h, kernel, stride, padding, ceil_mode, count_include_pad)
    if soft is None:
        return y, m2
    return y, M.pool_mask(m, kernel, stride, padding, dilation, ceil_mode, soft=soft)


def masked_max_pool2d(x: torch.Tensor, mask: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                      ceil_mode: bool = False, *, soft: bool = False,
                      soft_keep: str = "max") -> Tuple[torch.Tensor, torch.Tensor]:
    """Max pool of the masked input (removed = 0, as in the paper); mask_out = maxpool(mask).

    ``soft=True``: a mask in [0, 1]; the pool reads pixels with m > 0 as they are and mask_out,
    maxpool(mask), is differentiable in it (see pool_core)."""
    C.check_input(x)
    C.check_mask(mask, x, soft=soft)
    kernel, stride, padding, dilation = C.check_pool_args(x, kernel_size, stride, padding, dilation)
    m = M.op_mask(mask, x, soft)
    y, m2 = pool_core(x, m, "max", kernel, stride, padding, dilation, bool(ceil_mode),
                      soft=M.check_keep_rule(soft_keep) if soft else None)
    return y, C.restore_mask_dtype(m2, mask)


def masked_avg_pool2d(x: torch.Tensor, mask: torch.Tensor, kernel_size, stride=None, padding=0,
                      ceil_mode: bool = False, count_include_pad: bool = True, *, soft: bool = False,
                      soft_keep: str = "max") -> Tuple[torch.Tensor, torch.Tensor]:
    """avgpool(x*m) on positions whose window holds a visible pixel; mask_out = that indicator.

    ``soft=True``: a mask in [0, 1]; mask_out is differentiable in it (see pool_core)."""
    C.check_input(x)
    C.check_mask(mask, x, soft=soft)
    kernel, stride, padding, _ = C.check_pool_args(x, kernel_size, stride, padding, 1)
    m = M.op_mask(mask, x, soft)
    y, m2 = pool_core(x, m, "avg", kernel, stride, padding, (1, 1), bool(ceil_mode), bool(count_include_pad),
                      soft=M.check_keep_rule(soft_keep) if soft else None)
    return y, C.restore_mask_dtype(m2, mask)


def mean_core(x: torch.Tensor, m: torch.Tensor, soft: bool = False) -> torch.Tensor:
    """Global masked mean of a checked input: N x C, sum(m * x) / sum(m) (0 where sum(m) == 0): the mean
    over visible pixels for a 0/1 mask, the mask-weighted mean for a soft one (one primitive for both,
    differentiable in the mask). ``soft`` is accepted for symmetry with the other cores."""
    return resolve(x.device).masked_mean(x, m)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, *, soft: bool = False) -> torch.Tensor:
    """Global masked average pool: sum over visible pixels / their count -> N x C (0 if none).

    ``soft=True``: sum(m * x) / sum(m) for a mask in [0, 1], differentiable in it."""
    C.check_input(x)
    C.check_mask(mask, x, soft=soft)
    return mean_core(x, M.op_mask(mask, x, soft), soft=soft)
