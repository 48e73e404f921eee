"""Learned masks, end to end on CPU: DiffMask against LIME, extremal perturbations against TorchRay.

    python bench/bench_learned.py                        # both, EfficientNet-Lite0, scikit-image's cat
    python bench/bench_learned.py --only extremal --iterations 100 --repeats 3
    python bench/bench_learned.py --smoke                # tiny settings, seconds: tests the script

1. **DiffMask explanation of one image after fit** (amortised: one forward pass of the CNN with
   hooks, then the gate network) against **LIME with 1,000 samples** on the same image, model and
   memory format, with grey fill and with layer masking (bench_lime.py's set-up: 48 SLIC segments,
   batches of 16). Target: DiffMask >= 100x faster. The explanation's cost does not depend on how
   well the gate network is trained; ``--checkpoint`` loads a fitted one, otherwise a two-step
   fit stands in (the timing is the same).
2. **Extremal perturbation, same iterations and image, area 0.1**: our ``explain_extremal`` with
   soft layer masking and with our blending blur (sigma 20), against TorchRay's
   ``extremal_perturbation`` with its blur pyramid, all on the same model (channels_last, as the
   CLI runs it on CPU). Target: layer masking <= 1.5x TorchRay's time.

Contenders run interleaved (bench/harness.py: repeat r of every contender before repeat r + 1 of any,
the order rotated per round), medians, p25-p75 and min/max of wall time and of process CPU time.
Results: bench/results/cpu-learned-<date>.json, rewritten after every contender so that a cut-short
run keeps its figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402


class _Normalise(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("diffmask", "extremal"), default=None)
    p.add_argument("--samples", type=int, default=1000, help="LIME samples")
    p.add_argument("--iterations", type=int, default=100, help="extremal iterations (every contender)")
    p.add_argument("--lime-repeats", type=int, default=1)
    p.add_argument("--explain-repeats", type=int, default=20, help="DiffMask explanations timed")
    p.add_argument("--checkpoint", default=None, help="a fitted DiffMask checkpoint for EfficientNet-Lite0")
    # --repeats: interleaved rounds of the extremal contenders (LIME: --lime-repeats)
    args = H.script_args(p, argv, repeats=3, smoke=dict(samples=16, iterations=2, repeats=1, lime_repeats=1,
                                                         explain_repeats=2))

    from masked_ops.explain import DiffMask, explain_extremal, explain_lime, get_strategy, segment
    from masked_ops.explain.soft import soft_strategy
    from masked_ops.images import load_image
    from masked_ops.models import load_model

    model, info = load_model("efficientnet-lite0")
    image = info.prepare(load_image("chelsea"))[0]
    out = H.results_path(args, "learned")
    summary = dict(benchmark="learned_masks", model="efficientnet-lite0", image="chelsea (224 x 224)",
                   input_shape=[1, *image.shape], dtype="float32", **H.environment(H.CPU), results={},
                   complete=False)

    def record(section, name, stats):
        summary["results"].setdefault(section, {})[name] = stats
        H.write_json(out, summary)

    def recorder(section, per=1):
        return lambda name, samples: record(section, name, H.seconds(samples, per=per))

    # ------------------------------------------------------------------ 1. DiffMask vs LIME
    if args.only in (None, "diffmask"):
        print("DiffMask explanation vs LIME (channels_last model, as the CLI)", flush=True)
        cl = model.to(memory_format=torch.channels_last)
        if args.checkpoint:
            dm = DiffMask.load(args.checkpoint, cl, strategy=get_strategy("blur", cl))
        else:
            dm = DiffMask(cl, strategy=get_strategy("blur", cl), batch_size=2)
            dm.fit(image[None], epochs=2, progress=False)
        seg = segment(image, "slic", n_segments=50)
        dm.explain(image)  # warm-up
        strategies = {n: get_strategy(n, cl, mean=info.mean, std=info.std) for n in ("grey", "layer")}
        for s in strategies.values():
            explain_lime(s, image, segments=seg, num_samples=16, batch_size=16, progress=False)  # warm-up

        def diffmask_explain():
            for _ in range(args.explain_repeats):
                dm.explain(image)

        many = f"diffmask_explain_x{args.explain_repeats}"
        res = H.interleaved_samples({many: diffmask_explain}, 1, after=recorder("diffmask_vs_lime"))
        one = dict(H.seconds(res[many], per=args.explain_repeats),
                   note=f"{args.explain_repeats} explanations in a row, divided")
        record("diffmask_vs_lime", "diffmask_explain_one", one)
        lime = H.interleaved_samples({f"lime_{n}_{args.samples}": (lambda s=s: explain_lime(
            s, image, segments=seg, num_samples=args.samples, batch_size=16, progress=False))
            for n, s in strategies.items()}, args.lime_repeats, after=recorder("diffmask_vs_lime"))
        lime = {n: H.seconds(v) for n, v in lime.items()}
        summary["diffmask_speedup_vs_lime"] = {n: r["median_s"] / one["median_s"] for n, r in lime.items()}
        summary["diffmask_cpu_speedup_vs_lime"] = {n: r["median_cpu_s"] / one["median_cpu_s"] for n, r in lime.items()}
        summary["segments"] = int(seg.max()) + 1
        H.write_json(out, summary)
        print(json.dumps({k: round(v, 1) for k, v in summary["diffmask_speedup_vs_lime"].items()}),
              "(DiffMask speed-up over LIME, wall)", flush=True)
        dm.close()
        model = model.to(memory_format=torch.contiguous_format)

    # ------------------------------------------------------------------ 2. extremal vs TorchRay
    if args.only in (None, "extremal"):
        print(f"Extremal perturbation, {args.iterations} iterations, area 0.1", flush=True)
        from torchray.attribution.extremal_perturbation import extremal_perturbation

        model = model.to(memory_format=torch.channels_last)  # every contender: oneDNN's fast depthwise convs
        wrapped = nn.Sequential(_Normalise(info.mean, info.std), model).eval()
        with torch.no_grad():
            target = int(wrapped(image[None]).argmax())
        params = list(model.parameters())

        def restore():  # TorchRay switches the parameters' gradients off for good
            for q in params:
                q.requires_grad_(True)

        def torchray():
            extremal_perturbation(wrapped, image[None], target, areas=[0.1], max_iter=args.iterations,
                                  perturbation="blur")
            restore()

        contenders = {"torchray_blur": torchray}
        blur = get_strategy("blur", model, mean=info.mean, std=info.std, blur_sigma=20)
        contenders["ours_blur_sigma20"] = lambda: explain_extremal(blur, image, targets=target, areas=(0.1,),
                                                                   iterations=args.iterations, progress=False)
        try:
            layer = soft_strategy("layer", model, "explain_extremal", mean=info.mean, std=info.std)
            contenders["ours_layer"] = lambda: explain_extremal(layer, image, targets=target, areas=(0.1,),
                                                                iterations=args.iterations, progress=False)
        except ValueError as e:
            summary["results"].setdefault("extremal", {})["ours_layer"] = {"not_run": str(e)}
            print(f"  ours_layer: not run: {e}", flush=True)
        # warm-up: a few iterations each (and the layer conversion)
        extremal_perturbation(wrapped, image[None], target, areas=[0.1], max_iter=2, perturbation="blur")
        restore()
        for s in ([blur, layer] if "ours_layer" in contenders else [blur]):
            explain_extremal(s, image, targets=target, areas=(0.1,), iterations=2, progress=False)
        samples = H.interleaved_samples(contenders, args.repeats, after=recorder("extremal"))
        res = {n: H.seconds(v) for n, v in samples.items()}
        tr = res["torchray_blur"]
        summary["extremal_ratio_to_torchray"] = {n: r["median_s"] / tr["median_s"] for n, r in res.items()}
        summary["extremal_cpu_ratio_to_torchray"] = {n: r["median_cpu_s"] / tr["median_cpu_s"] for n, r in res.items()}
        summary["extremal_paired_ratio_to_torchray"] = {  # medians of per-round ratios
            n: r["torchray_blur"] for n, r in H.ratios({n: [s.wall_s for s in v] for n, v in samples.items()},
                                                       ["torchray_blur"]).items() if r}
        summary["iterations"] = args.iterations
        summary["target"] = target
        print(json.dumps({k: round(v, 2) for k, v in summary["extremal_ratio_to_torchray"].items()}),
              "(ratio to TorchRay, wall)", flush=True)

    summary["complete"] = True
    H.write_json(out, summary)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
