"""Masking strategies: each checked against an independent transcription of its definition."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import ndimage

from masked_ops.images import IMAGENET_MEAN, IMAGENET_STD
from masked_ops.explain.strategies import (FILL_STRATEGIES, STRATEGIES,
                                           gaussian_blur, get_strategy)

# Strategies whose output must not depend on what the removed pixels hold.
INVARIANT = ("black", "grey", "mean", "smooth-grey", "layer", "layer-renorm", "layer-zero")


def _has_layer_mask():
    try:
        import masked_ops.convert  # noqa: F401
        return True
    except ImportError:
        return False


def _skip_layer(name):
    if name.startswith("layer") and not _has_layer_mask():
        pytest.skip("masked_ops.convert (layer_mask) not available yet")


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def plain(model, images):
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype).view(1, 3, 1, 1)
    return model((images - mean) / std)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 16, 16, generator=g)
    masks = torch.rand(3, 1, 16, 16, generator=g) > 0.4
    return images, masks


@pytest.mark.parametrize("name", STRATEGIES)
def test_all_visible_is_plain_model(name, data):
    _skip_layer(name)
    model = tiny_cnn()
    images, _ = data
    ones = torch.ones(3, 1, 16, 16, dtype=torch.bool)
    # renorm renormalises at the image border unless the padding counts as visible (documented)
    with torch.no_grad():
        got = get_strategy(name, model, padding_visible=True)(images, ones)
        want = plain(model, images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if name == "layer-renorm":
        with torch.no_grad():
            default = get_strategy(name, model)(images, ones)
        assert not torch.allclose(default, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", INVARIANT)
@pytest.mark.parametrize("junk", [float("nan"), float("inf"), 1e30, "random"])
def test_removed_pixels_change_nothing(name, junk, data):
    _skip_layer(name)
    model = tiny_cnn()
    images, masks = data
    other = images.clone()
    removed = ~masks.expand_as(images)
    other[removed] = torch.rand(int(removed.sum())) * 7 if junk == "random" else junk
    s = get_strategy(name, model)
    with torch.no_grad():
        a, b = s(images, masks), s(other, masks.float())
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_grey_and_black_fill(data):
    model = tiny_cnn()
    images, masks = data
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        # grey = dataset mean, i.e. exactly 0 after normalisation
        want = model(((images - mean) / std) * masks)
        torch.testing.assert_close(get_strategy("grey", model)(images, masks), want, rtol=1e-5, atol=1e-6)
        want = model((images * masks - mean) / std)
        torch.testing.assert_close(get_strategy("black", model)(images, masks), want, rtol=1e-5, atol=1e-6)


def test_mean_fill_uses_visible_pixels(data):
    images, masks = data
    s = get_strategy("mean", tiny_cnn())
    comp = s.composite(images, masks)
    for i in range(3):
        vis = masks[i, 0]
        colour = images[i][:, vis].mean(dim=1)
        torch.testing.assert_close(comp[i][:, ~vis], colour[:, None].expand(3, int((~vis).sum())))
        assert torch.equal(comp[i][:, vis], images[i][:, vis])
    # nothing visible: dataset mean
    comp = s.composite(images[:1], torch.zeros(1, 1, 16, 16))
    torch.testing.assert_close(comp[0, :, 0, 0], torch.tensor(IMAGENET_MEAN))


@pytest.mark.parametrize("sigma,size", [(1.0, 16), (2.0, 9), (5.0, 40)])
def test_gaussian_blur_matches_scipy(sigma, size):
    x = torch.rand(2, 3, size, size + 3, dtype=torch.float64)
    got = gaussian_blur(x, sigma).numpy()
    # torch "reflect" padding = scipy "mirror"; radius ceil(3 sigma) = truncate 3 (rounded up)
    radius = math.ceil(3 * sigma)
    want = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="mirror",
                                   truncate=radius / sigma)
    if radius < size:  # scipy's kernel and ours agree while the kernel fits in the image
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert got.shape == x.shape


def test_blur_and_smooth_grey_composites(data):
    images, masks = data
    model = tiny_cnn()
    blur = get_strategy("blur", model, blur_sigma=3.0).composite(images, masks)
    want = torch.where(masks, images, gaussian_blur(images, 3.0))
    assert torch.equal(blur, want)
    sg = get_strategy("smooth-grey", model, smooth_sigma=1.5).composite(images, masks)
    grey = torch.where(masks, images, torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
    want = torch.where(masks, images, gaussian_blur(grey, 1.5))
    assert torch.equal(sg, want)


def test_noise_is_seeded(data):
    images, masks = data
    model = tiny_cnn()
    a = get_strategy("noise", model, seed=3).composite(images, masks)
    b = get_strategy("noise", model, seed=3).composite(images, masks)
    c = get_strategy("noise", model, seed=4).composite(images, masks)
    assert torch.equal(a, b) and not torch.equal(a, c)
    removed = ~masks.expand_as(images)
    assert (a[removed] >= 0).all() and (a[removed] < 1).all()
    assert torch.equal(a[~removed], images[~removed])


@pytest.mark.parametrize("name", ["grey", "layer"])
def test_one_image_broadcasts_to_many_masks(name, data):
    _skip_layer(name)
    model = tiny_cnn()
    images, masks = data
    s = get_strategy(name, model)
    with torch.no_grad():
        got = s(images[:1], masks)
        want = s(images[:1].expand(3, -1, -1, -1).contiguous(), masks)
    torch.testing.assert_close(got, want)


def test_bad_input(data):
    images, masks = data
    model = tiny_cnn()
    with pytest.raises(ValueError, match="unknown masking strategy 'gray'"):
        get_strategy("gray", model)
    s = get_strategy("grey", model)
    with pytest.raises(ValueError, match="masks"):
        s(images, masks[:, :, :8])
    with pytest.raises(ValueError, match="3 channels"):
        s(images[:, :2], masks)
    with pytest.raises(TypeError, match="images"):
        s(images.numpy(), masks)
    with pytest.raises(ValueError, match="mode"):
        get_strategy("layer", model, mode="sideways")
    assert set(FILL_STRATEGIES) < set(STRATEGIES) and len(STRATEGIES) == 13


@pytest.mark.parametrize("name", ["grey", "layer"])
def test_channels_last_model_gets_channels_last_images(name, data):
    _skip_layer(name)
    images, masks = data
    model = tiny_cnn()
    want = get_strategy(name, model)(images, masks)
    cl = tiny_cnn().to(memory_format=torch.channels_last)
    seen = []
    cl[0].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].is_contiguous(
        memory_format=torch.channels_last)))
    s = get_strategy(name, cl)
    assert s.channels_last and not get_strategy(name, model).channels_last
    torch.testing.assert_close(s(images, masks), want, rtol=1e-4, atol=1e-5)
    if name == "grey":
        assert seen == [True]
