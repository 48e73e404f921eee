"""GPU tests (``make test-gpu``; skipped without CUDA): the "cuda" and "triton" backends on CUDA tensors
against the "torch" backend (the oracle), through the op testers of tests/op_testers.py (one class per op,
shared with the CPU and Triton-interpreter tests: forward over the shared sweep of tests/op_cases.py in
every dtype and memory format, backward and gradcheck, opcheck, the invariants), plus what only a GPU
shows: 64-bit indexing, the model zoo, torch.compile, and the two GPU backends against each other.

Accuracy rule (op_cases.assert_accurate, flash-attention's): in float16/bfloat16/float32 a backend's error
against the float64 reference must be at most 2x plain PyTorch's error in the same dtype (plus two units in
the last place where plain PyTorch happens to be exact); float64 must match to 1e-10 relative.
"""
from __future__ import annotations

import pytest
import torch

import masked_ops as mo
import op_testers as OT
from masked_ops.backends import reference as R
from op_cases import PRIMITIVE_OPS, max_error, primitive_cases

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU_BACKENDS = OT.GPU.backends  # ("cuda", "triton")


def _backend(name):
    from masked_ops.backends import _load

    if not mo.available(name):
        pytest.skip(f"backend {name!r} unavailable: {mo.backends.unavailable_reason(name)}")
    return _load(name)


def _inputs(n=2, c=5, h=17, w=19, p=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    m = (torch.rand(n, 1, h, w, generator=g) > p).double()
    m[-1] = 0  # one sample with nothing visible
    return x.cuda(), m.cuda()


def _err(a, b):
    return max_error(a, b)


# ----------------------------------------------------------------------------- one tester per op
class TestNeighborFill(OT.NeighborFillTester):
    RUNNER = OT.GPU


class TestConvEpilogue(OT.ConvEpilogueTester):
    RUNNER = OT.GPU


class TestMaskedAffineAct(OT.MaskedAffineActTester):
    RUNNER = OT.GPU


class TestMaskedMaxPool2d(OT.MaskedMaxPool2dTester):
    RUNNER = OT.GPU


class TestMaskedAvgPool2d(OT.MaskedAvgPool2dTester):
    RUNNER = OT.GPU


class TestMaskedMean(OT.MaskedMeanTester):
    RUNNER = OT.GPU


class TestSoftFill(OT.SoftFillTester):
    RUNNER = OT.GPU


class TestImputationSolve(OT.ImputationSolveTester):
    """On CUDA tensors: the torch solver on the GPU against the CPU solve."""
    RUNNER = OT.GPU


class TestMaskedConv2d(OT.MaskedConv2dTester):
    RUNNER = OT.GPU


# ----------------------------------------------------------------------------- what only a GPU shows
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_int64_indexing_past_2_31_elements(backend):
    """A tensor of more than 2^31 elements (fp16, 4.3 GB): offsets must not wrap."""
    B = _backend(backend)
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    n, c, h, w = 1, 2, 32800, 32800  # 2.15e9 elements
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.float16)
    m = torch.zeros(n, 1, h, w, device="cuda", dtype=torch.float16)
    m[..., ::7, ::5] = 1
    tail = (slice(None), slice(None), slice(h - 40, h), slice(w - 40, w))
    out = B.conv_epilogue(x, m, None, None, "relu")
    assert torch.equal(out[tail], R.conv_epilogue(x[tail], m[tail], None, None, "relu"))
    del out
    out = B.neighbor_fill(x, m, 2)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # away from the crop's edge
    ref = R.neighbor_fill(x[tail].float(), m[tail].float(), 2)
    assert _err(out[tail][inner], ref[inner]) <= 2e-3
    del out
    ref_mean = torch.stack([torch.where(m[0, 0] > 0, x[0, k].float(), 0).sum() / m.float().sum() for k in range(c)])
    assert _err(B.masked_mean(x, m)[0].float(), ref_mean) <= 2e-3


def _zoo(name):
    tv = pytest.importorskip("torchvision")
    return getattr(tv.models, name)(weights=None).eval().cuda()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("model", ("resnet18", "densenet121", "efficientnet_b0"))
def test_zoo_invariants_on_gpu(backend, model):
    _backend(backend)
    net = _zoo(model)
    x = torch.randn(2, 3, 96, 96, device="cuda")
    with torch.no_grad(), mo.set_backend(backend):
        lm = mo.layer_mask(net, mode="fill")
        ones = torch.ones(2, 1, 96, 96, device="cuda")
        assert _err(lm(x, ones), net(x)) <= 1e-3, "all-ones mask must reproduce the model"
        m = (torch.rand(2, 1, 96, 96, device="cuda") > 0.4).float()
        a = lm(x, m)
        b = lm(torch.where(m > 0, x, torch.tensor(float("nan"), device="cuda")), m)
        assert torch.equal(a, b), "NaN in the removed region changed the logits"
        with mo.set_backend("torch"):
            ref = lm(x, m)
        assert _err(a, ref) <= 1e-3 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph_layer_masked_resnet50(backend):
    _backend(backend)
    net = _zoo("resnet50").to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 128, 128, device="cuda").contiguous(memory_format=torch.channels_last)
    m = (torch.rand(4, 1, 128, 128, device="cuda") > 0.5).float()
    torch._dynamo.reset()
    with torch.no_grad(), mo.set_backend(backend):
        lm = mo.layer_mask(net, mode="fill")
        eager = lm(x, m)
        compiled = torch.compile(lm, fullgraph=True)(x, m)
    assert _err(compiled, eager) <= 1e-2 * max(1.0, eager.abs().max().item())


def test_auto_picks_a_gpu_backend_for_cuda_tensors():
    from masked_ops.backends import resolve

    if not (mo.available("cuda") or mo.available("triton")):
        pytest.skip("no GPU backend built")
    with mo.set_backend("auto"):
        assert resolve(torch.device("cuda")).__name__.rsplit(".", 1)[-1] in ("compiled", "triton")


# The primitive cases this cross-check has always covered (soft_fill's kernels are checked by TestSoftFill).
CASES = {name: f for op in PRIMITIVE_OPS if op != "soft_fill" for name, f in primitive_cases(op).items()}


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_backends_agree_with_each_other(dtype):
    """cuda and triton agree where both exist (a cross-check independent of the reference)."""
    C, T = _backend("cuda"), _backend("triton")
    x, m = _inputs(2, 16, 33, 35)
    x, m = x.to(dtype).contiguous(memory_format=torch.channels_last), m.to(dtype)
    for name, f in CASES.items():
        a, b = f(C, x, m), f(T, x, m)
        for p, q in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            tol = 2 * torch.finfo(dtype).eps * max(1.0, q.abs().max().item())
            assert _err(p, q) <= tol, f"{name}: cuda and triton differ"
