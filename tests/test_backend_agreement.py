"""Every op on the CPU backends under test against the "torch" backend (the oracle): the op testers of
tests/op_testers.py (one class per op, shared with the GPU and Triton-interpreter tests: forward over the
shared sweep of tests/op_cases.py, backward and gradcheck, opcheck, the invariants), plus hypothesis-driven
random configurations and the AVX2/baseline check of the CPU kernels. One accuracy rule
(op_cases.assert_accurate, flash-attention's: a fused backend's error against a float64 reference is at
most 2x the torch backend's in the same dtype).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import masked_ops as mo
import op_testers as OT
from masked_ops.activations import ACTIVATIONS
from op_cases import (LAYOUTS, MASK_KINDS, MODES, PRIMITIVE_OPS, ConvCase, available_backends, make_conv_params,
                      make_input, make_mask)

# The CPU runner's backends (op_testers.CPU); the GPU tests run the same testers on ("cuda", "triton").
BACKENDS_UNDER_TEST = available_backends(OT.CPU.backends)
DEVICE = OT.CPU.device

pytestmark = pytest.mark.skipif(not BACKENDS_UNDER_TEST, reason="no compiled backend built here")

ACTS = tuple(ACTIVATIONS)


def assert_agree(backend, fn, inputs, *args, **kwargs):
    """fn on ``backend`` against the torch backend, forward and backward, in float64 (op_testers.assert_agrees)."""
    return OT.assert_agrees(backend, fn, inputs, *args, dtype=torch.float64, grad=True, **kwargs)


# ----------------------------------------------------------------------------- one tester per op
class TestNeighborFill(OT.NeighborFillTester):
    RUNNER = OT.CPU


class TestConvEpilogue(OT.ConvEpilogueTester):
    RUNNER = OT.CPU


class TestMaskedAffineAct(OT.MaskedAffineActTester):
    RUNNER = OT.CPU


class TestMaskedMaxPool2d(OT.MaskedMaxPool2dTester):
    RUNNER = OT.CPU


class TestMaskedAvgPool2d(OT.MaskedAvgPool2dTester):
    RUNNER = OT.CPU


class TestMaskedMean(OT.MaskedMeanTester):
    RUNNER = OT.CPU


class TestSoftFill(OT.SoftFillTester):
    RUNNER = OT.CPU


class TestImputationSolve(OT.ImputationSolveTester):
    RUNNER = OT.CPU


class TestMaskedConv2d(OT.MaskedConv2dTester):
    RUNNER = OT.CPU


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
# The ops whose CPU kernels the test below runs both ways (soft_fill has no AVX2 path: csrc/cpu/soft_fill.cpp).
_AVX2_OPS = [op for op in PRIMITIVE_OPS if op != "soft_fill"]
_BASELINE_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from masked_ops.backends import resolve
from op_cases import DTYPES, LAYOUTS, assert_primitive_sweep, primitive_cases, sweep_inputs
B = resolve(torch.device("cpu"), "cpp")
ops = sys.argv[3].split(",")
out = {}
for dtype in DTYPES:
    for layout in LAYOUTS:
        x, m = sweep_inputs(dtype, layout, "cpu", 2, 19, 13, 21)
        for op in ops:
            assert_primitive_sweep(B, dtype, layout, shape=(2, 19, 13, 21), op=op)
            for name, f in primitive_cases(op).items():
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
    r = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT, os.path.dirname(__file__), str(path),
                        ",".join(_AVX2_OPS)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    baseline = torch.load(path)
    B = resolve(torch.device("cpu"), "cpp")
    for dtype in DTYPES:
        for layout in LAYOUTS:
            x, m = sweep_inputs(dtype, layout, "cpu", 2, 19, 13, 21)
            for name, f in ((name, f) for op in _AVX2_OPS for name, f in primitive_cases(op).items()):
                ours = f(B, x, m)
                theirs = baseline[(str(dtype), layout, name)]
                ours, theirs = [t if isinstance(t, tuple) else (t,) for t in (ours, theirs)]
                for a, b in zip(ours, theirs):
                    assert torch.equal(_bits(a), _bits(b)), f"{name} {dtype} {layout}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (NaN payloads and signed zeros included)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
