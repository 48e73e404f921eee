"""The compiled backend: the fused kernels of masked_ops._C ("cpp" on CPU, "cuda" on CUDA).

The same primitives as masked_ops.backends.reference (same signatures, same return values),
each a thin call of ``torch.ops.masked_ops.*``. The dispatcher picks the kernel by the
tensors' device (csrc/cpu/ registers the CPU key, csrc/cuda/ the CUDA key), so this module
is device-agnostic. It also registers, for every op:
- a fake (meta) kernel, so the ops trace under torch.compile / FakeTensor / opcheck;
- an autograd formula written in torch ops (so it runs on any device and traces too):
  gradients for x, weight (through the conv outside), bias, scale and shift. The fill values
  carry no gradient, as in the paper. The mask gets None for now; each backward marks where
  a soft-mask gradient would be added.
"""
from __future__ import annotations

from typing import Optional

import torch

try:  # Importing the extension runs its static registrations (schemas and kernels).
    from .. import _C  # noqa: F401
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # not built, or built against another torch
    _IMPORT_ERROR = exc


def require(name: str) -> None:
    """Raise unless the backend ``name`` ("cpp" or "cuda") can run here."""
    if _IMPORT_ERROR is not None:
        raise ImportError(f"masked_ops._C cannot be imported ({_IMPORT_ERROR}); build it with "
                          f"`python setup.py build_ext --inplace`")
    key = {"cpp": "CPU", "cuda": "CUDA"}[name]
    if not torch._C._dispatch_has_kernel_for_dispatch_key("masked_ops::neighbor_fill", key):
        raise RuntimeError(f"masked_ops._C has no {key} kernels (built without "
                           f"{'CUDA' if key == 'CUDA' else 'the CPU sources'})")


def _ops():
    return torch.ops.masked_ops


# ----------------------------------------------------------------------------- primitives
def neighbor_fill(x: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
    return _ops().neighbor_fill(x, mask, int(iters))


def conv_epilogue(y: torch.Tensor, keep: torch.Tensor, scale: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], activation: str = "none") -> torch.Tensor:
    return _ops().conv_epilogue(y, keep, scale, bias, activation)


def masked_affine_act(x: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      activation: str = "none") -> torch.Tensor:
    return _ops().masked_affine_act(x, mask, scale, shift, activation)


def masked_max_pool2d(x, mask, kernel_size, stride, padding, dilation, ceil_mode):
    y, m2, _indices = _ops().masked_max_pool2d(x, mask, list(kernel_size), list(stride), list(padding),
                                               list(dilation), bool(ceil_mode))
    return y, m2


def masked_avg_pool2d(x, mask, kernel_size, stride, padding, ceil_mode, count_include_pad=True):
    return _ops().masked_avg_pool2d(x, mask, list(kernel_size), list(stride), list(padding), bool(ceil_mode),
                                    bool(count_include_pad))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _ops().masked_mean(x, mask)


# ----------------------------------------------------------------------------- shapes and layouts
def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The kernels' output layout: the input's suggested memory format (C++ suggest_memory_format)."""
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(x)


def _pooled_size(size, k: int, pad: int, stride: int, dil: int, ceil_mode: bool):
    """ATen's pooling_output_shape (csrc/cpu/common.h pooled_size)."""
    out = (size + 2 * pad - dil * (k - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out = out - 1
    return out


def _pool_shape(x, kernel_size, stride, padding, dilation, ceil_mode):
    ho = _pooled_size(x.shape[2], kernel_size[0], padding[0], stride[0], dilation[0], ceil_mode)
    wo = _pooled_size(x.shape[3], kernel_size[1], padding[1], stride[1], dilation[1], ceil_mode)
    return ho, wo


def _zero_where_removed(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask > 0, t, torch.zeros((), dtype=t.dtype, device=t.device))


# d act(z) / dz applied to grad, with the same ATen backward ops autograd uses for the
# reference's activations (masked_ops/activations.py), so gradients agree exactly.
_aten = torch.ops.aten
_ACTIVATION_BACKWARD = {
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


def _sum_to_channels(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=(0, 2, 3)).to(like.dtype)


# ----------------------------------------------------------------------------- registrations
def _register() -> None:
    lib = "masked_ops::"

    # -- neighbor_fill
    @torch.library.register_fake(lib + "neighbor_fill")
    def _(x, mask, iters):
        return torch.empty_like(x, memory_format=_memory_format(x))

    def fill_setup(ctx, inputs, output):
        _x, mask, _iters = inputs
        ctx.save_for_backward(mask)

    def fill_backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        # Visible pixels pass x through; filled pixels are detached (no gradient, as in the paper).
        # Soft-mask gradient goes here: d out / d mask = x - fill value (needs the fill values saved).
        return _zero_where_removed(grad, mask), None, None

    torch.library.register_autograd(lib + "neighbor_fill", fill_backward, setup_context=fill_setup)

    # -- conv_epilogue
    @torch.library.register_fake(lib + "conv_epilogue")
    def _(y, keep, scale, bias, activation):
        return torch.empty_like(y, memory_format=_memory_format(y))

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
        gz = _zero_where_removed(_ACTIVATION_BACKWARD[ctx.activation](grad, z), keep)
        gy = gz if scale is None else gz * scale
        gscale = (gz * y).sum(dim=1, keepdim=True) if scale is not None and ctx.needs_input_grad[2] else None
        gbias = _sum_to_channels(gz, bias) if bias is not None and ctx.needs_input_grad[3] else None
        # Soft-mask gradient goes here: keep is a hard select now; with a soft keep it would be
        # (act(z) * grad).sum(1, keepdim=True), and gscale would carry d window_sum / d mask.
        return gy, None, gscale, gbias, None

    torch.library.register_autograd(lib + "conv_epilogue", epilogue_backward, setup_context=epilogue_setup)

    # -- masked_affine_act
    @torch.library.register_fake(lib + "masked_affine_act")
    def _(x, mask, scale, shift, activation):
        return torch.empty_like(x, memory_format=_memory_format(x))

    def affine_setup(ctx, inputs, output):
        x, mask, scale, shift, activation = inputs
        ctx.activation = activation
        ctx.save_for_backward(x, mask, scale, shift)

    def affine_backward(ctx, grad):
        x, mask, scale, shift = ctx.saved_tensors
        s = scale.view(1, -1, 1, 1).to(x.dtype)
        z = x * s + shift.view(1, -1, 1, 1).to(x.dtype)
        gz = _zero_where_removed(_ACTIVATION_BACKWARD[ctx.activation](grad, z), mask)
        gx = gz * s
        # gz * x is 0 * (anything) at removed pixels: select again so NaN/inf there cannot leak.
        gscale = _sum_to_channels(_zero_where_removed(gz * x, mask), scale) if ctx.needs_input_grad[2] else None
        gshift = _sum_to_channels(gz, shift) if ctx.needs_input_grad[3] else None
        # Soft-mask gradient goes here: (act(z) * grad).sum(1, keepdim=True) for a soft mask.
        return gx, None, gscale, gshift, None

    torch.library.register_autograd(lib + "masked_affine_act", affine_backward, setup_context=affine_setup)

    # -- masked_max_pool2d
    @torch.library.register_fake(lib + "masked_max_pool2d")
    def _(x, mask, kernel_size, stride, padding, dilation, ceil_mode):
        ho, wo = _pool_shape(x, kernel_size, stride, padding, dilation, ceil_mode)
        fmt = _memory_format(x)
        n, c = x.shape[0], x.shape[1]
        y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
        m2 = torch.empty((n, 1, ho, wo), dtype=mask.dtype, device=mask.device)
        idx = torch.empty((n, c, ho, wo), dtype=torch.int64, device=x.device, memory_format=fmt)
        return y, m2, idx

    def max_setup(ctx, inputs, output):
        x, mask, kernel_size, stride, padding, dilation, ceil_mode = inputs
        _y, m2, idx = output
        ctx.geometry = (list(kernel_size), list(stride), list(padding), list(dilation), bool(ceil_mode))
        ctx.mark_non_differentiable(m2, idx)
        ctx.save_for_backward(x, mask, m2, idx)

    def max_backward(ctx, grad_y, _grad_m2, _grad_idx):
        x, mask, m2, idx = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode = ctx.geometry
        g = _zero_where_removed(grad_y, m2)
        gx = _aten.max_pool2d_with_indices_backward(g, x, kernel_size, stride, padding, dilation, ceil_mode, idx)
        # Soft-mask gradient goes here: d y / d mask at the argmax pixel (and through m2).
        return _zero_where_removed(gx, mask), None, None, None, None, None, None

    torch.library.register_autograd(lib + "masked_max_pool2d", max_backward, setup_context=max_setup)

    # -- masked_avg_pool2d
    @torch.library.register_fake(lib + "masked_avg_pool2d")
    def _(x, mask, kernel_size, stride, padding, ceil_mode, count_include_pad):
        ho, wo = _pool_shape(x, kernel_size, stride, padding, (1, 1), ceil_mode)
        y = torch.empty((x.shape[0], x.shape[1], ho, wo), dtype=x.dtype, device=x.device,
                        memory_format=_memory_format(x))
        m2 = torch.empty((x.shape[0], 1, ho, wo), dtype=mask.dtype, device=mask.device)
        return y, m2

    def avg_setup(ctx, inputs, output):
        x, mask, kernel_size, stride, padding, ceil_mode, count_include_pad = inputs
        _y, m2 = output
        ctx.geometry = (list(kernel_size), list(stride), list(padding), bool(ceil_mode), bool(count_include_pad))
        ctx.mark_non_differentiable(m2)
        ctx.save_for_backward(x, mask, m2)

    def avg_backward(ctx, grad_y, _grad_m2):
        x, mask, m2 = ctx.saved_tensors
        kernel_size, stride, padding, ceil_mode, count_include_pad = ctx.geometry
        g = _zero_where_removed(grad_y, m2)
        gx = _aten.avg_pool2d_backward(g, x, kernel_size, stride, padding, ceil_mode, count_include_pad, None)
        # Soft-mask gradient goes here: d y / d mask = x / divisor inside each window.
        return _zero_where_removed(gx, mask), None, None, None, None, None, None

    torch.library.register_autograd(lib + "masked_avg_pool2d", avg_backward, setup_context=avg_setup)

    # -- masked_mean
    @torch.library.register_fake(lib + "masked_mean")
    def _(x, mask):
        return x.new_empty((x.shape[0], x.shape[1]))

    def mean_setup(ctx, inputs, output):
        _x, mask = inputs
        ctx.save_for_backward(mask)

    def mean_backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        count = mask.sum(dim=(2, 3)).clamp_min(1)  # N x 1; all-removed samples get no gradient anyway
        g = (grad / count)[:, :, None, None]
        # Soft-mask gradient goes here: d mean / d mask = (x - mean) / count (x selected where visible).
        return _zero_where_removed(g, mask), None

    torch.library.register_autograd(lib + "masked_mean", mean_backward, setup_context=mean_setup)


if _IMPORT_ERROR is None:
    _register()
