"""Every explainer and experiment on a vision transformer through get_strategy("layer", vit) (issue 26).

Random-weight tiny ViTs (32 px, patches of 8: a 4 x 4 grid of tokens), timm's with a class token and
torchvision's. Each entry point runs, returns the right shape, finite and not constant, and is checked
against a property a wrong implementation fails: the outputs it is built from equal those of an
independent oracle (the ViT's own modules run by hand on the kept tokens only, no mask anywhere), or the
mask's gradient reaches the explanation (an implementation that ignored the mask gives identical maps).
The command line runs a timm ViT (timm's ``test_vit``, 160 px) whose weights sit in a temporary Hugging
Face cache, with nothing downloaded; the dataset runner and the experiment command run on it too.
"""
import argparse
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from vit_helpers import tiny_vit

from cli_helpers import fake_hf_cache, offline_caches, run_cli
from masked_ops.explain import (DiffMask, explain_diffmask, explain_extremal, explain_kernel_shap, explain_lime,
                                explain_occlusion, explain_rise, get_strategy)
from masked_ops.explain.gate_net import HiddenFeatures, stage_layers
from masked_ops.explain.rise import rise_masks
from masked_ops.explain.strategies import STRATEGIES, strategies_for

timm_vit = pytest.importorskip("timm.models.vision_transformer")
torchvision = pytest.importorskip("torchvision")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, PATCH = 32, 8
GRID = SIZE // PATCH
L = GRID * GRID
KINDS = ["timm", "torchvision"]
removal = importlib.import_module("masked_ops.experiments.removal")
leakage = importlib.import_module("masked_ops.experiments.leakage")
linearity = importlib.import_module("masked_ops.experiments.linearity")
faithfulness = importlib.import_module("masked_ops.experiments.faithfulness")
learned = importlib.import_module("masked_ops.experiments.learned_faithfulness")
exp_masks = importlib.import_module("masked_ops.experiments.masks")


def build(kind="timm"):
    return tiny_vit(kind, size=SIZE, patch=PATCH, head_std=0.5)


@pytest.fixture(scope="module")
def vits():
    return {k: build(k) for k in KINDS}


def image(seed=0):
    return torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def oracle(model, x, kept):
    """Logits of the model on the kept patch tokens of x (1 x 3 x H x W, normalised), by hand: embed, add the
    position embeddings, keep the class token and the kept patches, the blocks unmasked, pool, head."""
    with torch.no_grad():
        if isinstance(model, torchvision.models.VisionTransformer):
            t = model.conv_proj(x).flatten(2).transpose(1, 2)
            t = torch.cat([model.class_token, t], 1) + model.encoder.pos_embedding
            t = torch.cat([t[:, :1], t[:, 1:][:, list(kept)]], 1)
            for layer in model.encoder.layers:
                t = layer(t)
            return model.heads(model.encoder.ln(t)[:, 0])[0]
        t = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([model.cls_token, t], 1) + model.pos_embed
        t = torch.cat([t[:, :1], t[:, 1:][:, list(kept)]], 1)
        for blk in model.blocks:
            t = blk(t)
        return model.head(model.norm(t)[:, 0])[0]


def kept_patches(mask):
    """The patches (row-major) whose every pixel is visible in a 1 x H x W mask (the default patch_keep)."""
    m = mask.reshape(GRID, PATCH, GRID, PATCH).permute(0, 2, 1, 3).reshape(L, -1)
    return [j for j in range(L) if bool((m[j] > 0.5).all())]


def close(a, b, tol=1e-4):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), (a, b)


def usable(t):
    t = torch.as_tensor(t)
    assert bool(torch.isfinite(t).all()) and float(t.max() - t.min()) > 1e-6, t


# ----------------------------------------------------------------------------- strategies
def test_cnn_only_layer_options_are_refused_for_a_vit(vits):
    vit = vits["timm"]
    for name in ("layer-renorm", "layer-zero"):
        with pytest.raises(ValueError, match=f"mode '{name[6:]}'.*vision transformer.*dropping .*Use the strategy "
                                             f"'layer'"):
            get_strategy(name, vit)  # when the strategy is made, not at its first forward
    with pytest.raises(ValueError, match="padding_visible=True: CNN layer-masking options"):
        get_strategy("layer", vit, padding_visible=True)
    with pytest.raises(ValueError, match="fill_grad=True: CNN layer-masking options"):
        get_strategy("layer", vit, soft=True, fill_grad=True)
    assert strategies_for(vit) == [s for s in STRATEGIES if s not in ("layer-renorm", "layer-zero")]
    assert strategies_for(nn.Conv2d(3, 3, 1)) == list(STRATEGIES)
    assert removal.Subject(vits["torchvision"]).names == strategies_for(vit)  # the default list of experiments


def test_channels_last_model_explains_the_same(vits):
    vit = build("timm")
    x, masks = image()[None], torch.rand(4, 1, SIZE, SIZE) > 0.4
    with torch.no_grad():
        ref = get_strategy("layer", vit)(x, masks)
        cl = get_strategy("layer", vit.to(memory_format=torch.channels_last))
        assert cl.channels_last
        close(cl(x, masks), ref, 1e-5)


# ----------------------------------------------------------------------------- perturbation explainers
@pytest.mark.parametrize("kind", KINDS)
def test_occlusion_is_the_drop_with_each_token_removed(vits, kind):
    vit = vits[kind]
    s = get_strategy("layer", vit)
    img = image(1)
    exp = explain_occlusion(s, img, n_segments=L, output="logit", targets=[2, 7])
    assert exp.weights.shape == (2, L)
    usable(exp.weights)
    x = s.normalise(img[None])
    full = oracle(vit, x, range(L))
    for k in range(L):
        close(exp.weights[:, k], full[[2, 7]] - oracle(vit, x, [j for j in range(L) if j != k])[[2, 7]])
    # sliding windows of 2 x 2 patches, stride one patch: each cell's mean drop over its windows
    win = explain_occlusion(s, img, window=2 * PATCH, stride=PATCH, output="logit", targets=2)
    assert win.weights.shape == (1, L)
    usable(win.weights)


def test_lime_regresses_the_outputs_of_the_kept_tokens(vits):
    vit = vits["timm"]
    s = get_strategy("layer", vit)
    img = image(2)
    exp = explain_lime(s, img, segments="grid", n_segments=L, num_samples=40, output="prob", targets=3)
    assert exp.weights.shape == (1, L) and exp.outputs.shape == (40, 1)
    usable(exp.weights)
    x = s.normalise(img[None])
    for j in (0, 7, 25):  # each sample's output: the model on the tokens of the segments it keeps
        kept = [k for k in range(L) if exp.samples[j, k] > 0]
        close(exp.outputs[j, 0], oracle(vit, x, kept).softmax(0)[3])


def test_kernel_shap_sums_to_full_minus_the_class_token_alone(vits):
    vit = vits["torchvision"]
    s = get_strategy("layer", vit)
    img = image(3)
    exp = explain_kernel_shap(s, img, segments="grid", n_segments=L, num_samples=60, output="logit", targets=4)
    assert exp.weights.shape == (1, L)
    usable(exp.weights)
    x = s.normalise(img[None])
    # efficiency: the weights add up to f(all tokens) - f(no patch token), the class token alone
    close(exp.weights.sum(), oracle(vit, x, range(L))[4] - oracle(vit, x, [])[4], 1e-3)


# ----------------------------------------------------------------------------- mask explainers
def test_rise_binary_is_the_mean_of_token_dropped_outputs_and_soft_runs(vits):
    vit = vits["timm"]
    img = image(4)
    n, cells, p = 12, 4, 0.5
    exp = explain_rise(get_strategy("layer", vit), img, n_masks=n, cells=cells, p=p, binary=True, output="logit",
                       targets=1, seed=3)
    assert exp.weights.shape == (1, SIZE * SIZE)
    usable(exp.weights)
    masks = rise_masks(n, (SIZE, SIZE), cells, p, generator=torch.Generator().manual_seed(3)) > 0.5
    x = get_strategy("grey", vit).normalise(img[None])
    logits = torch.stack([oracle(vit, x, kept_patches(m)) for m in masks.float()])[:, 1]
    expected = (logits.double()[:, None] * masks.reshape(n, -1).double()).sum(0) / (n * p)
    close(exp.weights[0], expected, 1e-4)
    soft = explain_rise(get_strategy("layer", vit, soft=True), img, n_masks=n, cells=cells, p=p, output="logit",
                        targets=1, seed=3)
    assert soft.weights.shape == (1, SIZE * SIZE)
    usable(soft.weights)
    assert not torch.allclose(soft.weights, exp.weights)  # soft masks weigh tokens, not keep-or-drop


def test_extremal_masks_follow_the_target(vits):
    vit = vits["timm"]
    s = get_strategy("layer", vit, soft=True)
    exp = explain_extremal(s, image(5), targets=[0, 9], areas=(0.25,), iterations=6, step=4, sigma=4.0)
    assert exp.masks.shape == (2, 1, SIZE, SIZE) and exp.weights.shape == (2, SIZE * SIZE)
    assert bool(torch.isfinite(exp.masks).all()) and float(exp.masks.min()) >= 0 and float(exp.masks.max()) <= 1
    usable(exp.weights[0])
    # the area penalty alone treats both targets alike: the maps differ only through the mask's gradient
    assert float((exp.masks[0] - exp.masks[1]).abs().max()) > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_per_image_diffmask_gets_the_kl_gradient_through_dropped_tokens(vits, kind):
    s = get_strategy("layer", vits[kind], soft=True)
    exp = explain_diffmask(s, image(6), patch=PATCH, steps=4, samples=2, init_logit=0.0, lr=0.5, seed=1)
    assert exp.weights.shape == (1, L) and exp.masks.shape == (1, SIZE, SIZE)
    assert 0 <= exp.info["kept"] <= 1 and np.isfinite(exp.info["kl"])
    # every gate starts equal and the L0 term pushes all alike: they part only through the KL's gradient
    usable(exp.info["log_alpha"])


@pytest.mark.parametrize("kind", KINDS)
def test_diffmask_reads_the_blocks_on_the_patch_grid_and_drops_tokens(vits, kind):
    vit = vits[kind]
    blocks = ["blocks.0", "blocks.1"] if kind == "timm" else ["encoder.layers.encoder_layer_0",
                                                               "encoder.layers.encoder_layer_1"]
    assert stage_layers(vit, SIZE) == blocks
    if kind == "timm":  # a deeper ViT: 4 blocks, evenly spaced, the last included
        deep = timm_vit.VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=8, depth=12, num_heads=1)
        assert stage_layers(deep, SIZE) == [f"blocks.{i}" for i in (2, 5, 8, 11)]
    # the hidden states: block outputs, patch token r * GRID + c at grid cell (r, c), the class token left out
    x = torch.randn(2, 3, SIZE, SIZE)
    seen = {}
    modules = dict(vit.named_modules())
    handle = modules[blocks[-1]].register_forward_hook(lambda m, i, o: seen.__setitem__("t", o.detach()))
    feats = HiddenFeatures(vit, blocks)
    try:
        _, grids = feats.run(vit, x)
    finally:
        feats.remove()
        handle.remove()
    assert grids[-1].shape == (2, 32, GRID, GRID)
    torch.testing.assert_close(grids[-1][1, :, 2, 3], seen["t"][1, 1 + 2 * GRID + 3])
    dm = DiffMask(vit, strategy="layer", patch=PATCH, image_size=SIZE, batch_size=2, hidden=8)
    try:
        assert dm.layers == blocks and dm.strategy.soft
        imgs = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
        before = [p.detach().clone() for p in dm.gate.parameters()]
        dm.fit(imgs, epochs=1, progress=False)
        assert any(not torch.equal(a, b) for a, b in zip(before, dm.gate.parameters()))
        exps = dm.explain(imgs[:2])
        assert len(exps) == 2 and exps[0].weights.shape == (1, L)
        assert all(bool(torch.isfinite(e.weights).all()) and 0 <= float(e.weights.min()) for e in exps)
        assert np.isfinite(dm.evaluate(imgs)["kl"])
        # the strategy DiffMask drives: gated patches dropped (0/1 gates: the hard model on the kept tokens)
        gates = torch.zeros(1, 1, GRID, GRID)
        gates.view(-1)[[0, 5, 6, 15]] = 1
        mask = gates.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
        with torch.no_grad():
            close(dm.strategy(imgs[:1], mask)[0], oracle(vit, dm.strategy.normalise(imgs[:1]), [0, 5, 6, 15]))
    finally:
        dm.close()


# ----------------------------------------------------------------------------- experiments
def _photos(n=3):
    """Smooth random photos (bilinear upsampling of coarse noise): SLIC finds segments in them."""
    coarse = torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(8))
    return torch.nn.functional.interpolate(coarse, size=SIZE, mode="bilinear", align_corners=False).clamp(0, 1)


def test_removal_curves_are_the_token_dropped_model(vits):
    vit = vits["timm"]
    imgs = _photos(2)
    fractions, repeats = [0.0, 0.5, 1.0], 2
    res = removal.removal_curves(vit, imgs, ["layer", "grey"], fractions=fractions, repeats=repeats, patch=PATCH,
                                 progress=False)
    row = res["strategies"]["layer"]
    assert row["agreement"][0] == 1.0 and abs(row["kl"][0]) < 1e-6 and len(row["p_clean"]) == 3
    x = get_strategy("grey", vit).normalise(imgs)
    for f in (1, 2):  # the clean class's probability, averaged, from the oracle on each mask's kept tokens
        probs = []
        for i in range(2):
            clean = int(oracle(vit, x[i:i + 1], range(L)).argmax())
            masks = removal.removal_masks_for_image(i, (SIZE, SIZE), patch=PATCH, fractions=fractions,
                                                    repeats=repeats, seed=0)
            for r in range(repeats):
                probs.append(float(oracle(vit, x[i:i + 1], kept_patches(masks[f * repeats + r, 0])).softmax(0)[clean]))
        close(row["p_clean"][f], np.mean(probs), 1e-5)
    assert row["p_clean"] != res["strategies"]["grey"]["p_clean"]


def test_leakage_salient_vs_moved_and_shape_probe(vits):
    vit = vits["torchvision"]
    imgs = _photos(3)
    res = leakage.salient_vs_moved(vit, imgs[:1], ["layer", "grey"], area=0.25, progress=False)
    subject = leakage.Subject(vit, ["grey"])
    clean = subject.clean_logits(imgs[:1])
    region = exp_masks.salient_blob(leakage.gradient_saliency(subject, imgs[:1], clean.argmax(-1))[0], 0.25)
    x = subject.normalise(imgs[:1])
    expected = oracle(vit, x, kept_patches((~region).float()[None])).double().softmax(0)[int(clean.argmax())]
    close(res["strategies"]["layer"]["p_clean_salient"], expected, 1e-5)
    probe = leakage.shape_probe(vit, imgs, ["layer"], groups=["a", "b", "c"], jitter=2, folds=3, progress=False)
    row = probe["strategies"]["layer"]
    assert 0 <= row["accuracy"] <= 1 and len(row["fold_accuracy"]) == 3 and probe["chance"] == 1 / len(probe["shapes"])


def test_linearity_and_lime_faithfulness_run(vits):
    vit = vits["timm"]
    imgs = _photos(2)
    lin = linearity.linearity(vit, imgs, ["layer", "grey"], repeats=1, patch=PATCH, progress=False)
    assert -1 <= lin["strategies"]["layer"]["cosine"] <= 1 and np.isfinite(lin["strategies"]["layer"]["rel_err"])
    fa = faithfulness.lime_faithfulness(vit, imgs, ["layer"], samples=12, n_segments=8, steps=[0.0, 0.5, 1.0],
                                        progress=False)
    assert fa["explainers"] == ["layer", "random"] and fa["evaluators"] == ["layer"]
    assert np.isfinite(fa["deletion_auc"]["layer"]["layer"]) and np.isfinite(fa["insertion_auc"]["layer"]["layer"])


def test_learned_faithfulness_with_gradcam_and_diffmask_on_a_vit(vits):
    vit = vits["timm"]
    imgs = _photos(3)
    assert learned.gradcam_layer(vit, SIZE) == "blocks.1.norm1"
    assert learned.gradcam_layer(vits["torchvision"], SIZE) == "encoder.layers.encoder_layer_1.ln_1"
    res = learned.learned_faithfulness(
        vit, imgs[:1], imgs[1:], explainers=["gradcam", "diffmask-layer", "extremal-layer"], evaluators=["layer"],
        steps=[0.0, 0.5, 1.0], unit=PATCH, patch=PATCH, diffmask_epochs=1, diffmask_batch=2, extremal_iterations=2,
        extremal_areas=(0.25,), progress=False)
    assert res["diffmask"]["layer"]["layers"] == ["blocks.0", "blocks.1"]
    for e in ("gradcam", "diffmask-layer", "extremal-layer"):
        assert all(np.isfinite(res["auc"][m][e]["layer"]) for m in learned.METRICS), e
    cam = learned._gradcam(vit, imgs[:1], get_strategy("grey", vit).normalise, "blocks.1.norm1", 3)
    assert cam.shape == (SIZE, SIZE)
    usable(cam)


# ----------------------------------------------------------------------------- command line, local cache
@pytest.fixture
def hf_cache(monkeypatch, tmp_path):
    """timm's test_vit (160 px, patches of 16) with random weights saved as its pretrained tag r160_in1k in a
    temporary Hugging Face cache; torch.hub's downloader refuses (and records) any call."""
    calls = offline_caches(monkeypatch, tmp_path)
    return fake_hf_cache(tmp_path, "test_vit", "r160_in1k"), calls


def _photo(path, seed=0, size=(40, 56)):
    from PIL import Image

    rgb = (np.random.RandomState(seed).rand(size[0], size[1], 3) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return str(path)


def test_cli_explains_a_timm_vit_from_the_local_cache(hf_cache, tmp_path):
    from masked_ops.explain.perturb import load_explanations
    from masked_ops.images import load_image
    from masked_ops.models import load_model

    saved, calls = hf_cache
    photo = _photo(tmp_path / "photo.png")
    save = tmp_path / "vit.npz"
    env = dict(os.environ, PYTHONPATH=ROOT, MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "masked_ops.cli", "explain", photo, "--model", "test_vit.r160_in1k", "--method",
           "occlusion", "--n-segments", "4", "--masking", "layer,grey", "--output", "logit", "--save", str(save),
           "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "model: test_vit.r160_in1k, weights: r160_in1k (timm, local cache)" in r.stdout
    exps, meta = load_explanations(save)
    model, info = load_model("test_vit.r160_in1k")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items()) and info.input_size == 160
    x = info.prepare(load_image(photo))[0]
    ref = explain_occlusion(get_strategy("layer", model, mean=info.mean, std=info.std), x, n_segments=4,
                            output="logit", targets=meta["target"])
    assert [e.strategy for e in exps] == ["layer", "grey"]
    torch.testing.assert_close(exps[0].weights, ref.weights, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(exps[0].weights, exps[1].weights)
    assert calls == []


def test_cli_refuses_cnn_layer_modes_for_a_vit(hf_cache, tmp_path, capsys):
    code, _, err = run_cli(["explain", _photo(tmp_path / "p.png"), "--model", "test_vit.r160_in1k", "--method",
                            "occlusion", "--n-segments", "4", "--masking", "layer-zero", "--no-progress"], capsys)
    assert code == 2 and "masked-ops: error: mode 'zero'" in err and "vision transformer" in err
    from masked_ops.models import load_model

    (tmp_path / "empty").mkdir()
    os.environ["HF_HUB_CACHE"] = str(tmp_path / "empty")  # (restored by hf_cache's monkeypatch)
    with pytest.raises(ValueError, match=r"timm weights test_vit\.r160_in1k are not in the local cache .*never "
                                         r"downloads"):
        load_model("test_vit.r160_in1k")
    assert hf_cache[1] == []


def test_cli_folder_runner_and_experiment_on_a_timm_vit(hf_cache, tmp_path, capsys):
    from masked_ops.dataset import h5 as H

    _, calls = hf_cache
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    _photo(folder / "a" / "one.png", 1, (48, 48))
    _photo(folder / "a" / "two.png", 2, (50, 40))
    out = tmp_path / "vit.h5"
    code, stdout, err = run_cli(["explain", str(folder), "--model", "test_vit.r160_in1k", "--method", "occlusion",
                                 "--n-segments", "4", "--masking", "layer,grey", "--out", str(out), "--no-progress"],
                                capsys)
    assert code == 0, err
    r = H.read_h5(str(out))
    assert r["path"] == ["a/one.png", "a/two.png"] and r["attrs"]["model_weights"] == "r160_in1k (timm, local cache)"
    assert r["attributions"]["layer"].shape == (2, 160, 160)
    usable(torch.from_numpy(np.asarray(r["attributions"]["layer"][0])))
    exp_out = tmp_path / "exp"
    code, stdout, err = run_cli(["experiment", "removal", "--model", "test_vit.r160_in1k", "--images", "chelsea",
                                 "--strategies", "layer,grey", "--repeats", "1", "--out",
                                 str(exp_out), "--no-progress"], capsys)
    assert code == 0, err
    res = json.loads((exp_out / "removal" / "results.json").read_text())
    assert set(res["strategies"]) == {"layer", "grey"} and res["model"]["name"] == "test_vit.r160_in1k"
    # "--strategies all" leaves out the CNN-only layer modes for a ViT, and says so on stderr
    from masked_ops.cli import experiment as cli_experiment

    args = argparse.Namespace(strategies=["all"], evaluators=None)  # (a whole "all" run takes too long here)
    names, _ = cli_experiment._for_model(build("timm"), args, list(STRATEGIES), None)
    assert names == strategies_for(build("timm"))
    assert "--strategies all: layer-renorm, layer-zero left out" in capsys.readouterr().err
    assert calls == []
