"""RISE, checked against the ``torchray`` package's ``rise`` (TorchRay 1.0.0.2 runs with our torch).

TorchRay multiplies the input by the masks (a black fill in pixel space when the model
normalises) and applies a sigmoid to the model's outputs; a model that returns log(p / (1 - p))
makes that sigmoid give back the class probability p, so our RISE with the "black" strategy and
TorchRay's, given the same masks (``filter_masks``), must agree up to RISE's 1/p scale.
"""
import pytest
import torch
import torch.nn as nn

from masked_ops.explain.maps import MapExplanation
from masked_ops.explain.rise import explain_rise, rise_masks
from masked_ops.explain.soft import soft_strategies, soft_strategy
from masked_ops.explain.strategies import get_strategy
from masked_ops.images import IMAGENET_MEAN, IMAGENET_STD

torchray_rise = pytest.importorskip("torchray.attribution.rise", reason="torchray is a test dependency")


class Normalise(nn.Module):
    def forward(self, x):
        return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


class ProbLogit(nn.Module):
    """logit of the softmax probability, so that sigmoid() of it is the probability."""

    def forward(self, z):
        logp = z.double().log_softmax(1)
        return (logp - torch.log1p(-logp.exp().clamp(max=1 - 1e-12))).float()


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


@pytest.mark.parametrize("size,cells", [((40, 40), 7), ((33, 50), 5), ((16, 16), 2)])
def test_masks_match_torchray_geometry(size, cells):
    # Same grid and shifts: TorchRay's reflect-padded upsampling (its _upsample_reflect) and crop.
    n, p = 6, 0.5
    g = torch.Generator().manual_seed(4)
    ours = rise_masks(n, size, cells, p, generator=g)
    g = torch.Generator().manual_seed(4)
    grid = (torch.rand(n, 1, cells, cells, generator=g) < p).float()
    cell = [-(-s // cells) for s in size]
    dy = torch.randint(0, cell[0], (n,), generator=g)
    dx = torch.randint(0, cell[1], (n,), generator=g)
    up = torchray_rise._upsample_reflect(grid, (size[0] + cell[0], size[1] + cell[1]))
    want = torch.stack([up[i, :, dy[i]:dy[i] + size[0], dx[i]:dx[i] + size[1]] for i in range(n)])
    torch.testing.assert_close(ours, want)


def test_saliency_matches_torchray_with_the_same_masks():
    model = small_cnn()
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    n, p = 96, 0.5
    masks = rise_masks(n, (32, 32), 4, p, generator=torch.Generator().manual_seed(9))
    wrapped = nn.Sequential(Normalise(), model, ProbLogit()).eval()
    want = torchray_rise.rise(wrapped, image[None], num_masks=n, num_cells=4, filter_masks=masks, batch_size=32, p=p)

    import masked_ops.explain.rise as R

    original = R.rise_upsample
    it = iter(masks.split(32))
    R.rise_upsample = lambda *a, **k: next(it)  # feed the same masks, batch by batch
    try:
        exp = explain_rise(get_strategy("black", model), image, targets=[0, 3], n_masks=n, cells=4, p=p,
                           batch_size=32, progress=False)
    finally:
        R.rise_upsample = original
    for j, t in enumerate([0, 3]):
        torch.testing.assert_close(exp.heatmap(j) * p, want[0, t].float(), rtol=1e-4, atol=1e-6)


class Readout(nn.Module):
    """logits_c = 8 * mean(x * W_c) with smooth blobs W_c: a model whose answer lives in known places."""

    def __init__(self, size=24):
        super().__init__()
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        blob = lambda cy, cx: torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0 ** 2))
        self.register_buffer("w", torch.stack([blob(6, 6), blob(16, 14), blob(4, 18)])[:, None])

    def forward(self, x):
        return 8 * (x.mean(1, keepdim=True)[:, None] * self.w[None]).mean(dim=(2, 3, 4))


def _corr(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_saliency_agrees_with_torchray_statistically():
    # Own masks on each side (different random streams): TorchRay's map is as close to ours as
    # another seed of ours is, and both find the class's blob.
    model = Readout().eval()
    image = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.5
    wrapped = nn.Sequential(Normalise(), model, ProbLogit()).eval()
    want = torchray_rise.rise(wrapped, image[None], num_masks=2000, num_cells=4, batch_size=250, p=0.5)[0, 1]
    s = get_strategy("black", model)
    ours = [explain_rise(s, image, targets=1, n_masks=2000, cells=4, p=0.5, seed=k, batch_size=250,
                         progress=False).heatmap() * 0.5 for k in (0, 1)]
    assert _corr(ours[0], want) > 0.9
    assert _corr(ours[0], want) > _corr(ours[0], ours[1]) - 0.05
    torch.testing.assert_close(ours[0].mean(), want.mean(), rtol=0.02, atol=0)
    peak = divmod(int(ours[0].argmax()), 24)
    assert abs(peak[0] - 16) <= 4 and abs(peak[1] - 14) <= 4


def test_mask_statistics_and_seeding():
    m = rise_masks(400, (28, 28), 7, 0.3, generator=torch.Generator().manual_seed(0))
    assert m.shape == (400, 1, 28, 28) and float(m.min()) >= 0 and float(m.max()) <= 1
    assert abs(float(m.mean()) - 0.3) < 0.03
    model = small_cnn()
    s = get_strategy("grey", model)
    image = torch.rand(3, 28, 28)
    a = explain_rise(s, image, n_masks=40, cells=7, seed=1, progress=False)
    b = explain_rise(s, image, n_masks=40, cells=7, seed=1, progress=False)
    c = explain_rise(s, image, n_masks=40, cells=7, seed=2, progress=False)
    assert torch.equal(a.weights, b.weights) and not torch.equal(a.weights, c.weights)
    # batching does not change the draw
    d = explain_rise(s, image, n_masks=40, cells=7, seed=1, batch_size=7, progress=False)
    torch.testing.assert_close(a.weights, d.weights)


@pytest.mark.parametrize("name", soft_strategies())
def test_every_soft_strategy_and_binary_masks_with_layer(name):
    model = small_cnn()
    image = torch.rand(3, 20, 20)
    exp = explain_rise(soft_strategy(name, model), image, targets=[0, 2], n_masks=16, cells=4, progress=False)
    assert isinstance(exp, MapExplanation) and exp.method == "rise" and exp.weights.shape == (2, 400)
    hard = explain_rise(get_strategy("layer", model), image, n_masks=16, cells=4, binary=True, progress=False)
    assert hard.info["binary"] and hard.weights.shape == (1, 400)


def test_bad_input():
    model = small_cnn()
    s = get_strategy("grey", model)
    image = torch.rand(3, 16, 16)
    with pytest.raises(ValueError, match="n_masks must be an int >= 1"):
        explain_rise(s, image, n_masks=0)
    for p in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"p must be a probability in \(0, 1\)"):
            explain_rise(s, image, p=p, n_masks=2)
    with pytest.raises(ValueError, match="cells must be an int >= 1"):
        explain_rise(s, image, cells=0, n_masks=2)
    with pytest.raises(ValueError, match="cells must be at most"):
        explain_rise(s, image, cells=17, n_masks=2)
    with pytest.raises(ValueError, match="target class 5 is out of range"):
        explain_rise(s, image, targets=5, n_masks=2)
    with pytest.raises(ValueError, match="takes hard 0/1 masks only"):  # layer masking built without soft=True
        explain_rise(get_strategy("layer", model), image, n_masks=2)
