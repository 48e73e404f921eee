"""Every public op on every backend under test against the "torch" backend (the oracle),
forward and backward, over the shared sweep of tests/op_cases.py, plus hypothesis-driven
random configurations and the low-precision accuracy rule (flash-attention's: a fused
backend's fp16/bf16 error against an fp64 reference is at most 2x the torch backend's).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import masked_ops as mo
from masked_ops.activations import ACTIVATIONS
from op_cases import (LAYOUTS, LOW_PRECISION, MASK_KINDS, MODES, ConvCase, assert_accurate, assert_primitive_sweep,
                      available_backends, conv_cases, cycle_product, make_conv_params, make_input, make_mask,
                      pool_cases, tolerance)

# GPU helpers reuse this module with their own list (e.g. ["cuda", "triton"] on CUDA tensors).
BACKENDS_UNDER_TEST = available_backends(["cpp"])
DEVICE = "cpu"

pytestmark = pytest.mark.skipif(not BACKENDS_UNDER_TEST, reason="no compiled backend built here")

ACTS = tuple(ACTIVATIONS)


def run(backend, fn, inputs, *args, **kwargs):
    """fn(*inputs, *args, **kwargs) on ``backend``; returns (outputs, grads of the float inputs).

    The first output is back-propagated with a fixed random cotangent; every floating input
    but the mask (always the second) gets a gradient.
    """
    leaves = [t.detach().clone().requires_grad_(i != 1) if isinstance(t, torch.Tensor) and t.is_floating_point()
              else t for i, t in enumerate(inputs)]
    with mo.set_backend(backend):
        out = fn(*leaves, *args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    cot = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (outs[0] * cot.to(outs[0].dtype).to(outs[0].device)).sum().backward()
    grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    return [o.detach() for o in outs], grads


def assert_agree(backend, fn, inputs, *args, dtype=torch.float64, **kwargs):
    ref_out, ref_grads = run("torch", fn, inputs, *args, **kwargs)
    out, grads = run(backend, fn, inputs, *args, **kwargs)
    tol = tolerance(dtype)
    for i, (a, b) in enumerate(zip(out, ref_out)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"output {i}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if b.dtype == torch.bool or i > 0:  # masks are exact
            assert torch.equal(a, b), f"output {i} (mask) differs"
        else:
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"forward on {backend}: {m}")
    assert len(grads) == len(ref_grads)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"grad of input {i} on {backend}: {m}")
    return out


# ----------------------------------------------------------------------------- neighbor_fill
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("iters,kind,layout,dtype", list(cycle_product(
    (0, 1, 2, 3, 4, 6), MASK_KINDS, LAYOUTS, (torch.float64, torch.float32), length=12)))
def test_neighbor_fill(backend, iters, kind, layout, dtype):
    x = make_input(2, 5, 13, 11, dtype, layout, seed=iters, device=DEVICE)
    m = make_mask(kind, 2, 13, 11, seed=iters, device=DEVICE)
    out = assert_agree(backend, mo.neighbor_fill, (x, m), iters, dtype=dtype)[0]
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_neighbor_fill_large_plane_float32(backend):
    """A paper-sized mask (16x16 patches) on a 64x64 plane, 6 rings: many levels in one plan."""
    from op_cases import patch_mask

    x = make_input(2, 3, 64, 64, torch.float32, seed=3, device=DEVICE)
    m = patch_mask(2, 64, 64, patch=16, seed=3).to(DEVICE)
    assert_agree(backend, mo.neighbor_fill, (x, m), 6, dtype=torch.float32)


# ----------------------------------------------------------------------------- neighbor_fill_ (in place)
def _fill_in_place_cases():
    """(x, mask, iters, dtype, view): view says whether x is the interior of a padded buffer."""
    return list(cycle_product((0, 1, 2, 4), MASK_KINDS, ("contiguous", "channels_last"),
                              (torch.float64, torch.float32, torch.bfloat16), (False, True), length=15))


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("iters,kind,layout,dtype,view", _fill_in_place_cases())
def test_neighbor_fill_in_place(backend, iters, kind, layout, dtype, view):
    """The in-place fill writes exactly the reached removed pixels, with the copying fill's values.

    Independent of the reference's own in-place function: the expectation is built from the
    copying fill (tested above) and the reach of the mask (a max pool by 2*iters+1): reached
    removed pixels take neighbor_fill's values, every other element keeps its bits (NaN in the
    removed region, the padded border around a view).
    """
    from masked_ops.backends import resolve

    n, c, h, w = 2, 5, 13, 11
    m = make_mask(kind, n, h, w, seed=iters + 5, device=DEVICE).to(dtype)
    x = make_input(n, c, h, w, dtype, layout, seed=iters, device=DEVICE)
    x = torch.where(m > 0, x, torch.full((), float("nan"), dtype=dtype, device=DEVICE))  # removed: NaN
    if view:
        buf = torch.nn.functional.pad(x, (2, 1, 1, 3), value=7.0)
        target = buf[:, :, 1:1 + h, 2:2 + w]
    else:
        buf = target = x.clone(memory_format=torch.preserve_format)
    before = buf.clone()
    with torch.no_grad():
        returned = resolve(torch.device(DEVICE), backend).neighbor_fill_(target, m, iters)
    assert returned is target
    write = torch.nn.functional.max_pool2d((m > 0).double(), 2 * iters + 1, 1, iters) > 0
    write = (write & ~(m > 0)).expand(n, c, h, w)
    expected_inner = torch.where(write, mo.neighbor_fill(torch.where(m > 0, x, 0), m, iters).to(dtype), x)
    expected = before.clone()
    if view:
        expected[:, :, 1:1 + h, 2:2 + w] = expected_inner
    else:
        expected = expected_inner
    inner = buf[:, :, 1:1 + h, 2:2 + w] if view else buf
    assert torch.equal(inner[~write].isnan(), x[~write].isnan())  # NaN stays where it was, nowhere else
    torch.testing.assert_close(buf, expected, equal_nan=True, **tolerance(dtype))
    if view:  # the border is not touched
        assert torch.equal(buf[:, :, 0], before[:, :, 0]) and torch.equal(buf[..., -1], before[..., -1])
    assert buf.stride() == before.stride()


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_neighbor_fill_in_place_rejects_overlapping_memory(backend):
    from masked_ops.backends import resolve

    x = torch.zeros(1, 3, 5, 5, device=DEVICE).expand(2, -1, -1, -1)
    m = torch.zeros(2, 1, 5, 5, device=DEVICE)
    m[:, :, 2, 2] = 1
    with pytest.raises(RuntimeError, match="overlapping memory"):
        resolve(torch.device(DEVICE), backend).neighbor_fill_(x, m, 1)


# ----------------------------------------------------------------------------- conv_epilogue_ (in place)
@pytest.mark.parametrize("backend", ["torch"] + BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("act,layout,dtype,with_scale,kind", list(cycle_product(
    ACTS, LAYOUTS, (torch.float64, torch.float32, torch.bfloat16), (False, True), MASK_KINDS, length=12)))
def test_conv_epilogue_in_place(backend, act, layout, dtype, with_scale, kind):
    """Written over y, the epilogue equals the copying one of the same backend exactly and the
    reference within tolerance; NaN at removed positions is selected away; strided y works
    (through a dense copy) and keeps its strides."""
    from masked_ops.backends import reference as R
    from masked_ops.backends import resolve

    B = resolve(torch.device(DEVICE), backend)
    n, c, h, w = 2, 6, 7, 9
    keep = make_mask(kind, n, h, w, seed=3, device=DEVICE).to(dtype)
    y = make_input(n, c, h, w, dtype, layout, seed=4, device=DEVICE)
    y.masked_fill_(keep == 0, float("nan"))
    scale = (torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(5)) * 3).to(dtype).to(DEVICE) \
        if with_scale else None
    bias = torch.linspace(-1, 1, c, dtype=dtype, device=DEVICE)
    expected = B.conv_epilogue(y, keep, scale, bias, act)
    strides = y.stride()
    with torch.no_grad():
        out = B.conv_epilogue_(y, keep, scale, bias, act)
    assert out is y and y.stride() == strides
    assert torch.equal(y, expected)
    assert (y.masked_select((keep == 0).expand_as(y)) == 0).all()  # NaN there selected away to exactly 0
    torch.testing.assert_close(expected, R.conv_epilogue(
        make_input(n, c, h, w, dtype, layout, seed=4, device=DEVICE), keep, scale, bias, act), **tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("mode", MODES)
def test_masked_conv2d_without_autograd_matches_with(backend, mode):
    """Without autograd the public op writes its epilogue over the conv output: same result."""
    case = ConvCase(2, 4, 5, 11, 10, (3, 3), stride=(2, 2), padding=(1, 1))
    x = make_input(2, case.c_in, 11, 10, torch.float32, "channels_last", seed=2, device=DEVICE)
    m = make_mask("patches", 2, 11, 10, seed=2, device=DEVICE)
    w, b = make_conv_params(case, torch.float32, device=DEVICE)
    with mo.set_backend(backend):
        with torch.no_grad():
            fast = mo.masked_conv2d(x, m, w, b, case.stride, case.padding, mode=mode, activation="relu")[0]
        slow = mo.masked_conv2d(x.requires_grad_(), m, w, b, case.stride, case.padding, mode=mode,
                                activation="relu")[0]
    assert slow.requires_grad and torch.equal(fast, slow.detach())


# ----------------------------------------------------------------------------- masked_conv2d
_CONV = conv_cases()


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", _CONV, ids=[c.id for c in _CONV])
def test_masked_conv2d(backend, mode, case: ConvCase):
    i = _CONV.index(case) + MODES.index(mode)
    kind = MASK_KINDS[i % len(MASK_KINDS)]
    layout = LAYOUTS[i % len(LAYOUTS)]
    activation = ACTS[i % len(ACTS)]
    x = make_input(case.n, case.c_in, case.h, case.w, torch.float64, layout, seed=i, device=DEVICE)
    m = make_mask(kind, case.n, case.h, case.w, seed=i, device=DEVICE)
    weight, bias = make_conv_params(case, device=DEVICE)
    inputs = (x, m, weight) if bias is None else (x, m, weight, bias)
    out = assert_agree(backend, mo.masked_conv2d, inputs, **case.kwargs(), mode=mode,
                       padding_visible=(mode == "renorm" and i % 2 == 0), activation=activation)
    if layout == "channels_last":
        assert out[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("mode", MODES)
def test_masked_conv2d_float32_float_mask(backend, mode):
    case = ConvCase(2, 8, 8, 14, 14, (3, 3), padding=(1, 1))
    x = make_input(2, 8, 14, 14, torch.float32, "channels_last", seed=5, device=DEVICE)
    m = make_mask("patches", 2, 14, 14, seed=5, device=DEVICE).float()
    weight, bias = make_conv_params(case, torch.float32, device=DEVICE)
    assert_agree(backend, mo.masked_conv2d, (x, m, weight, bias), padding=1, mode=mode, activation="relu",
                 dtype=torch.float32)


# ----------------------------------------------------------------------------- affine + activation
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("activation", ACTS)
def test_masked_affine_act(backend, activation):
    i = ACTS.index(activation)
    x = make_input(2, 6, 9, 10, torch.float64, LAYOUTS[i % 3], seed=i, device=DEVICE) * 3
    m = make_mask(MASK_KINDS[i % len(MASK_KINDS)], 2, 9, 10, seed=i, device=DEVICE)
    g = torch.Generator().manual_seed(i)
    scale = torch.rand(6, generator=g, dtype=torch.float64).to(DEVICE) + 0.5
    shift = torch.randn(6, generator=g, dtype=torch.float64).to(DEVICE)
    assert_agree(backend, mo.masked_affine_act, (x, m, scale, shift), activation=activation)


# ----------------------------------------------------------------------------- pooling and mean
_POOL = pool_cases()


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("case", _POOL, ids=[c.id for c in _POOL])
def test_masked_max_pool2d(backend, case):
    i = _POOL.index(case)
    x = make_input(case.n, case.c, case.h, case.w, torch.float64, LAYOUTS[i % 3], seed=i, device=DEVICE)
    m = make_mask(MASK_KINDS[i % len(MASK_KINDS)], case.n, case.h, case.w, seed=i, device=DEVICE)
    out = assert_agree(backend, mo.masked_max_pool2d, (x, m), case.kernel, case.stride, case.padding,
                       case.dilation, ceil_mode=case.ceil_mode)
    if LAYOUTS[i % 3] == "channels_last":
        assert out[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("case", [c for c in _POOL if c.dilation == (1, 1)], ids=lambda c: c.id)
def test_masked_avg_pool2d(backend, case):
    i = _POOL.index(case)
    x = make_input(case.n, case.c, case.h, case.w, torch.float64, LAYOUTS[(i + 1) % 3], seed=i, device=DEVICE)
    m = make_mask(MASK_KINDS[(i + 2) % len(MASK_KINDS)], case.n, case.h, case.w, seed=i, device=DEVICE)
    assert_agree(backend, mo.masked_avg_pool2d, (x, m), case.kernel, case.stride, case.padding,
                 ceil_mode=case.ceil_mode, count_include_pad=case.count_include_pad)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("kind,layout", list(cycle_product(MASK_KINDS, LAYOUTS)))
def test_masked_mean(backend, kind, layout):
    x = make_input(3, 7, 12, 9, torch.float64, layout, device=DEVICE)
    m = make_mask(kind, 3, 12, 9, device=DEVICE)
    assert_agree(backend, mo.masked_mean, (x, m))


# ----------------------------------------------------------------------------- low precision rule
_LOWP_OPS = {
    "fill": lambda x, m, w, b: mo.neighbor_fill(x, m, 2),
    "conv_fill": lambda x, m, w, b: mo.masked_conv2d(x, m, w, b, padding=1, mode="fill", activation="gelu")[0],
    "conv_renorm": lambda x, m, w, b: mo.masked_conv2d(x, m, w, b, stride=2, padding=1, mode="renorm")[0],
    "affine": lambda x, m, w, b: mo.masked_affine_act(x, m, b.abs() + 0.5, b, "silu")[0],
    "max_pool": lambda x, m, w, b: mo.masked_max_pool2d(x, m, 3, 2, 1, ceil_mode=True)[0],
    "avg_pool": lambda x, m, w, b: mo.masked_avg_pool2d(x, m, 3, 2, 1, count_include_pad=False)[0],
    "mean": lambda x, m, w, b: mo.masked_mean(x, m),
}


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("op", list(_LOWP_OPS))
def test_low_precision_error_at_most_twice_torch(backend, dtype, op):
    case = ConvCase(2, 8, 8, 20, 20, (3, 3))
    x64 = make_input(2, 8, 20, 20, torch.float64, "channels_last" if op in ("fill", "mean") else "contiguous",
                     device=DEVICE)
    m = make_mask("patches", 2, 20, 20, device=DEVICE)
    w64, b64 = make_conv_params(case, device=DEVICE)
    fn = _LOWP_OPS[op]
    with mo.set_backend("torch"):
        ref = fn(x64, m, w64, b64)
        low_torch = fn(x64.to(dtype), m, w64.to(dtype), b64.to(dtype))
    with mo.set_backend(backend):
        low = fn(x64.to(dtype), m, w64.to(dtype), b64.to(dtype))
    assert low.dtype == dtype
    assert_accurate(low, low_torch, ref, dtype, f"{backend} {op} {dtype}")


# ----------------------------------------------------------------------------- the shared primitive sweep
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32) + LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_primitive_sweep(backend, dtype, layout):
    """Every primitive case of op_cases (the Triton-interpreter and GPU tests run the same ones) under
    the one accuracy rule, in every dtype and memory layout."""
    from masked_ops.backends import _load

    assert_primitive_sweep(_load(backend), dtype, layout, device=DEVICE)


# ----------------------------------------------------------------------------- hypothesis
@st.composite
def conv_configs(draw):
    k = (draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 3, 4])))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    p = (draw(st.integers(0, k[0])), draw(st.integers(0, k[1])))
    groups = draw(st.sampled_from([1, 2, 3]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 2))
    h = draw(st.integers(max(1, d[0] * (k[0] - 1) + 1 - 2 * p[0]), 14))
    w = draw(st.integers(max(1, d[1] * (k[1] - 1) + 1 - 2 * p[1]), 14))
    case = ConvCase(draw(st.integers(1, 2)), c_in, c_out, h, w, k, s, p, d, groups, draw(st.booleans()))
    return (case, draw(st.sampled_from(MODES)), draw(st.sampled_from(MASK_KINDS)), draw(st.sampled_from(LAYOUTS)),
            draw(st.sampled_from(ACTS)), draw(st.booleans()), draw(st.integers(0, 2 ** 16)))


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(cfg=conv_configs())
def test_masked_conv2d_random_configs(backend, cfg):
    case, mode, kind, layout, activation, padding_visible, seed = cfg
    x = make_input(case.n, case.c_in, case.h, case.w, torch.float64, layout, seed=seed, device=DEVICE)
    m = make_mask(kind, case.n, case.h, case.w, seed=seed, device=DEVICE)
    weight, bias = make_conv_params(case, seed=seed, device=DEVICE)
    inputs = (x, m, weight) if bias is None else (x, m, weight, bias)
    assert_agree(backend, mo.masked_conv2d, inputs, **case.kwargs(), mode=mode, padding_visible=padding_visible,
                 activation=activation)


@st.composite
def pool_configs(draw):
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    h, w = draw(st.integers(k[0], 13)), draw(st.integers(k[1], 13))
    return (k, s, p, h, w, draw(st.booleans()), draw(st.booleans()), draw(st.sampled_from(MASK_KINDS)),
            draw(st.sampled_from(LAYOUTS)), draw(st.integers(0, 2 ** 16)))


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(cfg=pool_configs())
def test_pools_random_configs(backend, cfg):
    k, s, p, h, w, ceil_mode, count_include_pad, kind, layout, seed = cfg
    x = make_input(2, 3, h, w, torch.float64, layout, seed=seed, device=DEVICE)
    m = make_mask(kind, 2, h, w, seed=seed, device=DEVICE)
    assert_agree(backend, mo.masked_max_pool2d, (x, m), k, s, p, 1, ceil_mode=ceil_mode)
    assert_agree(backend, mo.masked_avg_pool2d, (x, m), k, s, p, ceil_mode=ceil_mode,
                 count_include_pad=count_include_pad)


# ----------------------------------------------------------------------------- AVX2 and baseline loops
_BASELINE_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from masked_ops.backends import resolve
from op_cases import DTYPES, LAYOUTS, assert_primitive_sweep, primitive_cases, sweep_inputs
B = resolve(torch.device("cpu"), "cpp")
out = {}
for dtype in DTYPES:
    for layout in LAYOUTS:
        assert_primitive_sweep(B, dtype, layout, shape=(2, 19, 13, 21))
        x, m = sweep_inputs(dtype, layout, "cpu", 2, 19, 13, 21)
        for name, f in primitive_cases().items():
            out[(str(dtype), layout, name)] = f(B, x, m)
torch.save(out, sys.argv[2])
"""


@pytest.mark.skipif("cpp" not in BACKENDS_UNDER_TEST, reason="backend cpp not built")
def test_cpu_kernels_without_avx2_are_accurate_and_bit_identical(tmp_path):
    """The hot CPU loops are compiled for the x86-64 baseline and for AVX2, chosen at run time
    (csrc/cpu/common.h). This machine runs one path in this process; a subprocess with
    MASKED_OPS_NO_AVX2=1 runs the other: it meets the reference over the whole primitive sweep, and
    both paths give the same bits (no FMA in either)."""
    import os
    import subprocess
    import sys

    from masked_ops.backends import resolve
    from op_cases import DTYPES, LAYOUTS, primitive_cases, sweep_inputs

    path = tmp_path / "baseline.pt"
    env = dict(os.environ, MASKED_OPS_NO_AVX2="1")
    r = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT, os.path.dirname(__file__), str(path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    baseline = torch.load(path)
    B = resolve(torch.device("cpu"), "cpp")
    for dtype in DTYPES:
        for layout in LAYOUTS:
            x, m = sweep_inputs(dtype, layout, "cpu", 2, 19, 13, 21)
            for name, f in primitive_cases().items():
                ours = f(B, x, m)
                theirs = baseline[(str(dtype), layout, name)]
                ours, theirs = [t if isinstance(t, tuple) else (t,) for t in (ours, theirs)]
                for a, b in zip(ours, theirs):
                    assert torch.equal(_bits(a), _bits(b)), f"{name} {dtype} {layout}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (NaN payloads and signed zeros included)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
