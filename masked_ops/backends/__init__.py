"""Backend selection: which implementation of the masking primitives runs.

- "torch":  pure PyTorch (masked_ops.backends.reference), the oracle; runs anywhere.
- "cpp":    the compiled extension's fused CPU kernels (masked_ops._C), CPU tensors.
- "cuda":   the compiled extension's CUDA kernels, CUDA tensors.
- "triton": Triton kernels, CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).
- "auto":   per device, the fastest one available: CPU -> cpp; CUDA -> cuda, then triton;
            falls back to "torch" with one warning when the compiled pieces are missing.

``set_backend`` works as a plain setter and as a context manager::

    mo.set_backend("torch")
    with mo.set_backend("cpp"):
        ...
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType
from typing import Dict, Optional

import torch

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")

_state = threading.local()
_DEFAULT = os.environ.get("MASKED_OPS_BACKEND", "auto")
_warned: set = set()
_cache: Dict[str, Optional[ModuleType]] = {}
_errors: Dict[str, str] = {}


def _check_name(name) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend name currently selected (may be "auto")."""
    return getattr(_state, "name", _DEFAULT)


class set_backend:
    """Select the backend; usable as a function or as a context manager (restores on exit)."""

    def __init__(self, name: str):
        self._previous = get_backend()
        _state.name = _check_name(name)
        preload()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _state.name = self._previous
        return False


def _load(name: str) -> Optional[ModuleType]:
    """Import a backend module once; None (with the reason kept) when it is unavailable."""
    if name not in _cache:
        module = {"torch": "reference", "cpp": "compiled", "cuda": "compiled", "triton": "triton"}[name]
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
            if name in ("cpp", "cuda", "triton"):
                mod.require(name)
                _views[mod.__name__] = _CompileView(mod, _load("torch"))
            _cache[name] = mod
        except Exception as exc:  # ImportError, missing CUDA kernels, no Triton, ...
            _cache[name] = None
            _errors[name] = f"{type(exc).__name__}: {exc}"
    return _cache[name]


def preload() -> None:
    """Import the backends the current selection can resolve to, outside any torch.compile trace
    (dynamo cannot trace an import: the first resolve() inside a compiled region must find them
    cached). Called by set_backend and layer_mask."""
    name = get_backend()
    candidates = ("torch", "cpp", "cuda", "triton") if name == "auto" else ("torch", name)
    for candidate in candidates:
        if candidate == "triton" and not (torch.cuda.is_available() or _triton_runs_on_cpu()):
            continue
        _load(candidate)


def _no_device_reason(name: str) -> Optional[str]:
    """Why a loaded backend still cannot run on this machine (None: it can)."""
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA device on this machine (the CUDA kernels are built, but nothing can run them)"
    if name == "triton" and not torch.cuda.is_available() and not _triton_runs_on_cpu():
        return "no CUDA device on this machine (Triton runs on CPU tensors only under TRITON_INTERPRET=1)"
    return None


def available(name: str) -> bool:
    """Whether a backend can run *here*: its pieces are built or installed, and for "cuda" (and
    "triton", unless TRITON_INTERPRET=1) a CUDA device is present. "auto" and "torch" always can."""
    _check_name(name)
    if name == "auto":
        return True
    return _load(name) is not None and _no_device_reason(name) is None


def unavailable_reason(name: str) -> Optional[str]:
    """Why ``available(name)`` is False (None when it is True)."""
    if name == "auto":
        return None
    _load(name)
    return _errors.get(name) or _no_device_reason(name)


def _triton_runs_on_cpu() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# How each primitive runs inside torch.compile / torch.export, per primitive, chosen by measurement
# (bench/README.md, "Under torch.compile"): "kernel" keeps the backend's fused kernel as one opaque
# op; "decompose" uses the reference formulation in torch ops, which inductor can fuse with its
# neighbours (a conv epilogue into one pointwise loop after the vendor conv, for example).
# In-place variants follow the same choice (ops.owns_for_writing says when a model may use them).
UNDER_COMPILE: Dict[str, str] = {
    # Measured on whole models (bench/README.md, "Under torch.compile"): the fill stays one fused pass
    # (inductor cannot make its rings one pass); everything pointwise or pooled after a conv is better
    # left to inductor, which fuses it into its own loops and plans the buffers.
    "neighbor_fill": "kernel",
    "soft_fill": "kernel",
    "conv_epilogue": "decompose",
    "masked_affine_act": "decompose",
    "masked_max_pool2d": "decompose",
    "masked_avg_pool2d": "decompose",
    "masked_mean": "decompose",
    # Where a fill/zero-mode conv adds its bias: "conv" (the vendor conv) or "epilogue".
    "conv_bias": "conv",
}


class _CompileView:
    """A backend as seen under torch.compile: per primitive the kernel or the reference (UNDER_COMPILE)."""

    def __init__(self, kernels: ModuleType, reference: ModuleType):
        self._kernels, self._reference = kernels, reference

    def __getattr__(self, name):
        base = name[:-1] if name.endswith("_") else name
        use = self._reference if UNDER_COMPILE.get(base) == "decompose" else self._kernels
        return getattr(use, name)


_views: Dict[str, _CompileView] = {}


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


def resolve(device: torch.device, name: Optional[str] = None):
    """The backend to use for tensors on ``device`` (under torch.compile: its compile view)."""
    mod = _resolve(device, name)
    if not _is_compiling():
        return mod
    return _views.get(mod.__name__, mod)  # made at load time: nothing is created while tracing


def _resolve(device: torch.device, name: Optional[str] = None) -> ModuleType:
    """The backend module to use for tensors on ``device``."""
    name = _check_name(name or get_backend())
    is_cuda = device.type == "cuda"
    if name == "auto":
        order = ("cuda", "triton") if is_cuda else ("cpp",)
        for candidate in order:
            mod = _load(candidate)
            if mod is not None:
                return mod
        key = (device.type, "auto")
        if key not in _warned:
            _warned.add(key)
            reasons = "; ".join(f"{c}: {unavailable_reason(c)}" for c in order)
            warnings.warn(f"masked_ops: no compiled backend for {device.type} tensors ({reasons}); "
                          f"using the pure-PyTorch backend", RuntimeWarning, stacklevel=3)
        return _load("torch")
    if name == "torch":
        return _load("torch")
    if name == "cpp" and is_cuda:
        raise ValueError("backend 'cpp' runs on CPU tensors; got CUDA tensors (use 'cuda', 'triton' or 'auto')")
    if name == "cuda" and not is_cuda:
        raise ValueError(f"backend 'cuda' runs on CUDA tensors; got {device.type} tensors (use 'cpp' or 'auto')")
    if name == "triton" and not is_cuda and not _triton_runs_on_cpu():
        raise ValueError("backend 'triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1)")
    mod = _load(name)
    if mod is None:
        raise RuntimeError(f"masked_ops backend {name!r} is not available: {unavailable_reason(name)}")
    return mod
