"""Rule-level tests of layer_mask: each layer type against an independent transcription.

Small float64 models; the expected values come from the public ops on the pure-PyTorch
backend or from explicit per-pixel loops, never from the converter itself.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import masked_ops as mo
from masked_ops.convert import TraceError
from masked_ops.nn import MaskedBinary, MaskedPointwise

D = torch.float64


def _data(n=2, c=4, h=12, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=D)
    mask = torch.rand(n, 1, h, w, generator=g) > 0.4
    return x, mask


def _nan_outside(x, mask):
    return torch.where(mask, x, torch.full_like(x, float("nan")))


def _rand_bn(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c).to(D).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=D) * 0.3)
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=D) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g, dtype=D) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g, dtype=D) * 0.3)
    return bn


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def _torch_backend():
    with mo.set_backend("torch"), torch.no_grad():
        yield


# ----------------------------------------------------------------------------- conv family
@pytest.mark.parametrize("mode", ["fill", "renorm", "zero"])
@pytest.mark.parametrize("geom", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=3, padding=2, dilation=2), dict(kernel_size=1),
                                  dict(kernel_size=5, padding=2, groups=2)])
def test_conv_bn_relu_is_folded_and_matches_ops(mode, geom):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **geom).to(D)
    bn = _rand_bn(6)
    model = nn.Sequential(conv, bn, nn.ReLU()).eval()
    x, mask = _data()
    y, m2 = mo.masked_conv2d(x, mask, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                             conv.groups, mode=mode)
    expected, _ = mo.masked_batch_norm_act(y, m2, bn, "relu")
    lm = mo.layer_mask(model, mode=mode)
    _close(lm(_nan_outside(x, mask), mask), expected)
    assert "fused into" in lm.summary() and "bn(folded)" in lm.summary()


def test_zero_pad_before_conv_behaves_like_conv_padding():
    torch.manual_seed(0)
    conv_p = nn.Conv2d(4, 5, 3, padding=1).to(D)
    conv_0 = nn.Conv2d(4, 5, 3, padding=0).to(D)
    conv_0.load_state_dict(conv_p.state_dict())
    x, mask = _data()
    a = mo.layer_mask(nn.Sequential(nn.ZeroPad2d(1), conv_0))(x, mask)
    b = mo.layer_mask(conv_p)(x, mask)
    _close(a, b)


def test_asymmetric_same_padding_is_never_filled():
    """TF 'same' (pad right/bottom only) before a stride-2 conv: fill, then pad with zeros, then conv."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, stride=2).to(D)

    class TFSame(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(F.pad(x, (0, 1, 0, 1)))

    x, mask = _data()
    m = mask.to(D)
    from masked_ops.backends import reference as ref
    filled = ref.neighbor_fill(torch.where(mask, x, 0.0), m, 2)
    y = F.conv2d(F.pad(filled, (0, 1, 0, 1)), conv.weight, conv.bias, 2)
    keep = F.max_pool2d(F.pad(m, (0, 1, 0, 1)), 3, 2)
    expected = torch.where(keep > 0, y, 0.0)
    _close(mo.layer_mask(TFSame())(_nan_outside(x, mask), mask), expected)


class _SharedAndOwned(nn.Module):
    """a reads the input; b is the sole reader of a+bn+relu; c and d share b's output; e reads an add."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = _rand_bn(6).float()
        self.relu = nn.ReLU()
        self.b = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.d = nn.Conv2d(6, 6, 5, padding=2)
        self.e = nn.Conv2d(6, 6, 3, stride=2)

    def forward(self, x):
        y = self.b(self.relu(self.bn(self.a(x))))
        return self.e(F.pad(self.c(y) + self.d(y), (0, 1, 0, 1)))


def _without_in_place(lm):
    for layer in lm.layers.values():
        if getattr(layer, "fill_in_place", False):
            layer.fill_in_place = False


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype,fmt", [(torch.float64, torch.contiguous_format), (torch.float32, torch.channels_last)])
def test_in_place_fill_only_for_sole_readers_and_identical_results(backend, dtype, fmt):
    """Only b and e may fill their inputs in place: b's is a fresh activation nobody else reads, e's
    the add's fresh sum, filled before its explicit pad; a's input is the model's, c and d share
    theirs. The add writes its sum into c's output (fresh, read by the add alone). The in-place fills
    and the in-place add give bit-identical results to the copying ones (e's copying fill writes into
    its padded copy)."""
    if not mo.backends.available(backend):
        pytest.skip(f"backend {backend} not built")
    torch.manual_seed(0)
    model = _SharedAndOwned().to(dtype).eval()
    x, mask = _data(c=4, h=15, w=13)
    x = _nan_outside(x.to(dtype), mask).contiguous(memory_format=fmt)
    with mo.set_backend(backend):
        lm = mo.layer_mask(model.to(memory_format=fmt))
        marked = {name for name, layer in lm.layers.items() if getattr(layer, "fill_in_place", False)}
        assert marked == {"b", "e"}
        assert "fills its input in place" in lm.rules_used()["b"]
        assert [layer.add_into for layer in lm.layers.values() if isinstance(layer, MaskedBinary)] == [0]
        x_before = x.clone()
        fast = lm(x, mask)
        _without_in_place(lm)
        with torch.enable_grad():  # a copying fill everywhere: autograd needs x, so nothing is in place
            slow = lm(x.detach().requires_grad_(), mask)
    assert torch.equal(x.isnan(), x_before.isnan()) and torch.equal(x.nan_to_num(), x_before.nan_to_num())
    assert torch.equal(fast, slow.detach())


class _Shortcut(nn.Module):
    """A residual block: the shortcut y is read twice (by conv b and by the add), b's output once."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.a(x))
        return F.relu(y + self.b(y))


def test_residual_add_writes_into_the_branch_nobody_else_reads():
    """The add writes into b's output (its second input), never into the shortcut that b also reads;
    the result equals the pure-PyTorch backend's, which computes every add out of place."""
    torch.manual_seed(0)
    lm = mo.layer_mask(_Shortcut().eval())
    assert [layer.add_into for layer in lm.layers.values() if isinstance(layer, MaskedBinary)] == [1]
    x, mask = _data(c=3, h=15, w=13)
    x = _nan_outside(x, mask)
    with mo.set_backend("torch"):
        lm_torch = mo.layer_mask(_Shortcut().eval())
        lm_torch.load_state_dict(lm.state_dict())
        for layer in lm_torch.layers.values():
            if isinstance(layer, MaskedBinary):
                layer.add_into = None
        expected = lm_torch(x, mask)
    _close(lm(x, mask), expected)


def test_in_place_fill_is_skipped_under_autograd():
    """With autograd recording, the fills copy (in-place writes would break the backward)."""
    torch.manual_seed(0)
    model = _SharedAndOwned().double().eval()
    x, mask = _data(c=4, h=15, w=13)
    lm = mo.layer_mask(model)
    with torch.enable_grad():
        xg = x.clone().requires_grad_()
        out = lm(xg, mask)
        out.square().sum().backward()
    assert torch.equal(out.detach(), lm(x, mask))
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_reflect_padding_conv_is_refused():
    conv = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode"):
        mo.layer_mask(conv)


# ----------------------------------------------------------------------------- activations
@pytest.mark.parametrize("act,name", [(nn.ReLU(), "relu"), (nn.ReLU6(), "relu6"), (nn.LeakyReLU(), "leaky_relu"),
                                      (nn.SiLU(), "silu"), (nn.Hardswish(), "hardswish"),
                                      (nn.Hardsigmoid(), "hardsigmoid"), (nn.Sigmoid(), "sigmoid"),
                                      (nn.GELU(), "gelu"), (nn.Tanh(), "tanh")])
def test_activation_modules_fused_into_conv(act, name):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1).to(D)
    x, mask = _data()
    expected, _ = mo.masked_conv2d(x, mask, conv.weight, conv.bias, 1, 1, activation=name)
    lm = mo.layer_mask(nn.Sequential(conv, act))
    _close(lm(x, mask), expected)
    assert f"+{name}" in lm.summary()


@pytest.mark.parametrize("fn", [F.relu, torch.sigmoid, F.silu, F.hardsigmoid, F.gelu, torch.tanh])
def test_standalone_functional_activation_zeroes_removed(fn):
    class M(nn.Module):
        def forward(self, x):
            return fn(x + 1.0)  # the plain addend and f(0) != 0 must both be re-zeroed

    x, mask = _data()
    expected = torch.where(mask, fn(x + 1.0), 0.0)
    _close(mo.layer_mask(M())(_nan_outside(x, mask), mask), expected)


def test_standalone_activation_survives_module_to():
    # MaskedActivation once named its activation method _apply, shadowing nn.Module._apply: every
    # .to()/.double()/.cuda() of a converted model holding one raised a TypeError deep inside torch
    class M(nn.Module):
        def forward(self, x):
            return torch.tanh(x + 1.0)

    x, mask = _data()
    lm = mo.layer_mask(M())
    expected = lm(x, mask)
    lm.to(memory_format=torch.channels_last).to(torch.float32).to(D)
    _close(lm(x, mask), expected)


# ----------------------------------------------------------------------------- norms
def test_batchnorm_after_add_uses_visible_affine_and_fuses_relu():
    bn = _rand_bn(4)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.act = bn, nn.ReLU()

        def forward(self, x):
            return self.act(self.bn(x * 2))

    x, mask = _data()
    expected, _ = mo.masked_batch_norm_act(x * 2, mask, bn, "relu")
    _close(mo.layer_mask(M().eval())(_nan_outside(x, mask), mask), expected)


def test_train_mode_batchnorm_uses_visible_pixel_statistics_and_warns():
    bn = nn.BatchNorm2d(4).to(D).train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x, mask = _data()
    with pytest.warns(UserWarning, match="train mode"):
        lm = mo.layer_mask(bn)
    got = lm(_nan_outside(x, mask), mask)
    vis = x.permute(1, 0, 2, 3)[:, mask[:, 0]]  # C x (#visible pixels)
    mean, var = vis.mean(1), vis.var(1, unbiased=False)
    expected = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
    _close(got, torch.where(mask, expected, 0.0))
    for k, v in bn.state_dict().items():  # running statistics untouched
        assert torch.equal(v, before[k]), k


def test_groupnorm_statistics_over_visible_pixels():
    gn = nn.GroupNorm(2, 4).to(D)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-0.5, 0.5)
    x, mask = _data()
    expected = torch.zeros_like(x)
    for n in range(2):
        for g in range(2):
            vis = x[n, 2 * g:2 * g + 2][:, mask[n, 0]]
            mu, var = vis.mean(), vis.var(unbiased=False)
            norm = (x[n, 2 * g:2 * g + 2] - mu) / torch.sqrt(var + gn.eps)
            norm = norm * gn.weight[2 * g:2 * g + 2, None, None] + gn.bias[2 * g:2 * g + 2, None, None]
            expected[n, 2 * g:2 * g + 2] = torch.where(mask[n, 0], norm, 0.0)
    _close(mo.layer_mask(gn)(_nan_outside(x, mask), mask), expected)


def test_convnext_permute_layernorm_linear_per_pixel():
    torchvision = pytest.importorskip("torchvision")
    ln2d = torchvision.models.convnext.LayerNorm2d(4, eps=1e-6).to(D)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln2d, self.ln, self.fc = ln2d, nn.LayerNorm(4).to(D), nn.Linear(4, 6).to(D)
            self.gamma = nn.Parameter(torch.rand(6, dtype=D))

        def forward(self, x):
            y = self.ln2d(x).permute(0, 2, 3, 1)
            y = F.gelu(self.fc(self.ln(y))) * self.gamma
            return y.permute(0, 3, 1, 2)

    block = Block()
    x, mask = _data()
    plain = block(x)
    expected = torch.where(mask, plain, 0.0)  # strictly per pixel: the plain output where visible
    lm = mo.layer_mask(block)
    _close(lm(_nan_outside(x, mask), mask), expected)
    _close(lm(x, torch.ones_like(mask)), plain)


# ----------------------------------------------------------------------------- pools
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_maxpool_matches_op(ceil_mode):
    x, mask = _data(h=11, w=11)
    expected, _ = mo.masked_max_pool2d(x, mask, 3, 2, 1, ceil_mode=ceil_mode)
    _close(mo.layer_mask(nn.MaxPool2d(3, 2, 1, ceil_mode=ceil_mode))(_nan_outside(x, mask), mask), expected)


@pytest.mark.parametrize("count_include_pad", [False, True])
def test_avgpool_matches_op(count_include_pad):
    x, mask = _data(h=11, w=11)
    expected, _ = mo.masked_avg_pool2d(x, mask, 3, 2, 1, ceil_mode=True, count_include_pad=count_include_pad)
    pool = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=count_include_pad)
    _close(mo.layer_mask(pool)(_nan_outside(x, mask), mask), expected)


def test_global_pool_and_spatial_mean_are_masked_means():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return torch.flatten(self.pool(x), 1) + x.mean((2, 3)) + x.mean((-2, -1), keepdim=True)[:, :, 0, 0]

    x, mask = _data()
    mask[1] = False  # an all-removed sample gives 0
    expected = 3 * mo.masked_mean(x, mask)
    got = mo.layer_mask(M())(_nan_outside(x, mask), mask)
    _close(got, expected)
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_adaptive_pool_per_bin_masked_mean():
    x, mask = _data(h=8, w=8)
    got = mo.layer_mask(nn.AdaptiveAvgPool2d((2, 2)))(_nan_outside(x, mask), mask)
    expected = torch.zeros(2, 4, 2, 2, dtype=D)
    for i in range(2):
        for j in range(2):
            win = mask[:, 0, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
            xs = torch.where(win[:, None], x[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4], 0.0)
            cnt = win.sum((1, 2)).to(D)
            expected[:, :, i, j] = torch.where(cnt[:, None] > 0, xs.sum((2, 3)) / cnt.clamp_min(1)[:, None], 0.0)
    _close(got, expected)


# ----------------------------------------------------------------------------- joins
def test_residual_add_intersects_masks():
    torch.manual_seed(0)
    c3, c1 = nn.Conv2d(4, 4, 3, padding=1).to(D), nn.Conv2d(4, 4, 1).to(D)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c3, self.c1 = c3, c1

        def forward(self, x):
            y = self.c3(x)
            y += self.c1(x)
            return y

    x, mask = _data()
    a, ma = mo.masked_conv2d(x, mask, c3.weight, c3.bias, 1, 1)
    b, mb = mo.masked_conv2d(x, mask, c1.weight, c1.bias)
    expected = torch.where(ma & mb, a + b, 0.0)
    _close(mo.layer_mask(M())(_nan_outside(x, mask), mask), expected)


@pytest.mark.parametrize("concat", ["majority", "union", "intersection"])
def test_channel_concat_mask_vote(concat):
    torch.manual_seed(0)
    convs = [nn.Conv2d(4, 2, k, padding=k // 2).to(D) for k in (1, 3, 5)]

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(convs)

        def forward(self, x):
            y = torch.cat([c(x) for c in self.convs], 1)
            return y * 1.0

    x, mask = _data()
    outs = [mo.masked_conv2d(x, mask, c.weight, c.bias, 1, c.padding) for c in convs]
    ms = torch.stack([m for _, m in outs]).float()
    vote = {"majority": ms.sum(0) * 2 >= 3, "union": ms.amax(0) > 0, "intersection": ms.amin(0) > 0}[concat]
    expected = torch.where(vote, torch.cat([y for y, _ in outs], 1), 0.0)
    _close(mo.layer_mask(M(), concat=concat)(_nan_outside(x, mask), mask), expected)


def test_squeeze_excitation_multiply():
    torch.manual_seed(0)
    fc = nn.Conv2d(4, 4, 1).to(D)

    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = fc

        def forward(self, x):
            s = torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))
            return x * s

    x, mask = _data()
    s = torch.sigmoid(fc(mo.masked_mean(x, mask)[:, :, None, None]))
    _close(mo.layer_mask(SE())(_nan_outside(x, mask), mask), torch.where(mask, x * s, 0.0))


def test_flatten_head_enters_linear_with_zeros():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).to(D)
    x, mask = _data(h=6, w=6)
    expected = model(torch.where(mask, x, 0.0))
    _close(mo.layer_mask(model)(_nan_outside(x, mask), mask), expected)


# ----------------------------------------------------------------------------- model-level behaviour
def test_nan_mask_derivation_and_input_sizes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).to(D).eval()
    lm = mo.layer_mask(model)
    for size in (10, 17):
        x, mask = _data(c=3, h=size, w=size)
        x_nan = _nan_outside(x, mask)
        x_nan[:, 1:] = torch.where(mask, x[:, 1:], 0.0)  # NaN in one channel removes the pixel
        _close(lm(x_nan), lm(x, mask))


def test_original_model_untouched_and_parameters_shared():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm = mo.layer_mask(model)
    lm(torch.randn(1, 3, 8, 8), torch.ones(1, 1, 8, 8))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    first = lm.layers["_0"]  # conv + relu, no BatchNorm: shares the original weight
    assert first.weight is model[0].weight
    assert lm.layers["_2"].weight is not model[2].weight  # folded with the BatchNorm: a copy


def test_gradients_reach_visible_pixels_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).to(D)
    x, mask = _data(c=3)
    x = x.requires_grad_()
    with torch.enable_grad():
        mo.layer_mask(model)(x, mask).sum().backward()
    assert torch.equal(x.grad * (~mask), torch.zeros_like(x))
    assert (x.grad[mask.expand_as(x)] != 0).any()


def test_summary_names_rules():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)).eval()
    lm = mo.layer_mask(model)
    text = repr(lm)
    assert "conv[fill]" in text and "global masked mean" in text and "fused into" in text


# ----------------------------------------------------------------------------- errors and registration
class Roll(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, dims=3)


def test_unknown_spatial_op_raises_naming_the_node():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Roll())
    with pytest.raises(ValueError, match=r"roll.*register"):
        mo.layer_mask(model)


def test_leaf_module_without_rule_raises():
    with pytest.raises(ValueError, match="Unfold"):
        mo.layer_mask(nn.Sequential(nn.Conv2d(4, 4, 1), nn.Unfold(2)))


def test_spatial_reshape_raises():
    class M(nn.Module):
        def forward(self, x):
            return x.view(x.shape[0], x.shape[1], -1, 2)

    with pytest.raises(ValueError, match="reshape|view"):
        mo.layer_mask(M())


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


def test_untraceable_model_raises_with_module_and_reason():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Branchy())
    with pytest.raises(TraceError, match=r"1 \(Branchy\)") as info:
        mo.layer_mask(model)
    assert isinstance(info.value, ValueError)  # a refusal like every other (the CLI: bad input, exit 2)


def test_register_rule_for_custom_module():
    class ChannelScale(nn.Module):  # untraceable, but per pixel
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x * 3

    mo.register_rule(ChannelScale, lambda node, ctx: MaskedPointwise(ctx.module(node), "ChannelScale"))
    try:
        lm = mo.layer_mask(nn.Sequential(nn.Conv2d(3, 3, 1), ChannelScale()))
        x, mask = _data(c=3)
        out = lm(_nan_outside(x, mask), mask)
        assert torch.isfinite(out).all() and torch.equal(out * (~mask), torch.zeros_like(out))
        assert "ChannelScale" in lm.summary()
    finally:
        from masked_ops import rules
        rules._module_rules.pop(ChannelScale, None)


def test_bad_inputs_name_the_argument():
    lm = mo.layer_mask(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="mask"):
        lm(torch.randn(2, 3, 8, 8), torch.ones(2, 1, 8, 7))
    with pytest.raises(TypeError, match="x must be a floating"):
        lm(torch.ones(2, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="mode"):
        mo.layer_mask(nn.Conv2d(3, 3, 1), mode="blur")
    with pytest.raises(TypeError, match="nn.Module"):
        mo.layer_mask(lambda x: x)
