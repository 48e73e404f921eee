"""Explaining a folder: images per second with 1 and 2 processes (torchrun, gloo), and the merge.

    python bench/bench_dataset.py                      # CPU: 1 process, 2 processes, 1 process x 2 threads
    python bench/bench_dataset.py --repeats 1 --views 1 --merge-rows 500     # a quick look

Folder: the six bundled photos (scikit-image's chelsea, coffee, astronaut, rocket; scikit-learn's
china, flower) shrunk to --image-size px (short side) plus flipped and cropped views (--views per
photo), in two class folders, as in tests/test_dataset.py. Every run is the real command,
``masked-ops explain DIR --out X.h5 --fresh`` (or under ``torchrun --nproc-per-node 2``), in a fresh
process, so each figure includes process start, imports and model load (``wall``); ``in_run``
is the command's own clock (from listing the folder to the merged file: model load included,
imports excluded), and ``cpu`` the CPU seconds of all its processes (children rusage, which a loaded
machine inflates less than wall time). Contenders run round robin (repeat r of each before
repeat r+1 of any); medians and all values are kept. The 2-process output is checked bit for bit
against the 1-process one. Every contender runs with OMP_WAIT_POLICY=PASSIVE (unless set): on a
shared, oversubscribed host, spinning OpenMP threads make the 2-thread run several times slower.

The merge (rank 0's serial part) is timed on its own: --merge-rows synthetic rows at 224 x 224
with two strategies and 64 segments, in checkpoint files of 8 (written as the runner writes them),
merged into one file (rows/s, process CPU s per row, bytes per row).
``rank``: what one rank costs beside its forwards, at 1 thread: decode + resize + SLIC per image
(the CPU side a GPU rank also runs, serially), its peak resident memory (ru_maxrss) after one
explanation, and the model's parameter bytes.
Results: bench/results/cpu-dataset-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("OMP_NUM_THREADS", None)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: fairer on a shared host
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(cmd, env):
    """(wall s, in-run s, cpu s, stdout) of one command."""
    c0, t0 = _children_cpu(), time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    m = re.search(r"; ([0-9.]+) s\s*$", res.stdout.strip())
    return wall, float(m.group(1)) if m else float("nan"), cpu, res.stdout


def make_bench_folder(root: str, image_size: int, views: int) -> int:
    from dataset_helpers import make_folder

    make_folder(root, size=image_size)
    os.unlink(os.path.join(root, "5", "broken.jpg"))  # throughput of readable images only
    kept = 0
    for cls in sorted(os.listdir(root)):
        for f in sorted(os.listdir(os.path.join(root, cls))):
            path = os.path.join(root, cls, f)
            if not f.endswith((".png", ".jpg")) or (views < 2 and "-flip" in f) or (views < 3 and "-crop" in f):
                os.unlink(path)
            else:
                kept += 1
    return kept


def bench_merge(rows: int, tmp: str) -> dict:
    """Rank 0's merge of ``rows`` synthetic rows (224 x 224, two strategies) from files of 8."""
    import numpy as np

    from masked_ops.dataset import h5 as H

    rng = np.random.default_rng(0)
    parts = os.path.join(tmp, "merge.parts")
    os.makedirs(parts)
    seg = (np.arange(224)[:, None] // 28 * 8 + np.arange(224)[None, :] // 28).astype(np.uint16)  # 64 cells
    t0 = time.perf_counter()
    for b in range(0, rows, 8):
        batch = []
        for i in range(b, min(rows, b + 8)):
            w = rng.standard_normal((2, 64)).astype(np.float32)
            batch.append(H.Row(f"c/{i:07d}.jpg", 1, "c", (375, 500), 1, np.arange(5), np.full(5, 0.2, np.float32),
                               seg, {"layer": w[0][seg], "grey": w[1][seg]}))
        H.write_file(os.path.join(parts, f"r00000-{b:08d}.h5"), batch, strategies=["layer", "grey"], attrs={})
    write_s = time.perf_counter() - t0
    files = sorted(os.path.join(parts, f) for f in os.listdir(parts))
    out = os.path.join(tmp, "merged.h5")
    t0, c0 = time.perf_counter(), time.process_time()
    H.merge(files, out, attrs={}, run={}, strategies=["layer", "grey"], model_classes=[])
    merge_s, merge_cpu = time.perf_counter() - t0, time.process_time() - c0
    size = os.path.getsize(out)
    shard_bytes = sum(os.path.getsize(f) for f in files)
    return dict(rows=rows, map_size=[224, 224], strategies=2, checkpoint_write_s=write_s, merge_s=merge_s,
                merge_cpu_s=merge_cpu, merge_rows_per_s=rows / merge_s, merge_rows_per_cpu_s=rows / merge_cpu,
                output_bytes_per_row=size / rows, checkpoint_bytes_per_row=shard_bytes / rows, files=len(files))


RANK_PROFILE = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from masked_ops.dataset.explain import ImageExplainer, Settings
from masked_ops.dataset.folder import scan_folder
from masked_ops.explain.segmentation import segment
folder, model, method, masking, n_segments = sys.argv[1:6]
listing = scan_folder(folder)
e = ImageExplainer(Settings(model=model, method=method, masking=masking.split(","), samples=500,
                            segments="grid" if method == "occlusion" else "slic", n_segments=int(n_segments)),
                   torch.device("cpu"))
t0 = time.process_time()
for it in listing.items:  # the CPU side of an image: decode, resize, SLIC (a GPU rank does it too, serially)
    segment(e.info.prepare(e.load(listing.full_path(it)))[0], "slic", n_segments=50)
cpu_side = (time.process_time() - t0) / len(listing.items)
it = listing.items[0]
e.explain(e.load(listing.full_path(it)), it, -1)
params = sum(p.numel() * p.element_size() for p in e.model.parameters())
print(json.dumps(dict(cpu_side_s_per_image=cpu_side, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      model_parameter_mb=params / 2 ** 20, forward_batch=e.batch_size)))
"""


def rank_profile(folder, args, env) -> dict:
    """One rank's CPU-side cost per image (decode + resize + SLIC at 1 thread) and its peak memory."""
    res = subprocess.run([sys.executable, "-c", RANK_PROFILE, folder, args.model, args.method, args.masking,
                          str(args.n_segments)], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--method", default="occlusion")
    p.add_argument("--masking", default="layer,grey")
    p.add_argument("--n-segments", type=int, default=16, help="occlusion grid cells (default 16: 4 x 4)")
    p.add_argument("--views", type=int, default=3, choices=(1, 2, 3), help="views per photo (1-3)")
    p.add_argument("--image-size", type=int, default=256, help="short side of the photos on disk")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--merge-rows", type=int, default=2000)
    p.add_argument("--out", default=None)
    p.add_argument("--rank-only", action="store_true",
                   help="measure only the rank profile and add it to the --out JSON (which must exist)")
    args = p.parse_args(argv)
    # this checkout's package first, then the tests' helpers (done here, not at import: `make bench`
    # imports every bench_*.py under pytest)
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

    import torch

    import masked_ops

    tmp = tempfile.mkdtemp(prefix="bench-dataset-")
    out = args.out or os.path.join(HERE, "results", f"cpu-dataset-{datetime.date.today().isoformat()}.json")
    try:
        folder = os.path.join(tmp, "photos")
        n = make_bench_folder(folder, args.image_size, args.views)
        env = _env()
        if args.rank_only:
            with open(out) as f:
                summary = json.load(f)
            summary["rank"] = dict(rank_profile(folder, args, env), measured=datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec="seconds"), loadavg=os.getloadavg())
            with open(out, "w") as f:
                json.dump(summary, f, indent=2)
                f.write("\n")
            print(json.dumps(summary["rank"]))
            return 0
        common = ["explain", folder, "--model", args.model, "--method", args.method, "--masking", args.masking,
                  "--segments", "grid", "--n-segments", str(args.n_segments), "--no-progress", "--fresh"]
        cli = [sys.executable, "-m", "masked_ops.cli"]

        def torchrun(nproc):
            return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
                    "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "masked_ops.cli"]

        contenders = {
            "1_process_x_1_thread": lambda o: cli + common + ["--out", o],
            "2_processes_x_1_thread": lambda o: torchrun(2) + common + ["--out", o],
            "1_process_x_2_threads": lambda o: cli + common + ["--out", o, "--threads", "2"],
        }
        load_before = os.getloadavg()
        runs = {k: [] for k in contenders}
        outputs = {}
        for r in range(args.repeats):
            for name, cmd in contenders.items():
                o = os.path.join(tmp, f"{name}.h5")
                wall, in_run, cpu, _ = run_once(cmd(o), env)
                runs[name].append(dict(wall_s=wall, in_run_s=in_run, cpu_s=cpu, loadavg=os.getloadavg()[0]))
                outputs[name] = o
                print(f"repeat {r}: {name:<24} {wall:7.1f} s wall {in_run:7.1f} s in run {cpu:7.1f} s cpu "
                      f"({n / wall:.2f} images/s end to end)", flush=True)
        from test_dataset import _same_file

        try:
            _same_file(outputs["1_process_x_1_thread"], outputs["2_processes_x_1_thread"])
            identical = True
        except AssertionError:
            identical = False
        results = {}
        for name, rs in runs.items():
            wall = statistics.median(x["wall_s"] for x in rs)
            in_run = statistics.median(x["in_run_s"] for x in rs)
            cpu = statistics.median(x["cpu_s"] for x in rs)
            results[name] = dict(images=n, median_wall_s=wall, median_in_run_s=in_run, median_cpu_s=cpu,
                                 images_per_s_end_to_end=n / wall, images_per_s_in_run=n / in_run,
                                 cpu_s_per_image=cpu / n, runs=rs)
        base = results["1_process_x_1_thread"]
        for r in results.values():
            r["speedup_end_to_end"] = base["median_wall_s"] / r["median_wall_s"]
            r["speedup_in_run"] = base["median_in_run_s"] / r["median_in_run_s"]
        merge = bench_merge(args.merge_rows, tmp) if args.merge_rows else None
        rank = rank_profile(folder, args, env)
        from masked_ops.models import load_model

        _, info = load_model(args.model)
        summary = dict(
            benchmark="dataset_explain", model=args.model, method=args.method, masking=args.masking.split(","),
            segments=f"grid {args.n_segments}", images=n, image_size_on_disk=args.image_size,
            input_shape=[1, 3, info.input_size, info.input_size], dtype="float32", device="cpu",
            repeats=args.repeats, two_process_output_bit_identical=identical,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            torch=torch.__version__, masked_ops=masked_ops.__version__, python=platform.python_version(),
            machine=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
            loadavg_before=load_before, loadavg_after=os.getloadavg(), results=results, merge=merge, rank=rank)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        print(json.dumps({k: round(v["images_per_s_in_run"], 3) for k, v in results.items()}), "(images/s in run)")
        print(json.dumps({k: round(v["speedup_end_to_end"], 2) for k, v in results.items()}), "(speed-up, wall)")
        if merge:
            print(f"merge: {merge['merge_rows_per_s']:.0f} rows/s, {merge['output_bytes_per_row'] / 1e3:.1f} kB/row")
        print(f"2-process output bit-identical to 1 process: {identical}\nwrote {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
