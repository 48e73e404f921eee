"""layer_mask(resnet50) against the paper's hand-edited ResNet-50 (a second, independent oracle).

The hand-edited model below is written from the paper's description (Balasubramanian &
Feizi, ICCV 2023, section 3 and their released ResNet code), layer by layer, with the
public masked ops on the pure-PyTorch backend and no conversion machinery:
stem conv -> BN on visible pixels -> ReLU -> masked max pool; bottlenecks whose output
mask is the intersection of the branch mask and the shortcut mask; masked global mean;
the plain linear head. It runs unfolded (BatchNorm separate from the conv), in float64.
"""
import pytest
import torch

import masked_ops as mo

torchvision = pytest.importorskip("torchvision")


def _bn_relu(x, m, bn, relu=True):
    y, _ = mo.masked_batch_norm_act(x, m, bn, "relu" if relu else "none")
    return y


def _conv(x, m, conv, mode):
    return mo.masked_conv2d(x, m, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                            conv.groups, mode=mode)


def _bottleneck(block, x, m, mode):
    out, m1 = _conv(x, m, block.conv1, mode)
    out = _bn_relu(out, m1, block.bn1)
    out, m2 = _conv(out, m1, block.conv2, mode)
    out = _bn_relu(out, m2, block.bn2)
    out, m3 = _conv(out, m2, block.conv3, mode)
    out = _bn_relu(out, m3, block.bn3, relu=False)
    if block.downsample is not None:
        sc, msc = _conv(x, m, block.downsample[0], mode)
        sc = _bn_relu(sc, msc, block.downsample[1], relu=False)
    else:
        sc, msc = x, m
    m_out = m3 * msc  # the paper: output mask = intersection of branch and shortcut masks
    out = torch.where(m_out > 0, torch.relu(out + sc), torch.zeros((), dtype=out.dtype))
    return out, m_out


def paper_resnet50(model, x, mask, mode):
    """The hand-edited layer-masked ResNet-50 forward (x already holds anything at removed pixels)."""
    m = mask.to(x.dtype)
    out, m = _conv(x, m, model.conv1, mode)
    out = _bn_relu(out, m, model.bn1)
    out, m = mo.masked_max_pool2d(out, m, 3, 2, 1)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            out, m = _bottleneck(block, out, m, mode)
    feats = mo.masked_mean(out, m)
    return model.fc(feats)


@pytest.fixture(scope="module")
def resnet50_f64():
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().double()
    # Non-trivial BatchNorm statistics, so folding them is really exercised.
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("mode", ["fill", "renorm"])
def test_converted_resnet50_equals_paper_hand_edit(resnet50_f64, mode):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    # Random 8x8 patches removed, a different mask per sample.
    mask = (torch.rand(2, 1, 6, 6) > 0.4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    x_bad = torch.where(mask, x, torch.full_like(x, float("nan")))
    with mo.set_backend("torch"), torch.no_grad():
        expected = paper_resnet50(resnet50_f64, x, mask, mode)
        lm = mo.layer_mask(resnet50_f64, mode=mode)
        got = lm(x_bad, mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
