"""Tests of masked_ops.experiments: metrics on constructed cases, masks, resume, end-to-end runs.

Every experiment runs end to end on a tiny CNN and two tiny real photos; the metrics are
checked against values known by construction (identical predictions: KL 0, agreement 1; a
linear model: exact linearity), never against the code's own earlier output.
"""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

from masked_ops.experiments import (image_set, lime_faithfulness, linearity, removal_curves, salient_vs_moved,
                                    shape_probe)
from masked_ops.experiments import masks as M
from masked_ops.experiments import metrics
from masked_ops.cli.experiment import main as cli_main
from masked_ops.experiments.faithfulness import curve_masks, lime_weights
from masked_ops.runs.store import Run

ID = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # no normalisation: hand-made predictors stay simple


def tiny_cnn(classes: int = 7, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, classes)).eval()


@pytest.fixture(scope="module")
def photos():
    images, names = image_set(["chelsea", "coffee"], size=32)
    return images, names


# ----------------------------------------------------------------------------- metrics
def test_kl_is_zero_for_identical_and_matches_hand_value():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert metrics.kl_divergence(a, a).item() == 0.0
    assert metrics.kl_divergence(a, a + 5.0).item() == pytest.approx(0.0, abs=1e-12)  # softmax shift-invariant
    p = torch.softmax(a.double(), -1)
    q = torch.softmax(torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64), -1)
    expected = float((p * (p / q).log()).sum())
    assert metrics.kl_divergence(a, torch.tensor([[3.0, 2.0, 1.0]])).item() == pytest.approx(expected, rel=1e-12)
    assert expected > 0.1


def test_class_histogram_entropy_known_values():
    assert metrics.class_histogram_entropy(np.array([4, 4, 4, 4])) == 0.0
    assert metrics.class_histogram_entropy(np.arange(8)) == pytest.approx(3.0)
    assert metrics.class_histogram_entropy(np.array([1, 1, 2, 2])) == pytest.approx(1.0)
    assert metrics.most_common(np.array([3, 3, 3, 9])) == (3, 0.75)


def test_auc_cosine_relative_error_known_values():
    assert metrics.auc([1, 1, 1]) == pytest.approx(1.0)
    assert metrics.auc([0, 0.5, 1.0]) == pytest.approx(0.5)
    assert metrics.auc([1, 0], [0, 0.5]) == pytest.approx(0.25)
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0]])
    assert metrics.cosine(a, b).tolist() == pytest.approx([1.0, -1.0])
    assert metrics.relative_error(a, b).tolist() == pytest.approx([1.0, 2.0])
    lo, hi = metrics.bootstrap_ci(np.array([0.0, 1.0] * 20))
    assert lo < 0.5 < hi


def test_lime_weights_equal_sklearn_weighted_ridge():
    from sklearn.linear_model import Ridge
    from sklearn.metrics import pairwise_distances

    g = torch.Generator().manual_seed(3)
    z = torch.rand(60, 9, generator=g) < 0.5
    z[0] = True
    y = torch.rand(60, generator=g, dtype=torch.float64)
    ours = lime_weights(z, y)
    # lime_image: cosine distance to the all-ones sample, kernel sqrt(exp(-d^2/w^2)), Ridge(alpha=1)
    d = pairwise_distances(z.numpy().astype(float), np.ones((1, 9)), metric="cosine").ravel()
    w = np.sqrt(np.exp(-(d ** 2) / 0.25 ** 2))
    ref = Ridge(alpha=1.0, fit_intercept=True).fit(z.numpy().astype(float), y.numpy(), sample_weight=w).coef_
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------- masks
def test_removal_masks_nested_with_exact_counts():
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    masks = M.removal_masks((32, 32), 8, [0.0, 0.25, 0.5, 1.0], order)
    removed_patches = (1 - masks).view(4, 1, 4, 8, 4, 8).amax(dim=(3, 5)).flatten(1)
    assert removed_patches.sum(1).tolist() == [0, 4, 8, 16]
    assert bool((masks[1] >= masks[2]).all()) and bool((masks[2] >= masks[3]).all())  # nested
    # patches are whole: every 8 x 8 block is constant
    blocks = masks.view(4, 1, 4, 8, 4, 8)
    assert bool((blocks.amax(dim=(3, 5)) == blocks.amin(dim=(3, 5))).all())


def test_move_away_keeps_the_shape_and_avoids_the_region():
    region = torch.zeros(64, 64, dtype=torch.bool)
    region[5:20, 8:30] = True
    region[20:25, 8:12] = True
    moved, overlap = M.move_away(region)
    assert overlap == 0.0 and not bool((moved & region).any())
    assert int(moved.sum()) == int(region.sum())
    ys, xs = torch.nonzero(moved, as_tuple=True)
    assert torch.equal(moved[ys.min():ys.max() + 1, xs.min():xs.max() + 1], region[5:25, 8:30])


def test_probe_shapes_have_equal_area():
    areas = M.describe_shapes(224, 0.15)
    assert set(areas) == set(M.SHAPES)
    assert max(areas.values()) - min(areas.values()) < 0.01


# ----------------------------------------------------------------------------- removal
def test_strategy_returning_clean_logits_scores_agreement_one_and_kl_zero(photos):
    images, _ = photos
    model = tiny_cnn()
    clean = {"clean": lambda x, m: model(x), "constant": lambda x, m: torch.zeros(x.shape[0], 7)}
    r = removal_curves(model, images, clean, repeats=2, patch=8, progress=False, **ID)
    s = r["strategies"]["clean"]
    assert s["agreement"] == [1.0] * 11 and s["mean_agreement"] == 1.0
    assert max(s["kl"]) == pytest.approx(0.0, abs=1e-9)
    assert s["entropy_bits"] == [pytest.approx(r["clean_entropy_bits"])] * 11
    c = r["strategies"]["constant"]  # every prediction is class 0: a full collapse
    assert c["entropy_bits"] == [0.0] * 11 and c["top_share"] == [1.0] * 11 and c["top_class"] == [0] * 11
    with torch.no_grad():
        expected = float(metrics.kl_divergence(model(images), torch.zeros(2, 7)).mean())
    assert c["kl"][3] == pytest.approx(expected)


def test_removal_runs_end_to_end_with_real_strategies(photos):
    images, names = photos
    r = removal_curves(tiny_cnn(), images, ["grey", "layer"], repeats=1, patch=8, progress=False,
                       image_names=names)
    for s in ("grey", "layer"):
        v = r["strategies"][s]
        assert v["agreement"][0] == 1.0  # nothing removed: the clean prediction
        assert len(v["kl"]) == 11 and all(k >= 0 for k in v["kl"])
        assert v["kl"][0] == pytest.approx(0.0, abs=1e-5)
    assert r["strategies"]["layer"]["kl"][5] > 0


# ----------------------------------------------------------------------------- resume
class Interrupt(BaseException):
    pass


def test_resume_after_interruption_recomputes_nothing(tmp_path, photos):
    images, _ = photos
    model = tiny_cnn()
    calls = {"n": 0, "limit": None}

    def predict(x, m):
        calls["n"] += 1
        if calls["limit"] is not None and calls["n"] > calls["limit"]:
            raise Interrupt()  # like Ctrl-C in the middle of the run
        return model(x)

    strategies = {"a": predict, "b": lambda x, m: model(torch.where(m > 0, x, 0.5))}
    kw = dict(repeats=2, patch=8, progress=False, batch_size=64, **ID)  # one predict call per unit
    calls["limit"] = 1
    with pytest.raises(Interrupt):
        removal_curves(model, images, strategies, out=tmp_path, **kw)
    assert len(list((tmp_path / "removal" / "units").glob("a--*.npz"))) == 1
    calls.update(n=0, limit=None)
    resumed = removal_curves(model, images, strategies, out=tmp_path, **kw)
    assert calls["n"] == 1  # only the unit that was not finished
    calls["n"] = 0
    again = removal_curves(model, images, strategies, out=tmp_path, **kw)
    assert calls["n"] == 0
    fresh = removal_curves(model, images, strategies, out=None, **kw)
    assert resumed["strategies"] == fresh["strategies"] == again["strategies"]


def test_resume_refuses_a_different_configuration(tmp_path):
    Run(tmp_path, "x", {"seed": 0, "n": 2}, progress=False)
    with pytest.raises(ValueError, match="differs in: seed"):
        Run(tmp_path, "x", {"seed": 1, "n": 2}, progress=False)
    run = Run(tmp_path, "x", {"seed": 1, "n": 2}, fresh=True, progress=False)
    out = run.map(["u1", "u2"], lambda k: {"v": np.array([len(k)])})
    assert run.computed == 2 and out["u2"]["v"].tolist() == [2]
    run2 = Run(tmp_path, "x", {"seed": 1, "n": 2}, progress=False)
    run2.map(["u1", "u2", "u3"], lambda k: {"v": np.array([0])})
    assert run2.computed == 1


# ----------------------------------------------------------------------------- other experiments
def test_linearity_of_a_linear_model_is_exact_and_of_a_cnn_is_not(photos):
    images, _ = photos
    torch.manual_seed(1)
    linear = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 32 * 32, 5)).eval()
    linear = linear.double()
    r = linearity(linear, images.double(), ["black", "grey"], repeats=2, patch=8, group_fraction=0.25,
                  progress=False)
    for s in ("black", "grey"):
        assert r["strategies"][s]["rel_err"] == pytest.approx(0.0, abs=1e-9)
        assert r["strategies"][s]["cosine"] == pytest.approx(1.0, abs=1e-12)
    r2 = linearity(tiny_cnn(), images, ["grey", "layer"], repeats=2, patch=8, group_fraction=0.25,
                   progress=False)
    assert r2["strategies"]["grey"]["rel_err"] > 1e-3


def test_leakage_salient_and_probe_end_to_end(photos):
    images, _ = photos
    model = tiny_cnn()
    a = salient_vs_moved(model, images, ["grey", "layer"], area=0.25, progress=False)
    assert a["removed_area"] == pytest.approx(0.25, abs=0.02)
    for v in a["strategies"].values():
        assert 0 <= v["agreement_salient"] <= 1 and 0 <= v["p_clean_moved"] <= 1
    # A shape-blind predictor (it ignores the mask) leaves the probe at chance.
    # ... and one whose output is the (downsampled) mask itself lets the probe find the shape.
    blind = {"blind": lambda x, m: model(x), "leaky": lambda x, m: nn.functional.avg_pool2d(m, 4).flatten(1)}
    views, names = image_set(["chelsea", "coffee"], size=32, augment=3)
    b = shape_probe(model, views, blind, groups=[n.split(":")[0] for n in names], area=0.2, jitter=2,
                    progress=False, **ID)
    assert b["chance"] == pytest.approx(1 / len(M.SHAPES))
    assert b["strategies"]["blind"]["accuracy"] <= b["chance"] + 1e-9  # identical features per image
    assert b["strategies"]["leaky"]["accuracy"] > 0.9


def test_faithfulness_end_to_end_and_curve_masks(photos):
    images, _ = photos
    d, i = curve_masks(torch.tensor([2, 0, 1, 3]), [0.0, 0.5, 1.0])
    assert d.tolist() == [[True] * 4, [False, True, False, True], [False] * 4]
    assert i.tolist() == [[False] * 4, [True, False, True, False], [True] * 4]
    r = lime_faithfulness(tiny_cnn(), images, ["grey", "layer"], evaluators=["grey", "black"], samples=16,
                          n_segments=10, steps=[0, 0.5, 1], progress=False)
    assert r["explainers"] == ["grey", "layer", "random"] and r["evaluators"] == ["grey", "black"]
    for kind in ("deletion_auc", "insertion_auc"):
        for e in r["explainers"]:
            assert set(r[kind][e]) == {"grey", "black"}
            assert all(0 <= v <= 1 for v in r[kind][e].values())
    # deletion starts and insertion ends at the clean image: the same probability
    for e in r["explainers"]:
        assert r["deletion_curve"][e]["grey"][0] == pytest.approx(r["insertion_curve"][e]["grey"][-1])


# ----------------------------------------------------------------------------- command line
def test_cli_all_writes_report_and_resumes(tmp_path, monkeypatch, capsys):
    (tmp_path / "tinymod.py").write_text(textwrap.dedent("""
        import torch.nn as nn, torch
        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, 6))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    args = ["all", "--model", "tinymod:build", "--images", "chelsea", "coffee", "--size", "32", "--strategies",
            "grey,layer", "--repeats", "1", "--samples", "8", "--steps", "3", "--probe-augment", "1",
            "--seed", "3", "--out", str(out), "--no-progress"]
    assert cli_main(args) == 0
    readme = (out / "README.md").read_text()
    for exp in ("removal", "leakage-salient", "leakage-probe", "faithfulness", "linearity"):
        assert (out / exp / "results.json").exists()
        assert f"{exp}/results.json" in readme
    for png in ("removal/removal.png", "leakage/leakage.png", "faithfulness/faithfulness.png",
                "linearity/linearity.png"):
        assert (out / png).stat().st_size > 1000
    cmds = json.loads((out / "commands.json").read_text())
    assert cmds["removal"]["command"].startswith("python -m masked_ops.experiments all")
    assert "--seed 3" in cmds["removal"]["command"]
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/units/*.npz")}
    assert cli_main(args) == 0  # resumes: no unit is written again
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/units/*.npz")} == mtimes


def test_cli_bad_input_exits_with_a_message(tmp_path, capsys):
    assert cli_main(["removal", "--strategies", "purple", "--out", str(tmp_path)]) == 2
    assert "unknown masking strategy 'purple'" in capsys.readouterr().err
    assert cli_main(["removal", "--images", "no-such-photo", "--out", str(tmp_path), "--model",
                     "torch.nn:Identity"]) == 2
    assert "no-such-photo" in capsys.readouterr().err


@pytest.mark.parametrize("option,value,words", [("--steps", "1", "--steps: must be >= 2"),
                                                 ("--samples", "0", "--samples: must be >= 1"),
                                                 ("--augment", "-1", "--augment: must be >= 0"),
                                                 ("--batch-size", "many", "--batch-size: expected an integer >= 1")])
def test_cli_refuses_out_of_range_options_before_running(tmp_path, capsys, option, value, words):
    """--steps 1 used to end in an unexpected ZeroDivisionError after the model had loaded."""
    with pytest.raises(SystemExit) as info:
        cli_main(["faithfulness", option, value, "--out", str(tmp_path)])
    assert info.value.code == 2
    assert words in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_bundled_image_set_is_all_photos():
    from masked_ops.experiments.images import BUNDLED

    assert len(BUNDLED) == 11 and "chelsea" in BUNDLED and "china" in BUNDLED and "grace_hopper" in BUNDLED
    with pytest.raises(ValueError, match="augment"):
        image_set(["chelsea"], augment=12)
    imgs, names = image_set(["chelsea"], size=48, augment=2)
    assert imgs.shape == (3, 3, 48, 48) and names == ["chelsea", "chelsea:flip", "chelsea:crop-tl"]
    assert torch.equal(imgs[1], imgs[0].flip(-1))
    assert 0.0 <= float(imgs.min()) and float(imgs.max()) <= 1.0 and float(imgs.std()) > 0.05
