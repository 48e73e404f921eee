"""LIME end to end: masked_ops (grey fill, layer masking) against the `lime` package (grey fill).

    python bench/bench_lime.py                       # CPU, EfficientNet-Lite0, 1,000 samples
    python bench/bench_lime.py --device cuda --model resnet50 --repeats 5    # the GPU target (< 0.5 s)

Same model, same photo (scikit-image's cat, 224 x 224), same SLIC segments for every contender;
each figure is wall time of one full explanation (sampling, masks, every forward pass, the
regression) and its ratio to plain PyTorch measured in the same run: the unmasked model's forward
of as many images in batches of --batch-size, i.e. the floor of any explainer that paints pixels
and runs the plain model (layer masking runs a converted model and can go below it).
Every contender runs the same model in the same memory format (--format; channels_last by
default on CPU, as `masked-ops explain` does: oneDNN's depthwise convs are much faster so), the
lime package included, so the comparison is about the explainers, not the memory format.
Medians over --repeats, run round robin (wall time, and process CPU time, which a shared machine
inflates less).
The lime package runs with its defaults (batch_size 10) and hide_color = the ImageNet mean
colour (grey), with a classifier_fn that runs the plain model.
Results go to bench/results/<device>-lime-<date>.json (with --compile: <device>-lime-compiled-<date>.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """(median wall s, wall times, result, median process CPU s). CPU time is recorded because a
    shared machine inflates wall time; it is less sensitive to other processes (not immune)."""
    times, cpu, result = [], [], None
    for _ in range(repeats):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), times, result, statistics.median(cpu)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward (default: the library's, 16 on CPU, 64 on GPU)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--format", choices=("contiguous", "channels_last"), default=None,
                   help="memory format of the model for every contender (default: channels_last on CPU, as "
                        "the CLI; contiguous on GPU)")
    p.add_argument("--no-lime-package", action="store_true", help="skip the (slow) lime package run")
    p.add_argument("--compile", action="store_true",
                   help="every contender's model under torch.compile (the plain model for the floor, grey fill and "
                        "the lime package; the layer-masked model for layer masking), warmed up at every batch size")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from masked_ops.explain.perturb import resolve_batch_size

    args.batch_size = resolve_batch_size(args.batch_size, device)
    args.format = args.format or ("channels_last" if device.type == "cpu" else "contiguous")

    import masked_ops
    from masked_ops.explain import explain_lime, get_strategy, segment
    from masked_ops.models import load_image, load_model

    model, info = load_model(args.model)
    model = model.to(device)
    image = info.prepare(load_image("chelsea"))[0].to(device)
    seg = segment(image.cpu(), "slic", n_segments=50)
    k = int(seg.max()) + 1
    mean = torch.tensor(info.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, 3, 1, 1)
    load_before = os.getloadavg()
    results = {}

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{device.type}-lime{'-compiled' if args.compile else ''}-"
                                   f"{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def summarise():
        floor = results["plain_forward"]["median_s"]
        cfloor = results["plain_forward"]["median_cpu_s"]
        for r in results.values():
            r["ratio_to_plain"] = r["median_s"] / floor
            r["cpu_ratio_to_plain"] = r["median_cpu_s"] / cfloor
        summary = dict(
            benchmark="lime_end_to_end", model=args.model, device=str(device), samples=args.samples, segments=k,
            batch_size=args.batch_size, repeats=args.repeats, threads=args.threads, format=args.format,
            compiled=args.compile,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            torch=torch.__version__, masked_ops=masked_ops.__version__, backend=masked_ops.get_backend(),
            python=platform.python_version(), machine=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count(), loadavg_before=load_before, loadavg_after=os.getloadavg(),
            complete=False, results=results)
        if "lime_package_grey" in results:
            lp = results["lime_package_grey"]
            summary["speedup_vs_lime_package"] = {n: lp["median_s"] / r["median_s"] for n, r in results.items()
                                                  if n.startswith("masked_ops")}
            summary["cpu_speedup_vs_lime_package"] = {n: lp["median_cpu_s"] / r["median_cpu_s"]
                                                      for n, r in results.items() if n.startswith("masked_ops")}
        return summary

    def record(name, med, times, extra=None, cpu=None):
        results[name] = dict(median_s=med, times_s=times, median_cpu_s=cpu, **(extra or {}))
        print(f"{name:<34} {med:8.2f} s wall {cpu:8.2f} s cpu", flush=True)
        with open(out, "w") as f:  # after every contender: a cut-short run still leaves its figures
            json.dump(summarise(), f, indent=2)

    # One memory format for every contender (the lime package's classifier_fn runs the same model).
    fmt = torch.channels_last if args.format == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    eager_model = model
    if args.compile:
        model = torch.compile(model)

    # plain PyTorch floor: the unmasked model on `samples` images, batched
    batch = ((image[None] - mean) / std).expand(args.batch_size, -1, -1, -1).contiguous(memory_format=fmt)

    @torch.inference_mode()
    def plain():
        done = 0
        while done < args.samples:
            n = min(args.batch_size, args.samples - done)
            model(batch[:n])
            done += n

    with torch.inference_mode():  # warm-up (under --compile: every batch size the floor uses)
        for n in {args.batch_size, args.samples % args.batch_size or args.batch_size}:
            model(batch[:n])
    contenders = {"plain_forward": (plain, None)}

    def lime_run(strat):
        exp = explain_lime(strat, image, segments=seg, num_samples=args.samples, batch_size=args.batch_size,
                           progress=False)
        return exp, dict(target=exp.targets[0], top_segments=exp.top_segments(5).tolist())

    for name in ("grey", "layer"):
        strat = get_strategy(name, model if name != "layer" else eager_model, mean=info.mean, std=info.std)
        if args.compile and name == "layer":  # the converted model compiled (layer_mask takes the eager model)
            strat._masked = torch.compile(strat.masked_model)
        # warm-up (the layer_mask conversion; under --compile, a compile per batch size LIME will use)
        for n in {args.batch_size, args.samples % args.batch_size or args.batch_size}:
            explain_lime(strat, image, segments=seg, num_samples=n, batch_size=args.batch_size, progress=False)
        contenders[f"masked_ops_{name}"] = (lambda strat=strat: lime_run(strat), None)

    if not args.no_lime_package:
        from lime.lime_image import LimeImageExplainer

        @torch.inference_mode()
        def classifier_fn(images):
            x = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2).to(device)
            return model(((x - mean) / std).contiguous(memory_format=fmt)).softmax(1).cpu().numpy()

        rgb = image.permute(1, 2, 0).double().cpu().numpy()
        seg_np = seg.numpy()
        classifier_fn(np.repeat(rgb[None], 10, axis=0))  # warm-up at the lime package's batch size (10)

        def run_lime():
            exp = LimeImageExplainer(random_state=0).explain_instance(
                rgb, classifier_fn, top_labels=1, hide_color=tuple(info.mean), num_samples=args.samples,
                segmentation_fn=lambda img: seg_np, random_seed=0)
            top = [int(f) for f, _ in sorted(exp.local_exp[exp.top_labels[0]], key=lambda t: -t[1])[:5]]
            return exp, dict(target=int(exp.top_labels[0]), top_segments=top)

        contenders["lime_package_grey"] = (run_lime, None)

    # Round robin: repeat r of every contender runs before repeat r+1 of any, so a machine that
    # speeds up or slows down over minutes (shared hosts do) biases no contender.
    walls = {n: [] for n in contenders}
    cpus = {n: [] for n in contenders}
    extras = {}
    for _ in range(args.repeats):
        for name, (fn, _unused) in contenders.items():
            wall, _, result, cpu = timed(fn, device, 1)
            walls[name].append(wall)
            cpus[name].append(cpu)
            if isinstance(result, tuple):
                extras[name] = result[1]
            print(f"  {name:<32} {wall:8.2f} s wall {cpu:8.2f} s cpu", flush=True)
    for name in contenders:
        record(name, statistics.median(walls[name]), walls[name], extras.get(name),
               cpu=statistics.median(cpus[name]))

    summary = summarise()
    summary["complete"] = True
    with open(out, "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({n: round(r["ratio_to_plain"], 3) for n, r in results.items()}), "(wall, ratio to plain)")
    if "speedup_vs_lime_package" in summary:
        print(json.dumps({n: round(v, 2) for n, v in summary["speedup_vs_lime_package"].items()}),
              "(wall speed-up vs the lime package)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
