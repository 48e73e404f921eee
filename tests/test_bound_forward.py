"""Strategy.bind: one image under many masks, the image's share of the work done once.

The bound forward must equal ``strategy(image[None], masks)`` bit for bit, for every strategy, layout
and dtype (the explainers call it instead), keep removed pixels out (NaN there changes nothing), and
really skip the per-batch work it claims to skip.
"""
import pytest
import torch
import torch.nn as nn

from masked_ops.explain.strategies import CONSTANT_FILLS, STRATEGIES, bound_forward, get_strategy

torchvision = pytest.importorskip("torchvision")


def tiny_cnn(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval().to(dtype)


def _masks(n, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, 1, h, w, generator=g) > 0.4
    masks[0] = True   # all visible
    masks[1] = False  # nothing visible
    return masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", STRATEGIES)
def test_bound_forward_equals_the_call(name, channels_last, dtype):
    model = tiny_cnn(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    image = torch.rand(3, 17, 15, generator=torch.Generator().manual_seed(0), dtype=dtype)
    masks = _masks(4, 17, 15)
    with torch.inference_mode():
        # two strategies with the same seed: "noise" and "noisy-linear" draw per call
        expected = get_strategy(name, model)(image[None], masks)
        got = get_strategy(name, model).bind(image)(masks)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("name", ["black", "grey", "layer"])
def test_bound_forward_is_blind_to_removed_pixels(name):
    """NaN and inf where every mask removes the image give the same logits as a clean image."""
    model = tiny_cnn()
    g = torch.Generator().manual_seed(2)
    image = torch.rand(3, 16, 16, generator=g)
    masks = _masks(4, 16, 16)[2:]
    masks[:, :, 4:9, 3:11] = False
    dirty = image.clone()
    dirty[0, 4:9, 3:7] = float("nan")
    dirty[1:, 5:9, 7:11] = float("inf")
    strat = get_strategy(name, model)
    with torch.inference_mode():
        assert torch.equal(strat.bind(dirty)(masks), strat.bind(image)(masks))


@pytest.mark.parametrize("name", CONSTANT_FILLS + ("layer",))
def test_bound_forward_does_the_image_work_once(name, monkeypatch):
    """The point of bind: the normalisation (and fill) is not redone per batch. A bind that only
    forwarded to the call would normalise every batch."""
    strat = get_strategy(name, tiny_cnn())
    image = torch.rand(3, 16, 16)
    forward = strat.bind(image)
    calls = []
    normalise = type(strat).normalise
    monkeypatch.setattr(type(strat), "normalise", lambda self, x: calls.append(1) or normalise(self, x))
    with torch.inference_mode():
        for seed in range(3):
            forward(_masks(4, 16, 16, seed))
    assert calls == []


def test_bound_forward_checks_masks_like_the_call():
    strat = get_strategy("layer", tiny_cnn())
    forward = strat.bind(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="masks"):
        forward(torch.ones(2, 1, 15, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks"):
        forward(torch.full((2, 1, 16, 16), 0.5))  # soft, but this strategy is hard-only
    with pytest.raises(ValueError, match="channels"):
        get_strategy("grey", tiny_cnn()).bind(torch.rand(4, 16, 16))
    for name in ("grey", "layer", "mean"):
        with pytest.raises(ValueError, match="C x H x W"):
            get_strategy(name, tiny_cnn()).bind(torch.rand(1, 3, 16, 16))
    with pytest.raises(TypeError, match="image"):
        bound_forward(lambda x, m: x, [[0.0]])


@pytest.mark.parametrize("name", ["grey", "black", "layer"])
def test_soft_masks_take_the_blend(name):
    """A soft mask through the bound forward is the strategy's soft blend: the same logits and mask
    gradient as the call (layer masking: the same path, bit for bit; the constant fills blend in the
    normalised space, equal within float64 rounding), and they depend on the mask's value."""
    strat = get_strategy(name, tiny_cnn().double(), soft=True)
    image = torch.rand(3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    m = torch.rand(2, 1, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    m1, m2 = m.clone().requires_grad_(), m.clone().requires_grad_()
    got, expected = strat.bind(image)(m1), strat(image[None], m2)
    if name == "layer":
        assert torch.equal(got, expected)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got[:, 1].sum().backward()
    expected[:, 1].sum().backward()
    torch.testing.assert_close(m1.grad, m2.grad, rtol=1e-10, atol=1e-12)
    assert m1.grad.abs().min() > 0  # every pixel's visibility matters
    with torch.no_grad():
        assert not torch.allclose(strat.bind(image)(m / 2), got)


@pytest.mark.parametrize("name", CONSTANT_FILLS)
def test_soft_blend_is_exact_at_zero_and_one(name):
    """A float 0/1 mask that requires grad takes the soft path: at those values it must equal the hard
    select bit for bit, as the call's blend does."""
    strat = get_strategy(name, tiny_cnn())
    image = torch.rand(3, 16, 16)
    hard = _masks(4, 16, 16)
    soft = hard.float().requires_grad_()
    forward = strat.bind(image)
    assert torch.equal(forward(soft).detach(), forward(hard))


def test_soft_blend_keeps_nan_out_where_the_mask_is_zero():
    strat = get_strategy("grey", tiny_cnn().double())
    image = torch.rand(3, 12, 12, dtype=torch.float64)
    dirty = image.clone()
    dirty[:, 2:5, 3:6] = float("nan")
    m = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    m[:, :, 2:5, 3:6] = 0
    out = strat.bind(dirty)(m.clone().requires_grad_())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, strat(dirty[None], m))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_bound_forward_on_real_architectures(arch, channels_last):
    """The masked model reads the bound image as a broadcast batch: same logits as a real batch, and
    the bound image is never written (a converted model fills what it owns in place)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    strat = get_strategy("layer", model)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))
    masks = _masks(3, 64, 64)
    with torch.inference_mode():
        forward = strat.bind(image)
        bound = forward.__closure__  # the bound normalised image lives in the closure
        before = [c.cell_contents.clone() for c in bound if isinstance(c.cell_contents, torch.Tensor)]
        got = forward(masks)
        expected = strat(image[None], masks)
        after = [c.cell_contents for c in bound if isinstance(c.cell_contents, torch.Tensor)]
    assert torch.equal(got, expected)
    assert before and all(torch.equal(a, b) for a, b in zip(before, after))


def test_bound_forward_of_a_plain_callable():
    """Callables that are not strategies (an adapter, a user's function) are called as they are."""
    seen = []

    def strategy(images, masks):
        seen.append(images.shape)
        return torch.zeros(masks.shape[0], 2)

    out = bound_forward(strategy, torch.rand(3, 8, 8))(torch.ones(5, 1, 8, 8, dtype=torch.bool))
    assert out.shape == (5, 2) and seen == [(5, 3, 8, 8)]  # the image repeated to the masks' batch
