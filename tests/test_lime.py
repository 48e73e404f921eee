"""LIME / KernelSHAP: checked against the lime package and sklearn, on a tiny model."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.linear_model import Ridge
from sklearn.metrics import pairwise_distances

from masked_ops.explain import explain_kernel_shap, explain_lime, get_strategy, grid_segments
from masked_ops.explain.lime import cosine_distance_to_ones, lime_kernel, lime_samples, weighted_ridge
from masked_ops.explain.perturb import forward_samples
from masked_ops.images import IMAGENET_MEAN, IMAGENET_STD

lime_base = pytest.importorskip("lime.lime_base")
lime_image = pytest.importorskip("lime.lime_image")

H = W = 24


def tiny_cnn(classes=6):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)).eval()


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, H, W, generator=g)
    return tiny_cnn(), image, grid_segments(H, W, 4)


def test_weighted_ridge_matches_sklearn():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2, (80, 7), generator=g).double()
    y = torch.rand(80, 3, generator=g, dtype=torch.float64)
    w = torch.rand(80, generator=g, dtype=torch.float64)
    coef, intercept, score = weighted_ridge(x, y, w, alpha=1.0)
    for t in range(3):
        r = Ridge(alpha=1.0, fit_intercept=True).fit(x.numpy(), y[:, t].numpy(), sample_weight=w.numpy())
        np.testing.assert_allclose(coef[t].numpy(), r.coef_, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(intercept[t].item(), r.intercept_, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(score[t].item(), r.score(x.numpy(), y[:, t].numpy(), sample_weight=w.numpy()),
                                   rtol=1e-8)


def test_kernel_matches_lime_and_sklearn():
    z = lime_samples(50, 9, seed=3)
    z[5] = 0  # an all-removed row: sklearn's cosine distance is 1 there
    d = cosine_distance_to_ones(z)
    np.testing.assert_allclose(d.numpy(), pairwise_distances(z.numpy(), z[:1].numpy(), metric="cosine").ravel(),
                               atol=1e-12)
    kernel_fn = lime_image.LimeImageExplainer(kernel_width=0.25).base.kernel_fn
    np.testing.assert_allclose(lime_kernel(d).numpy(), kernel_fn(d.numpy()), rtol=1e-12)


def test_same_samples_same_weights_as_lime_base(setup):
    model, image, seg = setup
    strat = get_strategy("grey", model)
    z = lime_samples(300, 16, seed=0)
    outputs = forward_samples(strat, image, seg, z, list(range(6)))
    exp = explain_lime(strat, image, segments=seg, samples=z, targets=[0, 3, 5])
    base = lime_image.LimeImageExplainer(kernel_width=0.25, random_state=0).base
    dist = pairwise_distances(z.numpy(), z[:1].numpy(), metric="cosine").ravel()
    for i, label in enumerate([0, 3, 5]):
        intercept, local_exp, score, _ = base.explain_instance_with_data(
            z.numpy(), outputs.numpy(), dist, label, 16, feature_selection="none")
        want = np.zeros(16)
        for f, wgt in local_exp:
            want[f] = wgt
        np.testing.assert_allclose(exp.weights[i].numpy(), want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(exp.intercept[i].item(), intercept, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(exp.score[i].item(), score, rtol=1e-4, atol=1e-6)


def test_end_to_end_equals_lime_image_explainer(setup):
    """lime's whole pipeline (its sampling, its pixel hiding, its regression) against ours."""
    model, image, seg = setup
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def classifier_fn(images):  # N x H x W x 3 numpy -> probabilities
        x = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
        with torch.no_grad():
            return model((x - mean) / std).softmax(1).numpy()

    explainer = lime_image.LimeImageExplainer(kernel_width=0.25, feature_selection="none", random_state=7)
    ref = explainer.explain_instance(image.permute(1, 2, 0).double().numpy(), classifier_fn, labels=(2,),
                                     top_labels=None, hide_color=0, num_samples=200, batch_size=50,
                                     segmentation_fn=lambda img: seg.numpy(), random_seed=1)
    # lime's samples: RandomState(random_state).randint(0, 2, S*K), row 0 = ones
    z = np.random.RandomState(7).randint(0, 2, 200 * 16).reshape(200, 16).astype(np.float64)
    z[0] = 1
    ours = explain_lime(get_strategy("black", model), image, segments=seg, samples=torch.from_numpy(z),
                        targets=2, progress=False)
    want = np.zeros(16)
    for f, wgt in ref.local_exp[2]:
        want[f] = wgt
    np.testing.assert_allclose(ours.weights[0].numpy(), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.intercept[0].item(), ref.intercept[2], rtol=1e-4, atol=1e-6)


def test_masks_are_built_from_the_segment_map(setup):
    model, image, seg = setup
    seen = []

    class Recorder:
        name = "rec"

        def __call__(self, images, masks):
            seen.append(masks.clone())
            return torch.zeros(masks.shape[0], 2)

    z = lime_samples(10, 16, seed=2)
    forward_samples(Recorder(), image, seg, z, [0], batch_size=4)
    masks = torch.cat(seen)
    assert masks.shape == (10, 1, H, W)
    for s in range(10):
        want = torch.zeros(H, W, dtype=torch.bool)
        for k in range(16):
            if z[s, k] == 1:
                want |= seg == k
        assert torch.equal(masks[s, 0], want)


def test_seeded_and_reproducible(setup):
    model, image, seg = setup
    strat = get_strategy("grey", model)
    a = explain_lime(strat, image, segments=seg, num_samples=64, seed=5)
    b = explain_lime(strat, image, segments=seg, num_samples=64, seed=5, batch_size=7)
    c = explain_lime(strat, image, segments=seg, num_samples=64, seed=6)
    torch.testing.assert_close(a.weights, b.weights)
    assert not torch.equal(a.weights, c.weights)
    assert a.heatmap().shape == (H, W) and torch.equal(a.heatmap()[seg == 3], a.weights[0, 3].expand(int((seg == 3).sum())))


class LinearInSegments(nn.Module):
    """A 'model' whose logit t is linear in the image: Shapley values are exact and known."""

    def __init__(self, coef):
        super().__init__()
        self.coef = coef  # T x 3 x H x W

    def forward(self, x):
        return torch.einsum("nchw,tchw->nt", x, self.coef)


def test_kernel_shap_recovers_an_additive_model(setup):
    _, image, seg = setup
    g = torch.Generator().manual_seed(4)
    coef = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
    model = LinearInSegments(coef)
    # black fill with mean 0 / std 1: removing segment k subtracts exactly sum(coef * image) over k
    strat = get_strategy("black", model, mean=(0, 0, 0), std=(1, 1, 1))
    exp = explain_kernel_shap(strat, image.double(), segments=seg, num_samples=200, targets=[0, 1],
                              output="logit")
    contrib = torch.stack([torch.stack([(coef[t] * image.double())[:, seg == k].sum() for k in range(16)])
                           for t in range(2)])
    torch.testing.assert_close(exp.weights.double(), contrib, rtol=1e-4, atol=1e-4)


def test_bad_input(setup):
    model, image, seg = setup
    strat = get_strategy("grey", model)
    with pytest.raises(ValueError, match="num_samples"):
        explain_lime(strat, image, segments=seg, num_samples=0)
    with pytest.raises(ValueError, match="at least 2"):
        explain_lime(strat, image, segments=torch.zeros(H, W, dtype=torch.long), num_samples=8)
    with pytest.raises(ValueError, match="out of range"):
        explain_lime(strat, image, segments=seg, num_samples=8, targets=99)
    with pytest.raises(ValueError, match="samples must have shape"):
        explain_lime(strat, image, segments=seg, samples=torch.ones(5, 3))
    with pytest.raises(ValueError, match="segmentation method"):
        explain_lime(strat, image, segments="watershed", num_samples=8)
