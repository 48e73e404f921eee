"""Which soft semantics makes learned masks faithful? Extremal perturbations scored by deletion curves.

    python bench/bench_soft_semantics.py                       # the 11 bundled photos, ~25 min on 2 cores
    python bench/bench_soft_semantics.py --photos chelsea --iterations 100
    python bench/bench_soft_semantics.py --smoke               # 1 photo, 2 steps: tests the script

For each photo and each soft semantics of layer masking (masks.SOFT_SEMANTICS: "blend", "threshold",
"sample"), and for the blur fill as the pixel-space reference, run ``explain_extremal`` (preserve, area
0.1, 300 steps, seed 0: the set-up of issue 23) on the pretrained EfficientNet-Lite0, then rank the
16 x 16 patches by the mask's mean value (most important first, ties broken at random) and remove them
in that order in 15 steps (fractions 0, 1/14, ..., 1). Each curve is scored by its mean probability of
the clean top-1 class (the deletion AUC; lower = the ranking found the evidence sooner) under three
evaluators: hard layer masking (the one that matters for layer masking), grey and blur. The same for
``--random`` random orders per photo, averaged: the baseline a useful ranking must beat.

Results: bench/results/cpu-soft-semantics-<date>.json, written after every (photo, method) pair; a run
started again with the same --out skips the pairs it already has (it is long).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "motorcycle", "china", "flower", "grace_hopper")  # experiments.images.BUNDLED
METHODS = ("layer-blend", "layer-threshold", "layer-sample", "blur")
EVALUATORS = ("layer", "grey", "blur")
PATCH, STEPS = 16, 15


def deletion_scores(evaluators, image, order, target):
    """{evaluator: mean p(target) over the deletion curve} of one patch order."""
    from masked_ops.experiments.masks import removal_masks

    fractions = [i / (STEPS - 1) for i in range(STEPS)]
    masks = removal_masks(tuple(image.shape[-2:]), PATCH, fractions, order)
    images = image[None].expand(len(fractions), -1, -1, -1)
    out = {}
    with torch.no_grad():
        for name, s in evaluators.items():
            p = s(images, masks > 0).float().softmax(1)[:, target]
            out[name] = float(p.mean())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", nargs="+", default=list(PHOTOS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--area", type=float, default=0.1)
    p.add_argument("--random", type=int, default=10, help="random orders per photo")
    p.add_argument("--variant", default="preserve", choices=("preserve", "delete", "dual"),
                   help="explain_extremal's variant (issue 23's set-up: preserve)")
    p.add_argument("--reward", default="simple", choices=("simple", "contrastive"))
    args = H.script_args(p, argv, smoke=dict(photos=["chelsea"], methods=["layer-blend", "blur"], iterations=2,
                                             random=1))

    from masked_ops.experiments.learned_faithfulness import cell_order
    from masked_ops.experiments.masks import generator
    from masked_ops.explain import explain_extremal, get_strategy
    from masked_ops.images import load_image

    model, info = H.lite0()
    out = H.results_path(args, "soft-semantics")
    summary = dict(benchmark="soft_semantics", model="efficientnet-lite0", patch=PATCH, steps=STEPS,
                   iterations=args.iterations, area=args.area, random_orders=args.random,
                   variant=args.variant, reward=args.reward,
                   input_shape=[1, 3, 224, 224], dtype="float32", **H.environment(H.CPU), results={})
    if os.path.exists(out):
        with open(out) as f:
            summary["results"] = json.load(f).get("results", {})
    evaluators = {"layer": get_strategy("layer", model, mean=info.mean, std=info.std),
                  "grey": get_strategy("grey", model, mean=info.mean, std=info.std),
                  "blur": get_strategy("blur", model, mean=info.mean, std=info.std)}
    for i, photo in enumerate(args.photos):
        image = info.prepare(load_image(photo))[0]
        with torch.no_grad():
            target = int(evaluators["layer"](image[None], torch.ones(1, 1, *image.shape[-2:], dtype=torch.bool))
                         .argmax())
        res = summary["results"].setdefault(photo, {"target": target})
        if "random" not in res:
            g = generator(0, i)
            n = (image.shape[1] // PATCH) * (image.shape[2] // PATCH)
            runs = [deletion_scores(evaluators, image, torch.randperm(n, generator=g), target)
                    for _ in range(args.random)]
            res["random"] = {e: sum(r[e] for r in runs) / len(runs) for e in EVALUATORS}
            res["random_each"] = runs
            H.write_json(out, summary)
        for method in args.methods:
            if method in res:
                continue
            if method.startswith("layer-"):
                s = get_strategy("layer", model, mean=info.mean, std=info.std, soft=method[len("layer-"):])
            else:
                s = get_strategy(method, model, mean=info.mean, std=info.std)
            run = H.measure(lambda: explain_extremal(s, image, targets=target, areas=(args.area,),
                                                     variant=args.variant, reward=args.reward,
                                                     iterations=args.iterations, seed=0, progress=False))
            exp, wall = run.result, run.wall_s
            heat = exp.maps[0] if hasattr(exp, "maps") else exp.heatmap()
            order = cell_order(torch.as_tensor(heat).reshape(image.shape[-2:]), PATCH, generator(1, i))
            scores = deletion_scores(evaluators, image, order, target)
            res[method] = dict(scores, seconds=wall, cpu_seconds=run.cpu_s,
                               ratio_to_random={e: scores[e] / res["random"][e] for e in EVALUATORS},
                               area=exp.info["per_target"][0]["area"][0])
            H.write_json(out, summary)
            print(f"{photo:<10} {method:<16} " + "  ".join(f"{e} {scores[e]:.3f} ({scores[e] / res['random'][e]:.2f}x)"
                                                          for e in EVALUATORS) + f"  {wall:.0f} s", flush=True)
    # means over photos of the ratio to random
    table = {}
    for method in args.methods:
        rows = [r[method]["ratio_to_random"] for r in summary["results"].values() if method in r]
        if rows:
            table[method] = {e: sum(r[e] for r in rows) / len(rows) for e in EVALUATORS}
    summary["mean_ratio_to_random"] = table
    H.write_json(out, summary)
    print(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
