"""Time per image against the batch size: the explainers' forward batches (issue 29: choose the batch size by
measurement rather than a constant).

    python bench/bench_batch_size.py                 # CPU, Lite0 and ResNet-50, eager and compiled
    python bench/bench_batch_size.py --smoke         # one model, two sizes, no compile: tests the script
    python bench/bench_batch_size.py --end-to-end    # LIME, 1,000 samples: the default (timed) against constants
    python bench/bench_batch_size.py --removal       # the removal-curve experiment: its old batch 32 against the default

For each model (channels_last, as the explainers run it on CPU), plain and layer-masked (half the 16 x 16
patches removed), eager and under torch.compile: milliseconds per image of one forward at each batch size,
interleaved (the sizes of one model and mode rotate every round; bench/harness.py), medians and spreads,
and each size's ratio to the library's constant for short runs (explain.batching.CPU_DEFAULT).
``--end-to-end``: whole LIME explanations (1,000 samples, Lite0, channels_last, layer masking and grey)
at the old constant 16, the constant 4 and the default (batch_size=None: timed per run, the cache
cleared before every run so that each pays its own timing), interleaved.
Results: bench/results/cpu-batch-size-<date>.json (-end-to-end-<date>.json).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="efficientnet-lite0,resnet50")
    p.add_argument("--sizes", default="4,8,12,16,32")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--end-to-end", action="store_true", help="whole LIME explanations instead of single forwards")
    p.add_argument("--samples", type=int, default=1000, help="--end-to-end: LIME samples")
    p.add_argument("--removal", action="store_true", help="the removal-curve experiment at batch 32 and the default")
    args = H.script_args(p, argv, repeats=5, smoke=dict(models="efficientnet-lite0", sizes="4,8", repeats=2,
                                                        no_compile=True, samples=300))
    if args.end_to_end:
        return end_to_end(args)
    if args.removal:
        return removal(args)
    import masked_ops as mo
    from masked_ops.explain.batching import CPU_DEFAULT
    from masked_ops.models import load_model

    default = CPU_DEFAULT
    sizes = [int(s) for s in args.sizes.split(",")]
    out = H.results_path(args, "batch-size")
    results = []
    doc = dict(benchmark="batch_size", sizes=sizes, default_batch_size=default, repeats=args.repeats,
               input_shape=[None, 3, 224, 224], dtype="float32", format="channels_last",
               **H.environment(H.CPU), results=results)
    for name in args.models.split(","):
        model = load_model(name, "random" if name != "efficientnet-lite0" else None)[0]
        model = model.eval().to(memory_format=torch.channels_last)
        lm = mo.layer_mask(model)
        for mode in ("eager",) + (() if args.no_compile else ("compiled",)):
            for kind, net in (("plain", model), ("layer", lm)):
                fn = torch.compile(net) if mode == "compiled" else net
                contenders = {}
                for b in sizes:
                    x = torch.randn(b, 3, 224, 224).to(memory_format=torch.channels_last)
                    m = (torch.rand(b, 1, 14, 14) > 0.5).float().repeat_interleave(16, 2).repeat_interleave(16, 3)
                    contenders[str(b)] = (lambda f=fn, x=x, m=m, k=kind: f(x, m) if k == "layer" else f(x))
                with torch.inference_mode():
                    times = H.interleaved(contenders, args.repeats, H.CPU, warmup=2)
                per_image = {b: [t / int(b) for t in v] for b, v in times.items()}
                row = dict(model=name, mode=mode, kind=kind,
                           ms_per_image={b: H.stats(v) for b, v in per_image.items()})
                if str(default) in per_image:
                    row["ratio_to_default"] = {b: H.paired_ratio(v, per_image[str(default)]) for b, v in per_image.items()}
                results.append(row)
                best = min(per_image, key=lambda b: row["ms_per_image"][b]["median"])
                print(f"{name} {mode} {kind}: " + ", ".join(f"{b}: {row['ms_per_image'][b]['median']:.2f}"
                                                           for b in per_image) + f" ms/image; best {best}", flush=True)
                H.write_json(out, doc)
    print(f"wrote {out}")
    return 0


def end_to_end(args) -> int:
    from masked_ops.explain import batching, explain_lime, get_strategy
    from masked_ops.images import load_image
    from masked_ops.models import load_model

    name = args.models.split(",")[0]
    model, info = load_model(name, "random" if name != "efficientnet-lite0" else None)
    model = model.eval().to(memory_format=torch.channels_last)
    image = info.prepare(load_image("chelsea"))[0]
    out = H.results_path(args, "batch-size-end-to-end")
    chosen = {}

    def run(strategy, batch_size):
        def f():
            if batch_size is None:
                batching.clear_cache()  # every run pays its own timing
            explain_lime(strategy, image, num_samples=args.samples, batch_size=batch_size, progress=False)
            if batch_size is None:
                chosen.setdefault(strategy.name, []).append(batching.last_choice().get("size"))
        return f

    contenders = {}
    for masking in ("layer", "grey"):
        strategy = get_strategy(masking, model, mean=info.mean, std=info.std)
        for b in (16, batching.CPU_DEFAULT, None):
            contenders[f"{masking}@{'default' if b is None else b}"] = run(strategy, b)
    times = {k: [t / 1e3 for t in v] for k, v in H.interleaved(contenders, args.repeats, H.CPU, warmup=1).items()}
    doc = dict(benchmark="batch_size_end_to_end", model=name, method="lime", samples=args.samples, image="chelsea",
               format="channels_last", repeats=args.repeats, **H.environment(H.CPU),
               seconds={k: H.stats(v) for k, v in times.items()}, default_chose=chosen,
               ratio_to_16={k: H.paired_ratio(v, times[k.split("@")[0] + "@16"]) for k, v in times.items()})
    for k, v in doc["seconds"].items():
        print(f"{k}: {v['median']:.2f} s (x{doc['ratio_to_16'][k]:.2f} of batch 16)", flush=True)
    print(f"the default chose {chosen}")
    H.write_json(out, doc)
    print(f"wrote {out}")
    return 0


def removal(args) -> int:
    """masked_ops.experiments.removal_curves on two photos (layer masking and grey, 11 fractions x 5 orders)
    with the experiments' old batch 32 and their default now (None: the explainers' constant, 4 on CPU)."""
    from masked_ops.experiments.removal import removal_curves
    from masked_ops.images import centre_view, load_image
    from masked_ops.models import load_model

    model, info = load_model("efficientnet-lite0")
    model = model.to(memory_format=torch.channels_last)
    images = torch.stack([centre_view(load_image(n), info.input_size) for n in ("chelsea", "coffee")])
    contenders = {f"batch {'default' if b is None else b}": (
        lambda b=b: removal_curves(model, images, ["layer", "grey"], batch_size=b, repeats=5, progress=False,
                                   mean=info.mean, std=info.std)) for b in (32, None)}
    times = {k: [t / 1e3 for t in v] for k, v in H.interleaved(contenders, args.repeats, H.CPU, warmup=1).items()}
    out = H.results_path(args, "removal-batch-size")
    doc = dict(benchmark="removal_batch_size", model="efficientnet-lite0", format="channels_last",
               images=["chelsea", "coffee"], strategies=["layer", "grey"], fractions=11, orders=5,
               repeats=args.repeats, **H.environment(H.CPU), seconds={k: H.stats(v) for k, v in times.items()},
               ratio_to_32={k: H.paired_ratio(v, times["batch 32"]) for k, v in times.items()})
    for k, v in doc["seconds"].items():
        print(f"{k}: {v['median']:.2f} s (x{doc['ratio_to_32'][k]:.2f} of batch 32)", flush=True)
    H.write_json(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
