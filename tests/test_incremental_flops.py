"""masked_ops.explain.cone and bench/incremental_flops.py (issue 29: what incremental inference would save): the changed-rectangle
propagation against brute force on tiny networks (float64, a random perturbation of an input rectangle:
every changed position lies in the predicted rectangle, and for convs with random weights and injective
activations the predicted rectangle is exactly the bounding box of the changes), the same under layer
masking, and the FLOPs count against a hand computation and torch's own counter."""
import importlib.util
import json
import math
import os
import random
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from masked_ops import layer_mask
from masked_ops.explain import cone  # the propagation rules (the bench script measures with them)

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "incremental_flops.py")
_spec = importlib.util.spec_from_file_location("incremental_flops", _PATH)
I = sys.modules.setdefault("incremental_flops", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(I)


# ----------------------------------------------------------------------------- tiny networks
class Chain(nn.Module):
    """Convs of every geometry the models use (3x3, 5x5 stride 2, 1x1 stride 2, depthwise, TF-same
    asymmetric padding by module and by F.pad), a residual add with a strided shortcut, an average pool
    and a head; ``act`` between them (tanh: injective, so every change survives)."""

    def __init__(self, act=torch.tanh, c=4):
        super().__init__()
        self.act = act
        self.c1 = nn.Conv2d(3, c, 3, padding=1)
        self.pad = nn.ZeroPad2d((1, 2, 1, 2))
        self.c2 = nn.Conv2d(c, c, 5, stride=2)  # TF "same": the pad module in front
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.c3 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.short = nn.Conv2d(c, 2 * c, 1, stride=2)
        self.c4 = nn.Conv2d(2 * c, 2 * c, 3)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(2 * c, 5)

    def forward(self, x):
        y = self.act(self.c1(x))
        y = self.act(self.c2(self.pad(y)))
        y = self.act(self.dw(y)) + y
        z = self.act(self.c3(y)) + self.short(y)
        z = self.c4(F.pad(z, (1, 1, 1, 1)))
        z = self.pool(z)
        return self.head(z.mean((2, 3)))


class ReluNet(nn.Module):
    """ReLU, BN, max pool and a dilated conv: the predicted rectangle must contain the changes (a ReLU
    or a max may hide a change, and a dilated window has holes)."""

    def __init__(self, c=4):
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 7, stride=2, padding=3)
        self.bn = nn.BatchNorm2d(c)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.c2 = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.c3 = nn.Conv2d(c, c, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        y = self.pool(torch.relu(self.bn(self.c1(x))))
        y = torch.relu(self.c2(y)) + self.c3(y)
        return self.fc(torch.flatten(self.gap(y), 1))


def _random_rects(h, w, n, rng):
    rects = [(0, 3, 0, 3), (h - 1, h, w - 5, w), (h // 2, h // 2 + 1, w // 2, w // 2 + 1)]
    while len(rects) < n:
        y0, x0 = rng.randrange(h), rng.randrange(w)
        rects.append((y0, rng.randint(y0 + 1, h), x0, rng.randint(x0 + 1, w)))
    return rects


def _random_weights(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    return model.eval().double()


# ----------------------------------------------------------------------------- one axis
def test_conv_axis_is_the_exact_changed_set():
    """Every small geometry: the outputs whose window meets [a, b), enumerated, against the formula
    (exact for dilation 1, the bounding interval otherwise)."""
    for n_in in (1, 5, 8, 11):
        for k in (1, 2, 3, 5, 7):
            for s in (1, 2, 3):
                for p in range(0, k):
                    for d in (1, 2):
                        n_out = (n_in + 2 * p - d * (k - 1) - 1) // s + 1
                        if n_out < 1:
                            continue
                        for a in range(n_in):
                            for b in range(a + 1, n_in + 1):
                                hit = [o for o in range(n_out)
                                       if any(a <= o * s - p + j * d < b for j in range(k))]
                                got = cone.conv_axis(a, b, k, s, p, d, n_out)
                                if not hit:
                                    assert got is None or d > 1, (n_in, k, s, p, d, a, b, got)
                                    continue
                                assert got is not None and got[0] <= hit[0] and hit[-1] < got[1]
                                if d == 1:
                                    assert list(range(*got)) == hit, (n_in, k, s, p, a, b, got, hit)


def test_windows_are_the_occlusion_windows():
    from masked_ops.explain.occlusion import window_cells

    for size, window, stride, count in ((224, 32, 16, 13), (224, 16, 8, 27), (224, 16, 16, 14), (30, 7, 5, 6)):
        ws = I.windows(size, window, stride)
        assert len(ws) == count
        assert window_cells(size, size, window, stride)[1].shape[0] == count * count
        assert ws[0] == (0, window) and ws[-1][1] == size


# ----------------------------------------------------------------------------- brute force
def _check_against_brute_force(model, size, rects, exact_kinds):
    plan = cone.plan_model(model.float(), (size, size))
    assert not plan.unknown
    traced = torch.fx.symbolic_trace(model.double())
    byname = {o.name: o for o in plan.ops}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, dtype=torch.float64, generator=gen)
    checked = exact = 0
    for rect in rects:
        xp = x.clone()
        y0, y1, x0, x1 = rect
        xp[:, :, y0:y1, x0:x1] += torch.randn(1, 3, y1 - y0, x1 - x0, dtype=torch.float64, generator=gen)
        pred = cone.propagate(plan, rect)
        for name, box in I.observed(traced, x, xp).items():
            if name not in pred:
                continue
            assert I.contains(pred[name], box), (rect, name, pred[name], box)
            checked += 1
            if byname[name].kind in exact_kinds:
                assert box == pred[name], (rect, name, pred[name], box)
                exact += 1
    return checked, exact


def test_propagation_is_exact_for_convs_with_random_weights():
    model = _random_weights(Chain())
    checked, exact = _check_against_brute_force(model, 23, _random_rects(23, 23, 8, random.Random(0)),
                                                exact_kinds=("input", "conv", "pad", "pool", "pointwise"))
    assert exact >= 8 * 8 and checked == exact


def test_propagation_contains_every_change_with_relu_pool_and_dilation():
    model = _random_weights(ReluNet())
    checked, exact = _check_against_brute_force(model, 32, _random_rects(32, 32, 8, random.Random(1)),
                                                exact_kinds=())
    assert checked >= 8 * 6


def test_layer_masking_changes_the_same_cone():
    """A window removed by layer masking (the mask, not the pixels) changes exactly the predicted
    rectangle of every masked layer: the mask path has the convs' own geometry."""
    model = _random_weights(Chain(act=torch.relu))
    size = 23
    plan = cone.plan_model(model.float(), (size, size))
    model.double()
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    lm = layer_mask(model)
    n = 0
    for rect in _random_rects(size, size, 6, random.Random(2)):
        pred = cone.propagate(plan, rect)
        seen = I.observed_layer_masked(model, x, rect, lm)
        rows = [(name, box) for name, box in seen.items() if name in pred]
        assert sum(plan.ops[[o.name for o in plan.ops].index(k)].kind == "conv" for k, _ in rows) >= 5
        for name, box in rows:
            assert I.contains(pred[name], box), (rect, name, pred[name], box)
            n += box == pred[name]
    assert n >= 6 * 5


# ----------------------------------------------------------------------------- FLOPs
def test_flops_of_a_plain_conv_by_hand():
    conv = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1))
    plan = cone.plan_model(conv, (32, 32), channels=8)
    assert plan.flops == 16 * 16 * 16 * 8 * 3 * 3 * 2  # out 16 x 16, C_out 16, C_in 8, 3 x 3, x 2
    dw = nn.Sequential(nn.Conv2d(8, 8, 5, padding=2, groups=8))
    assert cone.plan_model(dw, (10, 10), channels=8).flops == 10 * 10 * 8 * 1 * 5 * 5 * 2
    # incremental: input rows 2-3, columns 3-4 changed -> 3x3 stride 1 pad 1 outputs rows 1-4, columns 2-5
    plain = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    plan = cone.plan_model(plain, (10, 10), channels=4)
    reg = cone.propagate(plan, (2, 4, 3, 5))
    conv_op = next(o for o in plan.ops if o.kind == "conv")
    assert reg[conv_op.name] == (1, 5, 2, 6)
    assert sum(I.op_costs(plan, reg)[0]) == 4 * 4 * 6 * 4 * 9 * 2


@pytest.mark.parametrize("make", [Chain, ReluNet])
def test_flops_match_torch_flop_counter(make):
    model = make().eval()
    plan = cone.plan_model(model, (32, 32))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert plan.flops == fc.get_total_flops()


def test_analyse_and_script(tmp_path):
    """The whole-window analysis (a full window changes everything: ratio 1) and the script end to end
    on a small torchvision model."""
    model = _random_weights(ReluNet()).float()
    a = I.analyse(cone.plan_model(model, (32, 32)), 32, 32)
    assert a["positions"] == 1 and math.isclose(a["ratio"], 1.0)
    a = I.analyse(cone.plan_model(model, (32, 32)), 4, 4)
    assert a["positions"] == 64 and a["ratio"] > 1 and a["ratio_batched"] <= a["ratio"]
    assert a["min_incremental_flops"] <= a["mean_incremental_flops"] <= a["max_incremental_flops"]
    out = tmp_path / "r.json"
    assert I.main(["--models", "resnet18", "--windows", "112/112", "--no-removal", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    r = doc["models"]["resnet18"]
    assert r["full_flops"] == pytest.approx(3.64e9, rel=0.01) and not r["unknown_ops"]
    assert r["windows"]["112/112"]["positions"] == 4 and "decision" in doc
