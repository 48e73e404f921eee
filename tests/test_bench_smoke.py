"""Every benchmark script runs its --smoke configuration end to end (tiny sizes, one round) and writes its
results file: a change to the library that breaks a benchmark fails here, not months later on a GPU
machine. Timings are not looked at (benchmarks are measured in bench/, never asserted)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "bench"))
                 if f.endswith(".py") and f != "harness.py")


def test_every_script_is_listed():
    assert len(SCRIPTS) >= 15 and "incremental_engine" in SCRIPTS and "bench_lime" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_run_writes_results(script, tmp_path):
    out = tmp_path / f"{script}.json"
    env = dict(os.environ, PYTHONPATH=ROOT, MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", f"{script}.py"), "--smoke", "--out", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    written = sorted(tmp_path.glob("*.json"))
    assert written, f"{script} wrote no results file: {sorted(p.name for p in tmp_path.iterdir())}"
    for p in written:
        json.loads(p.read_text())  # complete, parseable
