"""GPU benchmark of masked_ops (``make bench-gpu``): writes bench/results/gpu-<date>.json and .md.

Every record is a ratio against plain PyTorch measured in the same run:
    name, device, torch, dtype, batch, shape, backend,
    masked_ms (the masked op/model on the backend), plain_ms (the unmasked op/model), ratio,
    torch_ms (the same masking on the pure-PyTorch backend), torch_ratio (torch_ms / masked_ms: the speed-up),
    peak_masked_mib, peak_plain_mib, mem_ratio (peak memory of the forward, CUDA only).
Timings: CUDA events around each repetition after warm-up, medians. The whole run keeps to a
time budget (default 9 minutes): what does not fit is recorded as skipped, never silently dropped.

    python bench/gpu.py                       # on the GPU machine
    python bench/gpu.py --smoke --device cpu  # seconds, tiny shapes: tests the script itself
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import masked_ops as mo  # noqa: E402
from masked_ops.backends import _load  # noqa: E402

MODELS = ("resnet50", "efficientnet_b0", "convnext_tiny", "densenet121")


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def timed_ms(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() over reps, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn, device: torch.device):
    """Peak memory allocated while fn() runs, above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def gpu_backends(device: torch.device):
    if device.type == "cuda":
        return [b for b in ("cuda", "triton") if mo.available(b)]
    return ["cpp"] if mo.available("cpp") else ["torch"]


def record(args, name, dtype, batch, shape, backend, masked_ms, plain_ms, torch_ms, peak_masked=None,
           peak_plain=None, **extra):
    rec = {
        "name": name, "device": args.device_name, "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
        "batch": batch, "shape": list(shape), "backend": backend,
        "masked_ms": round(masked_ms, 4), "plain_ms": round(plain_ms, 4), "ratio": round(masked_ms / plain_ms, 4),
        "torch_ms": None if torch_ms is None else round(torch_ms, 4),
        "torch_ratio": None if torch_ms is None else round(torch_ms / masked_ms, 3),
        "peak_masked_mib": None if peak_masked is None else round(peak_masked, 1),
        "peak_plain_mib": None if peak_plain is None else round(peak_plain, 1),
        "mem_ratio": None if not peak_plain else round(peak_masked / peak_plain, 3),
    }
    rec.update(extra)
    print(f"  {name:44s} {backend:7s} masked {masked_ms:9.3f} ms  plain {plain_ms:9.3f} ms  "
          f"ratio {rec['ratio']:6.3f}  torch/masked {rec['torch_ratio']}", flush=True)
    return rec


# ----------------------------------------------------------------------------- ops
def op_cases(batch, device, dtype, small):
    """ResNet-50 shapes (first stage, stem pooling, head), or tiny ones in smoke mode."""
    s = 8 if small else 1
    g = torch.Generator(device).manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, device=device, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)

    def mask(n, h, w):
        # 16 x 16 patches (at 224 px) removed at random, as in the paper's experiments
        cells = torch.rand(n, 1, max(1, h // 4), max(1, w // 4), device=device, generator=g) > 0.5
        return F.interpolate(cells.float(), size=(h, w), mode="nearest").to(dtype)

    h56, h112, h7 = 56 // s, 112 // s, max(7 // s, 2)
    x56, m56 = t(batch, 64, h56, h56), mask(batch, h56, h56)
    x112, m112 = t(batch, 64, h112, h112), mask(batch, h112, h112)
    x7, m7 = t(batch, 2048, h7, h7), mask(batch, h7, h7)
    w3 = (torch.randn(64, 64, 3, 3, device=device, generator=g) * 0.05).to(dtype).contiguous(
        memory_format=torch.channels_last)
    bias = torch.randn(64, device=device, generator=g).to(dtype)
    scale = torch.rand(64, device=device, generator=g).to(dtype) + 0.5
    wsum = torch.rand(batch, 1, h56, h56, device=device, generator=g).to(dtype) * 2
    zero = torch.zeros((), device=device, dtype=dtype)
    return [
        # name, shape, masked fn(), plain fn()
        ("op/neighbor_fill[iters=2]", x56.shape, lambda: mo.neighbor_fill(x56, m56, 2),
         lambda: torch.where(m56 > 0, x56, zero)),
        ("op/neighbor_fill[iters=6]", x56.shape, lambda: mo.neighbor_fill(x56, m56, 6),
         lambda: torch.where(m56 > 0, x56, zero)),
        ("op/conv_epilogue[renorm,bias,relu]", x56.shape,
         lambda: _load_current().conv_epilogue(x56, m56, wsum, bias, "relu"), lambda: F.relu(x56 + bias.view(1, -1, 1, 1))),
        ("op/masked_affine_act[relu]", x56.shape, lambda: mo.masked_affine_act(x56, m56, scale, bias, "relu"),
         lambda: F.relu(x56 * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))),
        ("op/masked_max_pool2d[3,2,1]", x112.shape, lambda: mo.masked_max_pool2d(x112, m112, 3, 2, 1),
         lambda: F.max_pool2d(x112, 3, 2, 1)),
        ("op/masked_avg_pool2d[2,2]", x56.shape, lambda: mo.masked_avg_pool2d(x56, m56, 2, 2),
         lambda: F.avg_pool2d(x56, 2, 2)),
        ("op/masked_mean", x7.shape, lambda: mo.masked_mean(x7, m7), lambda: x7.mean(dim=(2, 3))),
        ("op/masked_conv2d[3x3,fill,relu]", x56.shape,
         lambda: mo.masked_conv2d(x56, m56, w3, bias, padding=1, mode="fill", activation="relu"),
         lambda: F.relu(F.conv2d(x56, w3, bias, padding=1))),
        ("op/masked_conv2d[3x3,renorm,relu]", x56.shape,
         lambda: mo.masked_conv2d(x56, m56, w3, bias, padding=1, mode="renorm", activation="relu"),
         lambda: F.relu(F.conv2d(x56, w3, bias, padding=1))),
    ]


def _load_current():
    from masked_ops.backends import get_backend

    return _load(get_backend())


def bench_ops(args, device, budget, records):
    dtype = args.dtype
    for batch in args.op_batches:
        for name, shape, masked, plain in op_cases(batch, device, dtype, args.smoke):
            if budget.left() < args.reserve:
                records.append({"name": name, "batch": batch, "skipped": "time budget"})
                continue
            with torch.no_grad():
                plain_ms = timed_ms(plain, device, args.warmup, args.reps)
                with mo.set_backend("torch"):
                    torch_ms = timed_ms(masked, device, args.warmup, args.reps)
                for backend in gpu_backends(device):
                    with mo.set_backend(backend):
                        masked_ms = timed_ms(masked, device, args.warmup, args.reps)
                    records.append(record(args, name, dtype, batch, shape, backend, masked_ms, plain_ms, torch_ms))


# ----------------------------------------------------------------------------- models
def build_model(name, small):
    import torchvision

    if small:
        name = "resnet18" if name == "resnet50" else name
    return getattr(torchvision.models, name)(weights=None).eval()


def bench_models(args, device, budget, records):
    dtype = args.model_dtype
    for model_name in args.models:
        try:
            net = build_model(model_name, args.smoke).to(device=device, dtype=dtype,
                                                          memory_format=torch.channels_last)
        except Exception as exc:  # a model the installed torchvision lacks
            records.append({"name": f"model/{model_name}", "skipped": f"{type(exc).__name__}: {exc}"})
            continue
        for mode in args.modes:
            try:
                lm = mo.layer_mask(net, mode=mode)
            except Exception as exc:
                records.append({"name": f"model/{model_name}/{mode}", "skipped": f"layer_mask: {exc}"})
                continue
            for batch in args.model_batches:
                name = f"model/{model_name}/{mode}"
                if budget.left() < args.reserve:
                    records.append({"name": name, "batch": batch, "skipped": "time budget"})
                    continue
                px = args.pixels
                g = torch.Generator(device).manual_seed(batch)
                x = torch.randn(batch, 3, px, px, device=device, generator=g).to(dtype).contiguous(
                    memory_format=torch.channels_last)
                cells = torch.rand(batch, 1, px // 16, px // 16, device=device, generator=g) > 0.5
                m = F.interpolate(cells.float(), size=(px, px), mode="nearest").to(dtype)
                try:
                    with torch.no_grad():
                        plain_ms = timed_ms(lambda: net(x), device, args.warmup, args.reps)
                        peak_plain = peak_mib(lambda: net(x), device)
                        torch_ms = None
                        if batch <= args.torch_backend_max_batch:
                            with mo.set_backend("torch"):
                                torch_ms = timed_ms(lambda: lm(x, m), device, 1, max(3, args.reps // 3))
                        for backend in gpu_backends(device):
                            with mo.set_backend(backend):
                                masked_ms = timed_ms(lambda: lm(x, m), device, args.warmup, args.reps)
                                peak_masked = peak_mib(lambda: lm(x, m), device)
                            records.append(record(args, name, dtype, batch, x.shape, backend, masked_ms, plain_ms,
                                                  torch_ms, peak_masked, peak_plain))
                except torch.cuda.OutOfMemoryError as exc:
                    records.append({"name": name, "batch": batch, "skipped": f"out of memory: {exc}"[:200]})
                finally:
                    del x, m
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        del net


def bench_lime(args, device, budget, records):
    """A LIME-sized run: `lime_samples` masked ResNet-50 forwards at 224 px, end to end."""
    if budget.left() < args.reserve:
        records.append({"name": "lime/resnet50", "skipped": "time budget"})
        return
    dtype = args.model_dtype
    net = build_model("resnet50", args.smoke).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    lm = mo.layer_mask(net, mode="fill")
    px, n, bs = args.pixels, args.lime_samples, args.lime_batch
    g = torch.Generator(device).manual_seed(7)
    image = torch.randn(1, 3, px, px, device=device, generator=g).to(dtype)
    cells = torch.rand(n, 1, px // 16, px // 16, device=device, generator=g) > 0.5
    masks = F.interpolate(cells.float(), size=(px, px), mode="nearest").to(dtype)

    def run(masked: bool):
        out = []
        for i in range(0, n, bs):
            m = masks[i:i + bs]
            x = image.expand(m.shape[0], -1, -1, -1).contiguous(memory_format=torch.channels_last)
            out.append((lm(x, m) if masked else net(x * m)).float().softmax(-1)[:, 0])
        return torch.cat(out)

    def seconds(fn):
        fn()  # warm-up (and cuDNN autotuning)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    with torch.no_grad():
        plain_s = seconds(lambda: run(False))
        for backend in gpu_backends(device):
            with mo.set_backend(backend):
                masked_s = seconds(lambda: run(True))
            records.append(record(args, "lime/resnet50[fill]", dtype, bs, (n, 3, px, px), backend, masked_s * 1e3,
                                  plain_s * 1e3, None, samples=n, masked_s=round(masked_s, 3),
                                  plain_s=round(plain_s, 3), plain_is="grey (zero) fill, same forwards"))


# ----------------------------------------------------------------------------- report
def summary_markdown(meta, records) -> str:
    lines = [f"# GPU benchmark {meta['date']}", "",
             f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}; medians of CUDA-event timings; "
             "ratio = masked / plain in the same run; torch/masked = speed-up over the pure-PyTorch backend.", "",
             "| name | backend | dtype | batch | masked ms | plain ms | ratio | torch/masked | mem ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped'][:60]} | | {r.get('batch', '')} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['backend']} | {r['dtype']} | {r['batch']} | {r['masked_ms']:.3f} | "
                     f"{r['plain_ms']:.3f} | {r['ratio']:.3f} | {r['torch_ratio']} | {r['mem_ratio']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few repetitions (tests the script)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu-<date>.json)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="stop starting new work after this many seconds (the device allows 10 min per call)")
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--modes", nargs="*", default=["fill", "renorm"])
    p.add_argument("--skip", nargs="*", default=[], choices=["ops", "models", "lime"])
    a = p.parse_args(argv)
    a.dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    a.model_dtype = a.dtype
    if a.smoke:
        a.op_batches, a.model_batches, a.pixels = [2], [2], 32
        a.warmup, a.reps, a.reserve = 1, 2, 0.0
        a.lime_samples, a.lime_batch, a.torch_backend_max_batch = 8, 4, 2
        a.models = a.models[:1] if a.models == list(MODELS) else a.models
    else:
        a.op_batches, a.model_batches, a.pixels = [64], [64, 256], 224
        a.warmup, a.reps, a.reserve = 5, 20, 20.0
        a.lime_samples, a.lime_batch, a.torch_backend_max_batch = 1000, 100, 64
    return a


def main(argv=None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        args.device_name = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(2)
        args.device_name = f"cpu ({platform.processor() or platform.machine()})"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or os.path.join(HERE, "results", f"gpu-{date}.json")
    meta = {"date": date, "device": args.device_name, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "smoke": args.smoke, "backends": gpu_backends(device),
            "argv": sys.argv[1:] if argv is None else list(argv)}
    print(f"masked_ops GPU benchmark: {meta}", flush=True)
    budget = Budget(args.budget_s)
    records = []
    t0 = time.monotonic()
    if "ops" not in args.skip:
        bench_ops(args, device, budget, records)
    if "lime" not in args.skip:
        bench_lime(args, device, budget, records)
    if "models" not in args.skip:
        bench_models(args, device, budget, records)
    meta["wall_s"] = round(time.monotonic() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(summary_markdown(meta, records))
    print(f"wrote {out} ({len(records)} records, {meta['wall_s']} s)")
    return out


if __name__ == "__main__":
    main()
