"""Explanation results (numpy, files), sliding-window occlusion against Captum, and the explainers'
refusal of images outside [0, 1]."""
import json
import os
import stat

import numpy as np
import pytest
import torch
import torch.nn as nn

from masked_ops.explain import (Explanation, explain_kernel_shap, explain_lime, explain_occlusion, get_strategy,
                                grid_segments, segment)
from masked_ops.explain.perturb import load_explanations, save_explanations

H, W = 24, 20


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


@pytest.fixture(scope="module")
def setup():
    image = torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))
    return tiny_cnn(), image


def test_numpy_is_the_heatmap(setup):
    model, image = setup
    exp = explain_occlusion(get_strategy("grey", model), image, segments=grid_segments(H, W, 3), targets=[1, 2])
    a = exp.numpy()
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (H, W)
    np.testing.assert_array_equal(a, exp.heatmap().numpy())
    both = exp.numpy(None)
    assert both.shape == (2, H, W)
    np.testing.assert_array_equal(both[1], exp.heatmap(1).numpy())
    # every pixel carries its segment's weight
    seg = exp.segments.numpy()
    for k in range(9):
        assert np.all(both[:, seg == k] == exp.weights[:, k, None].numpy())


def test_save_and_load_round_trip(setup, tmp_path):
    model, image = setup
    exp = explain_lime(get_strategy("layer", model), image, segments=grid_segments(H, W, 3), num_samples=20,
                       targets=[0, 3], output="logit")
    old = os.umask(0o022)
    try:
        exp.save(tmp_path / "e.npz", image_name="noise")
    finally:
        os.umask(old)
    assert oct(stat.S_IMODE(os.stat(tmp_path / "e.npz").st_mode)) == "0o644"
    assert os.listdir(tmp_path) == ["e.npz"]
    back = Explanation.load(tmp_path / "e.npz")
    assert (back.method, back.strategy, back.targets, back.output) == ("lime", "layer", [0, 3], "logit")
    for name in ("weights", "segments", "intercept", "score", "samples", "outputs"):
        assert torch.equal(getattr(back, name), getattr(exp, name)), name
    with np.load(tmp_path / "e.npz") as z:  # readable without masked_ops
        assert z["attributions"].shape == (1, 2, H, W)
        meta = json.loads(str(z["meta"]))
    assert meta["format"] == "masked_ops.explanations/1" and meta["explanations"][0]["meta"]["image_name"] == "noise"
    assert back.meta == {"image_name": "noise"} and exp.meta == {}


def test_several_explanations_in_one_file(setup, tmp_path):
    model, image = setup
    seg = grid_segments(H, W, 2)
    exps = [explain_occlusion(get_strategy(s, model), image, segments=seg) for s in ("layer", "grey")]
    save_explanations(tmp_path / "two.npz", exps, image=image, meta={"model": "tiny"})
    back, meta = load_explanations(tmp_path / "two.npz")
    assert [e.strategy for e in back] == ["layer", "grey"] and meta["model"] == "tiny"
    assert torch.equal(Explanation.load(tmp_path / "two.npz", strategy="grey").weights, exps[1].weights)
    with pytest.raises(ValueError, match="holds 2 explanations"):
        Explanation.load(tmp_path / "two.npz")
    with pytest.raises(ValueError, match="no explanation with strategy 'blur'"):
        Explanation.load(tmp_path / "two.npz", strategy="blur")
    with pytest.raises(ValueError, match=".npz"):
        exps[0].save(tmp_path / "x.h5")


@pytest.mark.parametrize("window,stride", [(8, 4), ((6, 8), (3, 5)), (8, 8), (7, 3)])
def test_sliding_window_occlusion_equals_captum(window, stride, setup):
    attr = pytest.importorskip("captum.attr")
    from masked_ops.explain.adapters.captum import CaptumForward, captum_inputs

    model, image = setup
    exp = explain_occlusion(get_strategy("layer", model), image, window=window, stride=stride, targets=2,
                            output="logit")
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    args = captum_inputs(image)
    with torch.no_grad():
        ref = attr.Occlusion(CaptumForward(model, "layer")).attribute(
            args["inputs"], sliding_window_shapes=(4, wh, ww), strides=(4, sh, sw), baselines=args["baselines"],
            target=2, perturbations_per_eval=8)
    torch.testing.assert_close(exp.heatmap(), ref[0, 0], rtol=1e-4, atol=1e-5)
    # the cells: pixels covered by the same windows; one forward pass per window
    assert exp.samples.shape[0] == (-(-(H - wh) // sh) + 1) * (-(-(W - ww) // sw) + 1)


def test_window_arguments_are_checked(setup):
    model, image = setup
    strat = get_strategy("grey", model)
    with pytest.raises(ValueError, match="larger than the image"):
        explain_occlusion(strat, image, window=30)
    with pytest.raises(ValueError, match="stride 9 is larger than the window 8"):
        explain_occlusion(strat, image, window=8, stride=9)
    with pytest.raises(ValueError, match="not both"):
        explain_occlusion(strat, image, window=8, segments="grid")
    with pytest.raises(ValueError, match="give window too"):
        explain_occlusion(strat, image, stride=4)


def test_grid_of_two_segments_splits_the_longer_side():
    tall = torch.rand(3, 30, 10)
    assert torch.equal(segment(tall, "grid", n_segments=2), (torch.arange(30) >= 15).long()[:, None].expand(30, 10))
    wide = segment(torch.rand(3, 10, 30), "grid", n_segments=2)
    assert torch.equal(wide, (torch.arange(30) >= 15).long()[None, :].expand(10, 30))
    assert int(segment(torch.rand(3, 64, 64), "grid", n_segments=64).max()) == 63  # 8 x 8, as before


@pytest.mark.parametrize("explain", [explain_lime, explain_occlusion, explain_kernel_shap])
@pytest.mark.parametrize("scale,message", [(255.0, "divide a 0-255 image by 255"),
                                           (-1.0, "pass pixels, not normalised values")])
def test_explainers_refuse_images_outside_0_1(explain, scale, message, setup):
    model, image = setup
    with pytest.raises(ValueError, match=message):
        explain(get_strategy("grey", model), image * scale, segments=grid_segments(H, W, 2))
    nan = image.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        explain(get_strategy("grey", model), nan, segments=grid_segments(H, W, 2))
