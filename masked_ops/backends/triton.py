"""The "triton" backend: the primitives of masked_ops.backends.reference as Triton kernels.

Same functions, same signatures, same results (within dtype tolerance) as the reference. Each
primitive is a registered op (namespace ``masked_ops_triton``) so torch.compile(fullgraph=True)
traces through it without graph breaks:
- torch >= 2.6: ``torch.library.triton_op`` + ``wrap_triton`` (Inductor sees the Triton kernels);
- older torch: ``torch.library.custom_op`` with a fake kernel (the op is opaque to Inductor).
Backward formulas are plain torch ops (``register_autograd``); as in the paper, fill values carry
no gradient.

Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests). This module
imports cleanly without Triton; ``require`` then says why the backend is unavailable.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import torch

try:
    import triton  # noqa: F401

    from masked_ops.triton_kernels import epilogue as _epilogue
    from masked_ops.triton_kernels import masked_mean as _mean
    from masked_ops.triton_kernels import neighbor_fill as _fill
    from masked_ops.triton_kernels import pooling as _pool
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # ImportError (no Triton), or a Triton too old for our kernels
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

NAMESPACE = "masked_ops_triton"
AVAILABLE = _IMPORT_ERROR is None


def require(name: str = "triton") -> None:
    """Raise when the backend cannot run here (called by masked_ops.backends when loading it)."""
    if not AVAILABLE:
        raise RuntimeError(f"the triton backend needs Triton 3.x: {_IMPORT_ERROR}")


# ----------------------------------------------------------------------------- registration
_triton_op = getattr(torch.library, "triton_op", None)
_wrap_triton = getattr(torch.library, "wrap_triton", None)
# Under TRITON_INTERPRET=1 the kernels are Python functions that would run on fake tensors while
# tracing, so there (as on torch < 2.6) the ops are opaque custom ops with a shape-only fake kernel.
USES_TRITON_OP = _triton_op is not None and _wrap_triton is not None and \
    os.environ.get("TRITON_INTERPRET", "0") != "1"


class _NoLaunch:
    """Stands in for wrap_triton in the fake kernel of the custom_op path: shapes only."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _no_launch(kernel):
    return _NoLaunch()


def _register(name: str, launcher):
    """Register ``launcher(..., wrap=...)`` as the op masked_ops_triton::<name>."""
    qualname = f"{NAMESPACE}::{name}"
    if USES_TRITON_OP:
        def impl(*args):
            return launcher(*args, wrap=_wrap_triton)
        impl.__signature__ = launcher.__op_signature__
        impl.__annotations__ = launcher.__op_annotations__
        return _triton_op(qualname, impl, mutates_args=())
    def impl(*args):
        return launcher(*args)
    impl.__signature__ = launcher.__op_signature__
    impl.__annotations__ = launcher.__op_annotations__
    op = torch.library.custom_op(qualname, impl, mutates_args=())

    @op.register_fake
    def _fake(*args):
        return launcher(*args, wrap=_no_launch)
    return op


def _signature(**params):
    """Attach the schema (parameter names and types) that torch.library infers ops from."""
    import inspect

    ret = params.pop("returns")

    def decorate(fn):
        fn.__op_signature__ = inspect.Signature(
            [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=v) for k, v in params.items()],
            return_annotation=ret)
        fn.__op_annotations__ = dict(params, **{"return": ret})
        return fn
    return decorate


Tensor = torch.Tensor


# The launchers below only exist when Triton imported.
if AVAILABLE:
    @_signature(x=Tensor, mask=Tensor, iters=int, returns=Tensor)
    def _fill_launch(x, mask, iters, wrap=lambda k: k):
        return _fill.neighbor_fill(x, mask, iters, wrap=wrap)

    @_signature(y=Tensor, keep=Tensor, scale=Optional[Tensor], bias=Optional[Tensor], activation=str,
                returns=Tensor)
    def _epilogue_launch(y, keep, scale, bias, activation, wrap=lambda k: k):
        return _epilogue.conv_epilogue(y, keep, scale, bias, activation, wrap=wrap)

    @_signature(x=Tensor, mask=Tensor, scale=Tensor, shift=Tensor, activation=str, returns=Tensor)
    def _affine_launch(x, mask, scale, shift, activation, wrap=lambda k: k):
        return _epilogue.masked_affine_act(x, mask, scale, shift, activation, wrap=wrap)

    @_signature(x=Tensor, mask=Tensor, kernel_size=List[int], stride=List[int], padding=List[int],
                dilation=List[int], ceil_mode=bool, returns=Tuple[Tensor, Tensor, Tensor])
    def _max_pool_launch(x, mask, kernel_size, stride, padding, dilation, ceil_mode, wrap=lambda k: k):
        return _pool.masked_max_pool2d(x, mask, kernel_size, stride, padding, dilation, ceil_mode, wrap=wrap)

    @_signature(x=Tensor, mask=Tensor, kernel_size=List[int], stride=List[int], padding=List[int],
                ceil_mode=bool, count_include_pad=bool, returns=Tuple[Tensor, Tensor])
    def _avg_pool_launch(x, mask, kernel_size, stride, padding, ceil_mode, count_include_pad, wrap=lambda k: k):
        return _pool.masked_avg_pool2d(x, mask, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                       wrap=wrap)

    @_signature(x=Tensor, mask=Tensor, returns=Tensor)
    def _mean_launch(x, mask, wrap=lambda k: k):
        return _mean.masked_mean(x, mask, wrap=wrap)

    _fill_op = _register("neighbor_fill", _fill_launch)
    _epilogue_op = _register("conv_epilogue", _epilogue_launch)
    _affine_op = _register("masked_affine_act", _affine_launch)
    _max_pool_op = _register("masked_max_pool2d", _max_pool_launch)
    _avg_pool_op = _register("masked_avg_pool2d", _avg_pool_launch)
    _mean_op = _register("masked_mean", _mean_launch)


# ----------------------------------------------------------------------------- autograd
def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def activation_grad(z: torch.Tensor, name: str) -> torch.Tensor:
    """d act(z) / dz for the names of masked_ops.activations (torch's own backward conventions)."""
    one, zero = torch.ones_like(z), torch.zeros_like(z)
    if name == "none":
        return one
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "relu6":
        return ((z > 0) & (z < 6)).to(z.dtype)
    if name == "leaky_relu":
        return torch.where(z > 0, one, one * 0.01)
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if name == "hardswish":
        return torch.where(z < -3, zero, torch.where(z <= 3, z / 3 + 0.5, one))
    if name == "hardsigmoid":
        return torch.where((z > -3) & (z < 3), one / 6, zero)
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if name == "gelu":
        return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if name == "tanh":
        t = torch.tanh(z)
        return 1 - t * t
    raise ValueError(f"unknown activation {name!r}")


def _fill_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _fill_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return torch.where(mask > 0, grad, _zero(grad)), None, None


def _epilogue_setup(ctx, inputs, output):
    y, keep, scale, bias, activation = inputs
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(y, keep, scale, bias)


def _epilogue_backward(ctx, grad):
    y, keep, scale, bias = ctx.saved_tensors
    kept = keep > 0
    z = torch.where(kept, y, _zero(y))
    if scale is not None:
        z = z * scale
    if bias is not None:
        z = z + bias.view(1, -1, 1, 1).to(z.dtype)
    gz = torch.where(kept, grad * activation_grad(z, ctx.activation), _zero(grad))
    gy = gz * scale if scale is not None else gz
    gbias = gz.sum(dim=(0, 2, 3)).to(ctx.bias_dtype) if ctx.has_bias else None
    return gy, None, None, gbias, None


def _affine_setup(ctx, inputs, output):
    x, mask, scale, shift, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(x, mask, scale, shift)


def _affine_backward(ctx, grad):
    x, mask, scale, shift = ctx.saved_tensors
    vis = mask > 0
    xm = torch.where(vis, x, _zero(x))
    z = xm * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)
    gz = torch.where(vis, grad * activation_grad(z, ctx.activation), _zero(grad))
    gx = gz * scale.view(1, -1, 1, 1).to(x.dtype)
    gscale = (gz * xm).sum(dim=(0, 2, 3)).to(scale.dtype)
    gshift = gz.sum(dim=(0, 2, 3)).to(shift.dtype)
    return gx, None, gscale, gshift, None


def _max_pool_setup(ctx, inputs, output):
    x, mask, kernel_size, stride, padding, dilation, ceil_mode = inputs
    ctx.geometry = (kernel_size, stride, padding, dilation, ceil_mode)
    ctx.save_for_backward(x, mask, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _max_pool_backward(ctx, grad_y, grad_mask, grad_idx):
    x, mask, mask_out, idx = ctx.saved_tensors
    g = torch.where(mask_out > 0, grad_y, _zero(grad_y))
    gx = torch.ops.aten.max_pool2d_with_indices_backward(g, x, *ctx.geometry, idx)
    return torch.where(mask > 0, gx, _zero(gx)), None, None, None, None, None, None


def _avg_pool_setup(ctx, inputs, output):
    x, mask, kernel_size, stride, padding, ceil_mode, count_include_pad = inputs
    ctx.geometry = (kernel_size, stride, padding, ceil_mode, count_include_pad)
    ctx.save_for_backward(x, mask, output[1])
    ctx.mark_non_differentiable(output[1])


def _avg_pool_backward(ctx, grad_y, grad_mask):
    x, mask, mask_out = ctx.saved_tensors
    g = torch.where(mask_out > 0, grad_y, _zero(grad_y))
    gx = torch.ops.aten.avg_pool2d_backward(g, x, *ctx.geometry, None)
    return torch.where(mask > 0, gx, _zero(gx)), None, None, None, None, None, None


def _mean_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _mean_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    den = mask.to(acc).sum(dim=(2, 3), keepdim=True)  # N x 1 x 1 x 1, exact counts
    per_pixel = (grad[:, :, None, None].to(acc) / den.clamp_min(1)).to(grad.dtype)
    gx = torch.where((mask > 0) & (den > 0), per_pixel, _zero(grad))
    return gx, None


if AVAILABLE:
    for _op, _bw, _setup in ((_fill_op, _fill_backward, _fill_setup),
                             (_epilogue_op, _epilogue_backward, _epilogue_setup),
                             (_affine_op, _affine_backward, _affine_setup),
                             (_max_pool_op, _max_pool_backward, _max_pool_setup),
                             (_avg_pool_op, _avg_pool_backward, _avg_pool_setup),
                             (_mean_op, _mean_backward, _mean_setup)):
        _op.register_autograd(_bw, setup_context=_setup)


# ----------------------------------------------------------------------------- primitives
def neighbor_fill(x: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
    require()
    return _fill_op(x, mask, int(iters))


def conv_epilogue(y: torch.Tensor, keep: torch.Tensor, scale: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], activation: str = "none") -> torch.Tensor:
    require()
    return _epilogue_op(y, keep, scale, bias, activation)


def masked_affine_act(x: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      activation: str = "none") -> torch.Tensor:
    require()
    return _affine_op(x, mask, scale, shift, activation)


def masked_max_pool2d(x, mask, kernel_size, stride, padding, dilation, ceil_mode):
    require()
    y, mask_out, _ = _max_pool_op(x, mask, list(kernel_size), list(stride), list(padding), list(dilation),
                                  bool(ceil_mode))
    return y, mask_out


def masked_avg_pool2d(x, mask, kernel_size, stride, padding, ceil_mode, count_include_pad=True):
    require()
    return _avg_pool_op(x, mask, list(kernel_size), list(stride), list(padding), bool(ceil_mode),
                        bool(count_include_pad))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    require()
    return _mean_op(x, mask)
