"""Shared generator of op configurations for the backend tests, and the one accuracy rule.

The checks that use them live in tests/op_testers.py (one tester per op), which the CPU, GPU and
Triton-interpreter tests share. Everything is deterministic (seeded) and small enough for CI. A test
module picks the backends it checks through its own ``BACKENDS_UNDER_TEST`` list (see
``available_backends``).
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
    elif kind == "patches16":  # the paper's 16x16 patches, about half removed
        m = patch_mask(n, h, w, patch=16, fraction=0.5, seed=seed)
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


def imputation_case(n: int, c: int, h: int, w: int, kind: str, seed: int = 0, device="cpu"):
    """(images float64 N x C x H x W in [0, 1), bool masks N x 1 x H x W) for the noisy-linear solve."""
    g = _generator(seed)
    images = torch.rand(n, c, h, w, generator=g, dtype=torch.float64)
    if kind == "scattered":
        masks = torch.rand(n, 1, h, w, generator=g) > 0.6
    elif kind == "one-removed":
        masks = torch.ones(n, 1, h, w, dtype=torch.bool)
        masks[:, :, h // 2, w // 3] = False
    elif kind == "one-visible":
        masks = torch.zeros(n, 1, h, w, dtype=torch.bool)
        masks[:, :, h - 1, 0] = True
    elif kind == "border-blocks":
        masks = torch.ones(n, 1, h, w, dtype=torch.bool)
        masks[:, :, : h // 2, : (2 * w) // 3] = False
        masks[:, :, h - 2:, w - 3:] = False
    elif kind == "patches8":  # 8 px cells, about half removed
        cells = torch.rand(n, 1, -(-h // 8), -(-w // 8), generator=g) > 0.5
        masks = cells.repeat_interleave(8, 2).repeat_interleave(8, 3)[:, :, :h, :w].contiguous()
    else:
        raise ValueError(f"unknown imputation mask kind {kind!r}")
    return images.to(device), masks.to(device)


def cycle_product(*axes: Sequence, length: Optional[int] = None) -> Iterator[tuple]:
    """A covering subset of a product: every value of every axis appears, rows vary together.

    Cheaper than the full product: row i takes axis[j][i % len(axis[j])].
    """
    length = length or max(len(a) for a in axes)
    for i in range(length):
        yield tuple(a[i % len(a)] for a in axes)


def all_pairs(a: Sequence, b: Sequence) -> List[tuple]:
    return list(itertools.product(a, b))


# ----------------------------------------------------------------------------- one accuracy rule
def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_accurate(ours: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype,
                    what: str) -> None:
    """The accuracy rule of every fused backend (CPU, Triton interpreter, GPU), after flash-attention:
    against the float64 reference ``truth``, the error of ``ours`` is at most twice the error of plain
    PyTorch (``plain``: the reference backend run in ``dtype``), plus two units in the last place of
    ``dtype`` at the output's scale (where plain PyTorch happens to be exact). In float64 itself the
    kernels must match the reference to 1e-10 relative."""
    assert ours.shape == truth.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(truth.shape)}"
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    err = max_error(ours, truth)
    if dtype == torch.float64:
        assert err <= 1e-10 * scale, f"{what}: float64 error {err:.3g}"
        return
    bound = 2 * max_error(plain, truth) + 2 * torch.finfo(dtype).eps * scale
    assert err <= bound, f"{what}: error {err:.3g} > 2 x plain PyTorch's {max_error(plain, truth):.3g} + 2 ulp"


# The iterative solves (noisy-linear imputation) have no "plain PyTorch in the same dtype": both solvers run
# in float64 to a residual of SOLVE_TOL, and their solutions must then agree to SOLVE_ATOL.
SOLVE_TOL, SOLVE_ATOL = 1e-10, 1e-8


def assert_solved(ours: torch.Tensor, truth: torch.Tensor, what: str) -> None:
    """The accuracy rule of the imputation solve (see SOLVE_TOL): ``ours`` within SOLVE_ATOL of ``truth``."""
    assert ours.shape == truth.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(truth.shape)}"
    err = max_error(ours, truth.to(ours.device))
    assert err <= SOLVE_ATOL, f"{what}: error {err:.3g} > {SOLVE_ATOL:g}"


# ----------------------------------------------------------------------------- one list of primitive cases
# The ops of the backends (masked_ops/backends/reference.py), in the order of tests/op_testers.py.
PRIMITIVE_OPS = ("neighbor_fill", "conv_epilogue", "masked_affine_act", "masked_max_pool2d", "masked_avg_pool2d",
                 "masked_mean", "soft_fill")


def soft_of(m: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """A soft mask with the zeros of the 0/1 mask ``m``: elsewhere multiples of 1/16 in [1/4, 1] (exact in
    every floating dtype, so a float64 reference and a bfloat16 run read the same mask)."""
    g = torch.Generator(m.device).manual_seed(seed)
    k = torch.randint(4, 17, tuple(m.shape), generator=g, device=m.device)
    return m * (k.to(m.dtype) / 16)


def primitive_cases(op: Optional[str] = None) -> dict:
    """Every backend primitive in several configurations: name -> f(backend module, x, m) -> tensor(s).

    Shared by the CPU sweep (test_backend_agreement), the Triton interpreter and the GPU tests (through
    tests/op_testers.py, one tester per op), so that every backend meets the same cases. Inputs: x
    N x C x H x W, m N x 1 x H x W 0/1 in x's dtype. ``op``: only that op's cases (one of PRIMITIVE_OPS).
    """
    cases = _primitive_cases_by_op()
    if op is not None:
        return dict(cases[op])
    return {name: f for per_op in cases.values() for name, f in per_op.items()}


def _primitive_cases_by_op() -> dict:
    from masked_ops.activations import ACTIVATIONS

    def scale_of(x):
        g = torch.Generator(x.device).manual_seed(1)
        return torch.rand(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, generator=g).to(x.dtype) * 2

    def ramp(x, lo=-1.0, hi=1.0):
        return torch.linspace(lo, hi, x.shape[1], device=x.device, dtype=x.dtype)

    cases = {op: {} for op in PRIMITIVE_OPS}
    fill = cases["neighbor_fill"]
    for iters in (0, 1, 2, 6):
        fill[f"fill{iters}"] = lambda B, x, m, it=iters: B.neighbor_fill(x, m, it)
        fill[f"fill_inplace{iters}"] = lambda B, x, m, it=iters: B.neighbor_fill_(
            torch.where(m > 0, x, torch.zeros((), dtype=x.dtype, device=x.device)), m, it)

    def padded_fill_in_place(B, x, m):  # into the interior of a padded buffer (a strided view)
        buf = F.pad(torch.where(m > 0, x, torch.zeros((), dtype=x.dtype, device=x.device)), (0, 1, 2, 1), value=3.0)
        B.neighbor_fill_(buf[:, :, 2:2 + x.shape[2], :x.shape[3]], m, 2)
        return buf

    fill["padded_fill_inplace"] = padded_fill_in_place
    epilogue = cases["conv_epilogue"]
    for act in ACTIVATIONS:
        epilogue[f"epilogue_{act}"] = lambda B, x, m, a=act: B.conv_epilogue(x, m, scale_of(x), ramp(x), a)
    epilogue["epilogue_plain"] = lambda B, x, m: B.conv_epilogue(x, m, None, None, "none")
    epilogue["epilogue_scale_only"] = lambda B, x, m: B.conv_epilogue(x, m, scale_of(x), None, "relu")
    epilogue["epilogue_bias_only"] = lambda B, x, m: B.conv_epilogue(x, m, None, ramp(x), "relu")
    epilogue["epilogue_inplace"] = lambda B, x, m: B.conv_epilogue_(x.clone(), m, scale_of(x), ramp(x), "relu6")
    epilogue["strided_epilogue_inplace"] = lambda B, x, m: B.conv_epilogue_(  # every other column of a buffer
        with_layout(x, "strided"), m, None, None, "silu")
    affine = cases["masked_affine_act"]
    affine["affine_relu"] = lambda B, x, m: B.masked_affine_act(x, m, ramp(x, 0.5, 2), ramp(x), "relu")
    affine["affine_silu"] = lambda B, x, m: B.masked_affine_act(x, m, ramp(x, 0.5, 2), ramp(x), "silu")
    for geo in (((3, 3), (2, 2), (1, 1), (1, 1), False), ((2, 2), (2, 2), (0, 0), (1, 1), True),
                ((3, 3), (1, 1), (1, 1), (2, 2), True), ((3, 2), (1, 2), (1, 0), (2, 1), True)):
        cases["masked_max_pool2d"][f"maxpool{geo}"] = lambda B, x, m, g=geo: B.masked_max_pool2d(x, m, *g)
    for geo in (((3, 3), (2, 2), (1, 1), False, True), ((3, 3), (2, 2), (1, 1), True, False),
                ((2, 2), (2, 2), (0, 0), False, True), ((2, 3), (2, 1), (1, 1), True, True)):
        cases["masked_avg_pool2d"][f"avgpool{geo}"] = lambda B, x, m, g=geo: B.masked_avg_pool2d(x, m, *g)
    cases["masked_mean"]["mean"] = lambda B, x, m: B.masked_mean(x, m)
    # soft masks (soft_of: m's zeros, values in [1/4, 1] elsewhere); 0 rings is m * x; pads: zeros around
    soft = cases["soft_fill"]
    for iters in (0, 1, 3):
        soft[f"soft_fill{iters}"] = lambda B, x, m, it=iters: B.soft_fill(x, soft_of(m), it, False)
    soft["soft_fill2_padded"] = lambda B, x, m: B.soft_fill(x, soft_of(m), 2, True, (2, 1, 0, 1))
    soft["soft_fill2_binary"] = lambda B, x, m: B.soft_fill(x, m, 2, False)  # at a 0/1 mask: the hard fill
    return cases


def sweep_inputs(dtype: torch.dtype, layout: str, device="cpu", n=2, c=5, h=17, w=19, seed=0):
    """(x, m) for the primitive sweep: patches removed, the last sample with nothing visible."""
    x = make_input(n, c, h, w, torch.float64, seed=seed)
    m = make_mask("patches", n, h, w, seed=seed).to(torch.float64)
    m[-1] = 0
    return with_layout(x.to(dtype), layout).to(device), m.to(dtype).to(device)


def assert_primitive_sweep(B, dtype: torch.dtype, layout: str, device="cpu", names=None, shape=(2, 5, 17, 19),
                           op: Optional[str] = None) -> None:
    """Every primitive case (of ``op``, or of every op) on backend module ``B`` against the reference, under
    assert_accurate; output masks exactly the reference's in the same dtype."""
    from masked_ops.backends import reference as R

    x, m = sweep_inputs(dtype, layout, device, *shape)
    for name, f in primitive_cases(op).items():
        if names is not None and name not in names:
            continue
        truth, ours, plain = f(R, x.double(), m.double()), f(B, x, m), f(R, x, m)
        truth, ours, plain = [t if isinstance(t, tuple) else (t,) for t in (truth, ours, plain)]
        for k, (o, p, t) in enumerate(zip(ours, plain, truth)):
            assert o.dtype == dtype and o.device.type == torch.device(device).type, f"{name}[{k}]: dtype/device"
            assert_accurate(o, p, t, dtype, f"{name}[{k}] {dtype} {layout}")
            if k > 0:  # output masks are exact
                assert torch.equal(o, p), f"{name}[{k}] {dtype} {layout}: output mask differs from the reference's"
        if layout == "channels_last" and name.startswith(("fill", "epilogue", "affine", "soft")) \
                and "inplace" not in name:
            assert ours[0].is_contiguous(memory_format=torch.channels_last), f"{name}: layout not kept"
