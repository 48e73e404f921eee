"""The one benchmark harness of masked_ops: interleaved timing, statistics, machine data, results.

Every benchmark script (bench/run.py for ops and models on CPU or GPU, and the end-to-end scripts
bench_*.py) parses its common options with :func:`script_args`, measures its contenders with
:func:`interleaved` (milliseconds per call, the op and model figures) or :func:`interleaved_samples`
(wall and CPU seconds of whole explanations or commands): each round runs every contender once, in
an order rotated by one per round, so that load on a shared machine hits all of them alike. Figures
are medians with their interquartile range (:func:`stats`, :func:`seconds`), and ratios are medians
of per-round ratios against the baselines measured in the same rounds (:func:`ratios`).
:func:`environment` is the one metadata block (machine, versions, threads, clock, load), and
:func:`write_json` the one writer (atomic, rewritten after every step by the long scripts) of
``bench/results/<device>-<name>-<date>.json`` (:func:`results_path`). bench/run.py writes its
records with :func:`write_results`: ``{"meta": environment, "records": [...]}`` plus a Markdown
table beside it.

A record of bench/run.py::

    {"name": "model/resnet50/fill", "device": "cpu (x86_64, 2 threads)", "torch": "2.13.0",
     "dtype": "float32", "batch": 8, "shape": [8, 3, 224, 224],
     "ms": {"plain": {"median": .., "p25": .., "p75": .., "min": .., "max": .., "n": ..}, ...},
     "ratio": {"masked": {"plain": 0.98, "plain_compiled": 1.31}, ...},   # medians of per-round ratios
     "peak_mib": {"plain": .., ...} (CUDA only), ...extra}

A new script::

    p = argparse.ArgumentParser(...); p.add_argument("--samples", type=int, default=1000)
    args = H.script_args(p, argv, repeats=3, smoke=dict(samples=16, repeats=1))
    out = H.results_path(args, "mything")              # bench/results/cpu-mything-<date>.json
    summary = dict(benchmark="mything", **H.environment(torch.device("cpu")), results={})
    def done(name, samples):                            # after every call: a cut-short run keeps its figures
        summary["results"][name] = H.seconds(samples)
        H.write_json(out, summary)
    samples = H.interleaved_samples({"plain": plain, "ours": ours}, args.repeats, after=done)
    summary["ratio"] = H.ratios({k: [s.wall_s for s in v] for k, v in samples.items()}, ["plain"])
    H.write_json(out, summary)
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch

CPU = torch.device("cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
if ROOT not in sys.path:  # every script benchmarks this checkout's package
    sys.path.insert(0, ROOT)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- timing
# CPU clock of interleaved(): "wall" (what a user waits) or "process" (CPU time of this process, all
# threads: on a host shared with other work it counts this run's work, not the time it waited for a
# core; use it with one thread, where no thread spins waiting for another). Set by --clock.
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


class Sample(NamedTuple):
    """One call: wall seconds, this process's CPU seconds (all threads), the CPU seconds of the child
    processes that ended during it (a command run with subprocess), and what it returned."""
    wall_s: float
    cpu_s: float
    children_cpu_s: float
    result: Any = None


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(fn: Callable, device: torch.device = CPU) -> Sample:
    """One call of fn (a GPU synchronised before and after), wall and CPU time: also for one-off
    durations that are not contenders (a fit, one explanation)."""
    _sync(device)
    t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
    result = fn()
    _sync(device)
    return Sample(time.perf_counter() - t0, time.process_time() - c0, _children_cpu() - k0, result)


def _rounds(contenders: Dict[str, Callable], rounds: int, warmup: int, budget_s: Optional[float],
            sync: Callable, timer: Callable, after: Optional[Callable]) -> Dict[str, list]:
    """The one interleaving loop: warm-ups, then round r runs the contenders rotated by r."""
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    sync()
    times: Dict[str, list] = {n: [] for n in names}
    t0 = time.monotonic()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timer(contenders[name]))
            if after is not None:
                after(name, times[name])
        if budget_s is not None and r >= 1 and time.monotonic() - t0 > budget_s:
            break
    return times


def interleaved(contenders: Dict[str, Callable], rounds: int, device: torch.device, warmup: int = 1,
                budget_s: Optional[float] = None) -> Dict[str, List[float]]:
    """Per contender, the milliseconds of each round (:func:`time_once_ms`). Round r runs the
    contenders rotated by r.

    ``warmup`` calls of each contender come first (compilation, autotuning, page faults). With
    ``budget_s`` the rounds stop early once that many seconds have passed (at least 2 rounds).
    """
    return _rounds(contenders, rounds, warmup, budget_s, lambda: _sync(device),
                   lambda fn: time_once_ms(fn, device), None)


def interleaved_samples(contenders: Dict[str, Callable], rounds: int, device: torch.device = CPU,
                        warmup: int = 0, budget_s: Optional[float] = None,
                        after: Optional[Callable[[str, List[Sample]], None]] = None,
                        verbose: bool = True) -> Dict[str, List[Sample]]:
    """Per contender, a :class:`Sample` of each round (wall and CPU seconds), rounds rotated as in
    :func:`interleaved`: for contenders that take seconds (a whole explanation, a command). Only the
    last call of each contender keeps its ``result``. ``after(name, samples so far)`` runs after
    every call (write the partial results there); ``verbose`` prints one line per call."""
    def after_each(name, samples):
        if len(samples) > 1:
            samples[-2] = samples[-2]._replace(result=None)
        if verbose:
            s = samples[-1]
            print(f"  {name:<32} {s.wall_s:9.3f} s wall {s.cpu_s + s.children_cpu_s:9.3f} s cpu", flush=True)
        if after is not None:
            after(name, samples)

    return _rounds(contenders, rounds, warmup, budget_s, lambda: _sync(device),
                   lambda fn: measure(fn, device), after_each)


# ----------------------------------------------------------------------------- statistics
def stats(values: Sequence[float], digits: int = 4) -> dict:
    """Median, p25, p75, min, max and count."""
    qs = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {"median": round(statistics.median(values), digits), "p25": round(qs[0], digits),
            "p75": round(qs[2], digits), "min": round(min(values), digits), "max": round(max(values), digits),
            "n": len(values)}


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a[r] / b[r]: contenders of one round share the machine's load."""
    return round(statistics.median(x / y for x, y in zip(a, b)), 4)


def ratios(times: Dict[str, Sequence[float]], baselines: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Per contender, its :func:`paired_ratio` to every baseline present (itself excluded)."""
    return {k: {b: paired_ratio(v, times[b]) for b in baselines if b in times and b != k}
            for k, v in times.items()}


def seconds(samples: Sequence[Sample], per: float = 1, cpu: str = "cpu_s") -> dict:
    """Statistics of one contender's samples, in seconds (divided by ``per``: per image, per call):
    median_s, p25_s, p75_s, min_s, max_s, times_s and the same of CPU time (``cpu``: "cpu_s" for
    this process, "children_cpu_s" for commands it ran) as median_cpu_s, p25_cpu_s, p75_cpu_s,
    cpu_times_s."""
    wall = [s.wall_s / per for s in samples]
    cpu_ = [getattr(s, cpu) / per for s in samples]
    w, c = stats(wall, digits=9), stats(cpu_, digits=9)
    return dict(median_s=w["median"], p25_s=w["p25"], p75_s=w["p75"], min_s=w["min"], max_s=w["max"], times_s=wall,
                median_cpu_s=c["median"], p25_cpu_s=c["p25"], p75_cpu_s=c["p75"], cpu_times_s=cpu_, n=len(samples))


def record(name: str, device: torch.device, dtype, batch: int, shape, times: Dict[str, List[float]],
           baselines: Sequence[str], peak_mib: Optional[Dict[str, float]] = None, **extra) -> dict:
    """One result of bench/run.py: statistics of every contender and its ratio to every baseline present."""
    rec = {"name": name, "device": device_name(device), "torch": torch.__version__,
           "dtype": str(dtype).replace("torch.", ""), "batch": batch, "shape": list(shape),
           "ms": {k: stats(v) for k, v in times.items()}, "ratio": ratios(times, baselines)}
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


# ----------------------------------------------------------------------------- metadata
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def now() -> str:
    """The date and time, UTC, to the minute."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# whether masked_ops.keep_freed_memory() is in effect (--keep-freed-memory): every results file says
MALLOC = {"keep_freed_memory": False}


def environment(device: torch.device, **extra) -> dict:
    """The one metadata block: what the figures were measured on (machine, versions, threads, clock,
    load: the host is shared), the command line, and ``extra`` (shapes, dtypes, settings).
    :func:`write_json` adds ``load_avg_end`` on every write."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import masked_ops
        mo_version, mo_backend = masked_ops.__version__, masked_ops.get_backend()
    except ImportError:
        mo_version = mo_backend = None
    return {"date": now(),
            "device": device_name(device), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "masked_ops": mo_version, "backend": mo_backend,
            "clock": "cuda events" if device.type == "cuda" else CLOCK["cpu"],
            "load_avg_start": load_average(), "keep_freed_memory": MALLOC["keep_freed_memory"],
            "argv": sys.argv[1:], **extra}


# ----------------------------------------------------------------------------- options, paths
def script_args(p, argv=None, threads: Optional[int] = 2, device: Optional[str] = None,
                repeats: Optional[int] = None, clock: bool = False, smoke: Optional[dict] = None):
    """Add the common options to the parser ``p``, parse, and apply them:

    --threads (torch CPU threads; default ``threads`` on a CPU device, torch's own on a GPU; no such
    option with ``threads=None``), --out (the results JSON), and where asked: --device (default
    ``device``), --repeats (interleaved rounds, default ``repeats``), --clock (wall or process CPU
    time, for :func:`interleaved`), --smoke (the settings in ``smoke`` over the parsed ones, and
    results in a fresh temporary folder unless --out: seconds, tests the script). Warnings are
    silenced (the scripts print their own progress)."""
    import warnings

    if threads is not None:
        p.add_argument("--threads", type=int, default=None,
                       help=f"torch CPU threads (default {threads}; on a GPU device, torch's default)")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/<device>-<name>-<date>.json)")
    if device is not None:
        p.add_argument("--device", default=device, help=f"torch device (default {device})")
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats, help=f"interleaved rounds (default {repeats})")
    if clock:
        p.add_argument("--clock", choices=["wall", "process"], default="wall",
                       help="CPU timing: wall clock (default) or this process's CPU time (robust on a loaded host; "
                            "use with --threads 1)")
    if smoke is not None:
        p.add_argument("--smoke", action="store_true",
                       help="the smallest settings, results in a temporary folder unless --out (tests the script)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="masked_ops.keep_freed_memory() first (glibc keeps freed buffers: what the masked-ops command "
                        "does; default: the system's malloc settings, as a Python user has them)")
    args = p.parse_args(argv)
    if args.keep_freed_memory:
        import masked_ops

        MALLOC["keep_freed_memory"] = masked_ops.keep_freed_memory()
    if smoke is not None and args.smoke:
        for k, v in smoke.items():
            setattr(args, k, v)
    warnings.simplefilter("ignore")
    if threads is not None:
        if args.threads is None and not str(getattr(args, "device", "cpu")).startswith("cuda"):
            args.threads = threads
        if args.threads:
            torch.set_num_threads(args.threads)
    if clock:
        CLOCK["cpu"] = args.clock
    return args


def results_path(args, name: str, device: str = "cpu") -> str:
    """--out, or bench/results/<device>-<name>-<UTC date>.json (<device>-<date>.json for an empty
    name); under --smoke a fresh temporary folder instead of bench/results."""
    if args.out:
        return args.out
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    folder = tempfile.mkdtemp(prefix="masked-ops-bench-") if getattr(args, "smoke", False) else RESULTS
    return os.path.join(folder, "-".join(s for s in (device, name, date) if s) + ".json")


def lite0():
    """(the pretrained EfficientNet-Lite0 in channels_last, its ModelInfo): the end-to-end scripts' model,
    in the layout the CLI and the explainers use on CPU."""
    from masked_ops.models import load_model

    model, info = load_model("efficientnet-lite0")
    return model.to(memory_format=torch.channels_last), info


# ----------------------------------------------------------------------------- writers
def _write_text(path: str, text: str) -> None:
    """Atomically, with ordinary permissions: the package's one atomic writer (masked_ops._util.io)."""
    from masked_ops._util.io import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: str, obj, indent: int = 2, load_end: bool = True) -> None:
    """Any result object as JSON, atomically: a long run writes after every step, and one cut short
    keeps its last complete file. A dict with the :func:`environment` block gets ``load_avg_end``
    (the load now) unless ``load_end`` is False."""
    if load_end and isinstance(obj, dict) and "load_avg_start" in obj:
        obj["load_avg_end"] = load_average()
    _write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_results(path: str, meta: dict, records: List[dict]) -> None:
    """bench/run.py's results: the JSON {"meta", "records"} and a Markdown table next to it (same stem, .md)."""
    meta = dict(meta, load_avg_end=load_average())
    write_json(path, {"meta": meta, "records": records}, indent=1)
    _write_text(os.path.splitext(path)[0] + ".md", markdown(meta, records))


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
            ratios_ = ", ".join(f"{v:.3f}x {b}" for b, v in r["ratio"].get(k, {}).items())
            lines.append(f"| {r['name']} | {r['dtype']} | {r['batch']} | {k} | {s['median']:.3f} | "
                         f"{s['p25']:.3f}-{s['p75']:.3f} | {ratios_} |")
    return "\n".join(lines) + "\n"
