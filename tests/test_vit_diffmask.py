"""Vision DiffMask on ViTs (masked_ops/explain/vit_diffmask.py, issue 26).

Random-weight tiny ViTs (32 px, patches of 8: 16 patch tokens, depth 2, width 32), timm's in its variants and
torchvision's. Checked: the gates' shapes and range; the all-open gates reproduce the model; closed gates
under replace="baseline" equal the model run by hand on baseline patch embeddings; replace="drop" is
TokenMasked's soft token dropping; the multipliers ascend; gradients reach every used probe and the
baseline and never the ViT; a short fit on a task with a known answer; checkpoints; bad input.

The known answer: black images with one random patch of noise, on a ViT whose patch projection has no
bias and a head scaled so that the output depends on that patch. A black patch's embedding is then exactly
the zero vector, the baseline of ``learn_baseline=False``: closing any black patch leaves the output
unchanged, closing the noise patch does not. The smallest mask within the KL budget keeps the noise patch
(wherever it is) and closes the other 15. With the published gradient estimator (a gate sampled exactly 0
gets no gradient) the outcome depends on the random model: of 8 model seeds, 5 reach this within 240
steps, 2 close the other patches more slowly, 1 shuts every gate for good; seed 1 is one of the 5.
"""
import pytest
import torch
import torch.nn as nn
from vit_helpers import tiny_vit

from masked_ops.explain.maps import MapExplanation
from masked_ops.explain.vit_diffmask import (PUBLISHED_DEFAULTS, VisionDiffMask, explain_vision_diffmask,
                                             log_open_probability)
from masked_ops.explain.hard_concrete import open_probability
from masked_ops.vit import TokenMasked

timm_vit = pytest.importorskip("timm.models.vision_transformer")
torchvision = pytest.importorskip("torchvision")

SIZE, PATCH, GRID = 32, 8, 4
PIX = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # the tiny models take pixels as they are
VARIANTS = {"timm-cls": dict(), "timm-reg": dict(reg_tokens=2), "timm-avg": dict(class_token=False, global_pool="avg"),
            "timm-dynamic": dict(dynamic_img_size=True)}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is ~50x faster than two on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build(name="timm-cls", seed=0, dtype=torch.float32):
    if name == "torchvision":
        return tiny_vit("torchvision", size=SIZE, patch=PATCH, seed=seed, dtype=dtype)
    return tiny_vit("timm", size=SIZE, patch=PATCH, seed=seed, dtype=dtype, **VARIANTS[name])


def images(n=3, seed=1, dtype=torch.float32):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make(model, **kw):
    opts = dict(warmup=0, batch_size=4, **PIX)
    opts.update(kw)
    return VisionDiffMask(model, **opts)


# ----------------------------------------------------------------------------- the forward
def test_defaults_are_the_published_ones():
    dm = VisionDiffMask(build())
    for k, v in PUBLISHED_DEFAULTS.items():
        assert dm.config[k] == v, k
    assert dm.config["hidden"] == 32 // 4 and dm.n_probes == 2 + 2  # a probe per hidden state: L + 2
    assert dm.lagrange.tolist() == [20.0] * 4
    probe = dm.gate.probes[0]
    assert probe.f[0].in_features == 2 * 32 and probe.scale == 15.0 and float(probe.offset.detach()) == 8.0
    model = build()
    assert VisionDiffMask(TokenMasked(model)).model is model  # a layer-masked ViT: the ViT inside
    import masked_ops.explain as E
    assert E.VisionDiffMask is VisionDiffMask and E.explain_vision_diffmask is explain_vision_diffmask


@pytest.mark.parametrize("name", list(VARIANTS) + ["torchvision"])
@pytest.mark.parametrize("replace", ["baseline", "drop"])
def test_open_gates_reproduce_the_model_and_gates_have_the_right_shape(name, replace):
    model = build(name)
    dm = make(model, replace=replace, image_size=SIZE)
    x = images()
    with torch.no_grad():
        ref = model(x)
        out = dm.masked_logits(x, torch.ones(3, 16))
    if replace == "drop" and name in ("timm-avg", "torchvision"):
        # TokenMasked's soft path at keeps 1 rounds differently in float32 (the keep-weighted mean pool
        # sum(w t) / sum(w); a zero float key mask in torchvision's MultiheadAttention); 1e-15 in float64
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    else:
        assert torch.equal(out, ref)
    logits, states = dm.hidden_states(x)
    assert torch.equal(logits, ref) and len(states) == 4 and all(s.shape == (3, 16, 32) for s in states)
    keep = dm.keep_probability(x)
    assert keep.shape == (3, 1, GRID, GRID) and bool(((keep >= 0) & (keep <= 1)).all())
    exps = dm.explain(x)
    assert len(exps) == 3 and all(isinstance(e, MapExplanation) for e in exps)
    e = exps[0]
    assert e.weights.shape == (1, 16) and e.masks.shape == (1, SIZE, SIZE) and e.targets == [int(ref[0].argmax())]
    assert bool(((e.masks >= 0) & (e.masks <= 1)).all())
    # the pixel map is the patch map upsampled (nearest), and the weights are the aggregated expected L0
    assert torch.equal(e.masks[0, ::PATCH, ::PATCH].reshape(-1), e.weights[0])
    _, la = dm.gate_logits(x)
    torch.testing.assert_close(e.weights[0], open_probability(la[0]).prod(-1))
    assert dm.explain(x[0], layer=0).info["layer"] == 0  # one image in, one explanation out


@pytest.mark.parametrize("name", ["timm-cls", "timm-reg", "torchvision"])
def test_closed_gates_give_the_model_on_baseline_patch_embeddings(name):
    model = build(name, dtype=torch.float64)
    dm = make(model, image_size=SIZE)
    with torch.no_grad():
        dm.gate.baseline.normal_()
    x = images(dtype=torch.float64)
    b = dm.baseline.detach()
    with torch.no_grad():
        out = dm.masked_logits(x, torch.zeros(3, GRID, GRID))
        # by hand: every patch embedding is b; class/register tokens and position embeddings as the model adds them
        if name == "torchvision":
            t = torch.cat([model.class_token.expand(3, -1, -1), b.expand(3, 16, -1)], 1) + model.encoder.pos_embedding
            ref = model.heads(model.encoder.ln(model.encoder.layers(t))[:, 0])
        else:
            t = model.norm_pre(model._pos_embed(b.expand(3, 16, -1)))
            ref = model.forward_head(model.norm(model.blocks(t)))
        assert torch.equal(out, ref)
        # half the gates: z h + (1 - z) b at the patch embeddings, nothing else
        z = torch.rand(3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        if name != "torchvision":
            h = model.patch_embed(x)
            t = model.norm_pre(model._pos_embed(z[..., None] * h + (1 - z[..., None]) * b))
            torch.testing.assert_close(dm.masked_logits(x, z), model.forward_head(model.norm(model.blocks(t))),
                                       rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["timm-cls", "torchvision"])
def test_drop_is_token_masked_soft_dropping(name):
    model = build(name, dtype=torch.float64)
    dm = make(model, replace="drop", image_size=SIZE)
    x = images(dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    z = torch.rand(3, 16, generator=g, dtype=torch.float64)
    soft = TokenMasked(model, soft=True)
    mask = z.view(3, 1, GRID, GRID).repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    with torch.no_grad():
        torch.testing.assert_close(dm.masked_logits(x, z), soft(x, mask), rtol=0, atol=1e-12)
        # at 0/1 gates: the hard token dropping, the closed patches' tokens absent (no baseline anywhere)
        hard = (z > 0.5).to(torch.float64)
        hard[0] = 0.0
        hmask = hard.view(3, 1, GRID, GRID).repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
        torch.testing.assert_close(dm.masked_logits(x, hard), TokenMasked(model)(x, hmask.bool()), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- training mechanics
def test_gradients_reach_the_used_probes_and_the_baseline_never_the_vit():
    model = build()
    dm = make(model, offset=0.0, lr=1e-2)  # gates half open: both terms have gradients
    records = []
    dm.fit(images(4), epochs=1, progress=False, callback=records.append)
    k = records[0]["layer"]
    for i, probe in enumerate(dm.gate.probes):
        grads = [p.grad for p in probe.parameters()]
        if i <= k:  # the gate at layer k is the product of the probes 0..k
            assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0
        else:
            assert all(g is None for g in grads)
    assert dm.baseline.grad is not None and float(dm.baseline.grad.abs().sum()) > 0
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # frozen, then given back
    used = [i for i, m in enumerate(dm.multipliers) if m.grad is not None]
    assert used == [k]  # one multiplier per hidden state, only the drawn layer's is trained


@pytest.mark.parametrize("replace", ["baseline", "drop"])
def test_the_multiplier_ascends_when_kl_exceeds_eps_and_descends_below(replace):
    model = one_patch_model()  # its output depends on the images (a random ViT's hardly does)
    x = one_patch_images(4, 2)[0]
    # every gate shut: KL far above eps
    dm = make(model, replace=replace, offset=-30.0, eps=0.01, alpha_init=5.0, lookahead=None)
    rec = dm._train_step(x)
    assert rec["kl"] > 0.01 and rec["kept"] < 1e-6
    after = dm.lagrange
    assert float(after[rec["layer"]]) == pytest.approx(5.0 + 0.3, abs=1e-5)  # Adam's first step: lr_alpha
    assert all(float(after[i]) == 5.0 for i in range(4) if i != rec["layer"])
    # every gate open: KL below eps, the multiplier descends, and is clamped at 0
    dm = make(model, replace=replace, offset=30.0, eps=1.0, alpha_init=0.1, lookahead=None)
    rec = dm._train_step(x)
    assert rec["kl"] < 1.0 and float(dm.lagrange[rec["layer"]]) == 0.0


def test_log_open_probability_is_the_log_of_the_expected_l0():
    la = torch.linspace(-30, 30, 61, dtype=torch.float64)
    torch.testing.assert_close(log_open_probability(la).exp(), open_probability(la))
    assert bool(torch.isfinite(log_open_probability(torch.tensor(-200.0))))


# ----------------------------------------------------------------------------- learning a known answer
def one_patch_model(seed=1):
    torch.manual_seed(seed)
    model = timm_vit.VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2,
                                       num_classes=10, class_token=False, global_pool="avg").eval()
    nn.init.normal_(model.head.weight, std=3.0)
    with torch.no_grad():
        model.patch_embed.proj.bias.zero_()  # a black patch embeds to exactly 0
    return model


def one_patch_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, SIZE, SIZE)
    where = torch.randint(0, 16, (n,), generator=g)
    for i, w in enumerate(where.tolist()):
        r, c = divmod(w, GRID)
        x[i, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = torch.rand(3, PATCH, PATCH, generator=g)
    return x, where


def test_fit_keeps_the_one_patch_that_matters_and_closes_the_others():
    model = one_patch_model()
    train, _ = one_patch_images(64, 0)
    test, where = one_patch_images(16, 1)
    dm = make(model, learn_baseline=False, batch_size=16, lr=3e-2, scale=10.0, offset=2.0, alpha_init=20.0, eps=0.1)
    with torch.no_grad():  # the premise: closing the noise patch costs KL, closing a black one costs nothing
        from masked_ops.explain.hard_concrete import kl_divergence
        clean = model(test)
        z = torch.ones(16, 16)
        z[torch.arange(16), where] = 0
        removed = kl_divergence(clean, dm.masked_logits(test, z))
        assert float(removed.min()) > 0.05 and float(removed.median()) > 10
        assert float(kl_divergence(clean, dm.masked_logits(test, 1 - z)).abs().max()) < 1e-6
    dm.fit(train, epochs=40, progress=False)
    keep = dm.keep_probability(test).reshape(16, 16)
    noise = keep[torch.arange(16), where]
    others = keep.clone()
    others[torch.arange(16), where] = float("nan")
    others = others[~others.isnan()]
    assert float(noise.min()) > 0.9
    assert float((others < 0.5).float().mean()) > 0.9 and float(others.mean()) < 0.1
    assert bool((keep.argmax(1) == where).all())
    assert dm.evaluate(test)["kl"] < 0.1
    assert len(dm.history) == 40 and dm.step == 160


def test_per_image_variant():
    """Fitted on one image with the helper's defaults (the published gate settings, larger learning rates)."""
    model = one_patch_model()
    x, where = one_patch_images(6, 5)
    exp = explain_vision_diffmask(model, x[0], steps=100, learn_baseline=False, progress=False, **PIX)
    assert isinstance(exp, MapExplanation) and exp.info["amortised"] is False and exp.info["steps"] == 100
    assert exp.weights.shape == (1, 16) and exp.masks.shape == (1, SIZE, SIZE)
    w, p = exp.weights[0], int(where[0])
    assert float(w[p]) > 0.9 and float(torch.cat([w[:p], w[p + 1:]]).max()) < 0.1
    assert exp.info["kl"] < 0.1 and len(exp.info["lagrange"]) == 4


# ----------------------------------------------------------------------------- checkpoints
def test_interrupted_fit_resumes_to_the_same_state(tmp_path):
    model = build()
    train = images(8, seed=7)
    opts = dict(offset=0.0, lr=1e-2, lookahead=(0.5, 2), warmup=3)  # lookahead and warm-up state cross the cut
    ref = make(model, **opts)
    ref.fit(train, epochs=3, val_images=images(2, seed=8), progress=False)
    ckpt = tmp_path / "vdm.pt"

    def stop(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    first = make(model, **opts)
    with pytest.raises(KeyboardInterrupt, match="at step 3 of 6.*holds step 3"):
        first.fit(train, epochs=3, val_images=images(2, seed=8), checkpoint=str(ckpt), checkpoint_every=1,
                  progress=False, callback=stop)
    resumed = make(model, **opts)
    resumed.fit(train, epochs=3, val_images=images(2, seed=8), checkpoint=str(ckpt), checkpoint_every=1, progress=False)
    for (k, a), b in zip(ref.gate.state_dict().items(), resumed.gate.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(ref.lagrange, resumed.lagrange)
    assert resumed.history == ref.history and resumed.step == ref.step == 6
    # load: the same explanations; another model, another configuration, a CNN DiffMask's file: refused
    back = VisionDiffMask.load(str(ckpt), model)
    x = images(2, seed=9)
    assert torch.equal(back.keep_probability(x), ref.keep_probability(x))
    with pytest.raises(ValueError, match="made for another model"):
        VisionDiffMask.load(str(ckpt), build(seed=5))
    with pytest.raises(ValueError, match="another Vision DiffMask configuration.*eps"):
        make(model, **dict(opts, eps=0.2)).fit(train, epochs=3, checkpoint=str(ckpt), progress=False)
    with pytest.raises(ValueError, match="other training data"):
        make(model, **opts).fit(images(8, seed=10), epochs=3, checkpoint=str(ckpt), progress=False)
    state = torch.load(ckpt, weights_only=True)
    state.pop("method")
    with pytest.raises(ValueError, match="not a Vision DiffMask state"):
        make(model, **opts).load_state_dict(state)


# ----------------------------------------------------------------------------- bad input
def test_bad_input(tmp_path):
    model = build()
    with pytest.raises(TypeError, match="model must be a timm or torchvision VisionTransformer.*Conv2d"):
        VisionDiffMask(nn.Conv2d(3, 8, 3))
    with pytest.raises(TypeError, match="model must be"):
        VisionDiffMask("vit_small_patch16_224")
    from timm.models.deit import VisionTransformerDistilled  # a subclass changes the forward: refused by name
    distilled = VisionTransformerDistilled(img_size=SIZE, patch_size=PATCH, embed_dim=32, depth=1, num_heads=2,
                                           num_classes=10)
    with pytest.raises(ValueError, match="VisionTransformerDistilled"):
        VisionDiffMask(distilled)
    with pytest.raises(ValueError, match="replace must be one of"):
        VisionDiffMask(model, replace="zero")
    for kw, match in [(dict(eps=0), "eps must be"), (dict(lr=-1.0), "lr must be"), (dict(lr_alpha=0), "lr_alpha"),
                      (dict(lr_baseline=float("nan")), "lr_baseline"), (dict(alpha_init=300.0), "alpha_init"),
                      (dict(alpha_init=-1.0), "alpha_init"), (dict(scale=0), "scale"), (dict(hidden=0), "hidden"),
                      (dict(lookahead=(2.0, 6)), "lookahead"), (dict(lookahead=(0.5, 0)), "lookahead"),
                      (dict(warmup=-1), "warmup"), (dict(batch_size=0), "batch_size"),
                      (dict(image_size=40), "image_size"), (dict(mean=(0.5,)), "mean and std")]:
        with pytest.raises(ValueError, match=match):
            VisionDiffMask(model, **kw)
    with pytest.raises(ValueError, match="image_size is required"):
        VisionDiffMask(build("timm-dynamic"))
    with pytest.raises(ValueError, match="multiple of the model's patch size"):
        VisionDiffMask(build("timm-dynamic"), image_size=36)
    dm = make(model)
    with pytest.raises(ValueError, match="must be 32 x 32"):
        dm.explain(torch.rand(1, 3, 40, 40))
    with pytest.raises(ValueError, match="images must be an N x 3 x 32 x 32"):
        dm.explain(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        dm.explain(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(TypeError, match="floating point"):
        dm.explain(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="layer must be"):
        dm.explain(images(1), layer=4)
    with pytest.raises(ValueError, match="target class 10 is out of range"):
        dm.explain(images(1), targets=10)
    with pytest.raises(ValueError, match="gates must hold one value per patch"):
        dm.masked_logits(images(2), torch.ones(2, 15))
    with pytest.raises(ValueError, match="empty training set"):
        dm.fit(torch.zeros(0, 3, 32, 32), progress=False)
    with pytest.raises(ValueError, match="val_images must be 32 x 32"):
        dm.fit(images(2), val_images=torch.rand(2, 3, 16, 16), progress=False)
    with pytest.raises(ValueError, match="checkpoint: the folder"):
        dm.fit(images(2), checkpoint=str(tmp_path / "no" / "vdm.pt"), progress=False)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        dm.fit(images(2), epochs=0, progress=False)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        explain_vision_diffmask(model, images(1)[0], steps=0, **PIX)
    with pytest.raises(ValueError, match="must be 32 x 32"):
        explain_vision_diffmask(model, torch.rand(3, 40, 40), steps=1, **PIX)
