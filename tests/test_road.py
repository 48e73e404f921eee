"""ROAD and SRG (masked_ops.experiments.road), checked against Quantus' own ROAD and hand values."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from masked_ops.experiments import road as R
from masked_ops.explain.adapters.nan_model import NaNMaskedModel
from masked_ops.explain.strategies import get_strategy

PERCENTAGES = [10, 30, 50, 70, 90]  # 10 x 10 images: whole pixel counts


def colour_model():
    """logits = mean of each (normalised, ReLU'd) colour channel: the class is the dominant colour, so
    removing the reddest pixels first (MoRF of a red attribution) changes the prediction."""
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        conv.bias.zero_()
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(5)
    base = torch.rand(6, 3, 10, 10, generator=g)
    red = torch.rand(6, 1, 10, 10, generator=g) < 0.35
    images = torch.where(red, torch.tensor([1.0, 0.2, 0.2]).view(1, 3, 1, 1),
                         base * torch.tensor([0.3, 0.7, 0.75]).view(1, 3, 1, 1) + 0.25)
    attributions = images[:, 0] + 0.01 * torch.rand(6, 10, 10, generator=g)  # distinct values: no ties
    model = colour_model()
    with torch.no_grad():
        labels = get_strategy("grey", model)(images, torch.ones(6, 1, 10, 10, dtype=torch.bool)).argmax(1)
    return model, images, attributions, labels


@pytest.mark.parametrize("name", ["noisy-linear", "grey", "inpaint-telea", "layer"])
def test_quantus_road_with_our_perturb_func_gives_our_numbers(name, setup):
    quantus = pytest.importorskip("quantus")
    model, images, attributions, labels = setup
    opts = {"noise": 0.0} if name == "noisy-linear" else {}
    strategy = get_strategy(name, model, **opts)
    net = NaNMaskedModel(strategy=strategy).eval()
    ours = R.road(strategy, images, attributions, labels, fractions=[p / 100 for p in PERCENTAGES])
    x = images.numpy()
    a = attributions[:, None].expand(-1, 3, -1, -1).numpy().copy()  # one value per element: whole pixels
    got = {}
    for order, a_q in (("morf", a), ("lerf", 1.0 - a)):  # LeRF: the reversed ranking (Quantus wants a >= 0)
        metric = quantus.ROAD(percentages=PERCENTAGES, perturb_func=R.quantus_perturb_func(strategy), abs=False,
                              normalise=False, disable_warnings=True, display_progressbar=False)
        res = metric(model=net, x_batch=x, y_batch=labels.numpy(), a_batch=a_q, device="cpu")
        got[order] = np.array([res[p] for p in PERCENTAGES])
        np.testing.assert_allclose(got[order], ours[order].mean(0), atol=1e-12, err_msg=f"{name} {order}")
    # the comparison can fail: the curves move with the removed fraction
    assert len(set(np.round(np.concatenate([got["morf"], got["lerf"]]), 6))) > 1


def test_road_masks_count_and_order():
    a = torch.tensor([[0.5, 0.1], [0.9, 0.3]])
    m = R.road_masks(a, [0.0, 0.25, 0.5, 1.0], "morf")
    assert m.shape == (4, 1, 2, 2) and m.dtype == torch.bool
    assert m[0].all() and not m[3].any()
    assert m[1, 0].tolist() == [[True, True], [False, True]]            # 0.9 first
    assert m[2, 0].tolist() == [[False, True], [False, True]]           # then 0.5
    lerf = R.road_masks(a, [0.25, 0.5], "lerf")
    assert lerf[0, 0].tolist() == [[True, False], [True, True]]          # 0.1 first
    assert lerf[1, 0].tolist() == [[True, False], [True, False]]         # then 0.3
    assert R.removal_count(0.29, 100) == 29 and R.removal_count(0.07, 100) == 7  # float-safe floors
    ties = R.pixel_ranking(torch.zeros(3, 3))
    assert ties.tolist() == list(range(9))                                # stable: raster order


def test_road_metrics_on_a_constructed_predictor():
    # logits = [#visible pixels with attribution > 0.5, 5]: class 0 wins while > 5 such pixels stay.
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 4, 4, generator=g)
    attr = (torch.arange(16, dtype=torch.float32) / 16).view(1, 4, 4).repeat(2, 1, 1)

    def predict(x, masks):
        hi = (attr[0] > 0.5).float()  # both images share the map
        n_hi = (masks[:, 0].float() * hi).flatten(1).sum(1)
        return torch.stack([n_hi, torch.full_like(n_hi, 5.0)], 1)

    curves = R.road(predict, images, attr, [0, 0], fractions=[0.0, 0.25, 0.5], metric="accuracy")
    # 7 pixels > 0.5 (indices 9..15); MoRF removes the highest first: 0% -> 7 > 5, 25% (4) -> 3 < 5
    assert curves["morf"][0].tolist() == [1.0, 0.0, 0.0]
    assert curves["lerf"][0].tolist() == [1.0, 1.0, 1.0]  # the lowest 8 go first: all 7 high ones stay
    probs = R.road(predict, images, attr, [0, 0], fractions=[0.0], metric="probability")
    p = torch.softmax(torch.tensor([7.0, 5.0], dtype=torch.float64), 0)[0].item()
    assert probs["morf"][0, 0] == pytest.approx(p)
    assert R.srg([1, 1, 1], [1, 0, 0], [0.0, 0.25, 0.5]) == pytest.approx(0.5 - 0.125)


def test_road_bad_input(setup):
    model, images, attributions, labels = setup
    s = get_strategy("grey", model)
    with pytest.raises(ValueError, match="attributions must have shape"):
        R.road(s, images, attributions[:, :5], labels)
    with pytest.raises(ValueError, match="labels"):
        R.road(s, images, attributions, labels[:2])
    with pytest.raises(ValueError, match="metric"):
        R.road(s, images, attributions, labels, metric="loss")
    with pytest.raises(ValueError, match="order"):
        R.road_masks(attributions[0], [0.5], "middle")
    with pytest.raises(ValueError, match="finite"):
        R.road_masks(torch.full((3, 3), float("nan")), [0.5])
    with pytest.raises(ValueError, match="fractions"):
        R.road(s, images, attributions, labels, fractions=[1.5])
    with pytest.raises(ValueError, match="same length"):
        R.srg([1, 0], [1, 0, 0])
