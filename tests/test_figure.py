"""Figures people share: wrapping grids, labelled colour bars, a shared scale, and ``visualize`` for any map."""
import os
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from masked_ops.explain import Explanation, grid_segments  # noqa: E402
from masked_ops.explain.figure import explanation_figure, visualize  # noqa: E402
from masked_ops.explain.strategies import STRATEGIES  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H = W = 32


def _exp(name, scale, method="lime", output="prob", seed=0):
    seg = grid_segments(H, W, 3)
    w = torch.randn(1, 9, generator=torch.Generator().manual_seed(seed)) * scale
    return Explanation(method, name, [3], w, seg, output=output)


@pytest.fixture
def image():
    return torch.rand(3, H, W, generator=torch.Generator().manual_seed(1))


def _heat_images(fig):
    """The heatmap artists (the ones with a colour bar), in drawing order."""
    return [im for ax in fig.axes for im in ax.get_images() if im.colorbar is not None]


def test_many_strategies_wrap_into_a_grid(image):
    exps = [_exp(s, 1.0, seed=i) for i, s in enumerate(STRATEGIES)]  # every strategy (13)
    fig = explanation_figure(image, exps, "cat", title="t")
    width, height = fig.get_size_inches()
    assert 0.6 < width / height < 2.0  # wrapped into blocks of rows, not one long 14 x 2 row
    assert len(_heat_images(fig)) == len(STRATEGIES)
    plt.close(fig)
    fig = explanation_figure(image, exps[:2], "cat", title="t")  # few strategies: one row of three
    assert len(fig.axes) - len(_heat_images(fig)) == 6
    plt.close(fig)


@pytest.mark.parametrize("method,output,label", [
    ("lime", "prob", "LIME weight, change of p(cat)"),
    ("occlusion", "logit", "drop in logit(cat) when removed"),
    ("kernel-shap", "prob", "SHAP value, share of p(cat)"),
    ("saliency", "prob", "saliency attribution, p(cat)"),  # a method the figure does not know
])
def test_colour_bars_say_what_they_show(method, output, label, image):
    fig = explanation_figure(image, [_exp("layer", 1.0, method, output)], "cat")
    (heat,) = _heat_images(fig)
    assert heat.colorbar.ax.get_ylabel() == label
    plt.close(fig)


def test_shared_scale(image):
    exps = [_exp("layer", 1.0, seed=1), _exp("grey", 10.0, seed=2)]
    fig = explanation_figure(image, exps, "cat", title="t")
    lims = [im.get_clim() for im in _heat_images(fig)]
    assert lims[0] != lims[1]
    plt.close(fig)
    fig = explanation_figure(image, exps, "cat", title="t", shared_scale=True)
    lims = [im.get_clim() for im in _heat_images(fig)]
    biggest = max(float(e.weights.abs().max()) for e in exps)
    assert lims[0] == lims[1] == pytest.approx((-biggest, biggest))
    assert "one colour scale for all" in fig._suptitle.get_text()
    plt.close(fig)


@pytest.mark.parametrize("shape", [(H, W), (1, H, W), (3, H, W), (H, W, 3), (1, 3, H, W)])
def test_visualize_takes_any_attribution_layout(shape, image):
    a = np.random.RandomState(0).randn(*shape)
    summed = a.reshape(-1, H, W).sum(0) if shape[-1] != 3 else a.sum(-1)
    fig, ax = visualize(torch.from_numpy(a), image, label="my attribution")
    (heat,) = _heat_images(fig)
    np.testing.assert_allclose(heat.get_array(), summed, rtol=1e-5, atol=1e-6)  # float32 sums
    assert heat.get_clim() == pytest.approx((-np.abs(summed).max(), np.abs(summed).max()), rel=1e-5)
    assert heat.colorbar.ax.get_ylabel() == "my attribution"
    plt.close(fig)


def test_visualize_signs_scale_axes_and_explanations(image):
    exp = _exp("layer", 1.0, "occlusion")
    fig, ax = visualize(exp, (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8), sign="positive", vmax=5.0)
    (heat,) = _heat_images(fig)
    assert heat.get_clim() == (0.0, 5.0) and float(heat.get_array().min()) >= 0
    assert heat.colorbar.ax.get_ylabel() == "drop in p when removed"
    plt.close(fig)
    fig, axes = plt.subplots(1, 2)
    visualize(exp, image, ax=axes[1], sign="negative", title="neg")
    assert axes[1].get_title() == "neg" and axes[1].get_images()
    np.testing.assert_allclose(axes[1].get_images()[-1].get_array(), np.clip(-exp.numpy(), 0, None))
    plt.close(fig)
    with pytest.raises(ValueError, match="4th channel is the mask"):
        visualize(np.zeros((4, H, W)))
    with pytest.raises(ValueError, match="differ in size"):
        visualize(np.zeros((H, W)), torch.rand(3, H + 1, W))
    with pytest.raises(ValueError, match="sign must be one of"):
        visualize(np.zeros((H, W)), sign="both")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        visualize(np.zeros((H, W)), image * 255)


def test_readme_visualize_example_runs_as_written(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("### Pictures and files"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert os.path.getsize(tmp_path / "cat-occlusion.png") > 1000
    back = Explanation.load(tmp_path / "cat-occlusion.npz")
    assert torch.equal(back.weights, namespace["exp"].weights)
    assert namespace["heat"].shape == (224, 224)
    # nothing of the picture is clipped: the (long) title, the colour bar, its ticks and label lie inside
    fig = namespace["fig"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    cbar = [a for a in fig.axes if a is not namespace["ax"]][0]
    assert cbar.yaxis.label.get_text()
    # the colour bar's tight box covers what is drawn of it: its ticks, their labels and its label
    for name, e in (("title", namespace["ax"].title.get_window_extent(renderer)),
                    ("colour bar", cbar.get_tightbbox(renderer))):
        assert box.x0 - 1 <= e.x0 and e.x1 <= box.x1 + 1 and box.y0 - 1 <= e.y0 and e.y1 <= box.y1 + 1, name
    plt.close(fig)


def test_mask_figure_colour_bars_are_labelled(image):
    from masked_ops.explain.figure import mask_figure
    from masked_ops.explain.maps import map_explanation

    maps = torch.rand(1, H, W, generator=torch.Generator().manual_seed(2))
    labels = {}
    for method, info in (("rise", {"output": "prob"}), ("extremal", {"areas": [0.1]}), ("diffmask", {"kept": 0.3})):
        masks = (maps > 0.5).float()[None] if method == "extremal" else (maps > 0.5).float()
        exp = map_explanation(method, "layer", [3], maps, masks=masks, info=info)
        fig = mask_figure(image, [exp], "cat")
        (heat,) = _heat_images(fig)
        labels[method] = heat.colorbar.ax.get_ylabel()
        plt.close(fig)
    assert labels == {"rise": "mean p when visible", "extremal": "mean of the masks over the areas (1: kept by all)",
                      "diffmask": "probability the gate keeps the patch"}
