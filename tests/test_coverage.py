"""Which models convert: one model per family of timm and torchvision, in float64 (issue 24).

Each family listed under CONVERTS converts and holds the invariants exactly enough to tell a wrong rule
from rounding: the all-ones mask reproduces the plain model within 1e-10 (relative, float64), NaN in a
removed region gives finite outputs equal to those with other values there, and the soft model at a 0/1
mask equals the hard one. Each family under REFUSED
is refused at conversion with a ValueError whose message names what stops it (never converted silently
wrong); when a new rule makes one convert, its test fails and says to move it. README.md, "Which models
convert", is this table in words. Random weights, batch 1, 96 px; the models of tests/test_zoo.py (fp32,
64 px) are not repeated here.
"""
import warnings

import pytest
import torch

import masked_ops as mo
from test_zoo import TIMM as ZOO_TIMM
from test_zoo import TORCHVISION as ZOO_TORCHVISION

SIZE = 96
D = torch.float64

TIMM_CONVERTS = [
    "resnet18", "resnet50d", "resnext50_32x4d", "seresnet50", "ecaresnet50d", "regnetx_002", "regnety_002",
    "regnetz_b16", "efficientnet_b0", "efficientnetv2_rw_t", "mobilenetv2_100", "mobilenetv3_large_100",
    "mnasnet_100", "fbnetc_100", "eca_nfnet_l0", "dm_nfnet_f0", "resnetv2_50", "dla34", "dla60x", "densenet121",
    "inception_v3", "inception_v4", "inception_resnet_v2", "xception41", "cs3darknet_s", "darknet53",
    "ese_vovnet19b_dw", "selecsls42b", "hardcorenas_a", "lcnet_050", "repvgg_a2", "repghostnet_050", "mixnet_s",
    "tinynet_a", "gernet_s", "resnetrs50", "legacy_seresnet18", "senet154",
    # reflect-padded blur pools; space-to-depth; selective kernels (stacked branches); split attention
    # (channel groups read from the map); global context (attention pooling); timm's VGG head
    "densenetblur121d", "tresnet_m", "skresnet18", "resnest14d", "gcresnet50t", "vgg11",
]
# family: the words of the ValueError that refuses it
TIMM_REFUSED = {  # the attention hybrids: self-attention over tokens (issue 26 brings token dropping)
    "botnet26t_256": "reshape", "halonet26t": "reshape", "efficientformerv2_s0": "", "mobilevit_xxs": "",
}
TORCHVISION_CONVERTS = ["resnet34", "resnext101_32x8d", "vgg11", "googlenet", "inception_v3", "mnasnet0_5",
                        "shufflenet_v2_x0_5", "efficientnet_v2_s", "regnet_x_400mf", "mobilenet_v3_small",
                        "densenet169", "squeezenet1_0", "wide_resnet101_2"]
TORCHVISION_REFUSED = {"swin_t": "", "maxvit_t": ""}
# vision transformers convert by token dropping (masked_ops.vit.TokenMasked, issue 26; tests/test_vit.py in detail)
TIMM_VITS = ["vit_small_patch16_224", "deit_tiny_patch16_224"]
TORCHVISION_VITS = ["vit_b_16"]
TIMM_CONVERTS += TIMM_VITS
TORCHVISION_CONVERTS += TORCHVISION_VITS


def _build(source, name, dtype=D):
    torch.manual_seed(0)
    if source == "timm":
        timm = pytest.importorskip("timm")
        kwargs = {"img_size": SIZE} if name in TIMM_VITS else {}
        return timm.create_model(name, pretrained=False, **kwargs).eval().to(dtype)
    torchvision = pytest.importorskip("torchvision")
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    if name in TORCHVISION_VITS:
        kwargs = {"image_size": SIZE}  # (a position embedding for 96 px)
    model = getattr(torchvision.models, name)(**kwargs)
    if name in TORCHVISION_VITS:
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    return model.eval().to(dtype)


def test_the_lists_do_not_overlap():
    for a, b in ((TIMM_CONVERTS, TIMM_REFUSED), (TIMM_CONVERTS, ZOO_TIMM), (TORCHVISION_CONVERTS, ZOO_TORCHVISION)):
        assert not set(a) & set(b), set(a) & set(b)
    assert len(TIMM_CONVERTS) + len(ZOO_TIMM) + len(TIMM_REFUSED) >= 64 + 1  # (+ resnet50 and convnext_tiny, second models of their families; convnext_atto of the survey is not repeated)  # one model per timm family surveyed


@pytest.mark.slow  # about 2-4 minutes for all families on 2 cores
@pytest.mark.parametrize("source,name", [("timm", n) for n in TIMM_CONVERTS]
                         + [("torchvision", n) for n in TORCHVISION_CONVERTS])
def test_family_converts_and_holds_the_invariants_in_float64(source, name):
    model = _build(source, name)
    lm = mo.layer_mask(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, SIZE, SIZE, generator=gen, dtype=D)
    mask = (torch.rand(1, 1, SIZE // 8, SIZE // 8, generator=gen) > 0.4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = model(x)
        ones = lm(x, torch.ones_like(mask))
        with_nan = lm(torch.where(mask, x, torch.full((), float("nan"), dtype=D)), mask)
        with_other = lm(torch.where(mask, x, torch.full((), 7.0, dtype=D)), mask)
    scale = float(plain.abs().max())
    assert float((ones - plain).abs().max()) <= 1e-10 * scale, f"{name}: the all-ones mask changes the output"
    assert torch.isfinite(with_nan).all() and torch.equal(with_nan, with_other), f"{name}: removed values leak"
    # the mask acts (far above float64 rounding; random deep nets can be nearly insensitive to their input)
    assert float((with_nan - plain).abs().max()) > 1e-9 * scale
    # one converted model serves soft masks too: at 0/1 values the soft model is the hard one
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        soft = mo.layer_mask(model, soft=True)(torch.where(mask, x, torch.zeros((), dtype=D)), mask.to(D))
    torch.testing.assert_close(soft, with_nan, rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("source,name",
                         [("timm", n) for n in TIMM_VITS] + [("torchvision", n) for n in TORCHVISION_VITS])
def test_vision_transformers_convert_by_token_dropping(source, name):
    from masked_ops.vit import TokenMasked

    model = _build(source, name, torch.float32)
    tm = mo.layer_mask(model)
    assert isinstance(tm, TokenMasked) and tm.model is model
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(tm(x, torch.ones(1, 1, SIZE, SIZE, dtype=torch.bool)), model(x), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("source,name,words", [("timm", n, w) for n, w in TIMM_REFUSED.items()]
                         + [("torchvision", n, w) for n, w in TORCHVISION_REFUSED.items()])
def test_family_is_refused_with_a_reason(source, name, words):
    model = _build(source, name)
    try:
        mo.layer_mask(model)
    except ValueError as e:
        assert "layer_mask" in str(e) and words in str(e), str(e)[:300]
    else:
        pytest.fail(f"{name} converts now: check it holds the invariants and move it to the converting list "
                    f"(and README.md, 'Which models convert')")
