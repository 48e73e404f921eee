"""Soft (differentiable) layer masking: masks in [0, 1], gradients with respect to the mask.

Every test holds on every backend that runs here: the pure-PyTorch reference (autograd straight
through) is checked by gradcheck in float64; the fused backends against it. Independent
expectations: finite differences (gradcheck), the hard path at 0/1 masks (bit for bit), and
hand-written formulas for the simplest cases.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import masked_ops as mo
from masked_ops import masks as M
from masked_ops.backends import reference as R
from op_cases import available_backends, make_mask

D = torch.float64
BACKENDS = ["torch"] + available_backends(["cpp"])


def _soft_mask(n, h, w, seed=0, lo=0.05, hi=0.95, zeros=False):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, 1, h, w, generator=g, dtype=D) * (hi - lo) + lo
    if zeros:  # a few exact zeros (removed) and ones (visible)
        m = torch.where(torch.rand(n, 1, h, w, generator=g) < 0.15, torch.zeros((), dtype=D), m)
        m = torch.where(torch.rand(n, 1, h, w, generator=g) < 0.15, torch.ones((), dtype=D), m)
    return m


def _x(n=1, c=3, h=7, w=8, seed=1):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=D)


def _gradcheck(fn, *inputs):
    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- gradients by finite differences
OPS = {
    "neighbor_fill": lambda x, m: mo.neighbor_fill(x, m, 2, soft=True),
    "neighbor_fill_0": lambda x, m: mo.neighbor_fill(x, m, 0, soft=True),
    "conv_fill": lambda x, m: mo.masked_conv2d(x, m, _w(), _b(), padding=1, soft=True, activation="silu")[0],
    "conv_fill_dilated_stride": lambda x, m: mo.masked_conv2d(x, m, _w(), None, stride=2, padding=2, dilation=2,
                                                              soft=True)[0],
    "conv_renorm": lambda x, m: mo.masked_conv2d(x, m, _w(), _b(), padding=1, mode="renorm", soft=True)[0],
    "conv_renorm_pv": lambda x, m: mo.masked_conv2d(x, m, _w(), _b(), padding=1, mode="renorm", soft=True,
                                                    padding_visible=True)[0],
    "conv_zero": lambda x, m: mo.masked_conv2d(x, m, _w(), _b(), padding=1, mode="zero", soft=True)[0],
    "conv_depthwise": lambda x, m: mo.masked_conv2d(x, m, _w(3, 1), _b(3), padding=1, groups=3, soft=True)[0],
    "conv_1x1_zero": lambda x, m: mo.masked_conv2d(x, m, _w(4, 3, 1), _b(4), mode="zero", soft=True)[0],
    "conv_keep_max": lambda x, m: mo.masked_conv2d(x, m, _w(), None, stride=2, padding=1, soft=True)[1],
    "max_pool_mask": lambda x, m: mo.masked_max_pool2d(x, m, 3, 2, 1, soft=True)[1],
    "max_pool_ceil_mask": lambda x, m: mo.masked_max_pool2d(x, m, 2, 2, 0, ceil_mode=True, soft=True)[1],
    "avg_pool_mask": lambda x, m: mo.masked_avg_pool2d(x, m, 3, 2, 1, soft=True)[1],
    "mean": lambda x, m: mo.masked_mean(x, m, soft=True),
    "affine": lambda x, m: mo.masked_affine_act(x, m, torch.full((3,), 1.5, dtype=D), torch.zeros(3, dtype=D),
                                                "tanh", soft=True)[0],
}


def _w(c_out=4, c_in=3, k=3):
    return torch.randn(c_out, c_in, k, k, generator=torch.Generator().manual_seed(2), dtype=D) / 3


def _b(c=4):
    return torch.linspace(-0.5, 0.5, c, dtype=D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_gradcheck_with_respect_to_a_soft_mask(backend, op):
    x = _x()
    m = _soft_mask(1, 7, 8).requires_grad_()
    with mo.set_backend(backend):
        assert _gradcheck(lambda m: OPS[op](x, m), m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_that_mix_no_fill_read_pixels_as_they_are(backend):
    """Pools and fill-mode convs without rings (1x1) read a pixel with m > 0 as it is: its mask value
    weighs it only where it is blended with its fill. Weighing there too shrank a constant mask c's
    activations by c at every such layer (c^33 through EfficientNet-Lite0's 1x1 convs)."""
    x = _x(1, 3, 9, 9)
    m = _soft_mask(1, 9, 9, seed=8, zeros=True)
    support = (m > 0).to(D)
    w, b = _w(4, 3, 1), _b(4)
    with mo.set_backend(backend):
        calls = {
            "max_pool": lambda mm: mo.masked_max_pool2d(x, mm, 3, 2, 1, soft=True)[0],
            "avg_pool": lambda mm: mo.masked_avg_pool2d(x, mm, 3, 2, 1, soft=True)[0],
            "conv_1x1_fill": lambda mm: mo.masked_conv2d(x, mm, w, b, soft=True)[0],
        }
        for name, f in calls.items():
            assert torch.equal(f(m), f(support)), name
        # zero mode weighs by definition (partial convolution's m * x), a ring-filling conv blends
        assert not torch.equal(mo.masked_conv2d(x, m, w, b, mode="zero", soft=True)[0],
                               mo.masked_conv2d(x, support, w, b, mode="zero", soft=True)[0])
        assert not torch.equal(mo.masked_conv2d(x, m, _w(), _b(), padding=1, soft=True)[0],
                               mo.masked_conv2d(x, support, _w(), _b(), padding=1, soft=True)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_with_respect_to_x_and_mask_when_fill_values_pass_gradient(backend):
    x = _x().requires_grad_()
    m = _soft_mask(1, 7, 8).requires_grad_()
    with mo.set_backend(backend):
        assert _gradcheck(lambda x, m: mo.neighbor_fill(x, m, 3, soft=True, fill_grad=True), x, m)
        assert _gradcheck(lambda x, m: mo.masked_conv2d(x, m, _w(), _b(), padding=1, soft=True, fill_grad=True)[0],
                          x, m)


def test_fill_values_pass_no_gradient_to_x_by_default():
    """Without fill_grad, d fill / d x is the product of the knownness values a pixel was kept with:
    each ring keeps k * v of the pixel's own value (an independent, per-pixel recurrence)."""
    x = _x(1, 2, 6, 7).requires_grad_()
    m = _soft_mask(1, 6, 7, zeros=True)
    out = mo.neighbor_fill(x, m, 2, soft=True)
    (gx,) = torch.autograd.grad(out.sum(), x)
    k, expected = m, (m > 0).to(D)
    ones = torch.ones(1, 1, 3, 3, dtype=D)
    for _ in range(2):
        expected = torch.where(F.conv2d(k, ones, padding=1) > 0, expected * k, expected)
        k = F.max_pool2d(k, 3, 1, 1)
    torch.testing.assert_close(gx, expected.expand_as(gx), rtol=1e-12, atol=1e-12)


class _Small(nn.Module):
    """Residual adds, a stride-2 conv, a depthwise conv, 1x1 convs (one strided), max and average pooling, a
    concat, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.down = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.side = nn.Conv2d(6, 6, 1)
        self.skip = nn.Conv2d(6, 6, 1, stride=2)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = y + self.dw(y)
        y = F.max_pool2d(y, 2) + F.silu(self.down(y)) + self.skip(y)
        y = torch.cat([F.avg_pool2d(y, 3, 1, 1), self.side(y)], 1)
        return self.head(y.mean((2, 3)))


def _small():
    torch.manual_seed(0)
    net = _Small().to(D).eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.3, 0.3)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fill", "renorm", "zero"])
def test_gradcheck_converted_model_with_respect_to_the_mask(backend, mode):
    """The exact mask gradient needs fill_grad=True: in a deep model x itself depends on the mask, and
    the default (fill values pass no gradient to x, as in the paper) drops the paths from the mask
    through earlier layers into later fill values (see test_default_mask_gradient_is_the_paper_surrogate).
    The blend semantics: the straight-through ones are piecewise constant in the mask by design."""
    lm = mo.layer_mask(_small(), mode, soft="blend", fill_grad=True)
    x = _x(1, 3, 8, 8)
    m = _soft_mask(1, 8, 8, seed=3).requires_grad_()
    with mo.set_backend(backend):
        assert _gradcheck(lambda m: lm(x, m), m)


def test_default_mask_gradient_is_the_paper_surrogate():
    """fill_grad=False differs from the exact gradient only through fill values: for one conv (its input
    does not depend on the mask) both are the exact gradient; deeper, they differ but stay close."""
    x = _x(1, 3, 8, 8)
    one = nn.Conv2d(3, 4, 3, padding=1).to(D)
    two = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)).to(D)
    grads = {}
    for name, net in (("one", one), ("two", two)):
        for fill_grad in (False, True):
            m = _soft_mask(1, 8, 8, seed=3).requires_grad_()
            mo.layer_mask(net, soft="blend", fill_grad=fill_grad)(x, m).sum().backward()
            grads[name, fill_grad] = m.grad
    torch.testing.assert_close(grads["one", False], grads["one", True], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(grads["two", False], grads["two", True])
    cos = F.cosine_similarity(grads["two", False].flatten(), grads["two", True].flatten(), dim=0)
    assert cos > 0.5, cos


# ----------------------------------------------------------------------------- binary masks: the hard path, bit for bit
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_binary_masks_give_the_hard_ops_bit_for_bit(backend, dtype):
    x = _x(2, 3, 11, 12).to(dtype)
    m = make_mask("patches", 2, 11, 12, seed=4).to(dtype)
    w, b = _w().to(dtype), _b().to(dtype)
    pairs = {
        "fill": lambda **kw: mo.neighbor_fill(x, m, 3, **kw),
        "fill0": lambda **kw: mo.neighbor_fill(x, m, 0, **kw),
        "conv_fill": lambda **kw: mo.masked_conv2d(x, m, w, b, padding=1, activation="relu", **kw),
        "conv_renorm": lambda **kw: mo.masked_conv2d(x, m, w, b, stride=2, padding=1, mode="renorm", **kw),
        "conv_zero": lambda **kw: mo.masked_conv2d(x, m, w, b, padding=2, dilation=2, mode="zero", **kw),
        "max_pool": lambda **kw: mo.masked_max_pool2d(x, m, 3, 2, 1, **kw),
        "avg_pool": lambda **kw: mo.masked_avg_pool2d(x, m, 2, 2, **kw),
        "mean": lambda **kw: mo.masked_mean(x, m, **kw),
    }
    with mo.set_backend(backend):
        for name, f in pairs.items():
            hard, soft = f(), f(soft=True)
            hard, soft = (hard, soft) if isinstance(hard, tuple) else ((hard,), (soft,))
            for h, s in zip(hard, soft):
                assert torch.equal(h, s), f"{name}: soft != hard at a 0/1 mask"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["resnet18", "densenet121", "mobilenet_v3_large", "efficientnet_b0"])
def test_binary_masks_give_the_hard_model_bit_for_bit_on_the_zoo(backend, name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)().eval()
    x = _x(2, 3, 64, 64).float()
    m = make_mask("patches", 2, 64, 64, seed=5).float()
    with mo.set_backend(backend), torch.no_grad():
        hard = mo.layer_mask(net)(x, m)
        for semantics in M.SOFT_SEMANTICS:
            assert torch.equal(mo.layer_mask(net, soft=semantics)(x, m), hard), semantics


# ----------------------------------------------------------------------------- removed means removed
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semantics", M.SOFT_SEMANTICS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -1e30])
def test_values_where_the_mask_is_zero_never_reach_outputs_or_gradients(backend, semantics, poison):
    lm = mo.layer_mask(_small(), soft=semantics)
    x = _x(2, 3, 10, 10)
    m = _soft_mask(2, 10, 10, seed=6, zeros=True)
    results = []
    for xx in (x, torch.where(m > 0, x, torch.full((), poison, dtype=D))):
        xg, mg = xx.clone().requires_grad_(), m.clone().requires_grad_()
        torch.manual_seed(0)  # "sample" draws the same 0/1 mask for both
        with mo.set_backend(backend):
            out = lm(xg, mg)
        params = [p for p in lm.parameters() if p.requires_grad]
        gx, gm, *gp = torch.autograd.grad(out.square().sum(), (xg, mg, *params))
        results.append((out.detach(), gx, gm, *gp))
    for a, b in zip(*results):
        assert torch.isfinite(b).all() and torch.equal(a, b)
    assert torch.equal(results[0][1][(m > 0).expand_as(x) == 0], torch.zeros(int((m == 0).sum()) * 3, dtype=D))


# ----------------------------------------------------------------------------- tiny mask values
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_mask_values_count_as_removed_and_keep_gradients_finite(backend):
    """Found by extremal perturbations on EfficientNet-Lite0: soft residual joins multiply masks, deep
    masks reached 1e-41, and the soft fill's 1 / box3(k) overflowed to a NaN mask gradient. Values below
    masks.soft_floor_value count as removed (exactly as 0 would), so outputs and gradients stay finite."""
    x = _x(2, 3, 10, 10).float()
    m = _soft_mask(2, 10, 10, seed=7).float()
    tiny = m.clone()
    tiny[:, :, 2:7, 3:8] = 1e-41  # a float32 denormal, far below the floor
    zero = m.clone()
    zero[:, :, 2:7, 3:8] = 0.0
    lm = mo.layer_mask(_small().float(), soft="blend")
    with mo.set_backend(backend):
        outs = []
        for mm in (tiny, zero):
            mg = mm.clone().requires_grad_()
            out = lm(x, mg)
            (gm,) = torch.autograd.grad(out.square().sum(), mg)
            outs.append((out.detach(), gm))
        (y_tiny, g_tiny), (y_zero, g_zero) = outs
        assert torch.isfinite(g_tiny).all() and torch.equal(y_tiny, y_zero) and torch.equal(g_tiny, g_zero)
        # the op-level fill too (the floor is applied to an op's own soft mask argument)
        xg, mg = x.clone().requires_grad_(), tiny.clone().requires_grad_()
        y = mo.neighbor_fill(xg, mg, 2, soft=True)
        gx, gm = torch.autograd.grad(y.square().sum(), (xg, mg))
        assert torch.isfinite(gx).all() and torch.isfinite(gm).all()
        torch.testing.assert_close(y.detach(), mo.neighbor_fill(x, zero, 2, soft=True))
    assert M.soft_floor_value(torch.float32) == 1e-6 and M.soft_floor_value(torch.bfloat16) > 1e-3


# ----------------------------------------------------------------------------- compile, bad input
@pytest.mark.parametrize("semantics", M.SOFT_SEMANTICS)
def test_compile_fullgraph_forward_and_backward_of_a_soft_model(semantics):
    lm = mo.layer_mask(_small().float(), soft=semantics)
    x = _x(2, 3, 10, 10).float()
    m = _soft_mask(2, 10, 10).float()
    torch._dynamo.reset()
    compiled = torch.compile(lm, fullgraph=True, backend="aot_eager")
    grads = []
    for f in (lm, compiled):
        mg = m.clone().requires_grad_()
        torch.manual_seed(0)
        f(x, mg).sum().backward()
        grads.append(mg.grad)
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("bad,exc,words", [
    (lambda m: m * 1.5, ValueError, "[0, 1]"),
    (lambda m: m - 0.5, ValueError, "[0, 1]"),
    (lambda m: torch.where(m > 0.5, float("nan"), m), ValueError, "NaN"),
    (lambda m: (m > 0.5).to(torch.int64), TypeError, "floating"),
])
def test_bad_soft_masks_name_the_argument(bad, exc, words):
    x = _x()
    m = bad(_soft_mask(1, 7, 8))
    for call in (lambda: mo.neighbor_fill(x, m, 2, soft=True), lambda: mo.masked_mean(x, m, soft=True),
                 lambda: mo.layer_mask(_small(), soft=True)(x.expand(1, 3, 7, 8), m)):
        with pytest.raises(exc) as info:
            call()
        assert "mask" in str(info.value) and words in str(info.value)


def test_a_soft_mask_without_soft_true_is_still_refused():
    with pytest.raises(ValueError, match="soft=True"):
        mo.neighbor_fill(_x(), _soft_mask(1, 7, 8), 2)
    with pytest.raises(ValueError, match="soft_keep must be"):
        mo.layer_mask(_small(), soft=True, soft_keep="mean")
    with pytest.raises(ValueError, match="soft_keep='prob' was removed"):
        mo.layer_mask(_small(), soft=True, soft_keep="prob")


@pytest.mark.parametrize("bad", ["bogus", "Blend", 1, 0.5])
def test_an_unknown_soft_semantics_is_refused_naming_the_argument(bad):
    from masked_ops.explain import get_strategy

    with pytest.raises(ValueError, match=r"soft must be False .* one of \('blend', 'threshold', 'sample'\)"):
        mo.layer_mask(_small(), soft=bad)
    with pytest.raises(ValueError, match="soft must be"):
        get_strategy("layer", _small(), soft=bad)
    with pytest.raises(ValueError, match="for layer strategies"):
        get_strategy("blur", _small(), soft="threshold")
