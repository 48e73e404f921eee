"""Extremal perturbations, checked against the ``torchray`` package (TorchRay 1.0.0.2).

TorchRay runs with the torch of this project (2.x): ``extremal_perturbation`` and its
``MaskGenerator``/``Perturbation`` classes are called directly as the outside reference. It
blurs with its own perturbation pyramid (8 blur levels, sigma up to 20, the mask value picks the
level), so for an exact comparison of the *algorithm* (mask parameterisation, area penalty,
optimiser, jitter) our explainer runs with a Strategy whose soft composite is TorchRay's own
``Perturbation.apply`` (``TorchRayBlur`` below). The issue's cross-check, our explainer with our
own blending "blur" strategy against TorchRay's blur on a real photo at area 0.1 (IoU >= 0.7),
is not met, and why is measured in ``test_real_photo_as_close_to_torchray_as_torchray_is_to_itself``.
"""
import pytest
import torch
import torch.nn as nn

from masked_ops.explain.extremal import PRESETS, SmoothMask, area_reference, explain_extremal
from masked_ops.explain.maps import MapExplanation
from masked_ops.explain.soft import soft_strategies, soft_strategy
from masked_ops.explain.strategies import FillStrategy, get_strategy
from masked_ops.images import IMAGENET_MEAN, IMAGENET_STD

torchray_ep = pytest.importorskip("torchray.attribution.extremal_perturbation",
                                  reason="torchray is a test dependency (pip install torchray)")


class Normalise(nn.Module):
    def forward(self, x):
        mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


class TorchRayBlur(FillStrategy):
    """A soft strategy whose composite is TorchRay's Perturbation pyramid of the images given."""

    def __init__(self, model, max_blur=20.0, levels=8):
        super().__init__("torchray-blur", None, model)
        self.max_blur, self.levels = max_blur, levels

    def _composite(self, images, visible):
        return self._blend(images, visible.to(images.dtype))

    def _blend(self, images, m):
        out = [torchray_ep.Perturbation(images[i:i + 1], num_levels=self.levels, max_blur=self.max_blur).apply(m[i:i + 1])
               for i in range(images.shape[0])]
        return torch.cat(out)


def small_cnn(classes=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def iou(a, b, t=0.5):
    a, b = a > t, b > t
    return float((a & b).sum()) / max(1, float((a | b).sum()))


@pytest.mark.parametrize("shape", [(96, 96, 7, 21.0), (40, 52, 5, 11.0), (33, 17, 3, 4.5)])
def test_smooth_mask_matches_torchray_mask_generator(shape):
    h, w, step, sigma = shape
    ours = SmoothMask(h, w, step, sigma)
    ref = torchray_ep.MaskGenerator((h, w), step, sigma)
    assert ours.param_shape == tuple(ref.shape_in) and ours.full_shape == tuple(ref.shape_out)
    p = torch.rand(3, 1, *ours.param_shape)
    (a, af), (b, bf) = ours(p), ref.generate(p)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(af, bf, rtol=0, atol=1e-5)


def test_area_reference():
    ref = area_reference([0.1, 0.5], 10)
    assert ref.tolist() == [[0] * 9 + [1], [0] * 5 + [1] * 5]


class TorchRayMaskGenerator:
    """TorchRay's MaskGenerator behind our SmoothMask's interface (to isolate the optimisation loop)."""

    def __init__(self, height, width, step=7, sigma=21.0, device="cpu", dtype=torch.float32):
        ours = SmoothMask(height, width, step, sigma)
        self.param_shape, self.full_shape = ours.param_shape, ours.full_shape
        self.ref = torchray_ep.MaskGenerator((height, width), step, sigma)

    def __call__(self, params):
        return self.ref.generate(params)


def _both(variant, *, torchray_generator, reward="simple", iterations=60, areas=(0.1, 0.3), target=2, seed=0):
    model = small_cnn()
    image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(seed))
    wrapped = nn.Sequential(Normalise(), model).eval()
    reward_func = torchray_ep.contrastive_reward if reward == "contrastive" else torchray_ep.simple_reward
    # TorchRay returns the mask made from the parameters *before* its last step; ours is made from
    # the final parameters: TorchRay's run of n + 1 steps is the one to compare with our n.
    want, _ = torchray_ep.extremal_perturbation(wrapped, image, target, areas=list(areas), max_iter=iterations + 1,
                                                step=5, sigma=11, variant=variant, perturbation="blur",
                                                reward_func=reward_func)
    for p in model.parameters():
        p.requires_grad_(True)  # TorchRay switched them off for good
    import masked_ops.explain.extremal as E

    original = E.SmoothMask
    if torchray_generator:
        E.SmoothMask = TorchRayMaskGenerator
    try:
        exp = explain_extremal(TorchRayBlur(model), image[0], targets=target, areas=areas, variant=variant,
                               iterations=iterations, step=5, sigma=11, area_growth=1.0035, reward=reward,
                               progress=False)
    finally:
        E.SmoothMask = original
    assert all(p.requires_grad for p in model.parameters())  # we restore them
    return exp.masks[0], want[:, 0]


@pytest.mark.parametrize("variant,reward", [("preserve", "simple"), ("delete", "simple"), ("dual", "simple"),
                                            ("preserve", "contrastive")])
def test_optimisation_retraces_torchray_step_by_step(variant, reward):
    # Same perturbation (TorchRay's pyramid) and TorchRay's own mask generator plugged into our
    # loop: the area penalty, optimiser, jitter, variants and rewards must retrace TorchRay's run.
    got, want = _both(variant, torchray_generator=True, reward=reward)
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("variant", ["preserve", "dual"])
def test_same_masks_as_torchray_with_our_generator(variant):
    # Our own SmoothMask too. Not bit for bit: the area penalty sorts the mask, which starts with
    # many tied values, so float noise of 1e-7 between the two generators sends the penalty's
    # gradient to other tied pixels (5e-4 apart after one step, 0.02 mean after 60, measured).
    got, want = _both(variant, torchray_generator=False)
    assert (got - want).abs().mean() < 0.05
    for a in range(got.shape[0]):
        assert iou(got[a], want[a]) >= 0.9
        assert abs(float(got[a].mean() - want[a].mean())) < 0.01


@pytest.fixture(scope="module")
def lite0_cat():
    from masked_ops.images import load_image
    from masked_ops.models import load_model

    model, info = load_model("efficientnet-lite0")
    return model, info.prepare(load_image("chelsea"))


def _iou_corr(a, b):
    a, b = a.flatten(), b.flatten()
    return iou(a, b), float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.slow
def test_real_photo_as_close_to_torchray_as_torchray_is_to_itself(lite0_cat):
    """The issue's cross-check on a real photo: the pretrained EfficientNet-Lite0 on scikit-image's cat,
    its top class, area 0.1, blur, 300 iterations (the "fast" preset's count, with TorchRay's growth).

    The issue asks for IoU >= 0.7 between our mask and TorchRay's. That is **not met**, and no
    reimplementation can meet it: the optimum is not stable. TorchRay against *itself*, with 1e-6
    of noise added to the input, gives IoU 0.58 at 300 iterations and 0.36 at 800 (the paper's
    count: the mask jumps between the forehead blob and forehead + eye + nose blobs), measured on
    this machine. With TorchRay's own blur pyramid as the perturbation, our explainer lands exactly
    as close: IoU 0.60 (300) and 0.37 (800), correlation 0.83 and 0.55 (TorchRay vs itself: 0.80
    and 0.54). With our blending blur strategy (sigma 20, a different perturbation for soft mask
    values) the IoU is 0.41 (300) and 0.16 (800). What this test asserts is the part that holds:
    with the same perturbation we are as close to TorchRay as TorchRay is to itself.
    """
    model, x = lite0_cat
    wrapped = nn.Sequential(Normalise(), model).eval()
    with torch.no_grad():
        target = int(wrapped(x).argmax())
    noisy = (x + 1e-6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    want, _ = torchray_ep.extremal_perturbation(wrapped, x, target, areas=[0.1], max_iter=301, perturbation="blur")
    again, _ = torchray_ep.extremal_perturbation(wrapped, noisy, target, areas=[0.1], max_iter=301,
                                                 perturbation="blur")
    for p in model.parameters():
        p.requires_grad_(True)
    exp = explain_extremal(TorchRayBlur(model), x[0], targets=target, areas=0.1, iterations=300,
                           area_growth=1.0035, progress=False)
    ours = _iou_corr(exp.masks[0, 0], want[0, 0])
    itself = _iou_corr(again[0, 0], want[0, 0])
    assert ours[0] >= itself[0] - 0.1 and ours[1] >= itself[1] - 0.1, (ours, itself)
    assert abs(float(exp.masks[0, 0].mean()) - float(want[0, 0].mean())) < 0.03  # the same mask area


# ----------------------------------------------------------------------------- our own behaviour
@pytest.mark.parametrize("name", soft_strategies())
def test_runs_with_every_soft_strategy(name):
    model = small_cnn()
    image = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(2))
    exp = explain_extremal(soft_strategy(name, model), image, targets=[1, 3], areas=(0.1, 0.4), iterations=5,
                           step=4, sigma=8, progress=False)
    assert isinstance(exp, MapExplanation) and exp.method == "extremal" and exp.targets == [1, 3]
    assert exp.weights.shape == (2, 24 * 24) and exp.masks.shape == (2, 2, 24, 24)
    assert exp.heatmap(1).shape == (24, 24)
    torch.testing.assert_close(exp.heatmap(0), exp.masks[0].mean(0))
    assert float(exp.masks.min()) >= 0 and float(exp.masks.max()) <= 1


def test_area_constraint_is_met_and_run_is_deterministic():
    model = small_cnn()
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3))
    s = get_strategy("grey", model)
    opts = dict(targets=0, areas=(0.15, 0.5), iterations=150, area_growth=1.0035 ** (800 / 150), step=4, sigma=8,
                progress=False)  # the penalty's weight grows as in 800 steps
    a = explain_extremal(s, image, **opts)
    b = explain_extremal(s, image, **opts)
    assert torch.equal(a.masks, b.masks)
    # the constrained area is that of the mask with its margin (TorchRay's convention)
    full = torch.tensor(a.info["per_target"][0]["area_with_margin"])
    torch.testing.assert_close(full, torch.tensor([0.15, 0.5]), rtol=0, atol=0.03)
    inside = torch.tensor(a.info["per_target"][0]["area"])
    torch.testing.assert_close(inside, a.masks[0].mean(dim=(1, 2)))
    assert inside[0] < inside[1]


def test_presets():
    assert PRESETS["paper"]["iterations"] == 800 and PRESETS["fast"]["iterations"] == 300
    # the fast preset ends at the paper's final area weight
    assert PRESETS["fast"]["area_growth"] ** 300 == pytest.approx(1.0035 ** 800)


def test_the_fast_preset_scales_its_schedule_to_fewer_steps():
    """With preset="fast" and 120 steps the area weight ends where 800 steps end it (the 300-step growth
    left it at 1.0035^(800 * 120 / 300), a fifth of its final value, issue 28)."""
    model = small_cnn()
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3))
    s = get_strategy("grey", model)
    opts = dict(targets=0, areas=(0.15,), iterations=120, step=4, sigma=8, progress=False)
    fast = explain_extremal(s, image, preset="fast", **opts)
    explicit = explain_extremal(s, image, area_growth=1.0035 ** (800 / 120), **opts)
    assert torch.equal(fast.masks, explicit.masks)
    area = fast.info["per_target"][0]["area_with_margin"][0]
    assert area == pytest.approx(0.15, abs=0.03)


def test_bad_input():
    model = small_cnn()
    image = torch.rand(3, 16, 16)
    s = get_strategy("blur", model)
    for areas in (0.0, 1.0, (0.1, 1.5), -0.2):
        with pytest.raises(ValueError, match="areas must lie in"):
            explain_extremal(s, image, areas=areas, iterations=1)
    with pytest.raises(ValueError, match="areas must hold at least one"):
        explain_extremal(s, image, areas=(), iterations=1)
    with pytest.raises(ValueError, match="target class 7 is out of range"):
        explain_extremal(s, image, targets=7, iterations=1)
    with pytest.raises(ValueError, match="variant"):
        explain_extremal(s, image, variant="both", iterations=1)
    with pytest.raises(ValueError, match="iterations"):
        explain_extremal(s, image, iterations=0)
    with pytest.raises(ValueError, match="preset"):
        explain_extremal(s, image, preset="slow")
    with pytest.raises(TypeError, match="image"):
        explain_extremal(s, image.numpy())
    with pytest.raises(ValueError, match="would not cover the image"):
        explain_extremal(s, image, step=4, sigma=6, iterations=1)
    with pytest.raises(ValueError, match="takes hard 0/1 masks only"):  # layer masking built without soft=True
        explain_extremal(get_strategy("layer", model), image, iterations=1)
