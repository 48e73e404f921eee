"""Exact incremental inference for sliding-window occlusion (masked_ops.explain.incremental; Krypton,
Nakandala et al., SIGMOD 2019) in wall time, issue 29's gate: does recomputing only the changed cone on
top of one clean forward beat full forwards by >= 1.5x end to end, with results equal to them?

    python bench/incremental_engine.py                      # ResNet-50, 224 px, windows 32/16 and 16/8
    python bench/incremental_engine.py --masking layer     # the same under layer masking
    python bench/incremental_engine.py --smoke              # ResNet-18 at 64 px: tests the script

Method: see masked_ops.explain.incremental (one clean forward cached; per node a clean, rect or full
state; every window's rectangle grown to one size per node so that all run as one batch; whole maps
once a rectangle covers more than the threshold of its map or at a global op).

Exactness: float64, every window's logits against a full forward of
the occluded image (max abs difference reported; the gate asks 1e-10). Speed: the engine (its clean
forward included) against full forwards of the same occluded images, both at each of ``--batches``,
interleaved rounds, medians; the headline is the best against the best. fp32: the max difference to
full forwards, next to the full forwards' own difference between batch sizes. fp32 NCHW, 2 threads.

Results: bench/results/cpu-incremental-engine-<date>.json.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import incremental_flops as IF  # noqa: E402

from masked_ops.explain.incremental import IncrementalModel  # noqa: E402

Rect = Tuple[int, int, int, int]


def occluded(clean: torch.Tensor, rects: Sequence[Rect], value: float = 0.0) -> torch.Tensor:
    """The clean image (1 x C x H x W, normalised) repeated, each copy painted ``value`` inside its rect."""
    x = clean.repeat(len(rects), 1, 1, 1)
    for b, (y0, y1, x0, x1) in enumerate(rects):
        x[b, :, y0:y1, x0:x1] = value
    return x


def window_rects(size: int, window: int, stride: int) -> List[Rect]:
    ax = IF.windows(size, window, stride)
    return [(y0, y1, x0, x1) for y0, y1 in ax for x0, x1 in ax]


def subject(model: nn.Module, masking: str, clean: torch.Tensor, rects: Sequence[Rect]):
    """(the model run, its clean inputs, the occluded inputs): ``grey`` paints each window 0 (the mean
    colour after normalisation) for the plain model; ``layer`` removes it by the mask of the layer-masked
    model (masked_ops.layer_mask), the image unchanged."""
    if masking == "grey":
        return model, clean, occluded(clean, rects)
    import masked_ops as mo

    ones = torch.ones(1, 1, *clean.shape[-2:], dtype=clean.dtype)
    return (mo.layer_mask(model), (clean, ones),
            (clean.expand(len(rects), -1, -1, -1), occluded(ones, rects)))


def _rows(inputs, i: int, j: int):
    return inputs[i:j] if isinstance(inputs, torch.Tensor) else tuple(t[i:j] for t in inputs)


def chunked(engine: IncrementalModel, inputs, rects: Sequence[Rect], batch: int) -> torch.Tensor:
    return torch.cat([engine(_rows(inputs, i, i + batch), rects[i:i + batch]) for i in range(0, len(rects), batch)])


def timed(contenders: dict, repeats: int):
    """Interleaved rounds (harness.interleaved; the contenders have run once already): (seconds per
    contender, medians, the fastest eager "full..." contender (NCHW or channels_last) and the fastest
    "incremental..." one)."""
    times = {k: [ms / 1000 for ms in v] for k, v in H.interleaved(contenders, repeats, H.CPU, warmup=0).items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    return (times, med, min((k for k in med if k.startswith("full") and "compiled" not in k), key=med.get),
            min((k for k in med if k.startswith("incremental")), key=med.get))


def channels_last(model: nn.Module, inputs):
    """A copy of the model and its inputs in channels_last memory format."""
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    return (copy.deepcopy(model).to(memory_format=torch.channels_last),
            cl(inputs) if isinstance(inputs, torch.Tensor) else tuple(cl(t) for t in inputs))


def full_forwards(model: nn.Module, inputs, batch: int) -> torch.Tensor:
    n = len(inputs) if isinstance(inputs, torch.Tensor) else len(inputs[0])
    with torch.no_grad():
        return torch.cat([model(*((_rows(inputs, i, i + batch),) if isinstance(inputs, torch.Tensor)
                                  else _rows(inputs, i, i + batch))) for i in range(0, n, batch)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--windows", nargs="*", default=["32/16", "16/8"], help="window/stride pairs (none: only --explain)")
    p.add_argument("--threshold", type=float, nargs="+", default=[0.5])
    p.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16], help="batch sizes, both contenders")
    p.add_argument("--check-size", type=int, default=96, help="float64 exactness check at this input size")
    p.add_argument("--compiled", action="store_true", help="also time full forwards of torch.compile(model)")
    p.add_argument("--masking", choices=("grey", "layer"), default="grey",
                   help="grey: windows painted, plain model; layer: windows removed by layer masking")
    p.add_argument("--explain", default="32/16", help="window/stride of the end-to-end explain_occlusion case "
                                                      "('' to skip)")
    args = H.script_args(p, argv, repeats=3, smoke=dict(model="resnet18", size=64, windows=["16/16"],
                                                         repeats=1, batches=[8], check_size=64))
    torch.manual_seed(0)
    model = IF.load(args.model)  # random weights (Lite0: pretrained): timing and equality do not depend on them
    out = H.results_path(args, "incremental-engine")
    meta = dict(benchmark="incremental_engine", model=args.model, masking=args.masking, size=args.size,
                batches=args.batches,
                dtype="float32", layout="NCHW", **H.environment(H.CPU), cases=[])
    for spec in args.windows:
        window, stride = (int(v) for v in spec.split("/"))
        # exactness, float64, at a smaller size (same code path; a 224 px float64 run takes minutes here)
        r64 = window_rects(args.check_size, window, stride)
        m64, c64, x64 = subject(copy.deepcopy(model).double(), args.masking,
                                torch.randn(1, 3, args.check_size, args.check_size, dtype=torch.float64), r64)
        exact = {}
        for th in args.threshold:
            y_inc = chunked(IncrementalModel(m64, c64, threshold=th), x64, r64, 8)
            exact[str(th)] = float((y_inc - full_forwards(m64, x64, 8)).abs().max())
        # speed, fp32: every contender at each batch size (large batches of 224 px ResNet-50 maps fault in
        # hundreds of MB per layer here, so the best batch is measured, not assumed)
        rects = window_rects(args.size, window, stride)
        run, clean, x = subject(model, args.masking, torch.randn(1, 3, args.size, args.size), rects)
        contenders = {f"full@b{b}": (lambda b=b: full_forwards(run, x, b)) for b in args.batches}
        # the same model in channels_last (oneDNN's faster layout on CPU; the engine uses it internally):
        # a user who tunes their full forwards would pick it
        run_cl, x_cl = channels_last(run, x)
        contenders.update({f"full-cl@b{b}": (lambda b=b: full_forwards(run_cl, x_cl, b)) for b in args.batches})
        if args.compiled:  # the baselines a user who compiles would compare with (compiled on their first call)
            compiled, compiled_cl = torch.compile(run), torch.compile(run_cl)
            contenders.update({f"full-compiled@b{b}": (lambda b=b: full_forwards(compiled, x, b)) for b in args.batches})
            contenders.update({f"full-compiled-cl@b{b}": (lambda b=b: full_forwards(compiled_cl, x_cl, b))
                               for b in args.batches})
            compiled_diff = max(float((contenders[f"full-compiled{v}@b{b}"]() - full_forwards(run, x, b)).abs().max())
                                for b in args.batches for v in ("", "-cl"))  # compiles every batch shape first
        for th in args.threshold:
            for b in args.batches:
                contenders[f"incremental@t{th}b{b}"] = (
                    lambda th=th, b=b: chunked(IncrementalModel(run, clean, threshold=th), x, rects, b))
        ref = full_forwards(run, x, args.batches[0])
        diffs = {k: float((f() - ref).abs().max()) for k, f in contenders.items() if k.startswith("incremental")}
        # the model's own fp32 rounding between batch sizes and between layouts: the yardstick of "equal"
        noise = max(float((contenders[f"full{v}@b{b}"]() - ref).abs().max()) for b in args.batches for v in ("", "-cl"))
        times, med, best_full, best_inc = timed(contenders, args.repeats)
        case = dict(window=window, stride=stride, positions=len(rects),
                    float64_max_abs_diff=exact, fp32_max_abs_diff=diffs, fp32_full_batch_to_batch=noise,
                    fp32_compiled_vs_eager=compiled_diff if args.compiled else None,  # also the model's own rounding
                    logit_scale=float(ref.abs().max()),
                    seconds={k: H.stats(v) for k, v in times.items()},
                    speedup_vs_best_full={k: med[best_full] / v for k, v in med.items()},
                    best_full=best_full, best_incremental=best_inc,
                    speedup_best_vs_best=med[best_full] / med[best_inc],
                    speedup_vs_best_compiled=(min(v for k, v in med.items() if k.startswith("full-compiled"))
                                              / med[best_inc]) if args.compiled else None,
                    speedup_paired_same_batch={str(b): statistics.median(
                        [f / i for f, i in zip(times[f"full@b{b}"], times[f"incremental@t{args.threshold[0]}b{b}"])])
                        for b in args.batches})
        meta["cases"].append(case)
        print(f"{args.model} {window}/{stride}: {len(rects)} windows; float64 max diff "
              f"{exact}; " + ", ".join(f"{k} {med[k]:.2f} s" for k in med)
              + f"; best incremental vs best full {case['speedup_best_vs_best']:.2f}x"
              + (f", vs best compiled full {case['speedup_vs_best_compiled']:.2f}x" if args.compiled else ""), flush=True)
        H.write_json(out, meta)
    if args.explain:
        meta["explain_occlusion"] = explain_case(model, args)
        H.write_json(out, meta)
    print(f"wrote {out}")
    return 0


def explain_case(model: nn.Module, args) -> dict:
    """End to end: explain_occlusion with the --masking strategy on a bundled photo, incremental or not, at the
    batch sizes given (each contender's own batch), interleaved rounds."""
    from masked_ops.explain import explain_occlusion, get_strategy
    from masked_ops.images import centre_view, load_image

    window, stride = (int(v) for v in args.explain.split("/"))
    image = centre_view(load_image("chelsea"), args.size)
    strategy = get_strategy(args.masking, model)
    contenders = {}
    for b in args.batches:
        contenders[f"full@b{b}"] = (lambda b=b: explain_occlusion(strategy, image, window=window, stride=stride,
                                                                  batch_size=b, progress=False))
        contenders[f"incremental@b{b}"] = (lambda b=b: explain_occlusion(
            strategy, image, window=window, stride=stride, batch_size=b, incremental=True, progress=False))
    a, b_ = contenders[f"full@b{args.batches[0]}"](), contenders[f"incremental@b{args.batches[0]}"]()
    times, med, best_full, best_inc = timed(contenders, args.repeats)
    case = dict(window=window, stride=stride, strategy=args.masking, image="chelsea", output="prob",
                max_abs_diff_outputs=float((a.outputs - b_.outputs).abs().max()),
                seconds={k: H.stats(v) for k, v in times.items()}, best_full=best_full, best_incremental=best_inc,
                speedup_best_vs_best=med[best_full] / med[best_inc])
    print(f"explain_occlusion {window}/{stride} {args.masking}: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items())
          + f"; best vs best {case['speedup_best_vs_best']:.2f}x; outputs differ by at most "
          f"{case['max_abs_diff_outputs']:.2e}", flush=True)
    return case


if __name__ == "__main__":
    sys.exit(main())
