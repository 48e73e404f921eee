"""The learned-mask faithfulness experiment: cell rankings, removal masks, a small resumable run."""
import json

import pytest
import torch
import torch.nn as nn

from masked_ops.experiments.learned_faithfulness import (EXPLAINERS, cell_order,
                                                         learned_faithfulness, markdown, removal_masks)


def test_cell_order_ranks_cells_and_breaks_ties_at_random():
    a = torch.zeros(8, 8)
    a[:4, 4:] = 3.0   # cell 1 (of 2 x 2 cells of 4 px)
    a[4:, :4] = 2.0   # cell 2
    a[4:, 4:] = 1.0   # cell 3
    g = torch.Generator().manual_seed(0)
    assert cell_order(a, 4, g).tolist() == [1, 2, 3, 0]
    ties = [tuple(cell_order(torch.zeros(8, 8), 4, torch.Generator().manual_seed(s)).tolist()) for s in range(20)]
    assert len(set(ties)) > 1  # no fixed (e.g. top-left first) order for equal attributions


def test_removal_masks():
    order = torch.tensor([3, 0, 2, 1])  # 2 x 2 cells of 2 px
    morf, lerf = removal_masks(order, [0.0, 0.5, 1.0], (4, 4), 2)
    assert morf.shape == (3, 1, 4, 4)
    assert morf[0].min() == 1 and morf[2].max() == 0 and lerf[0].min() == 1 and lerf[2].max() == 0
    # half removed: MoRF removes cells 3 and 0, LeRF removes cells 2 and 1
    assert morf[1, 0, 2:, 2:].max() == 0 and morf[1, 0, :2, :2].max() == 0 and morf[1, 0, :2, 2:].min() == 1
    assert lerf[1, 0, 2:, :2].max() == 0 and lerf[1, 0, :2, 2:].max() == 0 and lerf[1, 0, :2, :2].min() == 1


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6)).eval()


def test_small_run_resumes_and_reports(tmp_path):
    model = tiny_cnn()
    g = torch.Generator().manual_seed(1)
    test, train = torch.rand(2, 3, 32, 32, generator=g), torch.rand(3, 3, 40, 40, generator=g)
    explainers = [e for e in EXPLAINERS]
    params = dict(unit=8, patch=16, diffmask_epochs=2, diffmask_batch=2, extremal_iterations=3, rise_masks=8,
                  lime_samples=8, lime_segments=6, occlusion_cells=2)
    opts = dict(explainers=explainers, evaluators=["grey", "layer"], steps=[0.0, 0.5, 1.0], out=tmp_path,
                progress=False, image_names=["a", "b"], batch_size=8, **params)
    r = learned_faithfulness(model, test, train, **opts)
    ran = explainers  # all of them: layer masking takes soft masks (diffmask-layer, extremal-layer)
    assert r["explainers"] == ran and r["units_computed"] == 2 * len(ran) and not r["skipped"]
    for m in ("morf_prob", "lerf_prob", "insertion_prob", "morf_kl", "lerf_kl"):
        assert set(r["auc"][m]) == set(ran) and set(r["auc"][m]["gradcam"]) == {"grey", "layer"}
    # at fraction 0 nothing is removed (the clean probability); at 1 everything (MoRF = LeRF)
    unit = json.loads((tmp_path / "learned-faithfulness" / "results.json").read_text())
    assert unit["n_images"] == 2 and "diffmask" in unit and unit["diffmask"]["blur"]["history"]
    assert (tmp_path / "learned-faithfulness" / "diffmask-blur.pt").exists()
    again = learned_faithfulness(model, test, train, **opts)
    assert again["units_computed"] == 0 and again["auc"] == r["auc"]
    assert "DiffMask (blur)" in markdown(again)
    with pytest.raises(ValueError, match="unknown explainer"):
        learned_faithfulness(model, test, train, **dict(opts, explainers=["lime"]))
    with pytest.raises(ValueError, match="unknown parameters"):
        learned_faithfulness(model, test, train, **dict(opts, rise=3))


def test_curve_endpoints(tmp_path):
    model = tiny_cnn()
    g = torch.Generator().manual_seed(2)
    test = torch.rand(1, 3, 16, 16, generator=g)
    r = learned_faithfulness(model, test, test, explainers=["random", "occlusion-grey"], evaluators=["grey"],
                             steps=[0.0, 0.5, 1.0], progress=False, unit=4, patch=8, occlusion_cells=2)
    clean = model((test - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                  / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)).softmax(1).max().item()
    for e in ("random", "occlusion-grey"):
        c = r["curves"][e]["grey"]
        assert c["morf_prob"][0] == pytest.approx(clean, rel=1e-5)
        assert c["insertion_prob"][-1] == pytest.approx(clean, rel=1e-5)
        assert c["insertion_prob"][0] == pytest.approx(c["morf_prob"][-1], rel=1e-9)
