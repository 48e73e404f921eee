"""Channel splits, chunks, narrows and slices of a masked map (Res2Net, CSPNet, GhostNet, DPN, ReXNet...).

Each piece keeps its pixels where they are, so it carries the input's mask unchanged; the expectation is
written independently: the masked model equals the same model built from masked convs by hand, on the
same pieces. Splits along a spatial dim would cut the mask apart: refused, naming the node.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import masked_ops as mo

D = torch.float64


class _Split(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.a(x))
        if self.how == "split":
            p, q = torch.split(y, [4, 4], dim=1)
        elif self.how == "chunk":
            p, q = y.chunk(2, 1)
        elif self.how == "narrow":
            p, q = y.narrow(1, 0, 4), torch.narrow(y, 1, 4, 4)
        else:  # slices
            p, q = y[:, :4], y[:, 4:, ...]
        return torch.cat([self.b(p), q], 1)


def _net(how):
    torch.manual_seed(0)
    return _Split(how).to(D).eval()


@pytest.mark.parametrize("how", ["split", "chunk", "narrow", "slice"])
def test_pieces_carry_the_input_mask(how):
    net = _net(how)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, 11, generator=g, dtype=D)
    m = (torch.rand(2, 1, 10, 11, generator=g) > 0.4).to(D)
    lm = mo.layer_mask(net)
    # by hand: the masked convs on the same pieces
    y, k = mo.masked_conv2d(x, m, net.a.weight, net.a.bias, padding=1, activation="relu")
    z, k2 = mo.masked_conv2d(y[:, :4], k, net.b.weight, net.b.bias, padding=1)
    want = torch.cat([z, y[:, 4:]], 1)
    torch.testing.assert_close(lm(x, m), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lm(x, torch.ones_like(m)), net(x), rtol=1e-12, atol=1e-12)
    poisoned = torch.where(m > 0, x, torch.full((), float("nan"), dtype=D))
    assert torch.equal(lm(poisoned, m), lm(x, m))
    assert "of channels" in lm.summary() or "channels slice" in lm.summary()


class _Bad(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        if self.how == "split-h":
            return torch.split(y, 5, dim=2)[0].mean((2, 3))
        if self.how == "slice-w":
            return y[:, :, :, 2:].mean((2, 3))
        return y[:, 1].mean((1, 2))  # an int drops the channel dim


@pytest.mark.parametrize("how,words", [("split-h", "along dim 2; only its channel dim"),
                                       ("slice-w", "only a slice of its channels"),
                                       ("int", "only a slice of its channels")])
def test_spatial_splits_and_slices_are_refused_naming_the_node(how, words):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=words):
        mo.layer_mask(_Bad(how).eval())
