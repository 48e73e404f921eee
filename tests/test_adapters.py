"""Adapters, each run through the real installed package (lime, Captum, Quantus, shap): the recipes of the
module docstrings run verbatim, every Quantus 0.6 faithfulness metric with a perturb_func runs and agrees
with Quantus's own baseline replacement of the same whole pixels."""
import importlib
import textwrap
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


# ----------------------------------------------------------------------------- recipes, verbatim
def recipe(module_name: str) -> str:
    """The literal block after the first "::" of a module's docstring (the documented recipe)."""
    doc = importlib.import_module(module_name).__doc__
    lines = []
    for line in doc[doc.index("::\n") + 3:].splitlines():
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines)).strip("\n")


def run_recipe(module_name: str) -> dict:
    namespace = {}
    exec(compile(recipe(module_name), f"<recipe of {module_name}>", "exec"), namespace)
    return namespace


@pytest.mark.slow  # a real EfficientNet-Lite0, a few hundred layer-masked forward passes
def test_captum_recipe_runs_as_documented():
    pytest.importorskip("captum.attr")
    ns = run_recipe("masked_ops.explain.adapters.captum")
    for name in ("ablation", "lime", "shap", "occlusion"):
        assert ns[name].shape == (1, 4, 224, 224) and torch.isfinite(ns[name]).all(), name
    assert ns["attributions"].shape == (1, 3, 224, 224)
    assert ns["target"] in range(281, 286)  # a cat
    # Captum's FeatureAblation through the adapter = our occlusion of the same segments (logits)
    strat = get_strategy("layer", ns["model"], mean=ns["info"].mean, std=ns["info"].std)
    ours = explain_occlusion(strat, ns["images"][0], segments=ns["segments"], targets=ns["target"], output="logit")
    for c in range(3):
        torch.testing.assert_close(ns["ablation"][0, c], ours.heatmap(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a real EfficientNet-Lite0, a few hundred layer-masked forward passes
def test_quantus_recipe_runs_as_documented():
    _quantus()
    ns = run_recipe("masked_ops.explain.adapters.quantus")
    curve = np.asarray(ns["curve"])
    assert curve.shape == (1, 48) and np.isfinite(curve).all()
    # the last point has every pixel removed: layer masking's output with nothing visible
    with torch.no_grad():
        empty = ns["net"](torch.full_like(ns["images"], float("nan"))).softmax(1)[0, int(ns["y"][0])]
    assert curve[0, -1] == pytest.approx(float(empty), abs=1e-5)
    assert curve[0, 0] > curve[0, -1]  # removing the most relevant pixels first lowers the class
    assert sorted(ns["road_scores"]) == [10, 30, 50, 70, 90]


def test_lime_recipe_runs_as_documented():
    pytest.importorskip("lime.lime_image")
    ns = run_recipe("masked_ops.explain.adapters.lime_adapter")
    exp = ns["explanation"]
    assert exp.top_labels[0] in range(281, 286)  # a cat
    weights = np.array([w for _, w in exp.local_exp[exp.top_labels[0]]])
    assert np.isfinite(weights).all() and np.abs(weights).max() > 0


# ----------------------------------------------------------------------------- shap
def test_shap_recipe_runs_as_documented():
    pytest.importorskip("shap")
    ns = run_recipe("masked_ops.explain.adapters.shap_adapter")
    sv, heat = ns["sv"], ns["heat"]
    assert sv.values.shape == (1, 224, 224, 3, 1) and heat.shape == (224, 224)
    assert np.isfinite(heat).all() and np.abs(heat).max() > 0
    # the class explained is the model's top-1 (a cat)
    top = int(np.argmax(ns["f"](ns["image"][None])[0]))
    names = np.asarray(sv.output_names).reshape(-1)
    assert top in range(281, 286) and names[0] == ns["info"].class_names[top]


def test_shap_black_strategy_equals_shaps_own_black_masker(setup):
    shap = pytest.importorskip("shap")
    from masked_ops.explain.adapters.shap_adapter import shap_model

    model, image, _ = setup
    img = image.permute(1, 2, 0).numpy()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def plain(x):  # the plain model as a shap user would wrap it, with SHAP painting removed pixels 0
        x = torch.as_tensor(np.asarray(x, np.float32)).permute(0, 3, 1, 2)
        with torch.no_grad():
            return model((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).softmax(1).numpy()

    def run(f, value):
        return shap.Explainer(f, shap.maskers.Image(value, img.shape))(img[None], max_evals=120, batch_size=40,
                                                                      outputs=[1]).values

    ours = run(shap_model(model, "black", mean=mean, std=std), np.nan)
    theirs = run(plain, 0.0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    assert np.abs(theirs).max() > 0
    layer = run(shap_model(model, "layer", mean=mean, std=std), np.nan)
    assert np.isfinite(layer).all() and not np.allclose(layer, theirs)  # layer masking is not black paint
    with pytest.raises(ValueError, match="N x H x W x C"):
        shap_model(model, "layer")(np.zeros((2, 3, H, W), np.float32))


# ----------------------------------------------------------------------------- captum: one map per image
def test_captum_segment_map_per_image(setup):
    attr = pytest.importorskip("captum.attr")
    from masked_ops.explain.adapters.captum import CaptumForward, captum_inputs

    model, image, seg = setup
    images = torch.stack([image, image.flip(-1)])
    segs = torch.stack([seg, grid_segments(H, W, 2, 4)])  # 9 and 8 segments
    fwd = CaptumForward(model, "layer")
    args = captum_inputs(images, segs)
    assert args["feature_mask"].shape == (2, 4, H, W)
    with torch.no_grad():
        both = attr.FeatureAblation(fwd).attribute(**args, target=1, perturbations_per_eval=4)
        for i in range(2):
            alone = attr.FeatureAblation(fwd).attribute(**captum_inputs(images[i], segs[i]), target=1)
            torch.testing.assert_close(both[i], alone[0], rtol=1e-5, atol=1e-6)
            ours = explain_occlusion(get_strategy("layer", model), images[i], segments=segs[i], targets=1,
                                     output="logit")
            torch.testing.assert_close(both[i, 0], ours.heatmap(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="N x H x W"):
        captum_inputs(images, torch.stack([seg] * 3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        captum_inputs(images * 255)


# ----------------------------------------------------------------------------- lime: uint8 images
def test_lime_uint8_image_converted_or_explained(setup):
    lime_image = pytest.importorskip("lime.lime_image")
    from masked_ops.explain.adapters.lime_adapter import lime_classifier_fn, to_lime_image

    model, image, seg = setup
    u8 = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    fn = lime_classifier_fn(model)
    explainer = lime_image.LimeImageExplainer(random_state=0)
    with pytest.raises(ValueError):  # lime itself cannot write NaN into uint8: the documented failure
        explainer.explain_instance(u8, fn, hide_color=float("nan"), num_samples=10,
                                   segmentation_fn=lambda img: seg.numpy())
    converted = to_lime_image(u8)
    assert converted.dtype == np.float64 and np.array_equal(converted, u8 / 255.0)
    assert np.array_equal(to_lime_image(image), image.permute(1, 2, 0).double().numpy())
    exp = explainer.explain_instance(converted, fn, hide_color=float("nan"), labels=(0,), top_labels=None,
                                     num_samples=20, batch_size=10, segmentation_fn=lambda img: seg.numpy())
    assert len(exp.local_exp[0]) == 9
    with pytest.raises(TypeError, match="to_lime_image"):  # lime with hide_color=None passes uint8 through
        fn(u8[None])
    with pytest.raises(ValueError, match="divide a 0-255 image by 255"):
        to_lime_image(u8.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fn(u8[None].astype(np.float32))


# ----------------------------------------------------------------------------- quantus
def _quantus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("quantus")


QH = QW = 16  # small: every metric runs twice (ours, reference) and once more with layer masking


@pytest.fixture(scope="module")
def qsetup():
    from masked_ops.experiments.images import image_set

    images, _ = image_set(["chelsea", "coffee"], size=QH)
    a = np.random.RandomState(0).rand(2, 1, QH, QW).astype(np.float32)
    return tiny_cnn(), images.numpy(), np.array([1, 3]), a


def _whole_pixels(indices, pixels, channels=3):
    """Flat C x H x W indices -> every channel of their pixels (the test's transcription of "whole pixels")."""
    p = np.asarray(indices) % pixels
    return np.concatenate([p + c * pixels for c in range(channels)], axis=-1)


def _reference_perturb(arr, indices=None, mask=None, **kwargs):
    """Quantus's own baseline replacement with 0 (black), applied to the whole pixels named."""
    from quantus.functions.perturb_func import batch_baseline_replacement_by_indices

    arr = np.asarray(arr)
    if mask is not None:  # IROF (Quantus's own baseline_replacement_by_mask asserts equal shapes: 3 vs 1 channel)
        return np.where(np.broadcast_to(mask, arr.shape), 0.0, arr).astype(arr.dtype)
    if arr.ndim == 2:
        return batch_baseline_replacement_by_indices(arr, _whole_pixels(indices, arr.shape[1] // 3),
                                                     perturb_baseline=0.0)
    out = arr.reshape(arr.shape[0], -1).copy()  # ROAD: one C x H x W sample
    out[:, np.asarray(indices) % out.shape[1]] = 0.0
    return out.reshape(arr.shape)


def _metrics(quantus, perturb):
    common = dict(perturb_func=perturb, disable_warnings=True)
    return {
        "PixelFlipping": quantus.PixelFlipping(features_in_step=32, **common),
        "RegionPerturbation": quantus.RegionPerturbation(patch_size=4, regions_evaluation=6, **common),
        "Selectivity": quantus.Selectivity(patch_size=4, **common),
        "SensitivityN": quantus.SensitivityN(features_in_step=32, n_max_percentage=0.5, **common),
        "FaithfulnessCorrelation": quantus.FaithfulnessCorrelation(nr_runs=6, subset_size=32, **common),
        "FaithfulnessEstimate": quantus.FaithfulnessEstimate(features_in_step=32, **common),
        "MonotonicityCorrelation": quantus.MonotonicityCorrelation(nr_samples=2, features_in_step=32, **common),
        "Monotonicity": quantus.Monotonicity(features_in_step=32, **common),
        "IROF": quantus.IROF(**common),
        "ROAD": quantus.ROAD(percentages=[10, 50, 90], **common),
        "Infidelity": quantus.Infidelity(perturb_patch_sizes=[4], n_perturb_samples=1, **common),
    }


METRICS = ("PixelFlipping", "RegionPerturbation", "Selectivity", "SensitivityN", "FaithfulnessCorrelation",
           "FaithfulnessEstimate", "MonotonicityCorrelation", "Monotonicity", "IROF", "ROAD", "Infidelity")


def test_every_quantus_faithfulness_metric_with_a_perturb_func_is_covered():
    quantus = _quantus()
    import inspect

    from quantus.helpers.enums import EvaluationCategory

    with_perturb = sorted(name for name, cls in vars(quantus).items()
                          if inspect.isclass(cls) and issubclass(cls, quantus.Metric)
                          and getattr(cls, "evaluation_category", None) == EvaluationCategory.FAITHFULNESS
                          and "perturb_func" in inspect.signature(cls.__init__).parameters)
    assert with_perturb == sorted(METRICS)


def _score(metric, model, x, y, a):
    np.random.seed(0)  # FaithfulnessCorrelation draws random subsets
    out = metric(model=model, x_batch=x, y_batch=y, a_batch=a, device="cpu")
    return np.asarray(list(out.values()) if isinstance(out, dict) else out, dtype=np.float64)


@pytest.mark.parametrize("name", METRICS)
def test_quantus_metric_removes_the_whole_pixels_quantus_names(name, qsetup, monkeypatch):
    """Ours (NaN, then the "black" strategy paints 0) equals Quantus's own replacement of the same whole
    pixels by 0 on the plain model, in every calling convention; layer masking runs and differs."""
    quantus = _quantus()
    from masked_ops.explain.adapters.quantus import nan_perturb_func, negzero_perturb_func

    if not hasattr(np, "trapz"):  # Quantus 0.6's AUC helper calls np.trapz, gone in NumPy 2.4
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    model, x, y, a = qsetup
    infidelity = name == "Infidelity"  # its formula subtracts the perturbed input: the -0.0 marker
    ours_fn = negzero_perturb_func if infidelity else nan_perturb_func
    black = NaNMaskedModel(model, "black", negative_zero=infidelity).eval()
    ours = _score(_metrics(quantus, ours_fn)[name], black, x, y, a)
    reference = _score(_metrics(quantus, _reference_perturb)[name], black, x, y, a)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6, equal_nan=True)
    layer = NaNMaskedModel(model, "layer", negative_zero=infidelity).eval()
    scores = _score(_metrics(quantus, ours_fn)[name], layer, x, y, a)
    assert scores.size and np.isfinite(scores).all() or name == "MonotonicityCorrelation", scores


def test_quantus_pixel_flipping_with_layer_masking_transcribed(qsetup):
    quantus = _quantus()
    from masked_ops.explain.adapters.quantus import nan_perturb_func

    model, x, y, a = qsetup
    net = NaNMaskedModel(model, "layer").eval()
    step = 32
    metric = quantus.PixelFlipping(features_in_step=step, perturb_func=nan_perturb_func, disable_warnings=True,
                                   normalise=False, abs=False)
    scores = np.asarray(metric(model=net, x_batch=x, y_batch=y, a_batch=a, device="cpu", softmax=True))
    # transcription: Quantus ranks the C x H x W values of the broadcast attribution; after step k the pixels
    # of the first (k + 1) * step of them are removed, whole
    order = np.argsort(-np.broadcast_to(a, x.shape).reshape(2, -1), axis=1)
    strat = get_strategy("layer", model)
    steps = 3 * QH * QW // step
    want = []
    for k in range(steps):
        removed = np.zeros((2, QH * QW), dtype=bool)
        np.put_along_axis(removed, order[:, :(k + 1) * step] % (QH * QW), True, axis=1)
        visible = ~removed.reshape(2, 1, QH, QW)
        with torch.no_grad():
            p = strat(torch.from_numpy(x), torch.from_numpy(visible)).softmax(1).numpy()
        want.append(p[np.arange(2), y])
    assert scores.shape == (2, steps) and np.isfinite(scores).all()
    np.testing.assert_allclose(scores, np.stack(want, 1), rtol=1e-5, atol=1e-6)
    removed_after_first = len(np.unique(order[0, :step] % (QH * QW)))
    assert step // 3 <= removed_after_first <= step // 3 + 2  # a step of 32 values: ~32 / 3 whole pixels


def test_nan_perturb_func_conventions():
    from masked_ops.explain.adapters.quantus import nan_perturb_func, negzero_perturb_func

    # batched, flattened (C x H x W = 3 x 2 x 2): index 1 and 6 name pixels 1 and 2, every channel goes
    arr = np.arange(24, dtype=np.float32).reshape(2, 12)
    out = nan_perturb_func(arr, np.array([[1], [6]]))
    assert np.isnan(out[0].reshape(3, 4)[:, 1]).all() and np.isnan(out[1].reshape(3, 4)[:, 2]).all()
    assert np.isnan(out).sum() == 6 and not np.isnan(arr).any()
    # one sample (ROAD): C x H x W with flat indices
    one = nan_perturb_func(np.zeros((3, 2, 2)), np.array([4, 11]))
    assert np.isnan(one[:, 0, 0]).all() and np.isnan(one[:, 1, 1]).all() and np.isnan(one).sum() == 6
    # masks (IROF): N x 1 x H x W over N x C x H x W
    mask = np.zeros((1, 1, 2, 2), dtype=bool)
    mask[0, 0, 1, 0] = True
    m = nan_perturb_func(np.zeros((1, 3, 2, 2)), mask=mask)
    assert np.isnan(m[0, :, 1, 0]).all() and np.isnan(m).sum() == 3
    z = negzero_perturb_func(np.ones((1, 12)), np.array([[0]]))
    assert (z.reshape(3, 4)[:, 0] == 0).all() and np.signbit(z.reshape(3, 4)[:, 0]).all()
    with pytest.raises(TypeError, match="floating"):
        nan_perturb_func(np.zeros((1, 3), dtype=np.int64), np.array([[0]]))
    with pytest.raises(ValueError, match="channels"):
        nan_perturb_func(np.zeros((1, 4)), np.array([[0]]))
    assert nan_perturb_func(np.zeros((1, 4)), np.array([[0]]), channels=1)[0, 0] != 0  # NaN


def test_nan_model_refuses_images_outside_0_1(setup):
    model, image, _ = setup
    with pytest.raises(ValueError, match="divide a 0-255 image by 255"):
        NaNMaskedModel(model, "layer")(image[None] * 255)
    x = image[None].clone()
    x[..., :4, :] = float("nan")  # removed pixels may hold anything: only the visible ones are checked
    x[..., :2, :] = 1e6
    x[:, 0, :2, :] = float("nan")
    with torch.no_grad():
        NaNMaskedModel(model, "layer")(x)
