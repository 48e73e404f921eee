"""The wheel as a user installs it: built by `make wheel`, installed into a fresh venv with the CPU torch,
the demo run from outside the source tree with the fused CPU kernels.

The CPU torch comes from this machine's pip configuration (a local CPU-only torch wheel; the registry's
torch is the CUDA build), the other dependencies from the registry. Skipped where pip cannot find a CPU
build of the torch version the extension is built against (the wheel pins torch to that minor version).
"""
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH = torch.__version__.split("+")[0]


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


@pytest.mark.slow  # about a minute: relinks the CPU library, installs a venv (pip's cache helps), runs LIME
def test_wheel_in_a_fresh_venv_with_the_cpu_torch(tmp_path):
    listed = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path / "probe"),
                             f"torch=={TORCH}+cpu"], capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"no CPU build of torch {TORCH} reachable for pip here: {listed.stderr.strip()[-300:]}")
    dist = tmp_path / "dist"
    # the CPU wheel (CUDA kernels off: a GPU wheel would add masked_ops/_C_cuda, which this venv never loads)
    env = dict(os.environ, MASKED_OPS_CUDA="0")
    _run(["make", "-s", "-C", ROOT, "wheel", f"WHEEL_DIR={dist}", f"PYTHON={sys.executable}"], env=env, timeout=1800)
    (wheel,) = glob.glob(str(dist / "masked_ops-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    py, pip = str(venv / "bin" / "python"), [str(venv / "bin" / "python"), "-m", "pip"]
    _run(pip + ["install", "-q", f"{wheel}[explain]"], timeout=1500)
    outside = tmp_path / "user"
    outside.mkdir()
    probe = _run([py, "-c", "import masked_ops as mo, torch; from masked_ops.backends import unavailable_reason; "
                            "print(mo.__file__); print(torch.__version__); print(mo.available('cpp')); "
                            "print(unavailable_reason('cuda'))"], cwd=outside, timeout=300).stdout.splitlines()
    assert probe[0].startswith(str(venv)), probe  # the installed package, not this checkout
    assert probe[1] == f"{TORCH}+cpu", probe      # the CPU-only torch
    assert probe[2] == "True", probe              # the fused CPU kernels load with it
    assert "CPU-only build" in probe[3], probe    # and the CUDA backend says why it cannot run
    demo = _run([str(venv / "bin" / "masked-ops"), "explain", "--demo", "--samples", "100", "--no-progress"],
                cwd=outside, timeout=900)
    assert re.search(r"lime with layer masking: 101 forward passes", demo.stdout), demo.stdout
    assert (outside / "masked-ops-demo.png").stat().st_size > 10_000
    assert "pure-PyTorch backend" not in demo.stderr and "Traceback" not in demo.stderr, demo.stderr
