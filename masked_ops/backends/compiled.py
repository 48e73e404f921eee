"""The compiled backend: the fused kernels of masked_ops._C ("cpp", CPU) and masked_ops._C_cuda ("cuda").

The same primitives as masked_ops.backends.reference (same signatures, same return values),
each a thin call of ``torch.ops.masked_ops.*``. The dispatcher picks the kernel by the
tensors' device (csrc/cpu/ registers the CPU key, csrc/cuda/ the CUDA key), so this module
is device-agnostic. It also registers, for every op:
- a fake (meta) kernel, so the ops trace under torch.compile / FakeTensor / opcheck;
- its autograd formula, shared with the Triton backend (masked_ops/backends/autograd.py).
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from .autograd import FORMULAS, epilogue_formula, soft_fill_formula

def _import(module: str) -> Optional[BaseException]:
    """Import masked_ops.<module> (running its static registrations); the error, or None."""
    try:
        importlib.import_module(f"masked_ops.{module}")
        return None
    except ImportError as exc:  # not built, built against another torch, a missing shared library
        return exc


# The schemas and CPU kernels (masked_ops._C) load with any torch build; the CUDA kernels live in
# masked_ops._C_cuda, which needs a CUDA torch and is only imported with one (setup.py says why).
_IMPORT_ERROR: Optional[BaseException] = _import("_C")
_CUDA_IMPORT_ERROR: Optional[BaseException] = None
if _IMPORT_ERROR is None and torch.version.cuda:
    _CUDA_IMPORT_ERROR = _import("_C_cuda")


def _built_for() -> str:
    """Which torch the installed extension was built against (masked_ops/_build_info.py, written by setup.py)."""
    try:
        from .. import _build_info

        return f"built against torch {_build_info.TORCH_VERSION}; this is torch {torch.__version__}"
    except ImportError:
        return f"this is torch {torch.__version__}"


def _how_to_fix(what: str) -> str:
    """What a user can do about a library that does not load: a source checkout rebuilds, a wheel reinstalls."""
    source = os.path.exists(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "setup.py"))
    if source:
        return (f"rebuild it in this source checkout: `make build` (or `pip install -e . --no-build-isolation`"
                f"{'; MASKED_OPS_CUDA=1 builds the CUDA kernels without a GPU' if what == 'cuda' else ''})")
    return ("install a masked_ops build made for this torch (pip install --force-reinstall --no-cache-dir "
            "masked_ops), or build it from source: pip install --no-binary masked_ops masked_ops")


def require(name: str) -> None:
    """Raise unless the backend ``name`` ("cpp" or "cuda") can run here, saying why and what to do."""
    if _IMPORT_ERROR is not None:
        raise ImportError(f"masked_ops._C (the fused kernels) does not load: {_IMPORT_ERROR} ({_built_for()}); "
                          f"{_how_to_fix('cpp')}")
    if name == "cuda":
        if not torch.version.cuda:
            raise RuntimeError(f"torch {torch.__version__} is a CPU-only build: no CUDA kernels can run "
                               f"(install a CUDA build of torch for them)")
        if isinstance(_CUDA_IMPORT_ERROR, ModuleNotFoundError) and _CUDA_IMPORT_ERROR.name == "masked_ops._C_cuda":
            raise ImportError(f"masked_ops._C_cuda (the CUDA kernels) was not built; {_how_to_fix('cuda')}")
        if _CUDA_IMPORT_ERROR is not None:
            raise ImportError(f"masked_ops._C_cuda (the CUDA kernels) does not load: {_CUDA_IMPORT_ERROR} "
                              f"({_built_for()}); {_how_to_fix('cuda')}")
    key = {"cpp": "CPU", "cuda": "CUDA"}[name]
    if not torch._C._dispatch_has_kernel_for_dispatch_key("masked_ops::neighbor_fill", key):
        raise RuntimeError(f"masked_ops has no {key} kernels registered")


def _ops():
    return torch.ops.masked_ops


# ----------------------------------------------------------------------------- primitives
def neighbor_fill(x: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
    return _ops().neighbor_fill(x, mask, int(iters))


def neighbor_fill_(x: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
    _ops().neighbor_fill_(x, mask, int(iters))
    return x


def conv_epilogue(y: torch.Tensor, keep: torch.Tensor, scale: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], activation: str = "none") -> torch.Tensor:
    return _ops().conv_epilogue(y, keep, scale, bias, activation)


def conv_epilogue_(y: torch.Tensor, keep: torch.Tensor, scale: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], activation: str = "none") -> torch.Tensor:
    _ops().conv_epilogue_(y, keep, scale, bias, activation)
    return y


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


def soft_fill(x: torch.Tensor, mask: torch.Tensor, iters: int, fill_grad: bool = False,
              pads=(0, 0, 0, 0)) -> torch.Tensor:
    return _ops().soft_fill(x, mask, int(iters), bool(fill_grad), [int(p) for p in pads])


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


# ----------------------------------------------------------------------------- registrations
def _register() -> None:
    lib = "masked_ops::"

    @torch.library.register_fake(lib + "neighbor_fill")
    def _(x, mask, iters):
        return torch.empty_like(x, memory_format=_memory_format(x))

    @torch.library.register_fake(lib + "neighbor_fill_")
    def _(x, mask, iters):
        return None

    @torch.library.register_fake(lib + "conv_epilogue")
    def _(y, keep, scale, bias, activation):
        return torch.empty_like(y, memory_format=_memory_format(y))

    @torch.library.register_fake(lib + "conv_epilogue_")
    def _(y, keep, scale, bias, activation):
        return None

    @torch.library.register_fake(lib + "masked_affine_act")
    def _(x, mask, scale, shift, activation):
        return torch.empty_like(x, memory_format=_memory_format(x))

    @torch.library.register_fake(lib + "masked_max_pool2d")
    def _(x, mask, kernel_size, stride, padding, dilation, ceil_mode):
        ho, wo = _pool_shape(x, kernel_size, stride, padding, dilation, ceil_mode)
        fmt = _memory_format(x)
        n, c = x.shape[0], x.shape[1]
        y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
        m2 = torch.empty((n, 1, ho, wo), dtype=mask.dtype, device=mask.device)
        idx = torch.empty((n, c, ho, wo), dtype=torch.int64, device=x.device, memory_format=fmt)
        return y, m2, idx

    @torch.library.register_fake(lib + "masked_avg_pool2d")
    def _(x, mask, kernel_size, stride, padding, ceil_mode, count_include_pad):
        ho, wo = _pool_shape(x, kernel_size, stride, padding, (1, 1), ceil_mode)
        y = torch.empty((x.shape[0], x.shape[1], ho, wo), dtype=x.dtype, device=x.device,
                        memory_format=_memory_format(x))
        m2 = torch.empty((x.shape[0], 1, ho, wo), dtype=mask.dtype, device=mask.device)
        return y, m2

    @torch.library.register_fake(lib + "masked_mean")
    def _(x, mask):
        return x.new_empty((x.shape[0], x.shape[1]))

    @torch.library.register_fake(lib + "soft_fill")
    def _(x, mask, iters, fill_grad, pads):
        n, c, h, w = x.shape
        return torch.empty((n, c, h + pads[2] + pads[3], w + pads[0] + pads[1]), dtype=x.dtype, device=x.device,
                           memory_format=_memory_format(x))

    @torch.library.register_fake(lib + "conv_epilogue_backward")
    def _(grad, y, keep, scale, bias, activation, need_scale, need_bias):
        gy = torch.empty_like(y, memory_format=_memory_format(y))
        gscale = torch.empty_like(scale) if need_scale and scale is not None else y.new_empty(0)
        gbias = torch.empty_like(bias) if need_bias and bias is not None else y.new_empty(0)
        return gy, gscale, gbias

    @torch.library.register_fake(lib + "soft_fill_backward")
    def _(grad, x, mask, iters, fill_grad):
        # grad_mask: contiguous, as every kernel returns it (whatever the mask's strides).
        return torch.empty_like(x, memory_format=_memory_format(x)), mask.new_empty(mask.shape)

    @torch.library.register_fake(lib + "imputation_solve")
    def _(b, removed, tol, max_iter):
        return torch.empty_like(b), b.new_empty((b.shape[0], b.shape[1]))

    fused_epilogue = torch._C._dispatch_has_kernel_for_dispatch_key(lib + "conv_epilogue_backward", "CPU")
    for name, (backward, setup) in FORMULAS.items():
        if name == "conv_epilogue" and fused_epilogue:
            continue  # registered once, below (a second registration overrides the first, with a warning)
        torch.library.register_autograd(lib + name, backward, setup_context=setup)
    backward, setup = soft_fill_formula(lambda *args: _ops().soft_fill_backward(*args))
    torch.library.register_autograd(lib + "soft_fill", backward, setup_context=setup)
    if fused_epilogue:
        # The fused backward where this build has it (CPU); CUDA tensors use the torch-ops formula.
        fused, _ = epilogue_formula(lambda *args: _ops().conv_epilogue_backward(*args))
        generic, setup = FORMULAS["conv_epilogue"]

        def epilogue_backward(ctx, grad):
            return (fused if grad.device.type == "cpu" else generic)(ctx, grad)

        torch.library.register_autograd(lib + "conv_epilogue", epilogue_backward, setup_context=setup)


if _IMPORT_ERROR is None:
    _register()
