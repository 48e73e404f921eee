"""Autograd formulas of the fused primitives, shared by every backend that registers ops.

The compiled ops (masked_ops::*, cpp/cuda) and the Triton ops (masked_ops_triton::*) have the
same schemas, so one set of (backward, setup_context) pairs serves both: ``FORMULAS[name]``.
They are written in torch ops, so they run on any device and trace under torch.compile.

Gradients flow to x, weight (through the conv outside), bias, scale and shift. The fill values
carry no gradient, as in the paper. Masks: the hard primitives' masks are selects (no gradient);
masked_mean and soft_fill are differentiable in a soft mask (their formulas give its gradient).
Removed positions are *selected* away (never multiplied by zero), so NaN/inf in the removed region
cannot reach any gradient.
"""
from __future__ import annotations

import torch

_aten = torch.ops.aten

# d act(z) / dz applied to grad, with the same ATen backward ops autograd uses for the
# reference's activations (masked_ops/activations.py), so gradients agree exactly.
ACTIVATION_BACKWARD = {
    "none": lambda g, z: g,
    "relu": lambda g, z: _aten.threshold_backward(g, z, 0),
    "relu6": lambda g, z: _aten.hardtanh_backward(g, z, 0.0, 6.0),
    "leaky_relu": lambda g, z: _aten.leaky_relu_backward(g, z, 0.01, False),
    "silu": lambda g, z: _aten.silu_backward(g, z),
    "hardswish": lambda g, z: _aten.hardswish_backward(g, z),
    "hardsigmoid": lambda g, z: _aten.hardsigmoid_backward(g, z),
    "sigmoid": lambda g, z: _aten.sigmoid_backward(g, torch.sigmoid(z)),
    "gelu": lambda g, z: _aten.gelu_backward(g, z, approximate="none"),
    "tanh": lambda g, z: _aten.tanh_backward(g, torch.tanh(z)),
}


def _zero_where_removed(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask > 0, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _sum_to_channels(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=(0, 2, 3)).to(like.dtype)


# -- neighbor_fill(x, mask, iters)
def fill_setup(ctx, inputs, output):
    _x, mask, _iters = inputs
    ctx.save_for_backward(mask)


def fill_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    # Visible pixels pass x through; filled pixels are detached (no gradient, as in the paper).
    # Soft-mask gradient goes here: d out / d mask = x - fill value (needs the fill values saved).
    return _zero_where_removed(grad, mask), None, None


# -- conv_epilogue(y, keep, scale, bias, activation)
def epilogue_setup(ctx, inputs, output):
    y, keep, scale, bias, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(y, keep, scale, bias)


def epilogue_backward(ctx, grad):
    y, keep, scale, bias = ctx.saved_tensors
    z = y if scale is None else y * scale
    if bias is not None:
        z = z + bias.view(1, -1, 1, 1).to(z.dtype)
    # Select after the activation's derivative, so nothing computed at dropped positions leaks.
    gz = _zero_where_removed(ACTIVATION_BACKWARD[ctx.activation](grad, z), keep)
    gy = gz if scale is None else gz * scale
    gscale = (gz * _zero_where_removed(y, keep)).sum(dim=1, keepdim=True) if scale is not None and ctx.needs_input_grad[2] else None
    gbias = _sum_to_channels(gz, bias) if bias is not None and ctx.needs_input_grad[3] else None
    # keep is a select (0 where keep == 0, untouched elsewhere): no gradient, for a soft keep too. A soft
    # mask's gradient reaches the epilogue through scale (renorm), whose own autograd carries it on.
    return gy, None, gscale, gbias, None


def epilogue_formula(backward_op):
    """(backward, setup_context) of conv_epilogue with a backend's fused backward op
    ``backward_op(grad, y, keep, scale, bias, activation, need_scale, need_bias) -> (gy, gscale, gbias)``."""
    def backward(ctx, grad):
        y, keep, scale, bias = ctx.saved_tensors
        need_scale = scale is not None and ctx.needs_input_grad[2]
        need_bias = bias is not None and ctx.needs_input_grad[3]
        gy, gscale, gbias = backward_op(grad, y, keep, scale, bias, ctx.activation, need_scale, need_bias)
        return gy, None, (gscale if need_scale else None), (gbias.to(bias.dtype) if need_bias else None), None

    return backward, epilogue_setup


# -- masked_affine_act(x, mask, scale, shift, activation)
def affine_setup(ctx, inputs, output):
    x, mask, scale, shift, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(x, mask, scale, shift)


def affine_backward(ctx, grad):
    x, mask, scale, shift = ctx.saved_tensors
    s = scale.view(1, -1, 1, 1).to(x.dtype)
    xm = _zero_where_removed(x, mask)  # removed NaN/inf must not reach gscale through gz * x
    z = xm * s + shift.view(1, -1, 1, 1).to(x.dtype)
    gz = _zero_where_removed(ACTIVATION_BACKWARD[ctx.activation](grad, z), mask)
    gx = gz * s
    gscale = _sum_to_channels(gz * xm, scale) if ctx.needs_input_grad[2] else None
    gshift = _sum_to_channels(gz, shift) if ctx.needs_input_grad[3] else None
    # The mask is a select (a pointwise layer does not weight its pixels): no gradient to it.
    return gx, None, gscale, gshift, None


# -- masked_max_pool2d(x, mask, kernel_size, stride, padding, dilation, ceil_mode) -> (y, m2, indices)
def max_pool_setup(ctx, inputs, output):
    x, mask, kernel_size, stride, padding, dilation, ceil_mode = inputs
    _y, m2, idx = output
    ctx.geometry = (list(kernel_size), list(stride), list(padding), list(dilation), bool(ceil_mode))
    ctx.mark_non_differentiable(m2, idx)
    ctx.save_for_backward(x, mask, m2, idx)


def max_pool_backward(ctx, grad_y, _grad_m2, _grad_idx):
    x, mask, m2, idx = ctx.saved_tensors
    kernel_size, stride, padding, dilation, ceil_mode = ctx.geometry
    g = _zero_where_removed(grad_y, m2)
    gx = _aten.max_pool2d_with_indices_backward(g, x, kernel_size, stride, padding, dilation, ceil_mode, idx)
    # Hard masks only: soft pools are composites of ATen ops (ops.pool_core), differentiable in the mask.
    return _zero_where_removed(gx, mask), None, None, None, None, None, None


# -- masked_avg_pool2d(x, mask, kernel_size, stride, padding, ceil_mode, count_include_pad) -> (y, m2)
def avg_pool_setup(ctx, inputs, output):
    x, mask, kernel_size, stride, padding, ceil_mode, count_include_pad = inputs
    _y, m2 = output
    ctx.geometry = (list(kernel_size), list(stride), list(padding), bool(ceil_mode), bool(count_include_pad))
    ctx.mark_non_differentiable(m2)
    ctx.save_for_backward(x, mask, m2)


def avg_pool_backward(ctx, grad_y, _grad_m2):
    x, mask, m2 = ctx.saved_tensors
    kernel_size, stride, padding, ceil_mode, count_include_pad = ctx.geometry
    g = _zero_where_removed(grad_y, m2)
    gx = _aten.avg_pool2d_backward(g, x, kernel_size, stride, padding, ceil_mode, count_include_pad, None)
    # Hard masks only: soft pools are composites of ATen ops (ops.pool_core), differentiable in the mask.
    return _zero_where_removed(gx, mask), None, None, None, None, None, None


# -- masked_mean(x, mask) -> N x C: sum(m * x) / sum(m)
def mean_setup(ctx, inputs, output):
    x, mask = inputs
    ctx.save_for_backward(x, mask, output)


def mean_backward(ctx, grad):
    x, mask, mean = ctx.saved_tensors
    # Sums in fp32/fp64: an fp16 sum of a large mask overflows, a bf16 one is inexact.
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    den = mask.to(acc).sum(dim=(2, 3), keepdim=True)  # N x 1 x 1 x 1
    den = torch.where(den > 0, den, torch.ones_like(den))
    g = grad[:, :, None, None].to(acc) / den  # N x C x 1 x 1
    gx = _zero_where_removed((g * mask.to(acc)).to(grad.dtype), mask)
    gmask = None
    if ctx.needs_input_grad[1]:
        # d mean_c / d m_p = (x_pc - mean_c) / sum(m), with x selected (0 where m == 0).
        xs = _zero_where_removed(x, mask).to(acc)
        gmask = (g * (xs - mean[:, :, None, None].to(acc))).sum(dim=1, keepdim=True).to(mask.dtype)
    return gx, gmask


# -- soft_fill(x, mask, iters, fill_grad, pads): the backward is a fused op of each backend
def soft_fill_formula(backward_op):
    """(backward, setup_context) of soft_fill, given the backend's soft_fill_backward op."""
    def setup(ctx, inputs, output):
        x, mask, iters, fill_grad, pads = inputs
        ctx.iters, ctx.fill_grad, ctx.pads = int(iters), bool(fill_grad), tuple(int(p) for p in pads)
        ctx.save_for_backward(x, mask)

    def backward(ctx, grad):
        x, mask = ctx.saved_tensors
        left, _, top, _ = ctx.pads
        if any(ctx.pads):
            # The padded border's gradient goes nowhere; the interior goes to the backward as a view
            # (the CPU kernel reads its rows in place, the others copy).
            grad = grad[:, :, top:top + x.shape[2], left:left + x.shape[3]]
        else:
            grad = grad.contiguous(memory_format=_memory_format_of(x))
        gx, gmask = backward_op(grad, x, mask, ctx.iters, ctx.fill_grad)
        return ((gx if ctx.needs_input_grad[0] else None), (gmask if ctx.needs_input_grad[1] else None),
                None, None, None)

    return backward, setup


def _memory_format_of(t: torch.Tensor) -> torch.memory_format:
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(t)


FORMULAS = {
    "neighbor_fill": (fill_backward, fill_setup),
    "conv_epilogue": (epilogue_backward, epilogue_setup),
    "masked_affine_act": (affine_backward, affine_setup),
    "masked_max_pool2d": (max_pool_backward, max_pool_setup),
    "masked_avg_pool2d": (avg_pool_backward, avg_pool_setup),
    "masked_mean": (mean_backward, mean_setup),
}
