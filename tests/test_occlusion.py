"""Occlusion / feature ablation and segmentation, against loop transcriptions."""
import pytest
import torch
import torch.nn as nn

from masked_ops.explain import explain_occlusion, get_strategy, grid_segments, segment
from masked_ops.explain.segmentation import check_segments, relabel

H = W = 20


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5)).eval()


@pytest.mark.parametrize("output", ["prob", "logit"])
def test_occlusion_equals_one_segment_at_a_time(output):
    model = tiny_cnn()
    image = torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))
    seg = grid_segments(H, W, 3)
    strat = get_strategy("grey", model)
    exp = explain_occlusion(strat, image, segments=seg, targets=[1, 4], output=output, batch_size=4)
    f = (lambda l: l.softmax(1)) if output == "prob" else (lambda l: l)
    with torch.no_grad():
        full = f(strat(image[None], torch.ones(1, 1, H, W)))[0]
        for k in range(9):
            drop = f(strat(image[None], (seg != k)[None, None]))[0]
            for i, t in enumerate([1, 4]):
                torch.testing.assert_close(exp.weights[i, k].double(), (full[t] - drop[t]).double(),
                                           rtol=1e-5, atol=1e-6)


def test_grid_segments():
    seg = grid_segments(7, 10, 3)
    assert seg.shape == (7, 10) and torch.equal(torch.unique(seg), torch.arange(9))
    assert seg[0, 0] == 0 and seg[-1, -1] == 8
    # rows: 7 pixels into 3 bands of 3/2/2 (floor(i*3/7))
    assert seg[:, 0].tolist() == [0, 0, 0, 3, 3, 6, 6]


@pytest.mark.parametrize("method", ["grid", "slic", "quickshift", "felzenszwalb"])
def test_segment_methods_give_valid_label_maps(method):
    import skimage.data
    img = torch.from_numpy(skimage.data.chelsea()[::6, ::6].copy()).permute(2, 0, 1).float() / 255
    seg = segment(img, method, n_segments=25)
    assert seg.shape == img.shape[1:]
    check_segments(seg)
    assert int(seg.max()) + 1 >= 4


def test_bad_segments():
    with pytest.raises(ValueError, match="at least 2"):
        check_segments(torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="every label"):
        check_segments(torch.tensor([[0, 2], [2, 0]]))
    with pytest.raises(ValueError, match="integer"):
        check_segments(torch.zeros(4, 4))
    assert torch.equal(relabel(torch.tensor([[5, 9], [9, 5]])), torch.tensor([[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="unknown segmentation"):
        segment(torch.rand(3, 8, 8), "voronoi")
    with pytest.raises(ValueError, match="at least 2"):
        segment(torch.rand(3, 8, 8), "grid", n_segments=1)
