"""Vision transformers behind layer masking by token dropping (masked_ops/vit.py, issue 26): the plain forward
against the token-dropped forward with half the patches removed, both drop implementations.

    python bench/bench_vit.py                 # CPU, eager, ViT-S/16 and ViT-B/16 at 224 px, batch 8
    python bench/bench_vit.py --threads 1 --clock process   # this process's CPU time: on a loaded host
    python bench/bench_vit.py --smoke         # ViT-Ti/16, batch 2, one round: tests the script

Random weights (timm.create_model(name, pretrained=False)), float32, inference mode. Masks are
patch-aligned (16 x 16 patches, so "all" and "any" agree) and random, two kinds:
- ``exact``: exactly half of each image's 196 patches removed (a fixed removal fraction, as occlusion or
  deletion curves make): every sample keeps the same number of tokens, so "gather" needs no mask;
- ``bernoulli``: each patch removed with probability 1/2 (LIME's samples): counts differ per sample, so
  "gather" pads to the batch's largest count and masks the padding keys.
Contenders, interleaved (bench/harness.py): ``plain`` (the model itself), ``gather-<masks>`` and
``attention-<masks>`` (TokenMasked with drop="gather" / "attention"). Per contender the milliseconds per
forward (median, p25-p75, min, max); ratios are medians of per-round ratios to ``plain``.
Results: bench/results/cpu-vit-<date>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402  (also puts this checkout's package first on sys.path)


def patch_masks(n: int, grid: int, patch: int, kind: str, seed: int) -> torch.Tensor:
    """N x 1 x H x W bool, patch-aligned, about half the patches removed (``kind``: "exact" or "bernoulli")."""
    g = torch.Generator().manual_seed(seed)
    cells = grid * grid
    if kind == "exact":
        keep = torch.zeros(n, cells, dtype=torch.bool)
        for i in range(n):
            keep[i, torch.randperm(cells, generator=g)[: cells - cells // 2]] = True
    else:
        keep = torch.rand(n, cells, generator=g) >= 0.5
    keep = keep.reshape(n, 1, grid, grid)
    return keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--masks", default="exact,bernoulli")
    p.add_argument("--budget", type=float, default=100.0, help="seconds of rounds per model (at least 2 rounds)")
    args = H.script_args(p, argv, repeats=7, clock=True, smoke=dict(models="vit_tiny_patch16_224", batch=2, repeats=1,
                                                        budget=5.0))
    import timm

    from masked_ops.vit import token_mask

    out = H.results_path(args, "vit")
    results = []
    doc = dict(benchmark="vit", models=args.models.split(","), masks=args.masks.split(","), batch=args.batch,
               dtype="float32", mode="eager", repeats=args.repeats,
               removed="half of the 16 x 16 patches", **H.environment(H.CPU), results=results)
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        size = model.patch_embed.img_size
        patch = model.patch_embed.patch_size[0]
        grid = size[0] // patch
        x = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(1))
        contenders = {"plain": lambda: model(x)}
        kept = {}
        for kind in args.masks.split(","):
            mask = patch_masks(args.batch, grid, patch, kind, seed=2)
            kept[kind] = mask[:, 0, ::patch, ::patch].reshape(args.batch, -1).sum(1).tolist()
            for drop in ("gather", "attention"):
                tm = token_mask(model, drop=drop)
                contenders[f"{drop}-{kind}"] = (lambda f=tm, m=mask: f(x, m))
        with torch.inference_mode():
            times = H.interleaved(contenders, args.repeats, H.CPU, warmup=1, budget_s=args.budget)
        row = dict(model=name, shape=[args.batch, 3, *size], patches=grid * grid, kept_patches=kept,
                   ms={k: H.stats(v, digits=2) for k, v in times.items()},
                   ratio_to_plain={k: v["plain"] for k, v in H.ratios(times, ["plain"]).items() if "plain" in v})
        results.append(row)
        H.write_json(out, doc)
        print(f"{name} (batch {args.batch}, {len(times['plain'])} rounds): "
              f"plain {row['ms']['plain']['median']:.1f} ms; "
              + ", ".join(f"{k} {row['ms'][k]['median']:.1f} ms ({r:.3f}x)" for k, r in row["ratio_to_plain"].items()),
              flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
