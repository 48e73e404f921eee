"""Constructs of modern CNNs that layer_mask converts (issue 24), each against an independent expectation.

- Channel splits, chunks, narrows and slices (Res2Net, CSPNet, GhostNet, DPN, ReXNet...): each piece keeps
  its pixels where they are, so it carries the input's mask unchanged; the masked model equals the same
  model built from masked convs by hand. Spatial splits would cut the mask apart: refused, naming the node.
- In-place changes read again afterwards (NFNet's ``out.mul_(gain)``): rewritten out of place with the
  later reads redirected; refused when a view taken before would see the change.
- Weight-standardised convs (timm's StdConv2d family): the module's own weight formula, folded once.
- Nearest upsampling by integer factors (HRNet): pixels and their mask copied; other resampling refused.
- ConvNeXt-V2's global response norm over visible pixels; a fresh map plus a Python number (FastViT).
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


def _holds_the_invariants(lm, model, x, m, tol=1e-12):
    """All-ones mask: the model (within ``tol``, float64); NaN in the removed region: finite and inert.
    Returns the converted model's output at ``m``."""
    with torch.no_grad():
        torch.testing.assert_close(lm(x, torch.ones_like(m)), model(x), rtol=tol, atol=tol)
        poisoned = torch.where(m > 0, x, torch.full((), float("nan"), dtype=x.dtype))
        out = lm(poisoned, m)
        assert torch.isfinite(out).all() and torch.equal(out, lm(x, m))
    return out


class _InPlace(nn.Module):
    """timm's NFNet block: ``out.mul_(gain)`` whose result is discarded, then ``out`` read again."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("gain", torch.tensor(2.0))

    def forward(self, x):
        out = self.a(x)
        out.mul_(self.gain)
        return (out + 1).mean((2, 3))


class _InPlaceThroughView(_InPlace):
    """The same change, but a view of ``out`` taken before it is read after it (eager sees the change)."""

    def forward(self, x):
        out = self.a(x)
        view = out[:, :2]
        out.mul_(self.gain)
        return (view + 1).mean((2, 3))


def test_an_in_place_change_read_again_is_applied():
    """``out.mul_(g)`` then ``out + 1``: the later read sees the change, as in eager PyTorch (timm's NFNets)."""
    torch.manual_seed(0)
    model = _InPlace().to(D).eval()
    lm = mo.layer_mask(model)
    x = torch.randn(2, 3, 10, 11, dtype=D)
    m = (torch.rand(2, 1, 10, 11) > 0.4).to(D)
    with torch.no_grad():
        plain = model(x.clone())
        torch.testing.assert_close(lm(x, torch.ones_like(m)), plain, rtol=1e-12, atol=1e-12)
        # the gain is applied: without it the output would be (a(x) + 1).mean, a different number
        assert not torch.allclose(plain, (model.a(x) + 1).mean((2, 3)))
        poisoned = torch.where(m > 0, x, torch.full((), float("nan"), dtype=D))
        assert torch.equal(lm(poisoned, m), lm(x, m)) and torch.isfinite(lm(poisoned, m)).all()


def test_an_in_place_change_seen_through_a_view_is_refused_not_silently_skipped():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"changes 'a' in place, and 'getitem' read\(s\) it afterwards"):
        mo.layer_mask(_InPlaceThroughView().eval())


def test_weight_standardised_convs_use_the_modules_own_weight():
    pytest.importorskip("timm")
    from timm.layers import ScaledStdConv2dSame, StdConv2d

    torch.manual_seed(0)
    x = torch.randn(2, 3, 13, 14, dtype=D)
    m = (torch.rand(2, 1, 13, 14) > 0.3).to(D)
    for conv in (StdConv2d(3, 5, 3, padding=1), ScaledStdConv2dSame(3, 5, 3, stride=2)):
        conv = conv.to(D).eval()
        lm = mo.layer_mask(conv)
        torch.testing.assert_close(lm(x, torch.ones_like(m)), conv(x), rtol=1e-12, atol=1e-12)
        assert "standardised weight" in lm.summary()
        poisoned = torch.where(m > 0, x, torch.full((), float("nan"), dtype=D))
        assert torch.equal(lm(poisoned, m), lm(x, m)) and torch.isfinite(lm(poisoned, m)).all()


class _Up(nn.Module):
    def __init__(self, up):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.up = up

    def forward(self, x):
        return self.b(x) + self.up(self.a(x))


@pytest.mark.parametrize("up", [nn.Upsample(scale_factor=2, mode="nearest"),
                                lambda y: F.interpolate(y, scale_factor=2.0)], ids=["module", "function"])
def test_nearest_upsampling_copies_pixels_and_their_mask(up):
    torch.manual_seed(0)
    net = _Up(up).to(D).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 12, 10, generator=g, dtype=D)
    m = (torch.rand(2, 1, 12, 10, generator=g) > 0.5).to(D)
    lm = mo.layer_mask(net)
    ya, ka = mo.masked_conv2d(x, m, net.a.weight, net.a.bias, stride=2, padding=1)
    yb, kb = mo.masked_conv2d(x, m, net.b.weight, net.b.bias, padding=1)
    up_y = ya.repeat_interleave(2, 2).repeat_interleave(2, 3)
    up_k = ka.repeat_interleave(2, 2).repeat_interleave(2, 3)
    want = torch.where((kb * up_k) > 0, yb + up_y, torch.zeros((), dtype=D))
    torch.testing.assert_close(lm(x, m), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lm(x, torch.ones_like(m)), net(x), rtol=1e-12, atol=1e-12)
    soft = (torch.rand(2, 1, 12, 10, generator=g, dtype=D) * 0.9 + 0.05).requires_grad_()
    (grad,) = torch.autograd.grad(mo.layer_mask(net, soft=True)(x, soft).sum(), soft)
    assert torch.isfinite(grad).all() and (grad != 0).any()


@pytest.mark.parametrize("up,words", [(nn.Upsample(scale_factor=2, mode="bicubic"), "only 'nearest' and 'bilinear'"),
                                      (nn.Upsample(size=(12, 10)), "give scale_factor"),
                                      (nn.Upsample(scale_factor=1.5), "only integer factors")])
def test_other_resampling_is_refused_naming_the_node(up, words):
    with pytest.raises(ValueError, match=words):
        mo.layer_mask(_Up(up).eval())


class _PlusOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.a(x) + 1  # a fresh conv output and a Python number (FastViT)


def test_adding_a_python_number_to_a_fresh_map():
    """The in-place add (written into a fresh conv output nobody else reads) assumed two tensors: with a
    Python number it raised AttributeError at run time."""
    torch.manual_seed(0)
    net = _PlusOne().to(D).eval()
    x = torch.randn(1, 3, 6, 7, dtype=D)
    m = (torch.rand(1, 1, 6, 7) > 0.4).to(D)
    y, k = mo.masked_conv2d(x, m, net.a.weight, net.a.bias, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(mo.layer_mask(net)(x, m), torch.where(k > 0, y + 1, torch.zeros((), dtype=D)))


def test_global_response_norm_uses_visible_pixels_only():
    """ConvNeXt-V2's GRN, with non-zero weight and bias (timm initialises both to 0, where GRN is the
    identity and a zoo test could not see it), against the formula over visible pixels written here."""
    pytest.importorskip("timm")
    from timm.layers.grn import GlobalResponseNorm

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3, padding=1)
            self.grn = GlobalResponseNorm(6, channels_last=True)

        def forward(self, x):
            return self.grn(self.a(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    torch.manual_seed(0)
    net = Net().to(D).eval()
    with torch.no_grad():
        net.grn.weight.uniform_(-1, 1)
        net.grn.bias.uniform_(-1, 1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=D)
    m = (torch.rand(2, 1, 9, 8, generator=g) > 0.5).to(D)
    y, k = mo.masked_conv2d(x, m, net.a.weight, net.a.bias, padding=1)
    vis = k > 0
    norm = torch.sqrt((torch.where(vis, y, torch.zeros((), dtype=D)) ** 2).sum((2, 3), keepdim=True))
    n = norm / (norm.mean(1, keepdim=True) + net.grn.eps)
    want = y + net.grn.bias.view(1, -1, 1, 1) + net.grn.weight.view(1, -1, 1, 1) * y * n
    want = torch.where(vis, want, torch.zeros((), dtype=D))
    lm = mo.layer_mask(net)
    torch.testing.assert_close(lm(x, m), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lm(x, torch.ones_like(m)), net(x), rtol=1e-12, atol=1e-12)
    poisoned = torch.where(m > 0, x, torch.full((), float("inf"), dtype=D))
    assert torch.equal(lm(poisoned, m), lm(x, m))


def test_an_eval_batchnorm_with_an_activation_the_kernels_lack_runs_per_pixel():
    """timm's BatchNormAct2d with timm's own GELU class (EfficientFormerV2's stem) was refused as "cannot be
    fused" (the kernels' activation table knows nn.GELU, not it); in
    eval mode it is a per-pixel function, so it runs as it is, removed pixels selected away."""
    pytest.importorskip("timm")
    from timm.layers.activations import GELU
    from timm.layers.norm_act import BatchNormAct2d

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4, act_layer=GELU)).to(D).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 1.5)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 7, 6, dtype=D)
    m = (torch.rand(2, 1, 7, 6) > 0.4).to(D)
    lm = mo.layer_mask(net)
    y, k = mo.masked_conv2d(x, m, net[0].weight, net[0].bias, padding=1)
    with torch.no_grad():
        want = torch.where(k > 0, net[1](y), torch.zeros((), dtype=D))
        torch.testing.assert_close(lm(x, m), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lm(x, torch.ones_like(m)), net(x), rtol=1e-12, atol=1e-12)
    assert "BatchNormAct2d (eval, GELU)" in lm.summary()


class _Shuffle(nn.Module):
    """ShuffleNet's channel shuffle, sizes read from the map at run time, between two convs."""

    def __init__(self, groups=2, per_group=False):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
        self.groups, self.per_group = groups, per_group

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.size()
        if self.per_group:  # the other spelling: C/G channels per group given as the constant
            x = x.view(n, c // self.groups, self.groups, h, w)
        else:
            x = x.view(n, self.groups, c // self.groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous().relu()
        return self.b(x.view(n, -1, h, w))


@pytest.mark.parametrize("per_group", [False, True])
def test_channel_shuffle_passes_the_mask_through(per_group):
    torch.manual_seed(0)
    model = _Shuffle(3, per_group).to(D).eval()
    lm = mo.layer_mask(model)
    x = torch.randn(2, 3, 9, 10, dtype=D)
    m = (torch.rand(2, 1, 9, 10) > 0.4).to(D)
    _holds_the_invariants(lm, model, x, m)
    summary = lm.summary()
    assert "split channels into 3" in summary and "swap the channel group dims" in summary
    assert "merge channel groups" in summary


class _SpatialView(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        return x.view(n, c, h * w).mean(-1)  # merges the spatial dims: the mask cannot follow


def test_a_reshape_that_moves_pixels_is_refused():
    with pytest.raises(ValueError, match="only the flatten head view\\(N, -1\\) and channel groups"):
        mo.layer_mask(_SpatialView().eval())


def test_reflect_padded_blur_pool_never_copies_a_removed_pixel_into_the_border():
    """timm's BlurPool2d (DenseNet-blur, TResNet): reflect padding, then a fixed depthwise filter, stride 2."""
    pytest.importorskip("timm")
    from timm.layers import BlurPool2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BlurPool2d(4, filt_size=3, stride=2)).to(D).eval()
    lm = mo.layer_mask(model)
    x = torch.randn(2, 3, 11, 12, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(lm(x, torch.ones(2, 1, 11, 12, dtype=D)), model(x), rtol=1e-12, atol=1e-12)
        # column 1 is what reflect padding copies into column -1: removed there, it must not reach any
        # output (NaN there is inert), and the border output that reads only removed pixels is removed too
        m = torch.ones(2, 1, 11, 12, dtype=D)
        m[:, :, :, 0:3] = 0
        poisoned = x.clone()
        poisoned[:, :, :, 0:3] = float("nan")
        out = lm(poisoned, m)
        assert torch.isfinite(out).all() and torch.equal(out, lm(x, m))
    assert "reflect pad (1, 1, 1, 1)" in lm.summary()


def test_space_to_depth_keeps_a_block_only_when_all_of_it_is_visible():
    pytest.importorskip("timm")
    from timm.layers.space_to_depth import SpaceToDepth

    torch.manual_seed(0)
    model = nn.Sequential(SpaceToDepth(4), nn.Conv2d(48, 5, 1)).to(D).eval()
    lm = mo.layer_mask(model)
    x = torch.randn(1, 3, 16, 16, dtype=D)
    m = torch.ones(1, 1, 16, 16, dtype=D)
    m[:, :, 5, 6] = 0  # one pixel of block (1, 1)
    out = _holds_the_invariants(lm, model, x, m)
    with torch.no_grad():
        # the block holding the removed pixel is removed (0) at the output; the others are the module's
        plain = model(x)
        assert torch.equal(out[:, :, 1, 1], torch.zeros_like(out[:, :, 1, 1]))
        keep = torch.ones(4, 4, dtype=torch.bool)
        keep[1, 1] = False
        torch.testing.assert_close(out[:, :, keep], plain[:, :, keep], rtol=1e-12, atol=1e-12)


class _UpBilinear(nn.Module):
    def __init__(self, align_corners, functional):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align_corners)
        self.align_corners, self.functional = align_corners, functional

    def forward(self, x):
        x = self.a(x)
        if self.functional:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=self.align_corners)
        else:
            x = self.up(x)
        return self.b(x)


@pytest.mark.parametrize("align_corners,functional", [(False, False), (True, True), (False, True)])
def test_bilinear_upsampling_reads_visible_pixels_only(align_corners, functional):
    torch.manual_seed(0)
    model = _UpBilinear(align_corners, functional).to(D).eval()
    lm = mo.layer_mask(model)
    x = torch.randn(2, 3, 7, 9, dtype=D)
    m = (torch.rand(2, 1, 7, 9) > 0.4).to(D)
    with torch.no_grad():
        torch.testing.assert_close(lm(x, torch.ones_like(m)), model(x), rtol=0, atol=0)  # bit for bit
        poisoned = torch.where(m > 0, x, torch.full((), float("nan"), dtype=D))
        out = lm(poisoned, m)
        assert torch.isfinite(out).all() and torch.equal(out, lm(x, m))
    assert "bilinear upsampling x2x2" in lm.summary()
    soft = (torch.rand(2, 1, 7, 9, dtype=D) * 0.9 + 0.05).requires_grad_()
    (grad,) = torch.autograd.grad(mo.layer_mask(model, soft=True)(x, soft).sum(), soft)
    assert torch.isfinite(grad).all() and (grad != 0).any()


def test_bilinear_upsampling_renormalises_over_the_visible_contributors():
    """By hand, align_corners=True on 2 x 2 -> 4 x 4: output (1, 1) sits at (1/3, 1/3) and weighs a, b, c, d by
    4/9, 2/9, 2/9, 1/9; with b removed it is (4a + 2c + d) / 7; (0, 1) and (0, 2) read only a and b: a."""
    layer = mo.nn.MaskedUpsampleBilinear((2, 2), align_corners=True)
    a, c, d = 1.0, 100.0, 1000.0  # (b, removed, never enters)
    x = torch.tensor([[[[a, 0.0], [c, d]]]], dtype=D)  # b removed: its value is 0 (the activation invariant)
    m = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]], dtype=D)
    out = layer(x, *mo.masks.bilinear_weights(m, (2, 2), True), mo.masks.upsample_bilinear(m, (2, 2), True))
    torch.testing.assert_close(out[0, 0, 1, 1], torch.tensor((4 * a + 2 * c + d) / 7, dtype=D))
    torch.testing.assert_close(out[0, 0, 0, 1:3], torch.tensor([a, a], dtype=D))
    # the removed corner reads only b: removed
    assert out[0, 0, 0, 3] == 0
    from masked_ops import masks as M

    keep = M.upsample_bilinear(m, (2, 2), True)
    assert keep[0, 0, 0, 3] == 0 and keep[0, 0, 0, 2] == 1 and keep.sum() == 15


class _SelectiveKernel(nn.Module):
    """SKNet's selection, written out: two branches with different masks (dilation 1 and 2), stacked,
    weighted by a softmax over branches computed from their masked global mean, and summed."""

    def __init__(self):
        super().__init__()
        self.p1 = nn.Conv2d(3, 4, 3, padding=1)
        self.p2 = nn.Conv2d(3, 4, 3, padding=2, dilation=2, stride=1)
        self.fc = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        paths = torch.stack([self.p1(x).relu(), self.p2(x).relu()], dim=1)  # N x 2 x 4 x H x W
        attn = self.fc(paths.sum(1).mean((2, 3), keepdim=True))
        attn = torch.softmax(attn.view(attn.shape[0], 2, 4, 1, 1), dim=1)
        return torch.sum(paths * attn, dim=1)


def test_stacked_branches_share_the_intersection_of_their_masks():
    torch.manual_seed(0)
    model = _SelectiveKernel().to(D).eval()
    lm = mo.layer_mask(model)
    x = torch.randn(2, 3, 12, 13, dtype=D)
    m = torch.ones(2, 1, 12, 13, dtype=D)
    m[:, :, 4:8, 4:9] = 0
    out = _holds_the_invariants(lm, model, x, m)
    with torch.no_grad():
        # the dilated branch keeps a smaller region than the plain one (its window reaches 2 px): the
        # output is removed wherever either branch is, i.e. where the dilated branch sees only removed pixels
        from masked_ops import masks as M

        k1 = M.conv_keep(m, (3, 3), (1, 1), (1, 1), (1, 1))
        k2 = M.conv_keep(m, (3, 3), (1, 1), (2, 2), (2, 2))
        assert not torch.equal(k1, k2)
        removed = (torch.minimum(k1, k2) == 0).expand_as(out)
        assert removed.any() and (out[removed] == 0).all()
    assert "stack (2 inputs along dim 1, mask: intersection)" in lm.summary()


def test_sums_other_than_over_stacked_branches_are_refused():
    class _SpatialSum(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.a(x).sum((2, 3))

    with pytest.raises(ValueError, match="a spatial sum would count removed pixels"):
        mo.layer_mask(_SpatialSum().eval())


@pytest.mark.parametrize("side", [5, 9])  # below the head's kernel (its pooling branch) and above it
def test_vgg_head_takes_its_size_branch_at_run_time(side):
    pytest.importorskip("timm")
    from timm.models.vgg import ConvMlp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ConvMlp(8, 6, kernel_size=7, drop_rate=0.0)).to(D).eval()
    lm = mo.layer_mask(model)
    x = torch.randn(2, 3, side, side + 1, dtype=D)
    m = (torch.rand(2, 1, side, side + 1) > 0.3).to(D)
    out = _holds_the_invariants(lm, model, x, m)
    with torch.no_grad():
        assert not torch.allclose(out, model(x))  # the mask acts
        torch.testing.assert_close(mo.layer_mask(model, soft=True)(x * m, m), out, rtol=1e-12, atol=1e-12)
    assert "VGG head" in lm.summary()


def test_global_context_pools_over_visible_pixels_only():
    """GCNet's attention pooling: the softmax runs over visible positions, by hand on one image."""
    pytest.importorskip("timm")
    from timm.layers.global_context import GlobalContext

    torch.manual_seed(0)
    gc = GlobalContext(4, rd_channels=2).to(D).eval()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), gc).to(D).eval()
    lm = mo.layer_mask(model)
    x = torch.randn(1, 3, 6, 7, dtype=D)
    m = (torch.rand(1, 1, 6, 7) > 0.4).to(D)
    with torch.no_grad():
        torch.testing.assert_close(lm(x, torch.ones_like(m)), model(x), rtol=0, atol=0)  # the module's bits
        poisoned = torch.where(m > 0, x, torch.full((), float("nan"), dtype=D))
        out = lm(poisoned, m)
        assert torch.isfinite(out).all() and torch.equal(out, lm(x, m))
        # by hand: the masked conv's output at its visible pixels, the softmax of the attention logits over them
        keep = mo.masks.conv_keep(m, (3, 3), (1, 1), (1, 1), (1, 1))[0, 0] > 0  # the conv's output mask
        lm_first = mo.layer_mask(model[0])(x, m)[0]
        vis = keep.reshape(-1)
        feats = lm_first.reshape(4, -1)[:, vis]              # C x V, the masked conv's visible outputs
        logits = gc.conv_attn(lm_first[None])[0, 0].reshape(-1)[vis]
        context = feats @ torch.softmax(logits, 0)           # C
        want = lm_first * gc.gate(gc.mlp_scale(context.view(1, 4, 1, 1)))[0]
        want = torch.where(keep, want, torch.zeros((), dtype=D))
        torch.testing.assert_close(out[0], want, rtol=1e-12, atol=1e-12)
    assert "global context" in lm.summary()


class _EveryNewConstruct(nn.Module):
    """The constructs of issue 24 in one small model, for the compile check."""

    def __init__(self):
        super().__init__()
        from timm.layers import BlurPool2d
        from timm.layers.global_context import GlobalContext
        from timm.layers.space_to_depth import SpaceToDepth
        from timm.models.vgg import ConvMlp

        self.s2d = SpaceToDepth(4)
        self.a = nn.Conv2d(48, 8, 3, padding=1)
        self.blur = BlurPool2d(8, filt_size=3, stride=2)
        self.p1, self.p2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.gc = GlobalContext(8, rd_channels=4)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.head = ConvMlp(8, 5, kernel_size=3, drop_rate=0.0)

    def forward(self, x):
        x = self.blur(self.a(self.s2d(x)))
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)  # channel shuffle
        x = torch.stack([self.p1(x), self.p2(x)], dim=1).sum(1)
        x = self.up(self.gc(x))
        return self.head(x).mean((2, 3))


def test_the_new_constructs_compile_without_a_graph_break():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _EveryNewConstruct().to(D).eval()
    lm = mo.layer_mask(model)
    x = torch.randn(2, 3, 32, 32, dtype=D)
    m = (torch.rand(2, 1, 32, 32) > 0.3).to(D)
    with torch.no_grad():
        torch.testing.assert_close(lm(x, torch.ones_like(m)), model(x), rtol=1e-12, atol=1e-12)
        torch._dynamo.reset()
        compiled = torch.compile(lm, backend="eager", fullgraph=True)  # a graph break raises
        torch.testing.assert_close(compiled(x, m), lm(x, m), rtol=1e-12, atol=1e-12)


class _Shuffles(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(2, 4, 3, padding=1)
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x):
        y = F.pixel_shuffle(self.shuffle(self.a(x)), 2)        # depth-to-space: 8 -> 2 channels, 2x larger
        return F.pixel_unshuffle(self.b(y), 2).mean((2, 3))    # space-to-depth back


def test_depth_to_space_and_space_to_depth():
    torch.manual_seed(0)
    model = _Shuffles().to(D).eval()
    lm = mo.layer_mask(model)
    x = torch.randn(2, 3, 8, 9, dtype=D)
    m = (torch.rand(2, 1, 8, 9) > 0.4).to(D)
    _holds_the_invariants(lm, model, x, m)
    # depth-to-space: an output pixel is visible exactly where the input pixel it copies is
    ps = mo.layer_mask(nn.Sequential(nn.Conv2d(3, 8, 1), nn.PixelShuffle(2)).to(D).eval())
    y = ps(x, m)
    up = m.repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.equal((y.abs().sum(1, keepdim=True) > 0).to(D) <= up, torch.ones_like(up, dtype=torch.bool))
    summary = lm.summary()
    assert "pixel shuffle x2" in summary and "space to depth 2x2" in summary and "channel shuffle" in summary
