"""masked_ops.explain.incremental (issue 29: exact incremental inference for occlusion).

Every test compares with full forwards of the same inputs (float64: 1e-10), on inputs whose outputs do
differ from the clean one (an engine that returned the clean output, or ignored the change, fails), and
checks that the engine really computed rectangles (an engine that ran everything in full would pass the
equality tests)."""
import random

import pytest
import torch
import torch.nn as nn

from masked_ops.explain import explain_occlusion, get_strategy
from masked_ops.explain.incremental import IncrementalModel, changed_rects


def _painted(clean, rects, value=0.0):
    x = clean.repeat(len(rects), 1, 1, 1)
    for b, r in enumerate(rects):
        if r is not None:
            x[b, :, r[0]:r[1], r[2]:r[3]] = value
    return x


def _check(model, clean, rects, threshold=0.5, min_rect_nodes=1):
    """The engine against full forwards; returns the engine's plan for the batch."""
    model = model.eval().double()
    x = _painted(clean, rects)
    engine = IncrementalModel(model, clean, threshold=threshold)
    with torch.no_grad():
        want = model(x)
        base = model(clean)
    got = engine(x, rects)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-10
    changed = [b for b, r in enumerate(rects) if r is not None]
    # the changes reach the output (else equality says nothing about the engine)
    assert ((want[changed] - base).abs().amax(1) > 1e-6).all()
    plan = engine.plan_batch(rects)
    assert sum(kind == "rect" for kind, _ in plan.values()) >= min_rect_nodes
    return plan


class Zoo(nn.Module):
    """Dilation, depthwise and grouped convs, stride 2 on odd sizes, a constant pad (TF "same"), max pool
    with padding (-inf pad in the crops), average pool, channel concat, a functional activation, a gate
    x * sigmoid(x), a per-channel constant scale, a residual add and a head that reads x.size(0)."""

    def __init__(self, c=6):
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.dil = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.grp = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.down = nn.Conv2d(2 * c, 2 * c, 3, stride=2)
        self.avg = nn.AvgPool2d(2)
        self.bn = nn.BatchNorm2d(2 * c)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 2 * c).view(1, -1, 1, 1))
        self.head = nn.Linear(2 * c, 7)

    def forward(self, x):
        y = torch.tanh(self.pool(self.c1(x)))  # negative values in and out: its -inf padding matters
        y = torch.tanh(self.dil(y)) + y
        z = torch.cat([self.dw(y), y], dim=1)
        z = self.grp(z)
        z = z * torch.sigmoid(z) * self.scale
        z = self.bn(self.down(self.pad(z)))
        z = self.avg(z)
        return self.head(z.mean((2, 3)).view(x.size(0), -1))


@pytest.fixture(autouse=True)
def _double_default():
    torch.manual_seed(0)
    yield


def test_zoo_net_equals_full_forwards_on_odd_sizes_and_borders():
    net = Zoo()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    clean = torch.randn(1, 3, 37, 45, dtype=torch.float64)
    rects = [(0, 5, 0, 5), (30, 37, 40, 45), (10, 19, 3, 12), (17, 18, 22, 23), None, (0, 37, 20, 24)]
    _check(net, clean, rects)
    plan = _check(net, clean, rects, threshold=1.0)
    # the -inf padding of the max pool and the constant pad ran as rectangles, not in full
    assert plan["pool"][0] == "rect" and plan["pad"][0] == "rect" and plan["cat"][0] == "rect"


def test_batchnorm_folded_only_into_a_sole_reader_conv():
    """The engine folds an eval BatchNorm into the plain conv before it (the zoo test above checks the folded
    values, with non-trivial statistics); a conv whose output another node also reads keeps its BatchNorm."""
    import torchvision

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return (self.bn(y) + y).mean((2, 3))

    def batchnorms(engine):
        return [n for n in engine.nodes if n.op == "call_module"
                and isinstance(engine.modules[n.target], nn.BatchNorm2d)]

    clean = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert batchnorms(IncrementalModel(torchvision.models.resnet18().double(), clean)) == []
    net = Shared().double()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    assert len(batchnorms(IncrementalModel(net, clean))) == 1
    _check(net, clean, [(3, 9, 20, 30), (0, 32, 0, 4)])


def test_plan_reused_per_model_until_its_weights_change():
    """The traced, folded copy is cached per model: a second image of the same size reuses it (with its own
    clean forward); an in-place weight update, a replaced parameter or another input size makes a new one,
    so the outputs always follow the model as it is now."""
    net = Zoo().double().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
    clean, other = torch.randn(2, 1, 3, 37, 45, dtype=torch.float64)
    rects = [(0, 5, 0, 5), (10, 19, 3, 12)]

    def check(engine, c):
        x = _painted(c, rects)
        with torch.no_grad():
            assert (engine(x, rects) - net(x)).abs().max() < 1e-10

    first = IncrementalModel(net, clean)
    second = IncrementalModel(net, other)
    assert second.plan is first.plan
    check(first, clean)
    check(second, other)
    with torch.no_grad():  # an optimiser step, in effect: in place
        net.c1.weight.mul_(1.5)
        net.bn.running_var.add_(0.3)
    third = IncrementalModel(net, other)
    assert third.plan is not first.plan
    check(third, other)
    net.dil.weight = nn.Parameter(net.dil.weight.detach() * -1)
    fourth = IncrementalModel(net, other)
    assert fourth.plan is not third.plan
    check(fourth, other)
    assert IncrementalModel(net, torch.randn(1, 3, 33, 41, dtype=torch.float64)).plan is not fourth.plan


def test_inputs_in_any_layout():
    """Inputs given channels_last or as a non-contiguous view give the same outputs (the engine copies
    every crop into its own layout)."""
    net = Zoo().double().eval()
    clean = torch.randn(1, 3, 37, 45, dtype=torch.float64)
    rects = [(0, 5, 0, 5), (10, 19, 3, 12)]
    x = _painted(clean, rects)
    engine = IncrementalModel(net, clean)
    want = engine(x, rects)
    wide = torch.zeros(2, 3, 37, 90, dtype=torch.float64)
    wide[..., ::2] = x
    assert torch.equal(engine(x.contiguous(memory_format=torch.channels_last), rects), want)
    assert torch.equal(engine(wide[..., ::2], rects), want)
    with torch.no_grad():
        assert (want - net(x)).abs().max() < 1e-10


@pytest.mark.parametrize("threshold", [0.05, 0.5, 1.0])
def test_resnet18_sliding_windows_any_threshold(threshold):
    import torchvision

    net = torchvision.models.resnet18()
    clean = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    rects = [(y, min(y + 16, 64), x, min(x + 16, 64)) for y in range(0, 64, 24) for x in range(0, 64, 24)]
    _check(net, clean, rects, threshold, min_rect_nodes=1 if threshold > 0.05 else 0)


def test_resnet18_computes_only_the_cone():
    """At threshold 1 every node before the global pool runs as a rectangle, and a small window's
    rectangle in layer1 is a fraction of the map."""
    import torchvision

    net = torchvision.models.resnet18().double().eval()
    clean = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    plan = IncrementalModel(net, clean, threshold=1.0).plan_batch([(40, 48, 40, 48)])
    kind, (r,) = plan["layer1_0_conv1"]
    assert kind == "rect" and (r[1] - r[0]) * (r[3] - r[2]) < 24 * 24 / 4
    assert plan["avgpool"][0] == "full" and plan["fc"][0] == "full"


def test_efficientnet_lite0_equals_full_forwards():
    from masked_ops.models import load_model

    net, _ = load_model("efficientnet-lite0")  # pretrained: random weights barely read the input (changes ~1e-9)
    clean = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    _check(net, clean, [(0, 16, 0, 16), (24, 40, 24, 40), (56, 64, 8, 24)])


def test_random_rectangles_property():
    """Random rectangles (any size, any place, batches of mixed sizes) on the zoo net."""
    net = Zoo().double().eval()
    rng = random.Random(0)
    clean = torch.randn(1, 3, 33, 29, dtype=torch.float64)
    engine = IncrementalModel(net, clean, threshold=0.6)
    for _ in range(6):
        rects = []
        for _ in range(rng.randint(1, 5)):
            y0, x0 = rng.randrange(33), rng.randrange(29)
            rects.append((y0, rng.randint(y0 + 1, 33), x0, rng.randint(x0 + 1, 29)))
        x = clean.repeat(len(rects), 1, 1, 1)
        for b, (y0, y1, x0, x1) in enumerate(rects):
            x[b, :, y0:y1, x0:x1] = torch.randn(3, y1 - y0, x1 - x0, dtype=torch.float64)
        with torch.no_grad():
            assert (engine(x) - net(x)).abs().max().item() < 1e-10


def test_values_outside_the_rect_are_read_from_the_clean_input():
    """The engine reads the changed rectangle of each input and nothing else: an input that also differs
    outside its stated rect gives the output of the clean input with only the rect pasted in."""
    net = Zoo().double().eval()
    clean = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    x = clean + 1.0  # differs everywhere
    rect = (8, 16, 8, 16)
    pasted = clean.clone()
    pasted[:, :, 8:16, 8:16] = x[:, :, 8:16, 8:16]
    with torch.no_grad():
        assert (IncrementalModel(net, clean)(x, [rect]) - net(pasted)).abs().max().item() < 1e-10


def test_changed_rects():
    clean = torch.zeros(1, 2, 6, 7)
    x = clean.repeat(3, 1, 1, 1)
    x[0, 1, 2, 3] = 1.0
    x[1, 0, 0:2, 5:7] = float("nan")
    assert changed_rects(x, clean) == [(2, 3, 3, 4), (0, 2, 5, 7), None]


def test_fp32_close_to_full_forwards():
    import torchvision

    net = torchvision.models.resnet18().eval()
    clean = torch.randn(1, 3, 64, 64)
    rects = [(0, 16, 0, 16), (32, 48, 16, 32)]
    x = _painted(clean, rects)
    with torch.no_grad():
        want = net(x)
    got = IncrementalModel(net, clean)(x, rects)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_bad_input_is_refused():
    net = Zoo().double().eval()
    clean = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    engine = IncrementalModel(net, clean)
    x = clean.repeat(2, 1, 1, 1)
    with pytest.raises(ValueError, match="rect"):
        engine(x, [(0, 4, 0, 4), (10, 20, 0, 4)])
    with pytest.raises(ValueError, match="one rectangle per input"):
        engine(x, [(0, 4, 0, 4)])
    with pytest.raises(ValueError, match="inputs must have shape"):
        engine(torch.zeros(2, 3, 8, 8, dtype=torch.float64), [None, None])
    with pytest.raises(ValueError, match="clean must be"):
        IncrementalModel(net, torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="threshold"):
        IncrementalModel(net, clean, threshold=0)
    with pytest.raises(TypeError, match="nn.Module"):
        IncrementalModel(lambda x: x, clean)

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow: fx cannot trace it

    with pytest.raises(ValueError, match="torch.fx can trace"):
        IncrementalModel(Branchy(), clean)

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(ValueError, match="one tensor"):
        IncrementalModel(Pair(), clean)


@pytest.mark.parametrize("masking", ["grey", "layer"])
def test_explain_occlusion_incremental_equals_full(masking):
    """explain_occlusion(incremental=True): the same outputs as the full forwards, with a fill and under
    layer masking."""
    import torchvision

    net = torchvision.models.resnet18().eval()
    image = torch.rand(3, 64, 64)
    strategy = get_strategy(masking, net)
    full = explain_occlusion(strategy, image, window=16, stride=8, output="logit")
    inc = explain_occlusion(strategy, image, window=16, stride=8, output="logit", incremental=True)
    assert inc.meta.get("incremental") is True
    assert torch.allclose(inc.outputs, full.outputs, rtol=1e-4, atol=1e-4 * full.outputs.abs().max().item())
    assert full.outputs.std() > 1e-3  # the windows do change the output
    torch.testing.assert_close(inc.weights, full.weights, rtol=1e-3, atol=1e-4 * full.weights.abs().max().item())


def test_explain_occlusion_incremental_segments_and_blur():
    import torchvision

    net = torchvision.models.resnet18().eval()
    image = torch.rand(3, 64, 64)
    blur = get_strategy("blur", net)
    a = explain_occlusion(blur, image, segments="grid", n_segments=16, output="logit")
    b = explain_occlusion(blur, image, segments="grid", n_segments=16, output="logit", incremental=True)
    assert torch.allclose(a.outputs, b.outputs, rtol=1e-4, atol=1e-4 * a.outputs.abs().max().item())


# ----------------------------------------------------------------------------- under layer masking
def _check_layer_masked(net, size, rects, threshold, mode="fill", clean_removed=0.0):
    """The converted model's engine (inputs: image and mask, only the mask changes) against its full
    forwards; returns the plan. ``clean_removed``: the share of pixels already removed in the clean mask
    (then removed pixels next to a window are filled from beyond its cone: the fill halo matters)."""
    import masked_ops as mo

    net = net.eval().double()
    lm = mo.layer_mask(net, mode=mode)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    ones = (torch.rand(1, 1, size, size) >= clean_removed).double()
    masks = _painted(ones, rects)
    xs = x.expand(len(rects), -1, -1, -1)
    engine = IncrementalModel(lm, (x, ones), threshold=threshold)
    with torch.no_grad():
        want, base = lm(xs, masks), lm(x, ones)
    assert (engine((xs, masks), rects) - want).abs().max().item() < 1e-10
    assert (engine((xs, masks)) - want).abs().max().item() < 1e-10  # rects found by comparison
    changed = [b for b, r in enumerate(rects) if r is not None]
    assert ((want[changed] - base).abs().amax(1) > 1e-6).all()
    return engine.plan_batch(rects)


@pytest.mark.parametrize("threshold", [0.5, 1.0])
@pytest.mark.parametrize("mode", ["fill", "renorm"])
def test_layer_masked_resnet18_equals_full_forwards(threshold, mode):
    """Layer masking: the masked convs read their fill up to iters rings beyond their window (fill mode) or
    their renormalisation scale (renorm); the mask path, the max pool and the residual joins run on crops."""
    import torchvision

    rects = [(0, 16, 0, 16), (8, 24, 40, 56), (48, 64, 48, 64), (30, 31, 30, 31), None]
    plan = _check_layer_masked(torchvision.models.resnet18(), 64, rects, threshold, mode)
    if threshold == 1.0 and mode == "fill":  # everything before the global pool ran as rectangles
        assert plan["conv1"][0] == "rect" and plan["maxpool"][0] == "rect" and plan["layer4_1_conv2"][0] == "rect"
    if mode == "renorm":  # its (keep, scale) pairs have no rule yet: whole maps, and still equal
        assert plan["conv1"][0] == "full"


def test_layer_masked_fill_halo():
    """A clean mask with removed pixels of its own: those beside a window are filled from up to
    d*(k-1) rings away, beyond the window's footprint; the crops must hold that halo."""
    import torchvision

    rects = [(16, 32, 16, 32), (0, 16, 40, 56), (40, 64, 0, 24)]
    _check_layer_masked(torchvision.models.resnet18(), 64, rects, 1.0, clean_removed=0.3)


def test_layer_masked_zoo_net_equals_full_forwards():
    """Dilation, groups, odd sizes, concatenation, padding under layer masking (what has no crop rule, such
    as the explicit pad, runs in full: still equal)."""
    net = Zoo()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    _check_layer_masked(net, 37, [(0, 5, 0, 5), (30, 37, 30, 37), (10, 19, 3, 12)], 1.0)


def test_explain_occlusion_falls_back_where_the_engine_saves_nothing():
    """EfficientNet-Lite0 under layer masking: its padded first conv has no rule, so the engine would run
    every layer on whole maps (1.6x-1.75x slower than the model, measured): full forwards run instead, said
    in meta; grey fill on the same model and layer masking on a ResNet do run incrementally."""
    import torchvision
    from masked_ops.models import load_model

    lite, _ = load_model("efficientnet-lite0")
    image = torch.rand(3, 64, 64, dtype=torch.float64)
    lite = lite.double()
    for masking, used in (("layer", False), ("grey", True)):
        s = get_strategy(masking, lite)
        inc = explain_occlusion(s, image, n_segments=16, incremental=True)
        full = explain_occlusion(s, image, n_segments=16)
        assert inc.meta["incremental"] is used, masking
        assert (inc.outputs - full.outputs).abs().max() < 1e-10
    net = torchvision.models.resnet18().double().eval()
    assert explain_occlusion(get_strategy("layer", net), image, n_segments=16, incremental=True).meta["incremental"]


def test_explain_occlusion_incremental_refusals():
    import torchvision

    net = torchvision.models.resnet18().eval()
    image = torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match="paints the removed pixels"):
        explain_occlusion(get_strategy("noisy-linear", net), image, window=16, incremental=True)
    with pytest.raises(ValueError, match="is soft"):
        explain_occlusion(get_strategy("layer", net, soft=True), image, window=16, incremental=True)
    with pytest.raises(TypeError, match="incremental"):
        explain_occlusion(get_strategy("grey", net), image, window=16, incremental="yes")


class InPlace(nn.Module):
    """In-place calls of every kind fx records: a module flag, a functional flag, a Tensor method, a torch
    function and an augmented assignment. Run as they are, they would overwrite the clean cache."""

    def __init__(self, c=4):
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.c3 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        y = self.act(self.c1(x))
        z = self.c2(y)
        z += y
        z = torch.nn.functional.relu(z, inplace=True)
        w = self.c2(z).tanh_()
        w.add_(z)
        w = torch.relu_(self.c3(w) - 0.1)
        return self.head(w.mean((2, 3)))


def test_in_place_calls_do_not_corrupt_the_cache():
    net = InPlace()
    clean = torch.randn(1, 3, 24, 24, dtype=torch.float64)
    rects = [(0, 6, 0, 6), (10, 14, 12, 20), None]
    _check(net, clean, rects, threshold=1.0)
    engine = IncrementalModel(net.double(), clean, threshold=1.0)
    x = _painted(clean, rects)
    with torch.no_grad():
        want = net(x)
    for _ in range(2):  # a second call reads the same cache
        assert (engine(x, rects) - want).abs().max().item() < 1e-10
