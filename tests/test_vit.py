"""Vision transformers behind layer masking by token dropping (masked_ops/vit.py, issue 26).

Random-weight tiny ViTs (32 px, patches of 8: 16 patch tokens), built directly: timm's VisionTransformer
with a class token, with register tokens, with average pooling and no class token, and torchvision's.
Exactness is asserted in float64 against the plain model (all-ones mask) and against an independent
oracle: the model's own modules run by hand on the kept tokens only, with no mask anywhere.
"""
import math

import pytest
import torch
import torch.nn as nn
from vit_helpers import tiny_vit

import masked_ops as mo
from masked_ops import vit as V

timm_vit = pytest.importorskip("timm.models.vision_transformer")
torchvision = pytest.importorskip("torchvision")

D = torch.float64
SIZE, PATCH = 32, 8
GRID = SIZE // PATCH
NAN = float("nan")

TIMM_VARIANTS = {
    "timm-cls": dict(),
    "timm-reg": dict(reg_tokens=2),
    "timm-avg": dict(class_token=False, global_pool="avg"),
    "timm-reg-avg": dict(reg_tokens=2, global_pool="avg"),
}
VARIANTS = list(TIMM_VARIANTS) + ["torchvision"]


def build(name, dtype=D, size=SIZE, **extra):
    if name == "torchvision":
        return tiny_vit("torchvision", size=size, patch=PATCH, dtype=dtype, **extra)
    return tiny_vit("timm", size=size, patch=PATCH, dtype=dtype, **{**TIMM_VARIANTS.get(name, {}), **extra})


def images(n=3, seed=1, dtype=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=dtype)


def patch_mask(n=3, seed=2, p=0.5):
    """A patch-aligned bool mask; sample 0 keeps every patch, the last keeps exactly one."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, 1, GRID, GRID, generator=g) > p
    keep[0] = True
    keep[-1] = False
    keep[-1, 0, 1, 2] = True
    return keep.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)


def pixel_mask(n=3, seed=3, p=0.3):
    """A mask that is not patch-aligned (4 x 4 cells: patches partly visible)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, SIZE // 4, SIZE // 4, generator=g) > p).repeat_interleave(4, 2).repeat_interleave(4, 3)


def removed_to(x, mask, value):
    return torch.where(mask, x, torch.full((), value, dtype=x.dtype))


def close(a, b, tol=1e-10):
    scale = max(float(b.abs().max()), 1.0)
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max())


def oracle(model, x1, kept):
    """The model on one image's kept tokens, by hand, no mask: embed, add positions, keep, blocks, pool, head.
    x1: 1 x 3 x H x W (removed pixels already 0), kept: list of patch indices (row-major)."""
    with torch.no_grad():
        if isinstance(model, torchvision.models.VisionTransformer):
            t = model.conv_proj(x1).flatten(2).transpose(1, 2)
            t = torch.cat([model.class_token, t], 1) + model.encoder.pos_embedding
            t = torch.cat([t[:, :1], t[:, 1:][:, kept]], 1)
            for layer in model.encoder.layers:
                t = layer(t)  # torchvision's own EncoderBlock.forward, unmasked
            return model.heads(model.encoder.ln(t)[:, 0])
        t = model.patch_embed.proj(x1).flatten(2).transpose(1, 2)
        prefix = [p for p in (model.cls_token, model.reg_token) if p is not None]
        p = model.num_prefix_tokens
        t = torch.cat(prefix + [t], 1) + model.pos_embed
        t = torch.cat([t[:, :p], t[:, p:][:, kept]], 1)
        for blk in model.blocks:
            t = blk(t)  # timm's own Block.forward, no attn_mask
        t = model.norm(t)
        feat = t[:, 0] if model.global_pool == "token" else t[:, p:].mean(1)
        return model.head(model.fc_norm(feat))


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", VARIANTS)
def test_all_ones_reproduces_the_model(name):
    model = build(name)
    x = images()
    ones = torch.ones(3, 1, SIZE, SIZE, dtype=torch.bool)
    with torch.no_grad():
        plain = model(x)
        for drop in V.DROPS:
            close(V.token_mask(model, drop=drop)(x, ones), plain)
            close(V.token_mask(model, drop=drop, soft=True)(x, ones.to(D)), plain)
            close(V.token_mask(model, drop=drop)(x), plain)  # mask=None, no NaN: nothing removed
        m32 = build(name, torch.float32)
        torch.testing.assert_close(mo.layer_mask(m32)(x.float(), ones), m32(x.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_a_hard_mask_is_the_model_on_the_kept_tokens(name):
    model = build(name)
    x, mask = images(), patch_mask()
    x_removed = removed_to(x, mask, 1e6)  # what the removed pixels hold never matters
    kept_patches = mask[:, 0, ::PATCH, ::PATCH].reshape(3, -1)
    with torch.no_grad():
        for drop in V.DROPS:
            out = V.token_mask(model, drop=drop)(x_removed, mask)
            for i in range(3):
                kept = kept_patches[i].nonzero().flatten().tolist()
                close(out[i:i + 1], oracle(model, removed_to(x[i:i + 1], mask[i:i + 1], 0.0), kept))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("patch_keep", ["all", "any", 0.5])
def test_gather_and_attention_agree(name, patch_keep):
    model = build(name)
    x, mask = images(), pixel_mask()
    with torch.no_grad():
        g = V.token_mask(model, drop="gather", patch_keep=patch_keep)(x, mask)
        a = V.token_mask(model, drop="attention", patch_keep=patch_keep)(x, mask)
        close(g, a)
        soft = 0.2 + 0.8 * torch.rand(3, 1, SIZE, SIZE, dtype=D)
        soft = soft * pixel_mask(seed=4)
        close(V.token_mask(model, drop="gather", patch_keep=patch_keep, soft=True)(x, soft),
              V.token_mask(model, drop="attention", patch_keep=patch_keep, soft=True)(x, soft))


@pytest.mark.parametrize("name", ["timm-avg", "timm-cls", "torchvision"])
def test_everything_removed(name):
    """No visible patch: a model with a class token runs on its prefix alone, one without pools to 0
    (as masked_mean); finite, no NaN row in the attention, both drops alike."""
    model = build(name)
    x, none = images(2), torch.zeros(2, 1, SIZE, SIZE, dtype=torch.bool)
    with torch.no_grad():
        outs = [V.token_mask(model, drop=d)(removed_to(x, none, NAN), none) for d in V.DROPS]
        assert all(torch.isfinite(o).all() for o in outs)
        close(outs[0], outs[1])
        if name == "timm-avg":
            expected = model.head(model.fc_norm(torch.zeros(1, 32, dtype=D)))
            close(outs[0], expected.expand(2, -1))
        else:
            close(outs[0][:1], oracle(model, torch.zeros(1, 3, SIZE, SIZE, dtype=D), []))


def test_more_timm_options():
    """no_embed_class (DeiT-3), no position embedding, pool_include_prefix, dynamic image size: all run the
    model's own embedding code, so all-ones is the model and both drops agree."""
    for extra in (dict(no_embed_class=True, reg_tokens=1), dict(pos_embed="none"),
                  dict(global_pool="avg", pool_include_prefix=True, reg_tokens=1), dict(dynamic_img_size=True)):
        model = build("timm-cls", **extra)
        size = 48 if extra.get("dynamic_img_size") else SIZE
        xs = torch.randn(2, 3, size, size, dtype=D)
        ms = pixel_mask(2) if size == SIZE else torch.rand(2, 1, size, size) > 0.1
        with torch.no_grad():
            close(V.token_mask(model)(xs, torch.ones_like(ms)), model(xs))
            close(V.token_mask(model, drop="gather")(xs, ms), V.token_mask(model, drop="attention")(xs, ms))


# ----------------------------------------------------------------------------- removed values are inert
@pytest.mark.parametrize("name", ["timm-cls", "timm-avg", "torchvision"])
@pytest.mark.parametrize("drop", V.DROPS)
@pytest.mark.parametrize("patch_keep", ["all", "any"])
def test_nan_and_inf_in_removed_pixels_are_inert(name, drop, patch_keep):
    model = build(name)
    tm = V.token_mask(model, drop=drop, patch_keep=patch_keep)
    x, mask = images(), pixel_mask()
    outs, grads = [], []
    for value in (NAN, float("inf"), 0.0, 123.0):
        xv = removed_to(x, mask, value).requires_grad_()
        out = tm(xv, mask)
        (g,) = torch.autograd.grad((out * torch.arange(10, dtype=D)).sum(), xv)
        outs.append(out.detach())
        grads.append(g)
    assert torch.isfinite(outs[0]).all() and torch.isfinite(grads[0]).all()
    for o, g in zip(outs[1:], grads[1:]):
        assert torch.equal(o, outs[0]) and torch.equal(g, grads[0])
    assert not grads[0][~mask.expand_as(x)].any()  # no gradient at a removed pixel
    with torch.no_grad():  # mask=None: the NaN pixels are the removed ones
        assert torch.equal(tm(removed_to(x, mask, NAN)), outs[0])


# ----------------------------------------------------------------------------- patch_keep
def test_patch_keep_rules_on_a_hand_made_mask():
    m = torch.zeros(1, 1, 16, 16, dtype=D)  # 2 x 2 patches of 8 x 8 (64 pixels each)
    m[0, 0, :8, :8] = 1               # patch 0: all visible
    m[0, 0, :4, 8:] = 1               # patch 1: half visible (32 of 64)
    m[0, 0, 8, 0] = 1                 # patch 2: one pixel
    expected = {"all": [1, 0, 0, 0], "any": [1, 1, 1, 0], 0.5: [1, 1, 0, 0], 0.3: [1, 1, 0, 0], 0.51: [1, 0, 0, 0],
                1 / 64: [1, 1, 1, 0], 1.0: [1, 0, 0, 0]}
    for rule, keeps in expected.items():
        k = V.keep_rank(V.check_patch_keep(rule), 64)
        assert V.patch_keeps(m, (8, 8), k).flatten().tolist() == keeps, rule
    assert V.keep_rank(0.3, 10) == 3 and V.keep_rank(0.5, 64) == 32 and V.keep_rank(0.51, 64) == 33
    # a soft mask: the k-th largest value (min for "all", max for "any"); a constant patch keeps its value
    s = torch.full((1, 1, 16, 16), 0.7, dtype=D)
    s[0, 0, 0, 0] = 0.2
    s[0, 0, 0, 8] = 0.9
    assert V.patch_keeps(s, (8, 8), 64).flatten().tolist() == [0.2, 0.7, 0.7, 0.7]
    assert V.patch_keeps(s, (8, 8), 1).flatten().tolist() == [0.7, 0.9, 0.7, 0.7]


@pytest.mark.parametrize("name", ["timm-cls", "torchvision"])
def test_patch_keep_any_reads_removed_pixels_of_kept_patches_as_zero(name):
    model = build(name)
    x = images(1)
    m = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.bool)
    m[0, 0, :8, :8] = True      # patch 0 whole
    m[0, 0, 3, 10] = True       # patch 1: one pixel
    m[0, 0, 20:, 20:] = True    # patches 10 (16 of 64 pixels), 11 and 14 (32 of 64), 15 (all)
    with torch.no_grad():
        for rule, kept in (("any", [0, 1, 10, 11, 14, 15]), ("all", [0, 15]), (0.25, [0, 10, 11, 14, 15]),
                           (0.5, [0, 11, 14, 15]), (0.75, [0, 15])):
            out = V.token_mask(model, patch_keep=rule)(removed_to(x, m, NAN), m)
            close(out, oracle(model, removed_to(x, m, 0.0), kept))


# ----------------------------------------------------------------------------- soft masks
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("patch_keep", ["all", "any", 0.5])
def test_soft_at_0_1_is_the_hard_model(name, patch_keep):
    model = build(name)
    x, mask = images(), pixel_mask()
    x0 = removed_to(x, mask, 0.0)
    with torch.no_grad():
        for drop in V.DROPS:
            hard = V.token_mask(model, drop=drop, patch_keep=patch_keep)(x0, mask)
            for soft in (True, "blend", "threshold", "sample"):
                out = V.token_mask(model, drop=drop, patch_keep=patch_keep, soft=soft)(x0, mask.to(D))
                close(out, hard, 1e-12)


@pytest.mark.parametrize("name", ["timm-cls", "timm-reg-avg", "timm-avg", "torchvision"])
@pytest.mark.parametrize("drop", V.DROPS)
def test_soft_gradcheck(name, drop):
    """The mask gradient of "blend" (16 px: 4 patches, every pixel an input). A patch with a pixel at 0 is
    dropped under "all": held at 0 (gradcheck's steps would leave [0, 1]), its gradient is exactly 0."""
    model = build(name, size=16)
    tm = V.token_mask(model, drop=drop, soft=True, patch_keep="any" if name == "timm-avg" else "all")
    x = torch.randn(2, 3, 16, 16, dtype=D, generator=torch.Generator().manual_seed(1))
    removed = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    removed[1, :, :PATCH, :PATCH] = True
    removed[1, :, 3, 12] = True  # one pixel at 0: "all" drops its patch, "any" keeps it
    m = (0.15 + 0.8 * torch.rand(2, 1, 16, 16, dtype=D)).requires_grad_()
    zero = torch.zeros((), dtype=D)
    full = (name, drop) in (("timm-cls", "gather"), ("torchvision", "attention"))  # the others: fast mode
    assert torch.autograd.gradcheck(lambda mm: tm(x, torch.where(removed, zero, mm)), (m,), atol=1e-7,
                                    fast_mode=not full)
    (g,) = torch.autograd.grad(tm(x, torch.where(removed, zero, m)).sum(), m)
    assert not g[removed].any() and g.abs().max() > 0


@pytest.mark.parametrize("name", ["timm-cls", "timm-avg", "torchvision"])
def test_soft_depends_on_the_mask(name):
    """What a degenerate soft model (mask ignored, gradient 0, a hard threshold) fails."""
    model = build(name)
    tm = V.token_mask(model, soft=True)
    x = images(2)
    m = (0.3 + 0.7 * torch.rand(2, 1, GRID, GRID, dtype=D)).repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    m.requires_grad_()
    out = tm(x, m)
    (g,) = torch.autograd.grad(out[:, 3].sum(), m)
    out = out.detach()
    # every patch's keep matters (a patch-constant mask: its minimum's gradient is shared by the patch's pixels)
    assert (g.reshape(2, GRID, PATCH, GRID, PATCH).sum(dim=(2, 4)).abs() > 1e-7).all()
    with torch.no_grad():
        half = tm(x, m / 2)
        other = m.detach().clone()
        other[:, :, :PATCH, :PATCH] *= 0.5  # one patch less visible
        one_patch = tm(x, other)
        hard = V.token_mask(model)(x, m > 0)
    scale = float(out.abs().max())
    assert float((one_patch - out).abs().max()) > 1e-4 * scale
    assert float((hard - out).abs().max()) > 1e-4 * scale  # not the hard model of the support
    if name != "timm-avg":  # with a class token the patches are weighed against it
        assert float((half - out).abs().max()) > 1e-4 * scale
    else:  # no prefix token: keys and the pool are weighed relative to each other (documented)
        close(half, out)


def test_straight_through_semantics():
    model = build("timm-cls")
    x = images(2)
    keep = torch.tensor([0.9, 0.4, 0.6, 0.0] * 4, dtype=D).reshape(1, 1, GRID, GRID).expand(2, 1, GRID, GRID)
    m = keep.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3).clone().requires_grad_()
    out = V.token_mask(model, soft="threshold")(x, m)
    with torch.no_grad():
        close(out, V.token_mask(model)(x, m >= 0.5), 1e-12)
    (g,) = torch.autograd.grad(out.sum(), m)
    assert g[:, :, :, :PATCH].abs().sum() > 0  # straight-through: the kept patch at 0.9 has a gradient
    torch.manual_seed(5)
    sampled = V.token_mask(model, soft="sample")(x, m.detach())
    assert torch.isfinite(sampled).all()


# ----------------------------------------------------------------------------- bad input
def _raises(exc, words, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_bad_options_and_inputs():
    model = build("timm-cls")
    tm = V.token_mask(model)
    x, mask = images(2), pixel_mask(2)
    for bad in ("most", 0, 1.5, True, None):
        _raises(ValueError, ["patch_keep", "'all'"], V.token_mask, model, patch_keep=bad)
    _raises(ValueError, ["drop", "gather"], V.token_mask, model, drop="mask")
    _raises(ValueError, ["soft"], V.token_mask, model, soft="fuzzy")
    _raises(ValueError, ["x", "not a multiple of the patch size 8 x 8"], tm, torch.randn(2, 3, 30, 32, dtype=D))
    _raises(ValueError, ["x", "position embedding", "32 x 32", "dynamic_img_size"], tm, torch.randn(2, 3, 40, 40,
                                                                                                   dtype=D))
    _raises(ValueError, ["position embedding", "32 x 32"], V.token_mask(build("torchvision")),
            torch.randn(1, 3, 40, 40, dtype=D))
    _raises(ValueError, ["mask", "(2, 1, 32, 32)"], tm, x, mask[:, :, :16])
    _raises(ValueError, ["mask", "batch size"], tm, x, mask[:1])
    _raises(TypeError, ["mask", "bool or floating"], tm, x, mask.to(torch.int64))
    _raises(ValueError, ["mask", "device"], tm, x, mask.to("meta"))
    _raises(ValueError, ["only 0 (removed) and 1", "soft=True"], tm, x, mask.to(D) * 0.5)
    _raises(ValueError, ["[0, 1]"], V.token_mask(model, soft=True), x, mask.to(D) * 1.5)
    _raises(TypeError, ["x", "floating-point"], tm, x.to(torch.int64), mask)
    _raises(TypeError, ["model must be"], V.token_mask, "vit")


def test_unsupported_vits_are_refused_naming_what():
    words = ["layer_mask (token dropping): unsupported", "rather than masked silently wrong"]
    vt = timm_vit.VisionTransformer
    from timm.models.deit import VisionTransformerDistilled  # a subclass: it changes the forward
    small = dict(img_size=SIZE, patch_size=PATCH, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    _raises(ValueError, words + ["VisionTransformerDistilled", "vision transformer class"], mo.layer_mask,
            VisionTransformerDistilled(**small))
    _raises(ValueError, words + ["global_pool", "'map'"], mo.layer_mask, vt(**small, global_pool="map"))
    _raises(ValueError, words + ["global_pool", "'max'"], mo.layer_mask, vt(**small, global_pool="max"))
    _raises(ValueError, words + ["blocks.0.attn", "DiffAttention"], mo.layer_mask,
            vt(**small, attn_layer="diff"))
    _raises(ValueError, words + ["patch_drop", "PatchDropout"], mo.layer_mask, vt(**small, patch_drop_rate=0.5))
    _raises(ValueError, words + ["dynamic_img_pad"], mo.layer_mask,
            vt(**small, dynamic_img_pad=True, dynamic_img_size=True))
    swapped = vt(**small)
    swapped.blocks[0].attn = nn.Identity()
    _raises(ValueError, words + ["blocks.0.attn", "Identity", "timm.layers.Attention"], mo.layer_mask, swapped)
    from timm.models.vision_transformer import ResPostBlock
    _raises(ValueError, words + ["blocks.0", "ResPostBlock"], mo.layer_mask, vt(**small, block_fn=ResPostBlock))
    from torchvision.models.vision_transformer import ConvStemConfig
    stem = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=PATCH, num_layers=1, num_heads=2,
                                                hidden_dim=32, mlp_dim=64,
                                                conv_stem_configs=[ConvStemConfig(8, 3, PATCH)])
    _raises(ValueError, words + ["conv_proj", "Sequential"], mo.layer_mask, stem)


# ----------------------------------------------------------------------------- the API
def test_layer_mask_dispatches_vision_transformers():
    for name in ("timm-cls", "torchvision"):
        model = build(name)
        tm = mo.layer_mask(model)
        assert isinstance(tm, V.TokenMasked) and tm.model is model
        assert tm.patch_keep == V.DEFAULT_PATCH_KEEP and tm.drop == V.DEFAULT_DROP and tm.soft is None
        assert mo.layer_mask(model, soft=True).soft == "blend"
        assert mo.layer_mask(model, soft="threshold").soft == "threshold"
        for bad in (dict(mode="zero"), dict(concat="union"), dict(fill_grad=True), dict(padding_visible=True),
                    dict(fold_bn=False)):
            _raises(ValueError, ["layer_mask", "apply to CNNs only", "token_mask"], mo.layer_mask, model, **bad)
    text = repr(mo.layer_mask(build("timm-reg"), soft=True))
    for w in ("TokenMasked", "timm VisionTransformer", "patch 8 x 8", "3 prefix token(s)", "patch_keep='all'",
              "drop='gather'", "soft='blend'"):
        assert w in text, text
    assert "torchvision" in V.token_mask(build("torchvision"), patch_keep=0.5, drop="attention").summary()


def test_get_strategy_layer_explains_a_vit_by_occlusion():
    from masked_ops.explain import explain_occlusion, get_strategy

    model = build("timm-cls", torch.float32)
    strategy = get_strategy("layer", model)
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    exp = explain_occlusion(strategy, image, n_segments=GRID * GRID, output="logit", targets=3)
    assert exp.weights.shape == (1, GRID * GRID)
    x = strategy.normalise(image[None])
    with torch.no_grad():
        full = model(x)[0, 3]
        for k in (0, 5):
            kept = [j for j in range(GRID * GRID) if j != k]
            expected = full - oracle(model, x, kept)[0, 3]
            assert math.isclose(float(exp.weights[0, k]), float(expected), rel_tol=1e-4, abs_tol=1e-4)
    soft = get_strategy("layer", model, soft=True)
    m = torch.full((1, 1, SIZE, SIZE), 0.6, requires_grad=True)
    soft(image[None], m)[0, 3].backward()
    assert m.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- compile, export
@pytest.mark.parametrize("name", ["timm-reg-avg", "torchvision"])
def test_torch_compile_fullgraph_and_export(name):
    model = build(name, torch.float32)
    x, mask = images(2, dtype=torch.float32), pixel_mask(2)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for drop in V.DROPS:  # the default (gather) runs the attention path when traced: static shapes
        torch._dynamo.reset()
        graphs.clear()
        tm = V.token_mask(model, drop=drop)
        with torch.no_grad():
            eager = tm(x, mask)
            compiled = torch.compile(tm, backend=count, fullgraph=True)
            torch.testing.assert_close(compiled(x, mask), eager, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compiled(x, ~mask), tm(x, ~mask), rtol=1e-5, atol=1e-5)  # no recompile
        assert len(graphs) == 1
    torch._dynamo.reset()
    tm = V.token_mask(model, drop="attention")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(tm, backend="aot_eager", fullgraph=True)(x, mask), tm(x, mask),
                                   rtol=1e-5, atol=1e-5)
    ep = torch.export.export(tm, (x, mask))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x, ~mask), tm(x, ~mask), rtol=1e-5, atol=1e-5)


def test_masked_ops_vit_is_reachable_as_an_attribute():
    """The README's `mo.vit.token_mask(...)` works after a bare `import masked_ops as mo`."""
    import subprocess
    import sys

    code = "import masked_ops as mo; print(mo.vit.token_mask.__name__, mo.vit.DEFAULT_DROP)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["token_mask", V.DEFAULT_DROP]
