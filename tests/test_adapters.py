"""Adapters, each run through the real installed package (lime, Captum, Quantus)."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from masked_ops.explain import explain_lime, explain_occlusion, get_strategy, grid_segments
from masked_ops.explain.adapters import NaNMaskedModel, nan_mask

H = W = 24
CLASSES = 5


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, CLASSES)).eval()


@pytest.fixture(scope="module")
def setup():
    image = torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))
    return tiny_cnn(), image, grid_segments(H, W, 3)


@pytest.mark.parametrize("name", ["layer", "grey"])
def test_nan_model_equals_strategy(name, setup):
    model, image, seg = setup
    masks = (torch.rand(4, 1, H, W, generator=torch.Generator().manual_seed(1)) > 0.5)
    x = torch.where(masks, image, torch.tensor(float("nan")))
    with torch.no_grad():
        got = NaNMaskedModel(model, name)(x)
        want = get_strategy(name, model)(image[None], masks)
    assert torch.isfinite(got).all()
    assert torch.equal(nan_mask(x), masks)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- lime
@pytest.mark.parametrize("name", ["layer", "grey"])
def test_lime_classifier_fn_in_lime_image_explainer(name, setup):
    lime_image = pytest.importorskip("lime.lime_image")
    from masked_ops.explain.adapters.lime_adapter import lime_classifier_fn

    model, image, seg = setup
    fn = lime_classifier_fn(model, name)
    explainer = lime_image.LimeImageExplainer(kernel_width=0.25, feature_selection="none", random_state=3)
    ref = explainer.explain_instance(image.permute(1, 2, 0).double().numpy(), fn, labels=(1,), top_labels=None,
                                     hide_color=float("nan"), num_samples=60, batch_size=20,
                                     segmentation_fn=lambda img: seg.numpy(), random_seed=0)
    k = 9
    z = np.random.RandomState(3).randint(0, 2, 60 * k).reshape(60, k).astype(np.float64)
    z[0] = 1
    ours = explain_lime(get_strategy(name, model), image, segments=seg, samples=torch.from_numpy(z), targets=1)
    want = np.zeros(k)
    for f, w in ref.local_exp[1]:
        want[f] = w
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    np.testing.assert_allclose(ours.weights[0].numpy(), want, rtol=1e-4, atol=1e-6)


def test_lime_classifier_fn_rejects_integer_images(setup):
    from masked_ops.explain.adapters.lime_adapter import lime_classifier_fn

    fn = lime_classifier_fn(setup[0])
    with pytest.raises(TypeError, match="float"):
        fn(np.zeros((1, H, W, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="N x H x W x 3"):
        fn(np.zeros((1, 3, H, W)))


# ----------------------------------------------------------------------------- captum
@pytest.mark.parametrize("name", ["layer", "black"])
def test_captum_feature_ablation_equals_occlusion(name, setup):
    attr = pytest.importorskip("captum.attr")
    from masked_ops.explain.adapters.captum import CaptumForward, captum_inputs

    model, image, seg = setup
    fwd = CaptumForward(model, name)
    args = captum_inputs(image, seg)
    with torch.no_grad():
        a = attr.FeatureAblation(fwd).attribute(**args, target=2, perturbations_per_eval=4)
    ours = explain_occlusion(get_strategy(name, model), image, segments=seg, targets=2, output="logit")
    assert a.shape == (1, 4, H, W) and torch.isfinite(a).all()
    torch.testing.assert_close(a[0, 0], ours.heatmap(), rtol=1e-4, atol=1e-5)


def test_captum_occlusion_windows_equal_grid_occlusion(setup):
    attr = pytest.importorskip("captum.attr")
    from masked_ops.explain.adapters.captum import CaptumForward, captum_inputs

    model, image, seg = setup
    args = captum_inputs(image)
    with torch.no_grad():
        a = attr.Occlusion(CaptumForward(model, "layer")).attribute(
            args["inputs"], sliding_window_shapes=(4, 8, 8), strides=(4, 8, 8), baselines=args["baselines"],
            target=0, perturbations_per_eval=9)
    ours = explain_occlusion(get_strategy("layer", model), image, segments=seg, targets=0, output="logit")
    torch.testing.assert_close(a[0, 0], ours.heatmap(), rtol=1e-4, atol=1e-5)


class Additive(nn.Module):
    def __init__(self, coef):
        super().__init__()
        self.coef = coef

    def forward(self, x):
        return torch.einsum("nchw,tchw->nt", x, self.coef)


def test_captum_kernel_shap_and_lime_run(setup):
    attr = pytest.importorskip("captum.attr")
    from masked_ops.explain.adapters.captum import CaptumForward, captum_inputs

    _, image, seg = setup
    coef = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(2))
    strat = get_strategy("black", Additive(coef), mean=(0, 0, 0), std=(1, 1, 1))
    args = captum_inputs(image, seg)
    torch.manual_seed(0)
    with torch.no_grad():
        shap = attr.KernelShap(CaptumForward(strategy=strat)).attribute(**args, target=1, n_samples=120,
                                                                         perturbations_per_eval=40)
    contrib = torch.stack([(coef[1] * image)[:, seg == k].sum() for k in range(9)])
    # an additive function: KernelSHAP's regression recovers each segment's contribution exactly
    torch.testing.assert_close(shap[0, 0], contrib[seg], rtol=1e-3, atol=1e-3)
    model = tiny_cnn()
    with torch.no_grad():
        lime = attr.Lime(CaptumForward(model, "layer")).attribute(**captum_inputs(image, seg), target=0,
                                                                 n_samples=40, perturbations_per_eval=20)
    assert lime.shape == (1, 4, H, W) and torch.isfinite(lime).all()


# ----------------------------------------------------------------------------- quantus
def _quantus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("quantus")


def test_quantus_pixel_flipping_removes_with_layer_masking(setup):
    quantus = _quantus()
    from masked_ops.explain.adapters.quantus import nan_perturb_func

    model, image, seg = setup
    net = NaNMaskedModel(model, "layer").eval()
    x = image[None].repeat(2, 1, 1, 1).numpy()
    x[1] = x[1, :, ::-1].copy()
    a = np.random.RandomState(0).rand(2, 1, H, W).astype(np.float32)
    y = np.array([1, 3])
    step = 3 * H * W // 6
    metric = quantus.PixelFlipping(features_in_step=step, perturb_func=nan_perturb_func, disable_warnings=True,
                                   normalise=False, abs=False)
    scores = np.asarray(metric(model=net, x_batch=x, y_batch=y, a_batch=a, device="cpu", softmax=True))
    # transcription: remove the pixels of the top attributions, step by step; a pixel goes once any channel does
    strat = get_strategy("layer", model)
    order = np.argsort(-np.broadcast_to(a, x.shape).reshape(2, -1), axis=1)
    want = []
    for s in range(6):
        removed = np.zeros((2, 3 * H * W), dtype=bool)
        np.put_along_axis(removed, order[:, :(s + 1) * step], True, axis=1)
        visible = ~removed.reshape(2, 3, H, W).any(1, keepdims=True)
        with torch.no_grad():
            p = strat(torch.from_numpy(x), torch.from_numpy(visible)).softmax(1).numpy()
        want.append(p[np.arange(2), y])
    assert scores.shape == (2, 6) and np.isfinite(scores[:, :-1]).all()
    np.testing.assert_allclose(scores, np.stack(want, 1), rtol=1e-5, atol=1e-6)


def test_quantus_region_perturbation_runs(setup):
    quantus = _quantus()
    from masked_ops.explain.adapters.quantus import nan_perturb_func

    model, image, _ = setup
    net = NaNMaskedModel(model, "layer").eval()
    x = image[None].numpy()
    a = np.random.RandomState(1).rand(1, 1, H, W).astype(np.float32)
    metric = quantus.RegionPerturbation(patch_size=8, regions_evaluation=4, perturb_func=nan_perturb_func,
                                        disable_warnings=True, normalise=False)
    scores = np.asarray(metric(model=net, x_batch=x, y_batch=np.array([0]), a_batch=a, device="cpu"))
    assert scores.shape == (1, 4) and np.isfinite(scores).all()
    # removing regions changes the prediction (the perturbation reached the model as a mask)
    assert np.abs(np.diff(scores[0])).max() > 0


def test_nan_perturb_funcs():
    from masked_ops.explain.adapters.quantus import nan_perturb_func, nan_perturb_func_unbatched

    arr = np.zeros((2, 6), dtype=np.float32)
    out = nan_perturb_func(arr, np.array([[0, 2], [5, 1]]))
    assert np.isnan(out).sum() == 4 and np.isnan(out[0, [0, 2]]).all() and np.isnan(out[1, [5, 1]]).all()
    assert not np.isnan(arr).any()
    with pytest.raises(TypeError, match="floating"):
        nan_perturb_func(np.zeros((1, 3), dtype=np.int64), np.array([[0]]))
    one = nan_perturb_func_unbatched(np.zeros((3, 4, 4)), (slice(0, 2), slice(1, 3)), indexed_axes=[1, 2])
    assert np.isnan(one).sum() == 3 * 4 and np.isnan(one[:, 0:2, 1:3]).all()
