"""LIME end to end: masked_ops (grey fill, layer masking) against the `lime` package (grey fill).

    python bench/bench_lime.py                       # CPU, EfficientNet-Lite0, 1,000 samples
    python bench/bench_lime.py --device cuda --model resnet50 --repeats 5    # the GPU target (< 0.5 s)
    python bench/bench_lime.py --smoke               # 16 samples, seconds: tests the script

Same model, same photo (scikit-image's cat, 224 x 224), same SLIC segments for every contender;
each figure is wall time of one full explanation (sampling, masks, every forward pass, the
regression) and its ratio to plain PyTorch measured in the same run: the unmasked model's forward
of as many images in batches of --batch-size, i.e. the floor of any explainer that paints pixels
and runs the plain model (layer masking runs a converted model and can go below it).
Every contender runs the same model in the same memory format (--format; channels_last by
default on CPU, as `masked-ops explain` does: oneDNN's depthwise convs are much faster so), the
lime package included, so the comparison is about the explainers, not the memory format.
Medians and p25-p75 over --repeats, run interleaved (bench/harness.py: wall time, and process CPU
time, which a shared machine inflates less); ``ratio`` per contender is the median of per-round ratios.
The lime package runs with its defaults (batch_size 10) and hide_color = the ImageNet mean
colour (grey), with a classifier_fn that runs the plain model.
Results go to bench/results/<device>-lime-<date>.json (with --compile: <device>-lime-compiled-<date>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward, the same for every contender (default: the library's constant for short runs, "
                        "4 on CPU, 64 on GPU)")
    p.add_argument("--format", choices=("contiguous", "channels_last"), default=None,
                   help="memory format of the model for every contender (default: channels_last on CPU, as "
                        "the CLI; contiguous on GPU)")
    p.add_argument("--no-lime-package", action="store_true", help="skip the (slow) lime package run")
    p.add_argument("--compile", action="store_true",
                   help="every contender's model under torch.compile (the plain model for the floor, grey fill and "
                        "the lime package; the layer-masked model for layer masking), warmed up at every batch size")
    args = H.script_args(p, argv, device="cpu", repeats=1, smoke=dict(samples=16, repeats=1))
    device = torch.device(args.device)
    from masked_ops.explain.batching import check_batch_size, default_batch_size

    # one fixed batch for the floor and every contender (a fair floor): the library's constant unless given
    args.batch_size = check_batch_size(args.batch_size) or default_batch_size(device)
    args.format = args.format or ("channels_last" if device.type == "cpu" else "contiguous")

    from masked_ops.explain import explain_lime, get_strategy, segment
    from masked_ops.images import load_image
    from masked_ops.models import load_model

    model, info = load_model(args.model)
    model = model.to(device)
    image = info.prepare(load_image("chelsea"))[0].to(device)
    seg = segment(image.cpu(), "slic", n_segments=50)
    k = int(seg.max()) + 1
    mean = torch.tensor(info.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, 3, 1, 1)
    out = H.results_path(args, "lime-compiled" if args.compile else "lime", device.type)
    results = {}
    summary = dict(benchmark="lime_end_to_end", model=args.model, samples=args.samples, segments=k,
                   batch_size=args.batch_size, repeats=args.repeats, format=args.format, compiled=args.compile,
                   input_shape=[1, *image.shape], dtype="float32",
                   **H.environment(device), complete=False, results=results)

    def summarise(samples):
        """results: per contender its seconds, its ratio to the plain forward (of the medians, as before)
        and ``ratio``/``cpu_ratio`` (medians of per-round ratios to every baseline of the same rounds)."""
        walls = {n: [s.wall_s for s in v] for n, v in samples.items() if v}
        cpus = {n: [s.cpu_s for s in v] for n, v in samples.items() if v}
        n_min = min(len(v) for v in walls.values())
        paired = H.ratios({n: v[:n_min] for n, v in walls.items()}, ["plain_forward", "lime_package_grey"])
        cpu_paired = H.ratios({n: v[:n_min] for n, v in cpus.items()}, ["plain_forward", "lime_package_grey"])
        for name, v in samples.items():
            if not v:
                continue
            r = results.setdefault(name, {})
            r.update(H.seconds(v), ratio=paired[name], cpu_ratio=cpu_paired[name])
            if v[-1].result is not None:
                r.update(v[-1].result[1])
        if "plain_forward" in results:
            floor = results["plain_forward"]
            for r in results.values():
                r["ratio_to_plain"] = r["median_s"] / floor["median_s"]
                r["cpu_ratio_to_plain"] = r["median_cpu_s"] / floor["median_cpu_s"]
        if "lime_package_grey" in results:
            lp = results["lime_package_grey"]
            summary["speedup_vs_lime_package"] = {n: lp["median_s"] / r["median_s"] for n, r in results.items()
                                                  if n.startswith("masked_ops")}
            summary["cpu_speedup_vs_lime_package"] = {n: lp["median_cpu_s"] / r["median_cpu_s"]
                                                      for n, r in results.items() if n.startswith("masked_ops")}
        H.write_json(out, summary)  # after every call: a cut-short run still leaves its figures

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
    contenders = {"plain_forward": plain}

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
        contenders[f"masked_ops_{name}"] = lambda strat=strat: lime_run(strat)

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

        contenders["lime_package_grey"] = run_lime

    # Interleaved: repeat r of every contender runs before repeat r+1 of any, so a machine that
    # speeds up or slows down over minutes (shared hosts do) biases no contender.
    samples = {n: [] for n in contenders}

    def after(name, so_far):
        samples[name] = so_far
        summarise(samples)

    H.interleaved_samples(contenders, args.repeats, device, after=after)
    summary["complete"] = True
    summarise(samples)
    print(json.dumps({n: round(r["ratio_to_plain"], 3) for n, r in results.items()}), "(wall, ratio to plain)")
    if "speedup_vs_lime_package" in summary:
        print(json.dumps({n: round(v, 2) for n, v in summary["speedup_vs_lime_package"].items()}),
              "(wall speed-up vs the lime package)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
