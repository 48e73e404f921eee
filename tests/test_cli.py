"""The masked-ops command line: pictures, top-5, and clean failures (tiny model, tiny images)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from masked_ops import cli
from masked_ops.models import ModelInfo, load_image, load_model


def tiny_model():
    """Used through --model test_cli:tiny_model (a module:callable model)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=4),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    return model, ModelInfo("tiny", input_size=48)


MODEL = "test_cli:tiny_model"


@pytest.fixture
def photo(tmp_path):
    rgb = (np.random.RandomState(0).rand(40, 56, 3) * 255).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path)
    return str(path)


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _pngs(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".png") and f != "photo.png")


@pytest.mark.parametrize("method", ["lime", "occlusion", "kernel-shap"])
def test_explain_writes_png_and_prints_top5(method, photo, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, stdout, err = _run(["explain", photo, "--model", MODEL, "--method", method, "--masking", "layer,grey",
                              "--samples", "12", "--segments", "grid", "--n-segments", "9", "--out", str(out),
                              "--no-progress"], capsys)
    assert code == 0, err
    assert "top-5" in stdout and all(f"  {i}. " in stdout for i in range(1, 6))
    assert f"{method} with layer masking" in stdout and f"{method} with grey masking" in stdout
    assert str(out) in stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    assert _pngs(tmp_path) == ["out.png"]  # no temporary files left behind


@pytest.mark.parametrize("argv,message", [
    (["explain", "/nonexistent/cat.jpg"], "no such file"),
    (["explain", "{photo}", "--masking", "layer,gray"], "unknown masking strategy 'gray'"),
    (["explain", "{photo}", "--model", "no_such_model_xyz"], "unknown model"),
    (["explain", "{photo}", "--segments", "grid", "--n-segments", "1"], "at least 2"),
    (["explain", "{notimage}"], "cannot be read as an image"),
    (["explain", "{cmyk}"], "mode 'CMYK'"),
    (["explain", "{rgba}"], "transparent"),
    (["explain", "{photo}", "--out", "{tmp}/out.jpg"], ".png"),
    (["explain"], "needs an IMAGE"),
])
def test_bad_input_fails_cleanly(argv, message, photo, tmp_path, capsys):
    (tmp_path / "notimage.png").write_text("this is not a PNG")
    Image.new("CMYK", (20, 20)).save(tmp_path / "cmyk.jpg")
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    subs = {"photo": photo, "notimage": str(tmp_path / "notimage.png"), "cmyk": str(tmp_path / "cmyk.jpg"),
            "rgba": str(tmp_path / "rgba.png"), "tmp": str(tmp_path)}
    argv = [a.format(**subs) for a in argv]
    if "--model" not in argv:
        argv += ["--model", MODEL]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out.png")]
    code, stdout, err = _run(argv + ["--samples", "4", "--no-progress"], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_samples_below_one_is_refused(photo, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["explain", photo, "--samples", "0", "--out", str(tmp_path / "o.png")])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_failure_while_writing_leaves_nothing(photo, tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    def broken_savefig(self, f, **kw):
        f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        cli.main(["explain", photo, "--model", MODEL, "--samples", "4", "--segments", "grid",
                  "--masking", "grey", "--out", str(tmp_path / "o.png"), "--no-progress"])
    assert os.listdir(tmp_path) == ["photo.png"]


def test_experiment_subcommand_is_registered():
    parser = cli.build_parser()
    choices = parser._subparsers._group_actions[0].choices
    assert "explain" in choices
    try:
        import masked_ops.experiments.cli  # noqa: F401
    except ImportError:
        pytest.skip("masked_ops.experiments.cli not available")
    assert "experiment" in choices


def test_python_m_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "masked_ops.cli", "explain", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--masking" in r.stdout and "--demo" in r.stdout


def test_load_image_conversions(tmp_path):
    Image.fromarray((np.arange(64).reshape(8, 8) * 3).astype(np.uint8), "L").save(tmp_path / "g.png")
    g = load_image(str(tmp_path / "g.png"))
    assert g.shape == (3, 8, 8) and torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    cat = load_image("chelsea")
    assert cat.shape == (3, 300, 451) and cat.dtype == torch.float32 and 0 <= cat.min() and cat.max() <= 1
    with pytest.raises(ValueError, match="scikit-image sample"):
        load_image("eagle")  # not bundled: would download


def test_default_model_is_the_real_pretrained_efficientnet():
    model, info = load_model("efficientnet-lite0")
    x = info.prepare(load_image("chelsea"))
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        top = model((x - mean) / std)[0].topk(3).indices.tolist()
    assert top[0] in range(281, 286), [info.class_names[i] for i in top]  # a cat
    assert info.class_names[285] == "Egyptian cat" and len(info.class_names) == 1000
