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

import os
from typing import List, Optional, Tuple

import torch

from .autograd import FORMULAS, soft_fill_formula

try:
    import triton  # noqa: F401

    from masked_ops._triton import epilogue as _epilogue
    from masked_ops._triton import masked_mean as _mean
    from masked_ops._triton import neighbor_fill as _fill
    from masked_ops._triton import pooling as _pool
    from masked_ops._triton import soft_fill as _soft
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


def _register(name: str, launcher, mutates_args=()):
    """Register ``launcher(..., wrap=...)`` as the op masked_ops_triton::<name>."""
    qualname = f"{NAMESPACE}::{name}"
    if USES_TRITON_OP:
        def impl(*args):
            return launcher(*args, wrap=_wrap_triton)
        impl.__signature__ = launcher.__op_signature__
        impl.__annotations__ = launcher.__op_annotations__
        return _triton_op(qualname, impl, mutates_args=mutates_args)
    def impl(*args):
        return launcher(*args)
    impl.__signature__ = launcher.__op_signature__
    impl.__annotations__ = launcher.__op_annotations__
    op = torch.library.custom_op(qualname, impl, mutates_args=mutates_args)

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

    @_signature(x=Tensor, mask=Tensor, iters=int, returns=None)
    def _fill_inplace_launch(x, mask, iters, wrap=lambda k: k):
        _fill.neighbor_fill_(x, mask, iters, wrap=wrap)

    @_signature(y=Tensor, keep=Tensor, scale=Optional[Tensor], bias=Optional[Tensor], activation=str,
                returns=Tensor)
    def _epilogue_launch(y, keep, scale, bias, activation, wrap=lambda k: k):
        return _epilogue.conv_epilogue(y, keep, scale, bias, activation, wrap=wrap)

    @_signature(y=Tensor, keep=Tensor, scale=Optional[Tensor], bias=Optional[Tensor], activation=str,
                returns=None)
    def _epilogue_inplace_launch(y, keep, scale, bias, activation, wrap=lambda k: k):
        _epilogue.conv_epilogue_(y, keep, scale, bias, activation, wrap=wrap)

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

    @_signature(x=Tensor, mask=Tensor, iters=int, fill_grad=bool, pads=List[int], returns=Tensor)
    def _soft_fill_launch(x, mask, iters, fill_grad, pads, wrap=lambda k: k):
        return _soft.soft_fill(x, mask, iters, fill_grad, wrap=wrap, pads=pads)

    @_signature(grad=Tensor, x=Tensor, mask=Tensor, iters=int, fill_grad=bool, returns=Tuple[Tensor, Tensor])
    def _soft_fill_backward_launch(grad, x, mask, iters, fill_grad, wrap=lambda k: k):
        return _soft.soft_fill_backward(grad, x, mask, iters, fill_grad, wrap=wrap)

    _fill_op = _register("neighbor_fill", _fill_launch)
    _soft_fill_op = _register("soft_fill", _soft_fill_launch)
    _soft_fill_backward_op = _register("soft_fill_backward", _soft_fill_backward_launch)
    _fill_inplace_op = _register("neighbor_fill_", _fill_inplace_launch, mutates_args=("x",))
    _epilogue_op = _register("conv_epilogue", _epilogue_launch)
    _epilogue_inplace_op = _register("conv_epilogue_", _epilogue_inplace_launch, mutates_args=("y",))
    _affine_op = _register("masked_affine_act", _affine_launch)
    _max_pool_op = _register("masked_max_pool2d", _max_pool_launch)
    _avg_pool_op = _register("masked_avg_pool2d", _avg_pool_launch)
    _mean_op = _register("masked_mean", _mean_launch)


# ----------------------------------------------------------------------------- autograd
# The same schemas as the compiled ops, so the same formulas (masked_ops/backends/autograd.py).
if AVAILABLE:
    for _name, _op in (("neighbor_fill", _fill_op), ("conv_epilogue", _epilogue_op),
                       ("masked_affine_act", _affine_op), ("masked_max_pool2d", _max_pool_op),
                       ("masked_avg_pool2d", _avg_pool_op), ("masked_mean", _mean_op)):
        _backward, _setup = FORMULAS[_name]
        _op.register_autograd(_backward, setup_context=_setup)
    _backward, _setup = soft_fill_formula(_soft_fill_backward_op)
    _soft_fill_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- primitives
def neighbor_fill(x: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
    require()
    return _fill_op(x, mask, int(iters))


def neighbor_fill_(x: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
    require()
    _fill_inplace_op(x, mask, int(iters))
    return x


def conv_epilogue(y: torch.Tensor, keep: torch.Tensor, scale: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], activation: str = "none") -> torch.Tensor:
    require()
    return _epilogue_op(y, keep, scale, bias, activation)


def conv_epilogue_(y: torch.Tensor, keep: torch.Tensor, scale: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], activation: str = "none") -> torch.Tensor:
    require()
    _epilogue_inplace_op(y, keep, scale, bias, activation)
    return y


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


def soft_fill(x: torch.Tensor, mask: torch.Tensor, iters: int, fill_grad: bool = False,
              pads=(0, 0, 0, 0)) -> torch.Tensor:
    require()
    return _soft_fill_op(x, mask, int(iters), bool(fill_grad), [int(p) for p in pads])
