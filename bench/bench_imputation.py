"""noisy-linear (masked_ops, torch) against ROAD's algorithm as Quantus runs it (scipy spsolve per image).

    python bench/bench_imputation.py                 # 224 px photos, 50% and 90% of 16x16 patches removed
    python bench/bench_imputation.py --repeats 7 --threads 1
    python bench/bench_imputation.py --smoke         # 1 photo, 1 round, seconds: tests the script

Contenders, on the same images and masks, noise 0 (the solve only; the noise is one randn):
- ``quantus``: ``quantus.functions.perturb_func.noisy_linear_imputation`` (road_evaluation's sparse
  system built with scipy's lil_matrix, solved by ``spsolve``), one image at a time;
- ``ours-1``: ``masked_ops.explain.imputation.linear_imputation``, one image per call (on CPU: the
  fused kernel ``masked_ops::imputation_solve``);
- ``ours-batch``: the same, all images in one call;
- ``ours-torch``: the torch solver (what CUDA tensors use), all images in one call (backend "torch").
Interleaved over --repeats rounds (bench/harness.py); per contender the median, p25-p75, min and max
of wall and process-CPU time per image; speed-ups are quantus / ours, measured in the same run (of the
medians, and ``paired``: the median of per-round ratios). The largest absolute difference between
ours and Quantus is recorded too (target: <= 1e-4). OpenCV inpainting (Telea, Navier-Stokes) is
timed alongside for scale. Target on this CPU: ours >= 10x faster than quantus per image at 50%.
Results go to bench/results/cpu-imputation-<date>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402  (also puts this checkout's package first on sys.path)


def masks_for(n: int, size: int, patch: int, frac: float, seed: int) -> torch.Tensor:
    from masked_ops.experiments import masks as M

    g = torch.Generator().manual_seed(seed)
    cells = (size // patch) ** 2
    return torch.cat([M.removal_masks((size, size), patch, [frac], torch.randperm(cells, generator=g))
                      for _ in range(n)]) > 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=6, help="bundled photos (224 px)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.9])
    # --threads 1 by default: scipy's spsolve is single-threaded
    args = H.script_args(p, argv, threads=1, repeats=5, smoke=dict(images=1, fractions=[0.5], repeats=1))
    from quantus.functions.perturb_func import noisy_linear_imputation as quantus_nli

    import masked_ops as mo
    from masked_ops.experiments.images import image_set
    from masked_ops.explain.imputation import linear_imputation
    from masked_ops.explain.inpainting import inpaint

    names = ["chelsea", "coffee", "astronaut", "rocket", "motorcycle", "china", "flower", "grace_hopper"]
    images, _ = image_set(names[:args.images], 224)
    n = images.shape[0]
    out = H.results_path(args, "imputation")
    results = dict(**H.environment(H.CPU), images=n, shape=[1, 3, 224, 224],
                   dtype="float32 images; ours (fused CPU kernel) solves in float64, ours-torch in float64 (CG) "
                         "with a float32 multigrid preconditioner, Quantus in float64",
                   patch=16, repeats=args.repeats, configs={})
    for frac in args.fractions:
        masks = masks_for(n, 224, 16, frac, seed=int(frac * 100))
        x64 = [images[i].double().numpy() for i in range(n)]
        idx = [np.flatnonzero(~masks[i, 0].numpy().ravel()) for i in range(n)]

        def quantus():
            return [quantus_nli(x64[i], idx[i], noise=0.0) for i in range(n)]

        def ours_1():
            return [linear_imputation(images[i:i + 1], masks[i:i + 1]) for i in range(n)]

        def ours_batch():
            return linear_imputation(images, masks)

        def ours_torch():
            with mo.set_backend("torch"):
                return linear_imputation(images, masks)

        def telea():
            return inpaint(images, masks, "telea", workers=1)

        def ns():
            return inpaint(images, masks, "ns", workers=1)

        contenders = {"quantus": quantus, "ours-1": ours_1, "ours-batch": ours_batch, "ours-torch": ours_torch,
                      "inpaint-telea": telea, "inpaint-ns": ns}
        samples = H.interleaved_samples(contenders, args.repeats, verbose=False)
        outputs = {k: v[-1].result for k, v in samples.items()}
        ref = np.stack([o.reshape(3, 224, 224) for o in outputs["quantus"]])
        err1 = float(np.abs(torch.cat(outputs["ours-1"]).double().numpy() - ref).max())
        errb = float(np.abs(outputs["ours-batch"].double().numpy() - ref).max())
        errt = float(np.abs(outputs["ours-torch"].double().numpy() - ref).max())
        per_image = {k: H.seconds(v, per=n) for k, v in samples.items()}
        walls = {k: [s.wall_s for s in v] for k, v in samples.items()}
        cpus = {k: [s.cpu_s for s in v] for k, v in samples.items()}
        paired_wall, paired_cpu = H.ratios(walls, ["quantus"]), H.ratios(cpus, ["quantus"])
        q = per_image["quantus"]
        ours = ("ours-1", "ours-batch", "ours-torch")
        cfg = {"fraction_removed": frac,
               "max_abs_diff_vs_quantus": {"ours-1": err1, "ours-batch": errb, "ours-torch": errt},
               "per_image_s": per_image,
               "speedup_vs_quantus": {k: {"wall": q["median_s"] / per_image[k]["median_s"],
                                          "cpu": q["median_cpu_s"] / per_image[k]["median_cpu_s"],
                                          "paired_wall": 1 / paired_wall[k]["quantus"],
                                          "paired_cpu": 1 / paired_cpu[k]["quantus"]} for k in ours}}
        results["configs"][f"{int(round(frac * 100))}%"] = cfg
        H.write_json(out, results, indent=1)
        print(f"{frac:.0%} removed: per image quantus {q['median_s'] * 1e3:.0f} ms, "
              f"ours-1 {per_image['ours-1']['median_s'] * 1e3:.0f} ms, "
              f"ours-batch {per_image['ours-batch']['median_s'] * 1e3:.0f} ms; speed-up (wall/cpu) "
              + ", ".join(f"{k} {v['wall']:.1f}x/{v['cpu']:.1f}x" for k, v in cfg["speedup_vs_quantus"].items())
              + f"; max |ours - quantus| {max(err1, errb, errt):.1e}", flush=True)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
