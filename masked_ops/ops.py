"""Public functional ops of masked_ops (DESIGN.md section 3).

Each op validates its arguments (masked_ops._checks), canonicalises the mask, computes
the mask path (which depends on the mask alone) and hands the activation path to the
selected backend's primitives (masked_ops.backends). The heavy convolution itself stays
with ATen (oneDNN / cuDNN): the backends fuse what surrounds it.

Masks: N x 1 x H x W, 1 = visible, 0 = removed, bool or float. Output masks come back in
the dtype of the mask that was passed in.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _checks as C
from .activations import check_activation
from .backends import resolve
from .modes import fill_iters


# ----------------------------------------------------------------------------- mask path
def conv_mask_path(mask: torch.Tensor, kernel, stride, padding, dilation, mode: str,
                   padding_visible: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Output mask m' and (renorm only) the scale k_h*k_w / window_sum of a conv.

    ``mask`` is a canonical float mask. Both come from one window sum of the mask per output
    position, shared by all channels. m' = maxpool(m) with the conv's geometry, i.e.
    window_sum > 0. With ``padding_visible`` the zero-padded border counts as visible in the
    renorm denominator (so an all-ones mask reproduces the plain conv exactly); by default
    it counts as removed, as in the paper and NVIDIA's partial convolution.
    """
    kh, kw = kernel
    ones = torch.ones(1, 1, kh, kw, dtype=mask.dtype, device=mask.device)
    wsum = F.conv2d(mask, ones, None, stride, padding, dilation)
    keep = (wsum > 0.5).to(mask.dtype)
    if mode != "renorm":
        return keep, None
    if padding_visible and (padding[0] or padding[1]):
        ph, pw = padding
        padded = F.pad(mask, (pw, pw, ph, ph), value=1.0)
        wsum = F.conv2d(padded, ones, None, stride, 0, dilation)
    # Ratio in at least float32 (fp16 would round k*k/ws), float64 stays float64.
    scale = (kh * kw) / wsum.to(torch.promote_types(wsum.dtype, torch.float32)).clamp_min(1.0)
    scale = torch.where(keep > 0, scale, torch.zeros_like(scale)).to(mask.dtype)
    return keep, scale


# ----------------------------------------------------------------------------- ops
def neighbor_fill(x: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
    """Fill removed pixels from visible neighbours, ``iters`` rings deep (0 = zero them).

    See masked_ops.backends.reference.neighbor_fill for the exact rule.
    """
    C.check_input(x)
    C.check_mask(mask, x)
    iters = C.check_iters(iters)
    return resolve(x.device).neighbor_fill(x, C.as_float_mask(mask, x), iters)


def masked_conv2d(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, stride=1, padding=0, dilation=1, groups: int = 1,
                  mode: str = "fill", *, padding_visible: bool = False,
                  activation: str = "none") -> Tuple[torch.Tensor, torch.Tensor]:
    """Layer-masked Conv2d. Returns (y, mask_out).

    mode "fill" (the paper's layer masking): removed pixels are filled from visible
    neighbours (d*(k-1) rings) before the ordinary conv; "renorm" (partial convolution):
    conv(x*m) * k_h*k_w / window_sum(m) + bias; "zero": conv(x*m) + bias. In every mode the
    output is act(...) on kept positions and 0 elsewhere, and mask_out = maxpool(m) with
    the conv's kernel, stride, padding and dilation. ``activation`` fuses an activation
    into the epilogue (see masked_ops.activations).
    """
    C.check_input(x)
    C.check_mask(mask, x)
    kernel, stride, padding, dilation = C.check_conv_args(x, weight, bias, stride, padding, dilation,
                                                          groups, mode)
    check_activation(activation)
    m = C.as_float_mask(mask, x)
    backend = resolve(x.device)
    y, keep = _masked_conv2d(backend, x, m, weight, bias, kernel, stride, padding, dilation, groups,
                             mode, padding_visible, activation)
    return y, C.restore_mask_dtype(keep, mask)


def _masked_conv2d(backend, x, m, weight, bias, kernel, stride, padding, dilation, groups, mode,
                   padding_visible, activation, mask_path=None):
    """The unchecked core, shared with the converted models (which precompute the mask path)."""
    keep, scale = mask_path if mask_path is not None else \
        conv_mask_path(m, kernel, stride, padding, dilation, mode, padding_visible)
    iters = fill_iters(kernel, dilation) if mode == "fill" else 0
    if iters == 0 and kernel == (1, 1) and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        # A 1x1 conv reads only its own pixel and the epilogue selects removed positions away, so
        # the zeroing pass is not needed. With gradients it is: NaN there would reach weight.grad.
        xin = x
    else:
        xin = backend.neighbor_fill(x, m, iters)
    y = F.conv2d(xin, weight, None, stride, padding, dilation, groups)
    return epilogue_of_fresh(backend, y, keep, scale, bias, activation), keep


def epilogue_of_fresh(backend, y, keep, scale, bias, activation):
    """conv_epilogue of a conv output nobody else holds: written over y unless autograd records
    (on CPU, faulting in a large new buffer costs more than the epilogue's pass itself)."""
    if y.requires_grad and torch.is_grad_enabled():
        return backend.conv_epilogue(y, keep, scale, bias, activation)
    return backend.conv_epilogue_(y, keep, scale, bias, activation)


def masked_affine_act(x: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      activation: str = "none") -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm folded to a per-channel affine, plus activation, on visible pixels.

    y = act(x * scale + shift) where mask, 0 elsewhere. Returns (y, mask) (the mask is unchanged).
    """
    C.check_input(x)
    C.check_mask(mask, x)
    C.check_channel_vector(scale, "scale", x)
    C.check_channel_vector(shift, "shift", x)
    check_activation(activation)
    m = C.as_float_mask(mask, x)
    return resolve(x.device).masked_affine_act(x, m, scale, shift, activation), mask


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


def masked_max_pool2d(x: torch.Tensor, mask: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                      ceil_mode: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Max pool of the masked input (removed = 0, as in the paper); mask_out = maxpool(mask)."""
    C.check_input(x)
    C.check_mask(mask, x)
    kernel, stride, padding, dilation = C.check_pool_args(x, kernel_size, stride, padding, dilation)
    m = C.as_float_mask(mask, x)
    y, m2 = resolve(x.device).masked_max_pool2d(x, m, kernel, stride, padding, dilation, bool(ceil_mode))
    return y, C.restore_mask_dtype(m2, mask)


def masked_avg_pool2d(x: torch.Tensor, mask: torch.Tensor, kernel_size, stride=None, padding=0,
                      ceil_mode: bool = False, count_include_pad: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """avgpool(x*m) on positions whose window holds a visible pixel; mask_out = that indicator."""
    C.check_input(x)
    C.check_mask(mask, x)
    kernel, stride, padding, _ = C.check_pool_args(x, kernel_size, stride, padding, 1)
    m = C.as_float_mask(mask, x)
    y, m2 = resolve(x.device).masked_avg_pool2d(x, m, kernel, stride, padding, bool(ceil_mode),
                                                bool(count_include_pad))
    return y, C.restore_mask_dtype(m2, mask)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Global masked average pool: sum over visible pixels / their count -> N x C (0 if none)."""
    C.check_input(x)
    C.check_mask(mask, x)
    return resolve(x.device).masked_mean(x, C.as_float_mask(mask, x))
