"""GPU tests (``make test-gpu``; skipped without CUDA): the "cuda" and "triton" backends on CUDA
tensors against the "torch" backend (the oracle), every dtype and both memory formats.

Accuracy rule (flash-attention's): in float16/bfloat16/float32 a backend's error against the
float64 reference must be at most 2x plain PyTorch's error in the same dtype (plus one unit in
the last place where plain PyTorch happens to be exact); float64 must match to 1e-12.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import masked_ops as mo
from masked_ops.activations import ACTIVATIONS
from masked_ops.backends import reference as R
from op_cases import assert_accurate, assert_primitive_sweep, max_error, primitive_cases

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FORMATS = ("contiguous", "channels_last")
GPU_BACKENDS = ("cuda", "triton")


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


def _fmt(t, fmt):
    return t.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else t


def _err(a, b):
    return max_error(a, b)


# The primitive cases and the accuracy rule are the CPU and Triton-interpreter tests' own (op_cases).
CASES = primitive_cases()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_op_sweep(backend, dtype, fmt):
    assert_primitive_sweep(_backend(backend), dtype, fmt, device="cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_removed_region_invariance(backend, fmt):
    B = _backend(backend)
    x, m = _inputs()
    x, m = _fmt(x.float(), fmt), m.float()
    for poison in (float("nan"), float("inf"), -1e30):
        xp = torch.where(m > 0, x, torch.tensor(poison, device="cuda"))
        for name, f in CASES.items():
            a, b = f(B, x, m), f(B, xp, m)
            for k, (p, q) in enumerate(zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,))):
                assert torch.equal(p, q), f"{backend} {name}[{k}]: {poison} in the removed region changed the output"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_soft_fill_forward_and_gradients_match_reference(backend, fmt, dtype):
    """Soft masks: the fill's value and its gradients to x and to the mask (exact zeros in the mask, NaN
    under them) against the reference's autograd, for 0 to 3 rings, with and without fill_grad, with and
    without zeros padded around the result."""
    B = _backend(backend)
    g = torch.Generator().manual_seed(7)
    for iters, fill_grad, pads in ((0, False, (0, 0, 0, 0)), (1, False, (0, 1, 0, 1)), (3, False, (0, 0, 0, 0)),
                                   (3, True, (2, 1, 0, 1))):
        x = torch.randn(2, 5, 13, 17, generator=g, dtype=dtype)
        m = torch.rand(2, 1, 13, 17, generator=g, dtype=dtype) * (torch.rand(2, 1, 13, 17, generator=g) > 0.4)
        x[:, :, 0, 0], m[:, :, 0, 0] = float("nan"), 0.0
        w = torch.randn(2, 5, 13 + pads[2] + pads[3], 17 + pads[0] + pads[1], generator=g, dtype=dtype).cuda()
        got = []
        for M in (B, R):
            xi = _fmt(x.cuda(), fmt).requires_grad_(True)
            mi = m.cuda().to(dtype).requires_grad_(True)
            out = M.soft_fill(xi, mi, iters, fill_grad, pads)
            (out * w).sum().backward()
            got.append((out, xi.grad, mi.grad))
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        for what, b, r in zip(("value", "grad x", "grad mask"), *got):
            assert torch.isfinite(b).all(), f"{backend} soft_fill {what}: not finite"
            assert _err(b, r) <= tol * max(1.0, float(r.abs().max())), f"{backend} soft_fill {what} iters={iters}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autograd_matches_reference(backend):
    B = _backend(backend)
    x, m = _inputs(1, 3, 9, 10)
    x = x.requires_grad_(True)
    bias = torch.randn(3, device="cuda", dtype=torch.float64, requires_grad=True)
    scale = torch.rand(1, 1, 9, 10, device="cuda", dtype=torch.float64)
    for name, f, inputs in [
        ("fill", lambda M: M.neighbor_fill(x, m, 2), (x,)),
        ("epilogue", lambda M: M.conv_epilogue(x, m, scale, bias, "silu"), (x, bias)),
        ("max", lambda M: M.masked_max_pool2d(x, m, (3, 3), (2, 2), (1, 1), (1, 1), False)[0], (x,)),
        ("avg", lambda M: M.masked_avg_pool2d(x, m, (3, 3), (2, 2), (1, 1), False, True)[0], (x,)),
        ("mean", lambda M: M.masked_mean(x, m), (x,)),
    ]:
        out_b, out_r = f(B), f(R)
        w = torch.randn_like(out_r)
        gb = torch.autograd.grad((out_b * w).sum(), inputs)
        gr = torch.autograd.grad((out_r * w).sum(), inputs)
        for p, q in zip(gb, gr):
            assert _err(p, q) <= 1e-10, f"{backend} grad of {name}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", ("fill", "renorm", "zero"))
def test_public_masked_conv2d(backend, mode):
    _backend(backend)
    x, m = _inputs(2, 8, 20, 20)
    x, m = x.float().contiguous(memory_format=torch.channels_last), m.float()
    w = torch.randn(16, 8, 3, 3, device="cuda") * 0.1
    b = torch.randn(16, device="cuda")
    with mo.set_backend("torch"):
        ref, rm = mo.masked_conv2d(x, m, w, b, padding=1, mode=mode, activation="relu")
    with mo.set_backend(backend):
        out, om = mo.masked_conv2d(x, m, w, b, padding=1, mode=mode, activation="relu")
    assert torch.equal(om, rm)
    assert _err(out, ref) <= 1e-4


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


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_backends_agree_with_each_other(dtype):
    """cuda and triton agree where both exist (a cross-check independent of the reference)."""
    C, T = _backend("cuda"), _backend("triton")
    x, m = _inputs(2, 16, 33, 35)
    x, m = x.to(dtype).contiguous(memory_format=torch.channels_last), m.to(dtype)
    for name, f in itertools.islice(CASES.items(), None):
        a, b = f(C, x, m), f(T, x, m)
        for p, q in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            tol = 2 * torch.finfo(dtype).eps * max(1.0, q.abs().max().item())
            assert _err(p, q) <= tol, f"{name}: cuda and triton differ"


# ----------------------------------------------------------------------------- the shared sweep
# tests/op_cases.py (the CPU backend tests' configurations) on CUDA tensors, through the public ops.
try:
    import op_cases as OC
except ImportError:  # run from another directory without tests/ on sys.path
    OC = None


def _sweep_params():
    if OC is None:
        return []
    return [(b, mode, case, layout) for b in GPU_BACKENDS for mode in OC.MODES
            for case, layout in OC.cycle_product(OC.conv_cases(), OC.LAYOUTS)]


@pytest.mark.parametrize("backend,mode,case,layout", _sweep_params(),
                         ids=lambda v: getattr(v, "id", str(v)))
def test_shared_conv_sweep(backend, mode, case, layout):
    _backend(backend)
    for dtype in DTYPES:
        x = OC.make_input(case.n, case.c_in, case.h, case.w, torch.float64, layout, device="cuda")
        m = OC.make_mask("patches", case.n, case.h, case.w, device="cuda")
        w, b = OC.make_conv_params(case, torch.float64, device="cuda")
        with mo.set_backend("torch"):
            truth, tm = mo.masked_conv2d(x, m, w, b, mode=mode, **case.kwargs())
            cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
            plain, _ = mo.masked_conv2d(cast(x), m, cast(w), cast(b), mode=mode, **case.kwargs())
        with mo.set_backend(backend):
            ours, om = mo.masked_conv2d(cast(x), m, cast(w), cast(b), mode=mode, **case.kwargs())
        assert torch.equal(om, tm)
        assert_accurate(ours, plain, truth, dtype, f"{backend} {mode} {case.id} {layout} {dtype}")
        xp = OC.poison(cast(x), m, float("nan"))
        with mo.set_backend(backend):
            assert torch.equal(mo.masked_conv2d(xp, m, cast(w), cast(b), mode=mode, **case.kwargs())[0], ours)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", OC.pool_cases() if OC else [], ids=lambda c: c.id)
def test_shared_pool_sweep(backend, case):
    _backend(backend)
    for dtype, layout in zip(DTYPES, itertools.cycle(OC.LAYOUTS)):
        x = OC.make_input(case.n, case.c, case.h, case.w, dtype, layout, device="cuda")
        m = OC.make_mask("patches", case.n, case.h, case.w, device="cuda")
        for op, kw in ((mo.masked_max_pool2d, dict(dilation=case.dilation)),
                       (mo.masked_avg_pool2d, dict(count_include_pad=case.count_include_pad))):
            if op is mo.masked_avg_pool2d and case.dilation != (1, 1):
                continue
            args = (case.kernel, case.stride, case.padding)
            with mo.set_backend("torch"):
                truth, tm = op(x.double(), m, *args, ceil_mode=case.ceil_mode, **kw)
                plain, _ = op(x, m, *args, ceil_mode=case.ceil_mode, **kw)
            with mo.set_backend(backend):
                ours, om = op(x, m, *args, ceil_mode=case.ceil_mode, **kw)
            assert torch.equal(om, tm)
            assert_accurate(ours, plain, truth, dtype, f"{backend} {op.__name__} {case.id} {dtype}")


def test_noisy_linear_on_cuda_equals_the_cpu_solve():
    """noisy-linear's torch solver on CUDA tensors (batched over images and channels) against the
    CPU solve (the fused kernel where it is built), both to tol 1e-10."""
    from masked_ops.explain.imputation import linear_imputation

    g = torch.Generator().manual_seed(5)
    images = torch.rand(3, 3, 64, 48, generator=g, dtype=torch.float64)
    masks = torch.rand(3, 1, 64 // 8, 48 // 8, generator=g).repeat_interleave(8, 2).repeat_interleave(8, 3) > 0.5
    cpu = linear_imputation(images, masks, tol=1e-10)
    gpu = linear_imputation(images.cuda(), masks.cuda(), tol=1e-10)
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-8, rtol=0)
