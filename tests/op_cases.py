"""Shared generator of op configurations for the backend tests (CPU here; GPU helpers reuse it).

Everything is deterministic (seeded) and small enough for CI. A test module picks the
backends it checks through its own ``BACKENDS_UNDER_TEST`` list (see ``available_backends``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import masked_ops as mo

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
MASK_KINDS = ("ones", "zeros", "random", "pixel", "patches")
LAYOUTS = ("contiguous", "channels_last", "strided")
MODES = ("fill", "renorm", "zero")
POISONS = (float("nan"), float("inf"), -float("inf"), 1e30)


def available_backends(candidates: Sequence[str] = ("cpp",)) -> List[str]:
    """The candidate backends that can run here (compiled pieces present)."""
    return [b for b in candidates if mo.available(b)]


# ----------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class ConvCase:
    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True

    @property
    def id(self) -> str:
        k, s, p, d = self.kernel, self.stride, self.padding, self.dilation
        return (f"n{self.n}c{self.c_in}-{self.c_out}_{self.h}x{self.w}_k{k[0]}x{k[1]}_s{s[0]}{s[1]}"
                f"_p{p[0]}{p[1]}_d{d[0]}{d[1]}_g{self.groups}{'_b' if self.bias else ''}")

    def kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


def conv_cases() -> List[ConvCase]:
    """Kernel 1/3/5/7, stride 1/2, paddings, dilation 1/2, groups 1/2/depthwise, odd sizes, batch 1."""
    return [
        ConvCase(2, 4, 6, 9, 11, (1, 1)),
        ConvCase(2, 4, 6, 9, 11, (1, 1), stride=(2, 2), bias=False),
        ConvCase(2, 4, 6, 13, 11, (3, 3), padding=(1, 1)),
        ConvCase(1, 4, 4, 12, 9, (3, 3), stride=(2, 2), padding=(1, 1), groups=2),
        ConvCase(2, 6, 6, 11, 13, (3, 3), padding=(2, 2), dilation=(2, 2), groups=6),   # depthwise, dilated
        ConvCase(2, 3, 5, 15, 14, (5, 5), padding=(2, 2), bias=False),
        ConvCase(1, 4, 8, 17, 15, (5, 5), stride=(2, 2), padding=(1, 2), groups=2),
        ConvCase(2, 3, 4, 19, 17, (7, 7), stride=(2, 2), padding=(3, 3)),               # stem-like
        ConvCase(1, 4, 4, 10, 10, (7, 7), padding=(0, 0), dilation=(1, 1), groups=4),
        ConvCase(2, 4, 6, 9, 12, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1)),  # non-square
    ]


@dataclass(frozen=True)
class PoolCase:
    n: int
    c: int
    h: int
    w: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    ceil_mode: bool = False
    count_include_pad: bool = True

    @property
    def id(self) -> str:
        return (f"n{self.n}c{self.c}_{self.h}x{self.w}_k{self.kernel}_s{self.stride}_p{self.padding}"
                f"_d{self.dilation}{'_ceil' if self.ceil_mode else ''}{'' if self.count_include_pad else '_nopad'}")


def pool_cases() -> List[PoolCase]:
    return [
        PoolCase(2, 3, 12, 12, (3, 3), (2, 2), (1, 1)),                        # ResNet max pool
        PoolCase(2, 3, 13, 11, (3, 3), (2, 2), (1, 1), ceil_mode=True),
        PoolCase(1, 4, 9, 9, (2, 2), (2, 2), ceil_mode=True),
        PoolCase(2, 3, 11, 14, (3, 2), (1, 2), (1, 1), count_include_pad=False),
        PoolCase(2, 2, 15, 15, (5, 5), (3, 3), (2, 2), ceil_mode=True, count_include_pad=False),
        PoolCase(1, 3, 12, 13, (3, 3), (2, 1), (0, 1), dilation=(2, 2)),       # dilation: max pool only
    ]


# ----------------------------------------------------------------------------- tensors
def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_mask(kind: str, n: int, h: int, w: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """A bool mask N x 1 x H x W (True = visible) of the given kind."""
    g = _generator(seed)
    if kind == "ones":
        m = torch.ones(n, 1, h, w, dtype=torch.bool)
    elif kind == "zeros":
        m = torch.zeros(n, 1, h, w, dtype=torch.bool)
    elif kind == "random":
        m = torch.rand(n, 1, h, w, generator=g) > 0.5
    elif kind == "pixel":  # one visible pixel per sample
        m = torch.zeros(n, 1, h, w, dtype=torch.bool)
        for i in range(n):
            m[i, 0, int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))] = True
    elif kind == "patches":  # 4x4 patches, about half removed (the paper's masks, scaled down)
        m = patch_mask(n, h, w, patch=4, fraction=0.5, seed=seed)
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return m.to(device)


def patch_mask(n: int, h: int, w: int, patch: int = 16, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Random square patches removed with probability ``fraction`` (bool, True = visible)."""
    g = _generator(seed)
    gh, gw = -(-h // patch), -(-w // patch)
    keep = (torch.rand(n, 1, gh, gw, generator=g) >= fraction).float()
    return F.interpolate(keep, scale_factor=patch, mode="nearest")[:, :, :h, :w].contiguous() > 0


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as contiguous NCHW, channels_last, or a non-contiguous strided view."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a twice-as-wide tensor
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        view = wide[..., ::2]
        assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
        return view
    raise ValueError(f"unknown layout {layout!r}")


def make_input(n: int, c: int, h: int, w: int, dtype=torch.float64, layout: str = "contiguous", seed: int = 0,
               device="cpu") -> torch.Tensor:
    x = torch.randn(n, c, h, w, generator=_generator(seed), dtype=torch.float64).to(dtype)
    return with_layout(x, layout).to(device)


def make_conv_params(case: ConvCase, dtype=torch.float64, seed: int = 1, device="cpu"):
    g = _generator(seed)
    weight = torch.randn(case.c_out, case.c_in // case.groups, *case.kernel, generator=g, dtype=torch.float64)
    weight = (weight / (case.kernel[0] * case.kernel[1] * case.c_in // case.groups) ** 0.5).to(dtype).to(device)
    bias = torch.randn(case.c_out, generator=g, dtype=torch.float64).to(dtype).to(device) if case.bias else None
    return weight, bias


def poison(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """x with every removed pixel (mask False/0) replaced by ``value`` (NaN, inf, huge...)."""
    removed = ~(mask > 0) if mask.dtype != torch.bool else ~mask
    return torch.where(removed, torch.full((), value, dtype=x.dtype, device=x.device), x)


def tolerance(dtype: torch.dtype) -> dict:
    """rtol/atol for comparing a fused backend with the torch backend in the same dtype."""
    return {torch.float64: dict(rtol=1e-10, atol=1e-12),
            torch.float32: dict(rtol=1e-5, atol=1e-6),
            torch.float16: dict(rtol=1e-2, atol=1e-2),
            torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}[dtype]


def cycle_product(*axes: Sequence, length: Optional[int] = None) -> Iterator[tuple]:
    """A covering subset of a product: every value of every axis appears, rows vary together.

    Cheaper than the full product: row i takes axis[j][i % len(axis[j])].
    """
    length = length or max(len(a) for a in axes)
    for i in range(length):
        yield tuple(a[i % len(a)] for a in axes)


def all_pairs(a: Sequence, b: Sequence) -> List[tuple]:
    return list(itertools.product(a, b))
