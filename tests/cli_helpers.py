"""What the command-line tests share: running the CLI, the PNGs it left (the ``photo`` fixture: conftest.py),
offline model caches."""
import os

from masked_ops import cli


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of ``masked-ops ARGV``."""
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def pngs(folder):
    """The PNGs in ``folder`` other than the input photo (a failed run must leave none)."""
    return sorted(f for f in os.listdir(folder) if f.endswith(".png") and f != "photo.png")


def offline_caches(monkeypatch, tmp_path):
    """Empty torch and Hugging Face caches in tmp_path, HF offline, and torch.hub's downloader recording
    (and refusing) every call; returns the list of attempted URLs."""
    import torch.hub

    calls = []

    def no_download(url, *args, **kwargs):
        calls.append(url)
        raise AssertionError(f"download attempted: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return calls


def fake_hf_cache(tmp_path, arch="test_resnet", tag="r160_in1k"):
    """timm's ``arch`` with random weights (seed 6) saved as its pretrained ``tag`` in the Hugging Face cache
    tmp_path/hf; returns its state_dict."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(6)
    model = timm.create_model(arch, pretrained=False)
    repo = tmp_path / "hf" / f"models--timm--{arch}.{tag}"
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(repo / "snapshots" / "0123abc" / "model.safetensors"))
    return model.state_dict()
