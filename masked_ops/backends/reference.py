"""The pure-PyTorch backend: the reference math of every layer-masking primitive.

This module is the oracle of every test and the "plain PyTorch masking" baseline of
every benchmark, so it is written for clarity, not speed. All other backends
(cpp, cuda, triton) implement the same primitives with the same signatures:

    neighbor_fill(x, mask, iters) -> x_filled
    neighbor_fill_(x, mask, iters) -> x        (in place, where the fill reaches; no autograd)
    conv_epilogue(y, keep, scale, bias, activation) -> out
    conv_epilogue_(y, keep, scale, bias, activation) -> y   (in place; no autograd)
    masked_affine_act(x, mask, scale, shift, activation) -> out
    masked_max_pool2d(x, mask, kernel_size, stride, padding, dilation, ceil_mode) -> (y, mask_out)
    masked_avg_pool2d(x, mask, kernel_size, stride, padding, ceil_mode, count_include_pad) -> (y, mask_out)
    masked_mean(x, mask) -> N x C

Conventions shared by all primitives (the public ops in masked_ops.ops validate and
canonicalise their inputs before calling a backend):
- ``mask``/``keep`` are floating tensors of shape N x 1 x H x W holding exactly 0.0
  (removed) or 1.0 (visible), in the dtype of ``x``;
- removed values never influence anything, NaN and inf included: they are *selected
  away* with ``torch.where``, never multiplied by zero;
- fp16/bf16 inputs are computed in the input dtype here (this is what "plain PyTorch
  in the same dtype" means for the accuracy rule); fused backends accumulate in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import masks as M
from ..activations import apply_activation
from ..modes import saturated_rings

# Guard for denominators; window sums and counts are integers >= 1 wherever they are used,
# so this only avoids a 0/0 that is selected away afterwards.
EPS = 1e-12


def _zero_removed(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def neighbor_fill(x: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
    """Fill removed pixels from their visible neighbours ("fast marching" style).

    Start from x with removed pixels zeroed. In each of ``iters`` iterations, every pixel
    that is not yet known and has at least one known pixel in its 3x3 neighbourhood
    takes the mean of those known pixels and becomes known. Pixels never reached stay 0.
    ``iters == 0`` is plain zeroing of the removed region.

    Fill values carry no gradient (as in the paper): gradients reach ``x`` only through
    the visible pixels.
    """
    out = _zero_removed(x, mask)
    iters = saturated_rings(iters, x.shape[2], x.shape[3])
    if iters <= 0:
        return out
    c = x.shape[1]
    known = (mask > 0).to(x.dtype)
    ones_c = torch.ones(c, 1, 3, 3, dtype=x.dtype, device=x.device)
    ones_1 = torch.ones(1, 1, 3, 3, dtype=x.dtype, device=x.device)
    filled = out.detach()
    for _ in range(iters):
        s = F.conv2d(filled * known, ones_c, padding=1, groups=c)
        cnt = F.conv2d(known, ones_1, padding=1)
        newly = (cnt > 0) & (known == 0)
        filled = torch.where(newly, s / cnt.clamp_min(EPS), filled)
        known = torch.where(newly, torch.ones_like(known), known)
    # Visible pixels carry x (and its gradient); filled pixels carry the detached fill.
    return torch.where(mask > 0, out, filled)


def soft_fill(x: torch.Tensor, mask: torch.Tensor, iters: int, fill_grad: bool = False,
              pads=(0, 0, 0, 0)) -> torch.Tensor:
    """The input a soft-masked conv reads: each pixel blended with the fill by its mask value.

    docs/design.md, "Soft masks". With v_0 = x (selected to 0 where m == 0) and the knownness
    k_0 = m, each of ``iters`` rings does, with box3 the 3x3 sum (zero padding)::

        c = box3(k);  f = box3(k * v) / c;  v <- k * v + (1 - k) * f  where c > 0;  k <- maxpool3(k)

    and returns v. ``iters == 0`` gives m * x (the zero and renorm modes' input). At a 0/1 mask this
    is exactly ``neighbor_fill`` (a ring fills the unknown pixels next to known ones with the mean of
    those, known pixels keep x), bit for bit. Differentiable in the mask; ``fill_grad=False`` (the
    paper's choice) lets fill values carry no gradient to x, only to the mask. ``pads`` (left, right,
    top, bottom): zeros around the result, as F.pad after it (a TF-"same" conv's input).
    """
    if any(pads):
        return F.pad(soft_fill(x, mask, iters, fill_grad), tuple(int(p) for p in pads))
    v = _zero_removed(x, mask)
    iters = saturated_rings(iters, x.shape[2], x.shape[3])
    if iters <= 0:
        return v * mask
    c = x.shape[1]
    ones_c = torch.ones(c, 1, 3, 3, dtype=x.dtype, device=x.device)
    ones_1 = torch.ones(1, 1, 3, 3, dtype=x.dtype, device=x.device)
    k = mask
    # w: the same values as v, built from x.detach(): the fill reads w, so fill values pass gradient
    # to the mask (through k and through earlier rings) but, unless fill_grad, not to x.
    w = v if fill_grad else _zero_removed(x.detach(), mask)
    for _ in range(iters):
        cnt = F.conv2d(k, ones_1, padding=1)
        f = F.conv2d(k * w, ones_c, padding=1, groups=c) / cnt.clamp_min(EPS)
        known = cnt > 0
        v_next = torch.where(known, k * v + (1 - k) * f, v)
        w = v_next if fill_grad else torch.where(known, k * w + (1 - k) * f, w)
        v = v_next
        k = F.max_pool2d(k, 3, 1, 1)
    return v


def reached(mask: torch.Tensor, iters: int) -> torch.Tensor:
    """Bool N x 1 x H x W: visible, or within ``iters`` 3x3 steps (Chebyshev distance) of a visible pixel."""
    m = (mask > 0).to(torch.float32)
    if iters > 0:
        m = F.max_pool2d(m, 2 * iters + 1, 1, iters)
    return m > 0


def neighbor_fill_(x: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
    """neighbor_fill written into ``x`` itself, where the fill reaches; returns x.

    Reached removed pixels take the fill's values; visible pixels and pixels the fill never
    reaches keep whatever x holds there (so ``iters == 0`` changes nothing). For converted
    models that own their activations, outside autograd: a fill that only writes the ring
    pixels instead of copying the whole map.
    """
    iters = saturated_rings(iters, x.shape[2], x.shape[3])
    if iters > 0:
        write = reached(mask, iters) & ~(mask > 0)
        x.copy_(torch.where(write, neighbor_fill(x, mask, iters), x))
    return x


def conv_epilogue(y: torch.Tensor, keep: torch.Tensor, scale: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], activation: str = "none") -> torch.Tensor:
    """out = act(y * scale + bias) where keep, 0 elsewhere.

    ``scale`` is None (modes fill/zero) or N x 1 x Ho x Wo (renorm: k_h*k_w / window_sum).
    """
    # Select first: autograd would otherwise multiply removed NaNs into grad(scale) = sum_c(g * y) and
    # into the activation's derivative (0 * silu'(NaN) = NaN).
    z = _zero_removed(y, keep)
    if scale is not None:
        z = z * scale
    if bias is not None:
        z = z + bias.view(1, -1, 1, 1).to(z.dtype)
    z = apply_activation(z, activation)
    return _zero_removed(z, keep)


def conv_epilogue_(y: torch.Tensor, keep: torch.Tensor, scale: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], activation: str = "none") -> torch.Tensor:
    """conv_epilogue written over ``y`` (a conv output the caller owns; no autograd); returns y."""
    return y.copy_(conv_epilogue(y, keep, scale, bias, activation))


def masked_affine_act(x: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor,
                      shift: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """Eval-mode BatchNorm (as a per-channel affine) + activation on visible pixels."""
    # Zero first: otherwise autograd's grad(scale) = sum(g * x) would multiply by removed NaNs.
    z = _zero_removed(x, mask) * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)
    z = apply_activation(z, activation)
    return _zero_removed(z, mask)


def masked_max_pool2d(x, mask, kernel_size, stride, padding, dilation, ceil_mode):
    """Max pool of the masked input (removed = 0, as in the paper), times maxpool(mask)."""
    xm = _zero_removed(x, mask)
    y = F.max_pool2d(xm, kernel_size, stride, padding, dilation, ceil_mode)
    m2 = M.pool_mask(mask, kernel_size, stride, padding, dilation, ceil_mode)
    return _zero_removed(y, m2), m2


def masked_avg_pool2d(x, mask, kernel_size, stride, padding, ceil_mode, count_include_pad=True):
    """avgpool(x * m) times the indicator avgpool(m) > 0 (the paper's rule)."""
    xm = _zero_removed(x, mask)
    y = F.avg_pool2d(xm, kernel_size, stride, padding, ceil_mode, count_include_pad)
    m2 = M.pool_mask(mask, kernel_size, stride, padding, (1, 1), ceil_mode)
    return _zero_removed(y, m2), m2


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Global masked average pool, N x C: sum(m * x) / sum(m), 0 where sum(m) == 0.

    For a 0/1 mask: the mean over visible pixels (the hard rule); for a soft mask the mask-weighted
    mean, differentiable in the mask. x is selected first: NaN where m == 0 never enters.
    """
    xm = _zero_removed(x, mask) * mask
    num = xm.sum(dim=(2, 3))
    den = mask.sum(dim=(2, 3))
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.zeros((), dtype=x.dtype, device=x.device))
