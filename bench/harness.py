"""The one benchmark harness of masked_ops: interleaved timing, statistics, machine data, results.

Every benchmark script (bench/run.py for ops and models on CPU or GPU, bench/bench_lime.py)
measures its contenders with :func:`interleaved`: each round runs every contender once, in a
rotated order, so that load on a shared machine hits all of them alike. Figures are medians
with their interquartile range, and ratios are medians of per-round ratios against the
baselines measured in the same rounds. :func:`write_results` writes one JSON format for CPU
and GPU runs (``{"meta": ..., "records": [...]}``) plus a Markdown table beside it.

A record::

    {"name": "model/resnet50/fill", "device": "cpu (x86_64, 2 threads)", "torch": "2.13.0",
     "dtype": "float32", "batch": 8, "shape": [8, 3, 224, 224],
     "ms": {"plain": {"median": .., "p25": .., "p75": .., "min": .., "max": .., "n": ..}, ...},
     "ratio": {"masked": {"plain": 0.98, "plain_compiled": 1.31}, ...},   # medians of per-round ratios
     "peak_mib": {"plain": .., ...} (CUDA only), ...extra}
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# CPU clock: "wall" (what a user waits) or "process" (CPU time of this process, all threads: on a
# host shared with other work it counts this run's work, not the time it waited for a core; use it
# with one thread, where no thread spins waiting for another).
CLOCK = {"cpu": "wall"}


def time_once_ms(fn: Callable, device: torch.device) -> float:
    """Milliseconds of one call (CUDA events on a GPU; on a CPU the clock CLOCK["cpu"] says)."""
    if device.type == "cpu" and CLOCK["cpu"] == "process":
        t0 = time.process_time()
        fn()
        return (time.process_time() - t0) * 1e3
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(contenders: Dict[str, Callable], rounds: int, device: torch.device, warmup: int = 1,
                budget_s: Optional[float] = None) -> Dict[str, List[float]]:
    """Per contender, the milliseconds of each round. Round r runs the contenders rotated by r.

    ``warmup`` calls of each contender come first (compilation, autotuning, page faults). With
    ``budget_s`` the rounds stop early once that many seconds have passed (at least 2 rounds).
    """
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    _sync(device)
    times: Dict[str, List[float]] = {n: [] for n in names}
    t0 = time.monotonic()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(time_once_ms(contenders[name], device))
        if budget_s is not None and r >= 1 and time.monotonic() - t0 > budget_s:
            break
    return times


def stats(ms: Sequence[float]) -> dict:
    qs = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median": round(statistics.median(ms), 4), "p25": round(qs[0], 4), "p75": round(qs[2], 4),
            "min": round(min(ms), 4), "max": round(max(ms), 4), "n": len(ms)}


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a[r] / b[r]: contenders of one round share the machine's load."""
    return round(statistics.median(x / y for x, y in zip(a, b)), 4)


def record(name: str, device: torch.device, dtype, batch: int, shape, times: Dict[str, List[float]],
           baselines: Sequence[str], peak_mib: Optional[Dict[str, float]] = None, **extra) -> dict:
    """One result: statistics of every contender and its ratio to every baseline present."""
    rec = {"name": name, "device": device_name(device), "torch": torch.__version__,
           "dtype": str(dtype).replace("torch.", ""), "batch": batch, "shape": list(shape),
           "ms": {k: stats(v) for k, v in times.items()},
           "ratio": {k: {b: paired_ratio(v, times[b]) for b in baselines if b in times and b != k}
                     for k, v in times.items()}}
    if peak_mib:
        rec["peak_mib"] = {k: round(v, 1) for k, v in peak_mib.items()}
    rec.update(extra)
    return rec


def peak_mib(fn: Callable, device: torch.device) -> Optional[float]:
    """Peak memory allocated while fn() runs, above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device, **extra) -> dict:
    """What the figures were measured on: machine, versions, load (the host is shared)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device_name(device), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "clock": "cuda events" if device.type == "cuda" else CLOCK["cpu"],
            "load_avg_start": load_average(), "argv": sys.argv[1:], **extra}


def script_args(p, argv=None, threads: int = 2):
    """Finish an end-to-end script's options: --threads and --out, then parse, set the threads and
    silence warnings (the scripts print their own progress)."""
    import warnings

    p.add_argument("--threads", type=int, default=threads, help=f"torch CPU threads (default {threads})")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/<name>-<date>.json)")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    return args


def results_path(args, name: str) -> str:
    """--out, or bench/results/<name>-<today>.json."""
    return args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"{name}-{_dt.date.today().isoformat()}.json")


def lite0():
    """(the pretrained EfficientNet-Lite0 in channels_last, its ModelInfo): the end-to-end scripts' model,
    in the layout the CLI and the explainers use on CPU."""
    from masked_ops.models import load_model

    model, info = load_model("efficientnet-lite0")
    return model.to(memory_format=torch.channels_last), info


def write_json(path: str, obj) -> None:
    """Any result object as JSON, atomically (a temporary file, then a rename), readable by everyone: a
    long run writes after every step, and one cut short keeps its last complete file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bench-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_results(path: str, meta: dict, records: List[dict]) -> None:
    """The JSON (meta, records) and a Markdown table next to it (same stem, .md)."""
    meta = dict(meta, load_avg_end=load_average())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    os.replace(tmp, path)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(markdown(meta, records))


def markdown(meta: dict, records: List[dict]) -> str:
    lines = [f"# masked_ops benchmark, {meta['date']}", "",
             f"{meta['device']}, torch {meta['torch']}, load average {meta.get('load_avg_start')} -> "
             f"{meta.get('load_avg_end')}. Medians of interleaved rounds (ms, with p25-p75); ratios are medians "
             f"of per-round ratios.", "",
             "| name | dtype | batch | contender | median ms | p25-p75 | ratios |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if "skipped" in r:
            lines.append(f"| {r['name']} | | {r.get('batch', '')} | skipped: {r['skipped'][:80]} | | | |")
            continue
        for k, s in r["ms"].items():
            ratios = ", ".join(f"{v:.3f}x {b}" for b, v in r["ratio"].get(k, {}).items())
            lines.append(f"| {r['name']} | {r['dtype']} | {r['batch']} | {k} | {s['median']:.3f} | "
                         f"{s['p25']:.3f}-{s['p75']:.3f} | {ratios} |")
    return "\n".join(lines) + "\n"
