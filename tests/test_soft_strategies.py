"""Soft masks in the blending strategies: definition, bit-identity at 0/1, gradients, NaN, errors."""
import pytest
import torch
import torch.nn as nn

from masked_ops.explain.soft import require_soft, soft_strategies, soft_strategy, supports_soft
from masked_ops.explain.strategies import (FILL_STRATEGIES, IMAGENET_MEAN, IMAGENET_STD, STRATEGIES, gaussian_blur,
                                           get_strategy)

# Soft strategies: every fill, and layer masking built with soft=True (soft_strategy asks for it).
SOFT = soft_strategies()
INVARIANT = ("black", "grey", "mean", "smooth-grey", "layer", "layer-renorm", "layer-zero")  # output independent of removed values


def tiny_cnn(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval().to(dtype)


def _norm(x):
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def reference_composite(name, x, m, sigma_blur=5.0, sigma_smooth=2.0):
    """The blend written from the definition, pixel by pixel where it matters (independent code)."""
    grey = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    if name == "black":
        fill = torch.zeros_like(x)
    elif name == "grey":
        fill = grey.expand_as(x)
    elif name == "mean":
        w = m.expand_as(x)
        fill = ((w * x).sum((2, 3)) / w.sum((2, 3))).view(x.shape[0], 3, 1, 1).expand_as(x)
    elif name == "blur":
        fill = gaussian_blur(x, sigma_blur)
    elif name == "smooth-grey":
        fill = gaussian_blur(x * m + grey * (1 - m), sigma_smooth)
    else:
        raise AssertionError(name)
    return x * m + fill * (1 - m)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 12, 12, generator=g), torch.rand(2, 1, 12, 12, generator=g)


def test_every_fill_is_soft_and_layer_follows_get_strategy():
    assert set(FILL_STRATEGIES) <= set(SOFT)
    model = tiny_cnn()
    for name in FILL_STRATEGIES:
        assert get_strategy(name, model).soft and supports_soft(name)
    assert {"layer", "layer-renorm", "layer-zero"} <= set(SOFT) and supports_soft("layer")
    assert soft_strategy("layer", model).soft and not get_strategy("layer", model).soft
    with pytest.raises(ValueError, match=r"takes hard 0/1 masks only. Use get_strategy\('layer', model, soft=True\)"):
        require_soft(get_strategy("layer", model), "explain_extremal")
    for name in ("noisy-linear", "inpaint-telea", "segment-mean"):
        assert not supports_soft(name) and name not in SOFT
        with pytest.raises(ValueError, match="explain_extremal needs a strategy that takes soft masks"):
            soft_strategy(name, model, "explain_extremal")
        with pytest.raises(ValueError, match="takes hard 0/1 masks only"):
            get_strategy(name, model, soft=True)


@pytest.mark.parametrize("name", ["black", "grey", "mean", "blur", "smooth-grey"])
def test_soft_blend_matches_definition(name, data):
    x, m = data
    model = tiny_cnn()
    with torch.no_grad():
        got = get_strategy(name, model)(x, m)
        want = model(_norm(reference_composite(name, x, m)))
        comp = get_strategy(name, model).composite(x, m)
    torch.testing.assert_close(comp, reference_composite(name, x, m), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SOFT)
def test_binary_float_mask_with_grad_equals_hard_path_bit_for_bit(name, data):
    x, m = data
    hard = m > 0.5
    model = tiny_cnn()
    with torch.no_grad():
        want = soft_strategy(name, model, seed=1)(x, hard)
    soft = hard.float().requires_grad_(True)
    got = soft_strategy(name, model, seed=1)(x, soft)
    assert torch.equal(got.detach(), want)
    got[:, 1].sum().backward()
    assert soft.grad is not None and torch.isfinite(soft.grad).all()
    # 0/1 float masks without grad stay on the hard path (no change for existing callers)
    with torch.no_grad():
        assert torch.equal(soft_strategy(name, model, seed=1)(x, hard.float()), want)


@pytest.mark.parametrize("name", [n for n in SOFT if n != "noise"])
def test_gradcheck_wrt_soft_mask(name):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, 7, 7, generator=g, dtype=torch.float64)
    m = (0.1 + 0.8 * torch.rand(1, 1, 7, 7, generator=g, dtype=torch.float64)).requires_grad_(True)
    model = tiny_cnn(torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    # layer masking: the exact mask gradient needs fill_grad (the default is the paper's surrogate, which
    # drops how deeper layers' fill values move with the mask)
    # layer: the blend semantics with fill_grad (the straight-through ones are piecewise constant by design)
    s = soft_strategy(name, model, **({"fill_grad": True, "soft": "blend"} if name.startswith("layer") else {}))
    assert torch.autograd.gradcheck(lambda mm: s(x, mm), (m,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradient_is_x_minus_fill_at_zero_and_one():
    # d/dm of the composite = x - fill everywhere, the endpoints included (one-sided there).
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 6, 6, generator=g, dtype=torch.float64)
    m = (torch.rand(1, 1, 6, 6, generator=g, dtype=torch.float64) > 0.5).double().requires_grad_(True)
    s = get_strategy("grey", tiny_cnn(torch.float64))
    comp = s.composite(x, m)
    comp.sum().backward()
    grey = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(m.grad, (x - grey).sum(1, keepdim=True))


@pytest.mark.parametrize("name", SOFT)
@pytest.mark.parametrize("junk", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_removed_pixels_never_reach_outputs_or_gradients(name, junk, data):
    x, m = data
    m = m.clone()
    m[:, :, :5, :5] = 0  # removed exactly
    bad = x.clone()
    bad[:, :, :5, :5] = junk
    model = tiny_cnn()
    mm = m.clone().requires_grad_(True)
    out = soft_strategy(name, model, seed=2)(bad, mm)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(mm.grad).all()
    if name in INVARIANT:
        # and the output is what any finite value there would give
        with torch.no_grad():
            ref = soft_strategy(name, model, seed=2)(x, m)
        torch.testing.assert_close(out.detach(), ref, rtol=0, atol=0)


def test_soft_mask_errors(data):
    x, m = data
    s = get_strategy("grey", tiny_cnn())
    with pytest.raises(ValueError, match=r"masks must hold values in \[0, 1\]"):
        s(x, m * 2)
    with pytest.raises(ValueError, match=r"masks must hold values in \[0, 1\]"):
        s(x, torch.where(m > 0.5, m, torch.full_like(m, float("nan"))))
    with pytest.raises(ValueError, match="masks"):
        s(x, m[:, :, :6])
    with pytest.raises(ValueError, match="soft=True"):  # a hard layer strategy names the soft one
        get_strategy("layer", tiny_cnn())(x, m)
    with pytest.raises(TypeError, match="Strategy"):
        require_soft("grey", "explain_rise")


def test_one_image_many_soft_masks_broadcasts(data):
    x, m = data
    s = get_strategy("blur", tiny_cnn())
    with torch.no_grad():
        torch.testing.assert_close(s(x[:1], m), s(x[:1].expand(2, -1, -1, -1).contiguous(), m))
    assert set(SOFT) <= set(STRATEGIES)
