"""``masked-ops explain --method extremal|rise|diffmask``: pictures, the checkpoint path, clean failures."""
import pytest
import torch
import torch.nn as nn
from PIL import Image

from cli_helpers import pngs, run_cli
from masked_ops.explain.diffmask import DiffMask
from masked_ops.explain.strategies import get_strategy
from masked_ops.models import ModelInfo


def tiny_model():
    """Used through --model test_mask_cli:tiny_model (48 px input)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    return model, ModelInfo("tiny", input_size=48)


MODEL = "test_mask_cli:tiny_model"


@pytest.mark.parametrize("method,samples", [("extremal", "4"), ("rise", "16"), ("diffmask", "3")])
def test_mask_methods_write_png(method, samples, photo, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, stdout, err = run_cli(["explain", photo, "--model", MODEL, "--method", method, "--masking", "blur,grey",
                              "--samples", samples, "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "top-5" in stdout and f"{method} with blur masking" in stdout and f"{method} with grey masking" in stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    assert pngs(tmp_path) == ["out.png"]


def test_diffmask_checkpoint(photo, tmp_path, capsys):
    model, _ = tiny_model()
    dm = DiffMask(model, strategy=get_strategy("grey", model), patch=16, image_size=48, batch_size=2, hidden=8)
    dm.fit(torch.rand(2, 3, 60, 60), epochs=1, progress=False)
    ckpt = tmp_path / "dm.pt"
    dm.save(str(ckpt))
    out = tmp_path / "dm.png"
    code, stdout, err = run_cli(["explain", photo, "--model", MODEL, "--method", "diffmask", "--checkpoint", str(ckpt),
                              "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "amortised, trained with grey masking" in stdout and out.exists()
    assert "calibrated" not in stdout
    code, stdout, err = run_cli(["explain", photo, "--model", MODEL, "--method", "diffmask", "--checkpoint", str(ckpt),
                                 "--calibrate", "--save", str(tmp_path / "dm.npz"), "--out", str(out), "--no-progress"],
                                capsys)
    assert code == 0, err
    _check_calibrated(stdout, tmp_path / "dm.npz", "grey")


def _check_calibrated(stdout, npz, strategy):
    from masked_ops.explain import Explanation

    cal = Explanation.load(npz, strategy=strategy).meta["calibrated"]
    # the smallest top-k within the budget (eps 0.1; keeping every patch always is, so it exists)
    assert 0 <= cal["kept"] <= 1 and 0 <= cal["kl"] <= 0.1 + 1e-9, cal
    assert f"calibrated ({strategy}): the smallest top-k of the gates within the KL budget keeps " \
           f"{cal['kept']:.0%} of the patches (KL {cal['kl']:.3f})" in stdout


def test_diffmask_per_image_calibrate(photo, tmp_path, capsys):
    code, stdout, err = run_cli(["explain", photo, "--model", MODEL, "--method", "diffmask", "--masking", "grey,blur",
                                 "--samples", "3", "--calibrate", "--save", str(tmp_path / "d.npz"),
                                 "--out", str(tmp_path / "d.png"), "--no-progress"], capsys)
    assert code == 0, err
    for s in ("grey", "blur"):
        _check_calibrated(stdout, tmp_path / "d.npz", s)
    # what the CLI reports is the library's calibration of this image, not a value of its own
    from masked_ops.explain import Explanation, explain_diffmask
    from masked_ops.images import load_image

    model, info = tiny_model()
    x = info.prepare(load_image(photo))[0]
    with torch.no_grad():
        target = int(model((x[None] - torch.tensor(info.mean).view(1, 3, 1, 1))
                           / torch.tensor(info.std).view(1, 3, 1, 1)).argmax())
    want = explain_diffmask(get_strategy("grey", model, mean=info.mean, std=info.std), x, targets=[target], steps=3,
                            patch=16, calibrate=True, seed=0, progress=False).info["calibrated"]
    got = Explanation.load(tmp_path / "d.npz", strategy="grey").meta["calibrated"]
    assert got["kept"] == pytest.approx(want["kept"], abs=1e-6) and got["kl"] == pytest.approx(want["kl"], abs=1e-5)


@pytest.mark.parametrize("argv,message", [
    (["--method", "rise", "--checkpoint", "x.pt"], "--checkpoint does not apply to --method rise (it applies to diffmask)"),
    (["--method", "lime", "--checkpoint", "x.pt"], "--checkpoint does not apply to --method lime"),
    (["--method", "extremal", "--calibrate"], "--calibrate does not apply to --method extremal (it applies to diffmask)"),
    (["--method", "extremal", "--output", "logit"], "--output does not apply to --method extremal"),
    (["--method", "extremal", "--shared-scale"], "--shared-scale does not apply to --method extremal"),
    (["--method", "diffmask", "--checkpoint", "missing.pt"], "no such file"),
    (["--method", "extremal", "--masking", "blurry"], "unknown masking strategy"),
])
def test_bad_input_fails_cleanly(argv, message, photo, tmp_path, capsys):
    code, _, err = run_cli(["explain", photo, "--model", MODEL, "--out", str(tmp_path / "o.png"), "--no-progress"]
                        + argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert pngs(tmp_path) == []


def test_hard_only_strategy_is_refused(photo, tmp_path, capsys):
    code, _, err = run_cli(["explain", photo, "--model", MODEL, "--method", "extremal", "--masking", "noisy-linear",
                         "--out", str(tmp_path / "o.png"), "--no-progress"], capsys)
    assert code == 2 and "takes hard 0/1 masks only" in err


def test_mask_method_saves_its_map(photo, tmp_path, capsys):
    """--save works for the mask methods as for the others: the same .npz layout, the map per pixel."""
    from masked_ops.explain.perturb import load_explanations

    data = tmp_path / "rise.npz"
    code, stdout, err = run_cli(["explain", photo, "--model", MODEL, "--method", "rise", "--masking", "grey,layer",
                              "--samples", "8", "--save", str(data), "--output", "logit", "--no-progress"], capsys)
    assert code == 0, err
    assert pngs(tmp_path) == []  # --save alone writes no picture
    exps, meta = load_explanations(str(data))
    assert [e.strategy for e in exps] == ["grey", "layer"] and all(e.method == "rise" for e in exps)
    assert exps[0].heatmap().shape == (48, 48) and meta["method"] == "rise" and meta["output"] == "logit"
