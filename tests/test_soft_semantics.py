"""The soft semantics of a converted model (masks.SOFT_SEMANTICS): what each forward and backward is.

Independent expectations: the hard model at a 0/1 mask computed here (threshold, the draw of "sample"
recomputed from the same seed), and the blend model's gradient at that 0/1 mask (straight-through).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import masked_ops as mo
from masked_ops import masks as M

D = torch.float64


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv2d(5, 5, 3, stride=2, padding=1)
        self.c = nn.Conv2d(5, 5, 3, padding=1)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        y = F.relu(self.b(F.relu(self.a(x))))
        y = y + F.relu(self.c(y))
        return self.head(y.mean((2, 3)))


def _net():
    torch.manual_seed(0)
    return _Net().to(D).eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 12, 12, generator=g, dtype=D)
    m = torch.rand(2, 1, 12, 12, generator=g, dtype=D)
    return x, m


def test_soft_true_is_the_documented_default():
    assert M.check_soft(True) == M.DEFAULT_SOFT in M.SOFT_SEMANTICS
    assert mo.layer_mask(_net(), soft=True).soft_semantics == M.DEFAULT_SOFT
    assert mo.layer_mask(_net(), soft="blend").soft_semantics == "blend"
    assert mo.layer_mask(_net()).soft_semantics is None
    assert "soft='sample'" in mo.layer_mask(_net(), soft="sample").summary()


def test_threshold_forward_is_the_hard_model_at_half_and_its_gradient_the_blends_there(monkeypatch):
    net = _net()
    x, m = _inputs()
    hard_mask = (m >= 0.5).to(D)
    mg = m.clone().requires_grad_()
    out = mo.layer_mask(net, soft="threshold")(x, mg)
    assert torch.equal(out, mo.layer_mask(net)(x, hard_mask))
    (g,) = torch.autograd.grad(out.square().sum(), mg)
    hg = hard_mask.clone().requires_grad_()
    # The floor (values below 1e-6 count as 0, with no gradient) acts on the input mask m, before the
    # threshold; the reference takes the layers' gradient at the 0/1 mask itself, so it goes without.
    monkeypatch.setattr(M, "soft_floor", lambda v: v)
    (expected,) = torch.autograd.grad(mo.layer_mask(net, soft="blend")(x, hg).square().sum(), hg)
    torch.testing.assert_close(g, expected, rtol=0, atol=0)
    assert (g != 0).float().mean() > 0.5  # the straight-through gradient is not degenerate


def test_sample_forward_is_the_hard_model_at_a_fresh_bernoulli_draw():
    net = _net()
    x, m = _inputs(1)
    lm = mo.layer_mask(net, soft="sample")
    torch.manual_seed(5)
    out = lm(x, m)
    torch.manual_seed(5)
    drawn = (torch.rand_like(m) < m).to(D)
    assert torch.equal(out, mo.layer_mask(net)(x, drawn))
    # a new draw per forward: two calls differ, and the draws are Bernoulli(m) on average
    assert not torch.equal(lm(x, m), lm(x, m))
    torch.manual_seed(0)
    mean = torch.stack([M.straight_through(m, "sample") for _ in range(400)]).mean(0)
    assert (mean - m).abs().max() < 0.1


def test_the_straight_through_mask_is_exactly_0_or_1_with_the_identity_gradient():
    m = torch.tensor([0.0, 1e-3, 0.4999, 0.5, 0.73, 1.0], dtype=torch.float32, requires_grad=True)
    st = M.straight_through(m, "threshold")
    assert st.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    (g,) = torch.autograd.grad((st * torch.arange(6.0)).sum(), m)
    assert g.tolist() == list(range(6))
    with pytest.raises(ValueError, match="semantics must be one of"):
        M.straight_through(m, "blend")


@pytest.mark.parametrize("semantics", M.SOFT_SEMANTICS)
def test_every_semantics_is_pickled_and_copied_with_the_model(semantics):
    import copy
    import pickle

    lm = mo.layer_mask(_net(), soft=semantics)
    for other in (copy.deepcopy(lm), pickle.loads(pickle.dumps(lm))):
        assert other.soft_semantics == semantics
        x, m = _inputs(2)
        torch.manual_seed(0)
        a = lm(x, m)
        torch.manual_seed(0)
        assert torch.equal(other(x, m), a)


def test_layer_strategies_carry_the_semantics():
    from masked_ops.explain import get_strategy

    assert get_strategy("layer", _net(), soft=True).soft == M.DEFAULT_SOFT
    s = get_strategy("layer", _net(), soft="blend")
    assert s.soft == "blend" and s.masked_model.soft_semantics == "blend"
    assert get_strategy("layer", _net()).soft is False
