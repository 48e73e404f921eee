"""The experiments' additions of issue 13: LeRF/SRG in the faithfulness experiment, photo-grouped
confidence intervals, chunked command records and the cross-model summary page."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from masked_ops.experiments import image_set, lime_faithfulness, removal_curves
from masked_ops.experiments import metrics
from masked_ops.experiments.faithfulness import curve_masks
from masked_ops.experiments.report import record_command
from masked_ops.experiments.road import srg
from masked_ops.experiments.summary import verdict, write_summary


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5)).eval()


@pytest.fixture(scope="module")
def photos():
    return image_set(["chelsea", "coffee"], size=32, augment=1)  # 2 photos x (view, flip)


def test_group_means_and_verdict():
    v = np.array([1.0, 3.0, 10.0, 20.0])
    assert metrics.group_means(v, ["a", "a", "b", "b"]).tolist() == [2.0, 15.0]
    assert metrics.group_means(v, ["b", "a", "b", "a"]).tolist() == [5.5, 11.5]  # order of first appearance
    assert metrics.group_means(v).tolist() == v.tolist()
    with pytest.raises(ValueError, match="one group per value"):
        metrics.group_means(v, ["a"])
    assert verdict(0.01, 0.2) == "layer wins" and verdict(-0.3, -0.1) == "layer loses"
    assert verdict(-0.1, 0.1) == "no separation"


def test_faithfulness_lerf_and_srg_follow_their_definitions(photos):
    images, names = photos
    steps = [0.0, 0.5, 1.0]
    r = lime_faithfulness(tiny_cnn(), images, ["grey", "layer"], evaluators=["grey", "segment-mean"], samples=12,
                          n_segments=8, steps=steps, progress=False, image_names=names, seed=2)
    # LeRF removes the same segments as deletion, in the reverse order: both start clean and end empty
    for e in r["explainers"]:
        for v in r["evaluators"]:
            d, le = r["deletion_curve"][e][v], r["lerf_curve"][e][v]
            assert d[0] == pytest.approx(le[0]) and d[-1] == pytest.approx(le[-1])
            # SRG is the mean over images of AUC(LeRF) - AUC(MoRF): with a linear AUC, the difference of means
            assert r["srg"][e][v] == pytest.approx(srg(le, d, steps), abs=1e-12)
            lo, hi = r["srg_ci95"][e][v]
            assert lo - 1e-12 <= r["srg"][e][v] <= hi + 1e-12
            assert 0.0 <= r["road_morf_auc"][e][v] <= 1.0 and 0.0 <= r["road_lerf_auc"][e][v] <= 1.0
    d, i = curve_masks(torch.tensor([2, 0, 1, 3]).flip(0), [0.5])
    assert d.tolist() == [[True, False, True, False]]  # LeRF at 50%: the two lowest (3, 1) gone


def test_removal_cis_resample_photos_not_views(photos):
    images, names = photos
    r = removal_curves(tiny_cnn(), images, ["grey", "layer", "segment-mean"], fractions=[0.0, 0.5, 1.0], repeats=1,
                       progress=False, image_names=names)
    assert r["n_images"] == 4 and r["n_photos"] == 2
    # two photos: the bootstrap resamples 2 photo means (views averaged first), so the CI spans them
    for s in ("grey", "layer"):
        lo, hi = r["strategies"][s]["mean_agreement_ci95"]
        assert lo <= r["strategies"][s]["mean_agreement"] <= hi
    assert "segment-mean" in r["paired_vs_layer"]


def test_record_command_adds_up_resumed_chunks(tmp_path):
    record_command(tmp_path, "removal", "cmd A", 10.0, 4.0)
    record_command(tmp_path, "removal", "cmd A", 5.0, 2.0)
    rec = json.loads((tmp_path / "commands.json").read_text())["removal"]
    assert (rec["wall_s"], rec["cpu_s"], rec["chunks"]) == (15.0, 6.0, 2)
    record_command(tmp_path, "removal", "cmd B", 1.0, 1.0, elapsed_s=99.0)  # another command starts over
    rec = json.loads((tmp_path / "commands.json").read_text())["removal"]
    assert (rec["wall_s"], rec["chunks"], rec["elapsed_s"]) == (1.0, 1, 99.0)


def test_summary_page_compares_models(tmp_path, photos):
    images, names = photos
    for seed, model in ((0, "net-a"), (1, "net-b")):
        removal_curves(tiny_cnn(seed), images, ["grey", "layer", "noisy-linear"], fractions=[0.0, 0.5, 1.0],
                       repeats=1, progress=False, image_names=names, out=tmp_path / model)
    (tmp_path / "FINDINGS.md").write_text("## Findings\n\nhand-written")
    page = write_summary(tmp_path).read_text()
    assert "hand-written" in page and "net-a (mean top-1 agreement" in page and "net-b (mean" in page
    assert "[net-a](net-a/README.md)" in page and (tmp_path / "net-a" / "README.md").exists()
    assert "noisy-linear" in page and any(w in page for w in ("layer wins", "layer loses", "no separation"))
    with pytest.raises(ValueError, match="no experiment results"):
        write_summary(tmp_path / "net-a" / "removal")
