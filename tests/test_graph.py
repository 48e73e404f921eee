"""The converted model is one fx graph: inspectable code, torch.compile without graph breaks or
recompiles, torch.export, copy and pickle (issue "one graph")."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import masked_ops as mo
from op_cases import make_mask

torchvision = pytest.importorskip("torchvision")


class TinyNet(nn.Module):
    """Every kind of node a CNN has: conv+BN+ReLU, TF-"same" padding before a stride-2 depthwise
    conv, a residual add, max pool, concat, SE-style multiply by a pooled branch, global mean, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.se = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = self.pw(self.dw(F.pad(y, (0, 1, 0, 1)))) + F.max_pool2d(y, 2)
        y = torch.cat([y, F.relu(self.branch(y))], 1)
        s = torch.sigmoid(self.se(y.mean((2, 3))))
        y = y * s[:, :, None, None]
        return self.head(y.mean((2, 3)))


def _tiny():
    torch.manual_seed(0)
    net = TinyNet().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net


def _data(n=2, h=15, w=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=g), make_mask("patches", n, h, w, seed=seed)


def test_converted_model_is_a_graph_module_with_readable_code():
    lm = mo.layer_mask(_tiny())
    assert isinstance(lm, fx.GraphModule)
    code = lm.code
    assert "def forward(self, x, mask = None)" in code
    assert "for " not in code and "while " not in code  # no interpreter loop at run time
    lines = [ln.strip() for ln in code.splitlines() if "=" in ln]
    first_layer = next(i for i, ln in enumerate(lines) if "= self." in ln)
    mask_lines = [i for i, ln in enumerate(lines) if "masked_ops_masks_" in ln]
    assert mask_lines and max(mask_lines) < first_layer  # the whole mask path first, once
    # One mask node per distinct geometry: the 3x3 stride-1 pad-1 convs reading the same mask share it.
    assert code.count("masked_ops_masks_conv_keep") == len(set(
        ln.split("(", 1)[1] for ln in lines if "masked_ops_masks_conv_keep" in ln))
    assert "LayerMasked(TinyNet" in str(lm) and "conv[fill]" in lm.summary()


def _explain(model, *args):
    with torch.no_grad():
        return torch._dynamo.explain(model)(*args)


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "mobilenet_v3_large", "convnext_tiny"])
def test_torch_compile_traces_zoo_models_without_graph_breaks(name):
    torch.manual_seed(0)
    lm = mo.layer_mask(getattr(torchvision.models, name)().eval())
    x, m = _data(1, 64, 64)
    torch._dynamo.reset()
    ex = _explain(lm, x, m)
    assert ex.graph_break_count == 0, [r.reason[:200] for r in ex.break_reasons]
    assert ex.graph_count == 1


def test_tf_same_padding_model_traces_without_graph_breaks():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    lm = mo.layer_mask(timm.create_model("tf_efficientnet_lite0", pretrained=False).eval())
    x, m = _data(1, 64, 64)
    torch._dynamo.reset()
    assert _explain(lm, x, m).graph_break_count == 0


def test_new_mask_values_do_not_recompile_but_a_new_backend_does():
    lm = mo.layer_mask(_tiny())
    x, m1 = _data()
    _, m2 = _data(seed=1)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lm, backend=count, fullgraph=True)
    with torch.no_grad(), mo.set_backend("cpp" if mo.available("cpp") else "torch"):
        a1, a2 = compiled(x, m1), compiled(x, m2)
        assert len(graphs) == 1
        # (compiled, some ops run decomposed into ATen ops (backends.UNDER_COMPILE): equal up to rounding)
        torch.testing.assert_close(a1, lm(x, m1))
        torch.testing.assert_close(a2, lm(x, m2))
        assert not torch.allclose(a1, a2)  # the new mask's values were used, not a stale trace
        compiled(x, m2.float())  # a float 0/1 mask: same values, but a new input dtype guard
    with torch.no_grad(), mo.set_backend("torch"):
        torch.testing.assert_close(compiled(x, m1), lm(x, m1))  # the backend is part of the guard
    assert len(graphs) == 3


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_inductor_fullgraph_matches_eager(backend):
    if not mo.available(backend):
        pytest.skip(f"backend {backend} not built")
    lm = mo.layer_mask(_tiny())
    x, m = _data()
    torch._dynamo.reset()
    with torch.no_grad(), mo.set_backend(backend):
        compiled = torch.compile(lm, fullgraph=True)
        torch.testing.assert_close(compiled(x, m), lm(x, m), rtol=1e-4, atol=1e-5)
        x2, m2 = _data(seed=3)
        torch.testing.assert_close(compiled(x2, m2), lm(x2, m2), rtol=1e-4, atol=1e-5)


def test_compiled_model_still_refuses_a_soft_mask():
    lm = mo.layer_mask(_tiny())
    x, m = _data()
    torch._dynamo.reset()
    compiled = torch.compile(lm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(x, m.float())
        with pytest.raises(RuntimeError, match="mask must hold only 0"):
            compiled(x, m.float() * 0.5)


def test_nan_derived_mask_under_compile():
    lm = mo.layer_mask(_tiny())
    x, m = _data()
    x_nan = torch.where(m, x, float("nan"))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(lm, backend="aot_eager", fullgraph=True)(x_nan), lm(x, m))


def test_torch_export_matches_eager():
    lm = mo.layer_mask(_tiny())
    x, m = _data()
    ep = torch.export.export(lm, (x, m.float()))
    x2, m2 = _data(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x, m.float()), lm(x, m))
        torch.testing.assert_close(ep.module()(x2, m2.float()), lm(x2, m2))


def test_deepcopy_and_pickle_keep_the_model_and_its_summary():
    lm = mo.layer_mask(_tiny())
    x, m = _data()
    with torch.no_grad():
        expected = lm(x, m)
        clone = copy.deepcopy(lm)
        assert torch.equal(clone(x, m), expected) and clone.summary() == lm.summary()
        buf = io.BytesIO()
        torch.save(lm, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(x, m), expected) and loaded.summary() == lm.summary()
        assert torch.equal(pickle.loads(pickle.dumps(lm))(x, m), expected)


def test_original_model_module_tree_is_not_touched():
    net = _tiny()
    before = {name: type(mod) for name, mod in net.named_modules()}
    params = {name: p.clone() for name, p in net.named_parameters()}
    lm = mo.layer_mask(net)
    assert {name: type(mod) for name, mod in net.named_modules()} == before
    assert all(torch.equal(p, params[name]) for name, p in net.named_parameters())
    assert lm.layers["head"] is not None if "head" in lm.layers else True


@pytest.mark.parametrize("soft", [False, True])
def test_fills_take_the_layout_inductor_chose(soft):
    """The fills and the epilogue are tagged flexible_layout (csrc/ops.cpp): inductor hands them the
    layout it picked for the convs around them. Forcing its layout optimisation on an NCHW model makes
    that channels_last: outputs (and, soft, the mask's gradient) still match eager."""
    if not mo.available("cpp"):
        pytest.skip("backend cpp not built")
    import torch._inductor.config as inductor_config

    for op in ("neighbor_fill", "soft_fill", "soft_fill_backward", "conv_epilogue", "masked_affine_act"):
        assert torch.Tag.flexible_layout in getattr(torch.ops.masked_ops, op).default.tags, op
    net = _tiny()
    for p in net.parameters():
        p.requires_grad_(False)
    lm = mo.layer_mask(net, soft=soft)
    x, m = _data(n=3, h=17, w=16)
    if soft:
        m = m * torch.rand(m.shape, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with mo.set_backend("cpp"), inductor_config.patch(force_layout_optimization=True):
        compiled = torch.compile(lm, fullgraph=True)
        outs, grads = [], []
        for f in (lm, compiled):
            mi = m.clone().requires_grad_(soft)
            with torch.set_grad_enabled(soft):
                out = f(x, mi)
                if soft:
                    out.logsumexp(-1).sum().backward()
            outs.append(out.detach())
            grads.append(mi.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    if soft:
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


class _TFSameChain(nn.Module):
    """conv+BN+ReLU6 whose output only a TF-"same" padded stride-2 depthwise conv reads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, groups=16)
        self.pw = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = F.relu6(self.bn(self.stem(x)))
        return self.pw(self.dw(F.pad(y, (0, 1, 0, 1)))).mean((2, 3))


def test_padded_conv_fills_its_own_input_then_pads_under_compile():
    """A conv with explicit padding that owns its input fills it in place and pads it after. Under
    compile the fill then gets the conv output in inductor's layout; filling a view of the padded
    buffer instead pinned that buffer to NCHW (a transpose before and after the conv)."""
    if not mo.available("cpp"):
        pytest.skip("backend cpp not built")
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    net = _TFSameChain().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
    lm = mo.layer_mask(net)
    assert lm.layers["dw"].fill_in_place and "fills its input in place" in lm.rules_used()["dw"]
    x, m = _data(n=2, h=17, w=16)
    torch._dynamo.reset()
    with torch.no_grad(), mo.set_backend("cpp"), inductor_config.patch(force_layout_optimization=True):
        eager = lm(x, m)
        compiled, (code, *_) = run_and_get_code(torch.compile(lm, fullgraph=True), x, m)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    fills = [ln for ln in code.splitlines() if "masked_ops.neighbor_fill_" in ln and "torch.ops" in ln]
    assert len(fills) == 1, fills  # the depthwise conv's input (the stem's, the model's input, is copied)
    assert "reinterpret_tensor" not in fills[0], fills
