"""The experiments on an image folder: labels from class folders, accuracy beside agreement, torchrun.

Same folder and tiny model as test_dataset.py (dataset_helpers); the class folders "1" and "5" name
classes the tiny model predicts, so that accuracy against the labels is neither 0 nor 1.
"""
import json
import os
import subprocess

import numpy as np
import pytest
import torch

from dataset_helpers import make_folder, tiny_model
from masked_ops.cli import experiment as exp_cli
from masked_ops.experiments.images import labelled_image_set
from masked_ops.images import centre_view, load_image
from masked_ops.experiments.removal import removal_curves, removal_masks_for_image
from masked_ops.explain import get_strategy
from test_dataset import _env, _torchrun

MODEL = "dataset_helpers:tiny_model"
ARGS = ["--model", MODEL, "--strategies", "layer,grey", "--repeats", "2", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("expdata") / "photos"
    return str(root), make_folder(str(root))


def _clean_pred(model, info, images):
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((images - mean) / std).argmax(-1).numpy()


def test_labelled_image_set_reads_class_folders(folder):
    root, paths = folder
    model, info = tiny_model()
    s = labelled_image_set([root], 64, class_names=info.class_names)
    assert s.names == paths  # the corrupt file skipped, the text file ignored
    assert [p for p, _ in s.skipped] == ["5/broken.jpg"]
    assert s.labels.tolist() == [int(p.split("/")[0]) for p in paths]
    one = centre_view(load_image(os.path.join(root, paths[0])), 64)
    assert torch.equal(s.images[0], one)
    aug = labelled_image_set([root], 64, augment=1, class_names=info.class_names)
    assert len(aug.names) == 2 * len(paths) and aug.names[1] == paths[0] + ":flip"
    assert aug.labels[1] == aug.labels[0]
    nolab = labelled_image_set([root, "chelsea"], 64, class_names=["a"])  # "1", "5": no class of that model
    assert not nolab.labelled and nolab.names[-1] == "chelsea"


def test_removal_accuracy_against_labels_matches_a_direct_count(folder):
    """Accuracy per fraction recomputed here from the strategy's own predictions on the same masks."""
    root, _ = folder
    model, info = tiny_model()
    s = labelled_image_set([root], 64, class_names=info.class_names)
    idx = [0, 1, 2, 9, 10, 11]  # both classes
    images, labels = s.images[idx], s.labels[idx].copy()
    clean = _clean_pred(model, info, images)
    assert 0 < (clean == labels).mean() < 1, "the folder should give a clean accuracy strictly between 0 and 1"
    labels[5] = -1  # an image without a label counts for agreement, not for accuracy
    fractions = [0.0, 0.5, 1.0]
    with torch.no_grad():
        r = removal_curves(model, images, ["grey"], fractions=fractions, repeats=2, labels=labels, progress=False)
    assert r["n_labelled"] == 5
    assert r["clean_accuracy"] == pytest.approx((clean[:5] == labels[:5]).mean())
    grey = get_strategy("grey", model)
    expected = []
    for i in range(5):
        masks = removal_masks_for_image(i, (64, 64), patch=16, fractions=fractions, repeats=2, seed=0)
        with torch.no_grad():
            pred = grey(images[i:i + 1], masks).argmax(-1).view(len(fractions), 2).numpy()
        expected.append((pred == labels[i]).mean(axis=1))
    v = r["strategies"]["grey"]
    np.testing.assert_allclose(v["accuracy"], np.mean(expected, axis=0))
    assert v["accuracy"][0] == pytest.approx(r["clean_accuracy"]) and v["agreement"][0] == 1.0
    assert v["mean_accuracy"] == pytest.approx(np.mean(expected))
    with pytest.raises(ValueError, match="labels must be 6 integer"):
        removal_curves(model, images, ["grey"], fractions=fractions, repeats=1, labels=[1, 2], progress=False)


def test_units_computed_counts_each_run_alone(folder, tmp_path):
    """Two runs in one process (a world of one): the second counts its own units, not the first's too."""
    root, _ = folder
    prev = torch.get_num_threads()
    try:
        for out in ("a", "b"):
            assert exp_cli.main(["removal", "--images", root, "--out", str(tmp_path / out)] + ARGS) == 0
            res = json.load(open(tmp_path / out / "removal" / "results.json"))
            assert res["units_computed"] == 1 + 2 * 18
    finally:
        torch.set_num_threads(prev)


@pytest.mark.slow  # subprocesses: ~10 s on an idle 2-core machine, ~40 s under load
def test_torchrun_experiment_equals_single_process(folder, tmp_path, capsys):
    root, _ = folder
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    prev = torch.get_num_threads()
    try:
        assert exp_cli.main(["removal", "--images", root, "--out", one] + ARGS) == 0
    finally:
        torch.set_num_threads(prev)
    out = capsys.readouterr().out
    assert "mean top-1 accuracy over the fractions, 18 labelled images" in out and "agreement" in out
    res = subprocess.run(_torchrun(2, ["experiment", "removal", "--images", root, "--out", two] + ARGS),
                         env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    a = json.load(open(os.path.join(one, "removal", "results.json")))
    b = json.load(open(os.path.join(two, "removal", "results.json")))
    assert a == b  # every number, the units computed (by all ranks) included
    assert a["units_computed"] == 1 + 2 * 18
    readme = open(os.path.join(two, "README.md")).read()
    assert "mean top-1 accuracy vs labels" in readme and "18 labelled images" in readme
