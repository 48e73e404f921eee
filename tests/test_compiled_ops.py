"""The compiled ops as torch.library custom ops: opcheck (schema, fake kernels, autograd
registration, dynamic shapes), gradcheck in float64 through the public ops, and
torch.compile(fullgraph=True)."""
from __future__ import annotations

import pytest
import torch

import masked_ops as mo
from op_cases import ConvCase, available_backends, make_conv_params, make_input, make_mask, with_layout

BACKENDS_UNDER_TEST = available_backends(["cpp"])
pytestmark = pytest.mark.skipif(not BACKENDS_UNDER_TEST, reason="compiled extension not built")
BACKEND = BACKENDS_UNDER_TEST[0] if BACKENDS_UNDER_TEST else "cpp"


def _ops():
    import masked_ops.backends.compiled  # noqa: F401  (registers fake kernels and autograd)

    return torch.ops.masked_ops


def _sample(layout="contiguous", dtype=torch.float64, requires_grad=True):
    x = make_input(2, 3, 9, 8, dtype, layout, seed=1).requires_grad_(requires_grad)
    m = make_mask("patches", 2, 9, 8, seed=1).to(dtype)
    return x, m


SAMPLES = [("contiguous", torch.float64), ("channels_last", torch.float32)]


def _opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("layout,dtype", SAMPLES)
def test_opcheck_neighbor_fill(layout, dtype):
    x, m = _sample(layout, dtype)
    for iters in (0, 2):
        _opcheck(_ops().neighbor_fill.default, (x, m, iters))


@pytest.mark.parametrize("layout,dtype", SAMPLES)
def test_opcheck_neighbor_fill_in_place(layout, dtype):
    """The mutating op: its schema declares the write (opcheck checks that), its fake kernel
    returns nothing, and it works on a strided view (the interior of a padded buffer)."""
    x, m = _sample(layout, dtype, requires_grad=False)
    for iters in (0, 2):
        _opcheck(_ops().neighbor_fill_.default, (x.clone(), m, iters))
    buf = torch.nn.functional.pad(x, (1, 1, 2, 0))
    _opcheck(_ops().neighbor_fill_.default, (buf[:, :, 2:, 1:-1], m, 2))


@pytest.mark.parametrize("layout,dtype", SAMPLES)
def test_opcheck_conv_epilogue_in_place(layout, dtype):
    y, keep = _sample(layout, dtype, requires_grad=False)
    _opcheck(_ops().conv_epilogue_.default, (y.clone(), keep, None, None, "relu6"))
    _opcheck(_ops().conv_epilogue_.default, (y.clone(), keep, keep * 2.25, torch.randn(3, dtype=dtype), "silu"))
    _opcheck(_ops().conv_epilogue_.default, (y.clone()[:, :, ::2], keep[:, :, ::2], None, None, "none"))


@pytest.mark.parametrize("layout,dtype", SAMPLES[1:])
def test_opcheck_conv_epilogue(layout, dtype):
    y, keep = _sample(layout, dtype)
    scale = (keep * 2.25).requires_grad_()
    bias = torch.randn(3, dtype=dtype, requires_grad=True)
    _opcheck(_ops().conv_epilogue.default, (y, keep, None, None, "none"))
    _opcheck(_ops().conv_epilogue.default, (y, keep, scale, bias, "gelu"))


@pytest.mark.parametrize("layout,dtype", SAMPLES)
def test_opcheck_conv_epilogue_backward(layout, dtype):
    y, keep = _sample(layout, dtype, requires_grad=False)
    grad = torch.randn_like(y)
    scale, bias = keep * 2.25 + 0.5, torch.randn(3, dtype=dtype)
    _opcheck(_ops().conv_epilogue_backward.default, (grad, y, keep, scale, bias, "silu", True, True))
    _opcheck(_ops().conv_epilogue_backward.default, (grad, y, keep, None, None, "relu", False, False))
    _opcheck(_ops().conv_epilogue_backward.default, (grad, y, keep, scale, bias, "hardswish", False, True))


@pytest.mark.parametrize("activation", ["none", "relu", "relu6", "leaky_relu", "silu", "hardswish", "hardsigmoid",
                                        "sigmoid", "gelu", "tanh"])
@pytest.mark.parametrize("layout,dtype", SAMPLES)
def test_fused_epilogue_backward_matches_the_torch_formula(activation, layout, dtype):
    """The CPU's one-pass epilogue backward against autograd through the reference epilogue (torch ops),
    with NaN in the removed region (it must reach no gradient)."""
    from masked_ops.backends import compiled, reference

    y, keep = _sample(layout, dtype, requires_grad=False)
    y = y.detach().clone()
    y[:, :, 0, 0] = float("nan")
    keep[:, :, 0, 0] = 0
    gen = torch.Generator().manual_seed(3)
    scale = torch.rand(keep.shape, generator=gen, dtype=dtype) + 0.5
    bias = torch.randn(3, generator=gen, dtype=dtype)
    grad = torch.randn(y.shape, generator=gen, dtype=dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for with_scale, with_bias in [(False, False), (True, False), (False, True), (True, True)]:
        grads = {}
        for backend in (compiled, reference):
            yy = y.clone().requires_grad_()
            s = scale.clone().requires_grad_() if with_scale else None
            b = bias.clone().requires_grad_() if with_bias else None
            backend.conv_epilogue(yy, keep, s, b, activation).backward(grad)
            grads[backend] = [t.grad for t in (yy, s, b) if t is not None]
        for g, w in zip(grads[compiled], grads[reference]):
            assert torch.isfinite(g).all() and torch.isfinite(w).all()
            torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize("fill_grad", [False, True])
@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (0, 1, 0, 1), (2, 0, 1, 3)])
def test_soft_fill_matches_the_reference_in_every_layout(dtype, layout, iters, fill_grad, pads):
    """The CPU kernel (planes for NCHW, channels innermost for channels_last) against the reference's
    autograd: values, the gradient to x and to a soft mask with exact zeros, NaN in removed pixels,
    zeros padded around the result (TF "same"; channels_last writes into the padded buffer and reads
    the padded gradient's interior in place)."""
    from masked_ops.backends import compiled, reference

    gen = torch.Generator().manual_seed(iters + 10 * fill_grad)
    C = 5 if layout != "channels_last" else 10  # channels_last from 8 channels runs with channels innermost
    x = make_input(2, C, 9, 11, dtype, seed=iters)
    m = torch.rand(2, 1, 9, 11, generator=gen, dtype=dtype) * (torch.rand(2, 1, 9, 11, generator=gen) > 0.4).to(dtype)
    m[0, :, 2, 3] = 1.0  # a fully visible pixel next to partly visible ones
    x[:, :, 0, 0], m[:, :, 0, 0] = float("nan"), 0.0  # removed: never read
    w = torch.randn(2, C, 9 + pads[2] + pads[3], 11 + pads[0] + pads[1], generator=gen, dtype=dtype)
    out, grads = {}, {}
    for backend in (compiled, reference):
        xi, mi = with_layout(x, layout).requires_grad_(), m.clone().requires_grad_()
        out[backend] = backend.soft_fill(xi, mi, iters, fill_grad, pads)
        (out[backend] * w).sum().backward()
        grads[backend] = (xi.grad, mi.grad)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out[compiled], out[reference], **tol)
    for g, r in zip(grads[compiled], grads[reference]):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, **tol)
    if layout == "channels_last":  # the output keeps the input's layout
        assert out[compiled].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(1, 70, 6, 13), (1, 19, 1, 9), (3, 33, 7, 1), (1, 130, 5, 5), (2, 9, 2, 2),
                                   (9, 12, 5, 7), (9, 8, 1, 1)])
@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("fill_grad", [False, True])
@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 2, 0, 1)])
def test_soft_fill_backward_channels_last_sweeps(shape, iters, fill_grad, pads):
    """The channels_last backward sweeps the rows of each ring once, all of a pixel's channels together
    (channel counts that leave a partial 8-lane sum, single rows and columns), in row chunks for small
    batches and per sample for batch 9 (at least twice the threads of any CI machine), with 1-3
    rings (the value's adjoint alternates between two buffers), NaN and inf in removed pixels, a padded
    result (its gradient's interior read in place): against the reference's autograd in float64."""
    from masked_ops.backends import compiled, reference

    N, C, H, W = shape
    gen = torch.Generator().manual_seed(C * 7 + iters)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    m = torch.rand(N, 1, H, W, generator=gen, dtype=torch.float64)
    m = m * (torch.rand(N, 1, H, W, generator=gen) > 0.3).to(torch.float64)
    x = x.masked_fill(m == 0, float("nan"))
    x[:, :1] = x[:, :1].masked_fill(m == 0, float("inf"))
    w = torch.randn(N, C, H + pads[2] + pads[3], W + pads[0] + pads[1], generator=gen, dtype=torch.float64)
    w = w.contiguous(memory_format=torch.channels_last)
    grads = {}
    for backend in (compiled, reference):
        xi = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        mi = m.clone().requires_grad_()
        (backend.soft_fill(xi, mi, iters, fill_grad, pads) * w).sum().backward()
        grads[backend] = (xi.grad, mi.grad)
    for g, r in zip(grads[compiled], grads[reference]):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("iters", [1, 2, 5])
def test_soft_fill_channels_last_is_the_hard_fill_at_binary_masks(dtype, iters):
    """The channels_last soft fill (channels innermost from 8 channels on; its first ring reads x itself)
    equals the hard neighbour fill bit for bit at a 0/1 mask, with NaN in the removed pixels."""
    from masked_ops.backends import compiled

    gen = torch.Generator().manual_seed(iters)
    m = (torch.rand(2, 1, 9, 13, generator=gen) > 0.5).to(dtype)
    x = torch.randn(2, 20, 9, 13, generator=gen).to(dtype).masked_fill(m == 0, float("nan"))
    x = x.contiguous(memory_format=torch.channels_last)
    soft = compiled.soft_fill(x, m, iters, False)
    hard = compiled.neighbor_fill(x, m, iters)
    assert torch.equal(soft.isnan(), hard.isnan())
    assert torch.equal(soft.nan_to_num(), hard.nan_to_num())
    assert soft.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout,dtype", SAMPLES)
def test_opcheck_soft_fill(layout, dtype):
    x, _ = _sample(layout, dtype)
    m = torch.rand(2, 1, 9, 8, generator=torch.Generator().manual_seed(4), dtype=dtype)
    m[:, :, :3, :3] = 0
    m.requires_grad_()
    for iters, fill_grad, pads in [(0, False, [0, 0, 0, 0]), (2, False, [0, 1, 0, 1]), (3, True, [2, 0, 1, 0])]:
        _opcheck(_ops().soft_fill.default, (x, m, iters, fill_grad, pads))
        _opcheck(_ops().soft_fill_backward.default, (torch.randn_like(x), x.detach(), m.detach(), iters, fill_grad))


@pytest.mark.parametrize("layout,dtype", SAMPLES[1:])
def test_opcheck_masked_affine_act(layout, dtype):
    x, m = _sample(layout, dtype)
    scale = torch.rand(3, dtype=dtype, requires_grad=True)
    shift = torch.randn(3, dtype=dtype, requires_grad=True)
    _opcheck(_ops().masked_affine_act.default, (x, m, scale, shift, "silu"))


@pytest.mark.parametrize("layout,dtype", SAMPLES[:1])
def test_opcheck_masked_max_pool2d(layout, dtype):
    x, m = _sample(layout, dtype)
    _opcheck(_ops().masked_max_pool2d.default, (x, m, [3, 3], [2, 2], [1, 1], [1, 1], True))


@pytest.mark.parametrize("layout,dtype", SAMPLES[1:])
def test_opcheck_masked_avg_pool2d(layout, dtype):
    x, m = _sample(layout, dtype)
    _opcheck(_ops().masked_avg_pool2d.default, (x, m, [3, 3], [2, 2], [1, 1], True, False))


@pytest.mark.parametrize("layout,dtype", SAMPLES[:1])
def test_opcheck_masked_mean(layout, dtype):
    x, m = _sample(layout, dtype)
    _opcheck(_ops().masked_mean.default, (x, m))


def test_max_pool_indices_are_atens():
    """The returned indices are ATen's max_pool2d_with_indices on the masked input (flat h*W+w)."""
    x, m = _sample("channels_last", torch.float64, requires_grad=False)
    _y, _m2, idx = _ops().masked_max_pool2d(x, m, [3, 3], [2, 2], [1, 1], [1, 1], True)
    xm = torch.where(m > 0, x, torch.zeros((), dtype=x.dtype))
    _, expected = torch.nn.functional.max_pool2d(xm.contiguous(), 3, 2, 1, 1, True, return_indices=True)
    assert torch.equal(idx, expected)


# ----------------------------------------------------------------------------- gradcheck
def _gradcheck(fn, inputs):
    # fast_mode: checks random projections of the Jacobian (the full one costs minutes here).
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("mode", ["renorm", "zero"])
def test_gradcheck_masked_conv2d(mode):
    case = ConvCase(1, 4, 4, 7, 7, (3, 3), (2, 1), (1, 1), groups=2)
    x = make_input(1, 4, 7, 7, seed=2).requires_grad_()
    m = make_mask("random", 1, 7, 7, seed=2)
    w, b = (t.requires_grad_() for t in make_conv_params(case))
    with mo.set_backend(BACKEND):
        _gradcheck(lambda x, w, b: mo.masked_conv2d(x, m, w, b, **case.kwargs(), mode=mode,
                                                    activation="silu")[0], (x, w, b))


def test_gradcheck_masked_conv2d_fill():
    """Fill values carry no gradient by design (as in the paper), so the numerical Jacobian
    w.r.t. x only matches where the fill changes nothing: all-visible for x; any mask for
    weight and bias."""
    case = ConvCase(1, 3, 4, 7, 6, (3, 3), padding=(1, 1))
    x = make_input(1, 3, 7, 6, seed=3).requires_grad_()
    w, b = (t.requires_grad_() for t in make_conv_params(case))
    m = make_mask("patches", 1, 7, 6, seed=3)
    ones = torch.ones_like(m)
    with mo.set_backend(BACKEND):
        _gradcheck(lambda w, b: mo.masked_conv2d(x.detach(), m, w, b, padding=1, activation="gelu")[0], (w, b))
        _gradcheck(lambda x, w, b: mo.masked_conv2d(x, ones, w, b, padding=1, activation="tanh")[0], (x, w, b))


def test_gradcheck_affine_pools_mean():
    x = make_input(2, 3, 8, 7, seed=4).requires_grad_()
    m = make_mask("random", 2, 8, 7, seed=4)
    scale = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    shift = torch.randn(3, dtype=torch.float64).requires_grad_()
    with mo.set_backend(BACKEND):
        _gradcheck(lambda x, s, t: mo.masked_affine_act(x, m, s, t, "gelu")[0], (x, scale, shift))
        _gradcheck(lambda x: mo.masked_max_pool2d(x, m, 3, 2, 1, ceil_mode=True)[0], (x,))
        _gradcheck(lambda x: mo.masked_avg_pool2d(x, m, 3, 2, 1, ceil_mode=True, count_include_pad=False)[0], (x,))
        _gradcheck(lambda x: mo.masked_mean(x, m), (x,))


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("mode", ["fill", "renorm"])
def test_torch_compile_fullgraph_masked_conv2d(mode):
    case = ConvCase(2, 4, 6, 10, 9, (3, 3), padding=(1, 1))
    x = make_input(2, 4, 10, 9, torch.float32, seed=5)
    m = make_mask("patches", 2, 10, 9, seed=5)
    w, b = make_conv_params(case, torch.float32)

    def f(x, m, w, b):
        y, m2 = mo.masked_conv2d(x, m, w, b, padding=1, mode=mode, activation="relu")
        p, _ = mo.masked_max_pool2d(y, m2, 3, 2, 1)
        return p

    torch._dynamo.reset()
    with mo.set_backend(BACKEND):
        eager = f(x, m, w, b)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, m, w, b)
    torch.testing.assert_close(compiled, eager)


def test_torch_compile_fullgraph_converted_model_with_in_place_ops():
    """A converted model without autograd writes its fills and epilogues in place (a fill into its
    own input, another into the interior view of a padded copy): torch.compile functionalizes
    those mutations and traces the whole forward, with the eager result."""
    import torch.nn as nn
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.c = nn.Conv2d(8, 8, 3, stride=2)

        def forward(self, x):
            return self.c(F.pad(torch.relu(self.b(torch.relu(self.a(x)))), (0, 1, 0, 1))).mean((2, 3))

    torch.manual_seed(0)
    net = Net().eval()
    x = make_input(2, 3, 12, 11, torch.float32, seed=6)
    m = make_mask("patches", 2, 12, 11, seed=6)
    torch._dynamo.reset()
    with torch.no_grad(), mo.set_backend(BACKEND):
        lm = mo.layer_mask(net)
        assert lm.layers["b"].fill_in_place
        eager = lm(x, m)
        compiled = torch.compile(lm, fullgraph=True, backend="aot_eager")(x, m)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("mode", ["fill", "zero", "renorm"])
def test_compiled_conv_masks_equal_eager(mode):
    """Under torch.compile the hard keep is a max pool (inductor lowers it), eager a window sum: the same
    0/1 values for every geometry (strides, paddings, dilations, TF-"same" prepads, odd sizes, single
    visible pixels, all removed)."""
    from masked_ops import masks as M

    g = torch.Generator().manual_seed(7)
    m = (torch.rand(3, 1, 13, 11, generator=g) > 0.6).float()
    m[1] = 0
    m[1, 0, 6, 4] = 1  # a single visible pixel
    m[2] = 0           # nothing visible
    geometries = [((3, 3), (1, 1), (1, 1), (1, 1), None), ((3, 3), (2, 2), (0, 0), (1, 1), (0, 1, 0, 1)),
                  ((5, 5), (2, 2), (0, 0), (1, 1), "same"), ((3, 3), (1, 1), (2, 2), (2, 2), None),
                  ((1, 3), (1, 2), (0, 1), (1, 1), None), ((7, 7), (2, 2), (3, 3), (1, 1), None)]
    for kernel, stride, padding, dilation, prepad in geometries:
        def f(m):
            return M.conv_masks(m, kernel, stride, padding, dilation, mode, False, prepad)

        torch._dynamo.reset()
        keep, scale = f(m)
        ckeep, cscale = torch.compile(f, fullgraph=True)(m)
        assert torch.equal(ckeep, keep), (kernel, stride, padding, dilation, prepad)
        assert set(keep.unique().tolist()) <= {0.0, 1.0} and keep.sum() > 0
        if mode == "renorm":
            assert torch.equal(cscale, scale)
