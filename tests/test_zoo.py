"""Every zoo model, converted with layer_mask, holds the two invariants (DESIGN.md section 2).

1. all-ones mask: the converted model reproduces the original (fp32, relative 1e-4);
2. removed-region invariance: NaN, inf, huge or random values at removed pixels give a
   bit-identical output.
Random weights, batch 1, 64 px (the smallest size every model accepts), eval mode.
"""
import warnings

import pytest
import torch

import masked_ops as mo

torchvision = pytest.importorskip("torchvision")

TORCHVISION = ["resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d", "vgg16_bn", "densenet121",
               "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf",
               "squeezenet1_1", "alexnet"]
TIMM = ["resnet50", "tf_efficientnet_lite0", "convnext_tiny",
        # channel splits, chunks and slices (issue 24)
        "res2net50_14w_8s", "cspdarknet53", "cspresnet50", "ghostnet_100", "dpn68", "rexnet_100",
        "inception_next_tiny",
        # an ECA gate broadcast with expand_as; weight-standardised convs folded at conversion
        "ecaresnet26t", "nf_resnet26", "nf_regnet_b0", "resnetv2_50x1_bit",
        # nearest upsampling (HRNet's fuse layers); a fresh map plus a Python number (FastViT)
        "hrnet_w18_small", "fastvit_t8",
        # global response normalisation
        "convnextv2_atto"]
SIZE = 64


def _build(source, name):
    torch.manual_seed(0)
    if source == "timm":
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False).eval()
    return getattr(torchvision.models, name)().eval()


@pytest.mark.parametrize("source,name", [("torchvision", n) for n in TORCHVISION] + [("timm", n) for n in TIMM])
def test_zoo_invariants(source, name):
    model = _build(source, name)
    lm = mo.layer_mask(model, mode="fill")
    gen = torch.Generator().manual_seed(1)
    # Batch 1 keeps the zoo within the CI budget; per-sample masks are covered by test_convert
    # and test_resnet50_oracle (batch 2).
    x = torch.randn(1, 3, SIZE, SIZE, generator=gen)
    # Random 8x8 patches, about 40% removed.
    mask = (torch.rand(1, 1, SIZE // 8, SIZE // 8, generator=gen) > 0.4)
    mask = mask.repeat_interleave(8, 2).repeat_interleave(8, 3)
    removed = ~mask.expand_as(x)
    junk = torch.randn(x.shape, generator=gen) * 1e30
    junk[:, :, ::3] = float("inf")
    junk[:, 0] = float("-inf")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "auto" may fall back to the torch backend
        plain = model(x)
        ones = lm(x, torch.ones(1, 1, SIZE, SIZE, dtype=torch.bool))
        with_nan = lm(torch.where(removed, torch.full_like(x, float("nan")), x), mask)
        with_junk = lm(torch.where(removed, junk, x), mask.float())
    scale = plain.abs().max()
    assert (ones - plain).abs().max() <= 1e-4 * scale, f"{name}: all-ones mask differs from the plain model"
    assert torch.isfinite(with_nan).all()
    assert torch.equal(with_nan, with_junk), f"{name}: values in the removed region leak into the output"
    # The mask really acts: removing 40% of the pixels changes the output.
    assert not torch.allclose(with_nan, plain, rtol=1e-3, atol=1e-3 * float(scale))
