"""Explaining a folder: images per second with 1 and 2 processes (torchrun, gloo), and the merge.

    python bench/bench_dataset.py                      # CPU: 1 process, 2 processes, 1 process x 2 threads
    python bench/bench_dataset.py --repeats 1 --views 1 --merge-rows 500     # a quick look
    python bench/bench_dataset.py --smoke              # the smallest settings: tests the script
    python bench/bench_dataset.py --incremental --n-segments 64 --views 1 --merge-rows 0
                                                       # 1 process, full forwards against --incremental

Folder: the six bundled photos (scikit-image's chelsea, coffee, astronaut, rocket; scikit-learn's
china, flower) shrunk to --image-size px (short side) plus flipped and cropped views (--views per
photo), in two class folders, as in tests/test_dataset.py. Every run is the real command,
``masked-ops explain DIR --out X.h5 --fresh`` (or under ``torchrun --nproc-per-node 2``), in a fresh
process, so each figure includes process start, imports and model load (``wall``); ``in_run``
is the command's own clock (from listing the folder to the merged file: model load included,
imports excluded), and ``cpu`` the CPU seconds of all its processes (children rusage, which a loaded
machine inflates less than wall time). Contenders run interleaved (bench/harness.py: repeat r of each
before repeat r+1 of any, the order rotated per round); medians, p25-p75 and all values are kept. The
2-process output is checked bit for bit against the 1-process one. Every contender runs with
OMP_WAIT_POLICY=PASSIVE (unless set): on a shared, oversubscribed host, spinning OpenMP threads make
the 2-thread run several times slower.

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
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402  (also puts this checkout's package first on sys.path)

ROOT = H.ROOT


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


def run_once(cmd, env) -> float:
    """Run one command; its own clock (in-run seconds, from its last line). The harness times it (wall,
    and the CPU of the processes it ran)."""
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    m = re.search(r"; ([0-9.]+) s\s*$", res.stdout.strip())
    return float(m.group(1)) if m else float("nan")


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

    from masked_ops.dataset import h5

    rng = np.random.default_rng(0)
    parts = os.path.join(tmp, "merge.parts")
    os.makedirs(parts)
    seg = (np.arange(224)[:, None] // 28 * 8 + np.arange(224)[None, :] // 28).astype(np.uint16)  # 64 cells

    def write_checkpoints():
        for b in range(0, rows, 8):
            batch = []
            for i in range(b, min(rows, b + 8)):
                w = rng.standard_normal((2, 64)).astype(np.float32)
                batch.append(h5.Row(f"c/{i:07d}.jpg", 1, "c", (375, 500), 1, np.arange(5),
                                    np.full(5, 0.2, np.float32), seg, {"layer": w[0][seg], "grey": w[1][seg]}))
            h5.write_file(os.path.join(parts, f"r00000-{b:08d}.h5"), batch, strategies=["layer", "grey"], attrs={})

    write_s = H.measure(write_checkpoints).wall_s
    files = sorted(os.path.join(parts, f) for f in os.listdir(parts))
    out = os.path.join(tmp, "merged.h5")
    m = H.measure(lambda: h5.merge(files, out, attrs={}, run={}, strategies=["layer", "grey"], model_classes=[]))
    merge_s, merge_cpu = m.wall_s, m.cpu_s
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
    p.add_argument("--merge-rows", type=int, default=2000)
    p.add_argument("--incremental", action="store_true",
                   help="occlusion: 1 process with and without --incremental instead of the process counts "
                        "(outputs compared to fp32 rounding; no rank profile)")
    p.add_argument("--rank-only", action="store_true",
                   help="measure only the rank profile and add it to the --out JSON (which must exist)")
    # no --threads: each command runs with its own default (1 thread) or --threads 2
    args = H.script_args(p, argv, threads=None, repeats=3, smoke=dict(views=1, repeats=1, merge_rows=16, n_segments=4,
                                                         image_size=64))
    # the tests' helpers (done here, not at import: `make bench` imports every bench_*.py under pytest;
    # the harness put this checkout's package first)
    sys.path.insert(1, os.path.join(ROOT, "tests"))

    tmp = tempfile.mkdtemp(prefix="bench-dataset-")
    out = H.results_path(args, "dataset")
    try:
        folder = os.path.join(tmp, "photos")
        n = make_bench_folder(folder, args.image_size, args.views)
        env = _env()
        if args.rank_only:
            with open(out) as f:
                summary = json.load(f)
            summary["rank"] = dict(rank_profile(folder, args, env), measured=H.now(),
                                   loadavg=H.load_average())
            H.write_json(out, summary, load_end=False)  # the run's load_avg_end stays
            print(json.dumps(summary["rank"]))
            return 0
        common = ["explain", folder, "--model", args.model, "--method", args.method, "--masking", args.masking,
                  "--segments", "grid", "--n-segments", str(args.n_segments), "--no-progress", "--fresh"]
        cli = [sys.executable, "-m", "masked_ops.cli"]

        def torchrun(nproc):
            return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
                    "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "masked_ops.cli"]

        commands = {
            "1_process_x_1_thread": lambda o: cli + common + ["--out", o],
            "2_processes_x_1_thread": lambda o: torchrun(2) + common + ["--out", o],
            "1_process_x_2_threads": lambda o: cli + common + ["--out", o, "--threads", "2"],
        }
        if args.incremental:  # the same 1-process command, each removal's cone only
            commands = {"1_process_x_1_thread": commands["1_process_x_1_thread"],
                        "1_process_x_1_thread_incremental": lambda o: cli + common + ["--out", o, "--incremental"]}
        outputs = {name: os.path.join(tmp, f"{name}.h5") for name in commands}
        contenders = {name: (lambda name=name: run_once(commands[name](outputs[name]), env)) for name in commands}
        from masked_ops.models import load_model

        _, info = load_model(args.model)
        summary = dict(
            benchmark="dataset_explain", model=args.model, method=args.method, masking=args.masking.split(","),
            segments=f"grid {args.n_segments}", images=n, image_size_on_disk=args.image_size,
            input_shape=[1, 3, info.input_size, info.input_size], dtype="float32", repeats=args.repeats,
            **H.environment(H.CPU))
        loads = {k: [] for k in contenders}
        in_runs = {k: [] for k in contenders}  # the harness keeps only the last call's result: keep each here

        def after(name, samples):  # the command's CPU: the processes it ran (children rusage)
            s = samples[-1]
            loads[name].append((H.load_average() or [None])[0])
            in_runs[name].append(s.result)
            print(f"repeat {len(samples) - 1}: {name:<24} {s.wall_s:7.1f} s wall {s.result:7.1f} s in run "
                  f"{s.children_cpu_s:7.1f} s cpu ({n / s.wall_s:.2f} images/s end to end)", flush=True)

        samples = H.interleaved_samples(contenders, args.repeats, after=after, verbose=False)
        from test_dataset import _same_file

        identical, incremental_diff = None, None
        if args.incremental:
            from masked_ops.dataset.h5 import read_h5

            a, b = read_h5(outputs["1_process_x_1_thread"]), read_h5(outputs["1_process_x_1_thread_incremental"])
            incremental_diff = max(float(abs(a["attributions"][k] - b["attributions"][k]).max())
                                   for k in a["attributions"])
        else:
            try:
                _same_file(outputs["1_process_x_1_thread"], outputs["2_processes_x_1_thread"])
                identical = True
            except AssertionError:
                identical = False
        results = {}
        for name, ss in samples.items():
            sec = H.seconds(ss, cpu="children_cpu_s")
            in_run = H.stats(in_runs[name], digits=9)
            rs = [dict(wall_s=s.wall_s, in_run_s=r, cpu_s=s.children_cpu_s, loadavg=load)
                  for s, r, load in zip(ss, in_runs[name], loads[name])]
            results[name] = dict(images=n, median_wall_s=sec["median_s"], median_in_run_s=in_run["median"],
                                 median_cpu_s=sec["median_cpu_s"], p25_wall_s=sec["p25_s"], p75_wall_s=sec["p75_s"],
                                 p25_in_run_s=in_run["p25"], p75_in_run_s=in_run["p75"],
                                 images_per_s_end_to_end=n / sec["median_s"],
                                 images_per_s_in_run=n / in_run["median"],
                                 cpu_s_per_image=sec["median_cpu_s"] / n, runs=rs)
        base = results["1_process_x_1_thread"]
        for r in results.values():
            r["speedup_end_to_end"] = base["median_wall_s"] / r["median_wall_s"]
            r["speedup_in_run"] = base["median_in_run_s"] / r["median_in_run_s"]
        paired = H.ratios({k: [s.wall_s for s in v] for k, v in samples.items()}, ["1_process_x_1_thread"])
        for k, r in results.items():  # medians of per-round speed-ups
            if paired[k]:
                r["paired_speedup_end_to_end"] = 1 / paired[k]["1_process_x_1_thread"]
        merge = bench_merge(args.merge_rows, tmp) if args.merge_rows else None
        rank = None if args.incremental else rank_profile(folder, args, env)
        summary.update(two_process_output_bit_identical=identical, results=results, merge=merge, rank=rank,
                       incremental_max_abs_diff=incremental_diff)
        H.write_json(out, summary)
        print(json.dumps({k: round(v["images_per_s_in_run"], 3) for k, v in results.items()}), "(images/s in run)")
        print(json.dumps({k: round(v["speedup_end_to_end"], 2) for k, v in results.items()}), "(speed-up, wall)")
        if merge:
            print(f"merge: {merge['merge_rows_per_s']:.0f} rows/s, {merge['output_bytes_per_row'] / 1e3:.1f} kB/row")
        if args.incremental:
            print(f"incremental maps differ from full forwards' by at most {incremental_diff:.2e}")
        else:
            print(f"2-process output bit-identical to 1 process: {identical}")
        print(f"wrote {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
