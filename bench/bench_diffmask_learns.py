"""Does DiffMask learn under layer masking? Fit on bundled photos, score on held-out ones.

    python bench/bench_diffmask_learns.py                          # layer and blur, ~15 min on 2 cores
    python bench/bench_diffmask_learns.py --strategies layer --epochs 40
    python bench/bench_diffmask_learns.py --smoke                  # 1 epoch, 2 steps: tests the script

Amortised ``DiffMask(model, strategy=...)`` on the pretrained EfficientNet-Lite0, trained on the bundled
photos other than the held-out ones (augmented views: random resized crops and flips), and the per-image
``explain_diffmask`` on each held-out photo. The issue-23 target: the fit ends with an active Lagrange
multiplier (> 0: the KL constraint binds) and keeps at most 50% of the patches on the held-out photos
while their KL(clean || masked) <= eps. Everything is measured with the deterministic gates (the
explanation a user gets), under the strategy the mask was learned with and under hard layer masking.

Results: bench/results/cpu-diffmask-<date>.json (history per epoch, final figures per strategy).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

HELD_OUT = ("chelsea", "coffee", "astronaut")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", default=["layer", "blur"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--soft", default=None, help="the soft semantics of layer masking (default: masks.DEFAULT_SOFT)")
    p.add_argument("--per-image-steps", type=int, default=300)
    p.add_argument("--budget", default="both", help="what the KL budget constrains (DiffMask BUDGETS: 'both' or "
                                                     "'samples', the budget before 2026-12-07)")
    p.add_argument("--last", action="store_true", help="per image, report the last iterate (explain_diffmask "
                                                       "keep_best=False, the behaviour before keep_best existed)")
    p.add_argument("--skip-amortised", action="store_true", help="only the per-image variant")
    args = H.script_args(p, argv, smoke=dict(strategies=["layer"], epochs=1, per_image_steps=2))

    import masked_ops
    from masked_ops.images import BUNDLED, centre_view, load_image
    from masked_ops.explain import DiffMask, explain_diffmask, get_strategy
    from masked_ops.explain.hard_concrete import deterministic_gate, gates_to_mask, kl_divergence

    model, info = H.lite0()
    train = [load_image(n) for n in BUNDLED if n not in HELD_OUT]
    held = torch.stack([centre_view(load_image(n), 224) for n in HELD_OUT])
    out = H.results_path(args, "diffmask")
    summary = dict(benchmark="diffmask_learns", model="efficientnet-lite0", train_photos=len(train),
                   held_out=list(HELD_OUT), epochs=args.epochs, batch_size=args.batch_size, eps=args.eps,
                   soft_semantics=args.soft or masked_ops.masks.DEFAULT_SOFT, budget=args.budget,
                   input_shape=[1, *held.shape[1:]],
                   dtype="float32", **H.environment(H.CPU), results={})
    hard_layer = get_strategy("layer", model, mean=info.mean, std=info.std)

    def hard_kl(mask):
        with torch.no_grad():
            clean = hard_layer(held, torch.ones(len(held), 1, 224, 224, dtype=torch.bool))
            return kl_divergence(clean, hard_layer(held, mask >= 0.5)).tolist()

    for name in args.strategies:
        res = summary["results"].setdefault(name, {})
        strat = name if name != "layer" or args.soft is None else \
            get_strategy("layer", model, mean=info.mean, std=info.std, soft=args.soft)
        dm = DiffMask(model, strategy=strat, batch_size=args.batch_size, eps=args.eps, mean=info.mean, std=info.std,
                      budget=args.budget)
        if not args.skip_amortised:
            fit = H.measure(lambda: dm.fit(train, epochs=args.epochs, val_images=held, progress=False,
                                           callback=lambda r: None))
            hist = fit.result
            res["fit_seconds"], res["fit_cpu_seconds"] = fit.wall_s, fit.cpu_s
            res["steps"] = dm.step
            res["history"] = hist
            v = dm.evaluate(held)
            with torch.no_grad():
                _, gl = dm.gate_logits(held)
                gates = deterministic_gate(gl)
                kept_gates = (gates >= 0.5).float().mean(dim=(1, 2, 3)).tolist()
                cal = dm.explain(held, calibrate=True)
            res["amortised"] = dict(val_kl=v["kl"], val_kept_open_probability=v["kept"], lagrange=float(dm.lagrange),
                                    kept_fraction=kept_gates, hard_layer_kl=hard_kl(gates_to_mask(gates, dm.patch)),
                                    calibrated_kept=[e.info["calibrated"]["kept"] for e in cal],
                                    calibrated_kl=[e.info["calibrated"]["kl"] for e in cal],
                                    calibrated_hard_layer_kl=hard_kl(torch.stack([e.info["calibrated"]["mask"][None]
                                                                                  for e in cal]).float()))
            H.write_json(out, summary)
            print(f"{name}: fit {dm.step} steps {res['fit_seconds']:.0f} s: val KL {v['kl']:.3f}, kept "
                  f"{v['kept']:.2f}, lambda {float(dm.lagrange):.2f}, kept patches {kept_gates}; calibrated: kept "
                  f"{res['amortised']['calibrated_kept']}, KL {res['amortised']['calibrated_kl']}", flush=True)
        per = []
        s = dm.strategy
        for i, photo in enumerate(HELD_OUT):
            run = H.measure(lambda: explain_diffmask(s, held[i], steps=args.per_image_steps, eps=args.eps,
                                                     budget=args.budget, keep_best=not args.last,
                                                     calibrate=True, progress=False))
            e = run.result
            kept = float((deterministic_gate(e.info["log_alpha"]) >= 0.5).float().mean())
            c = e.info["calibrated"]
            per.append(dict(photo=photo, kl=e.info["kl"], kept_open_probability=e.info["kept"], kept_fraction=kept,
                            step=e.info["step"], last_kl=e.info["last_kl"], last_kept=e.info["last_kept"],
                            calibrated_kept=c["kept"], calibrated_kl=c["kl"],
                            lagrange=e.info["lagrange"], seconds=run.wall_s, cpu_seconds=run.cpu_s))
            print(f"  per-image {photo}: KL {e.info['kl']:.3f} kept {kept:.2f} (step {e.info['step']}; last: KL "
                  f"{e.info['last_kl']:.3f}) lambda {e.info['lagrange']:.2f}; calibrated: kept {c['kept']:.2f} "
                  f"KL {c['kl']:.3f}", flush=True)
        res["per_image"] = per
        H.write_json(out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
