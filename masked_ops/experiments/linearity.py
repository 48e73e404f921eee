"""Experiment 4: linearity. Are the features of a union of disjoint visible patches the sum of the
features of each patch alone?

For every image and repeat, ``groups`` disjoint random sets of 16 x 16 patches (each
``group_fraction`` of the image) are drawn. With F(mask) the model's logits under a strategy and
F0 = F(nothing visible), the centred features are G(mask) = F(mask) - F0 (the baseline of a
perturbation explanation). Reported per strategy:

- ``cosine``: cos(G(union), sum_k G(patch_k)): 1 when the union is (a positive multiple of)
  the sum, whatever the scale;
- ``rel_err``: ||G(union) - sum_k G(patch_k)|| / ||G(union)||: 0 for an exactly additive model;
- ``rel_err_raw``: the same without centring (F instead of G).

A linear model is exactly additive under fills that are affine in the mask (black, grey). Note
that layer masking averages over the visible area in the global pool, so its union behaves
like the *mean* of the patches rather than their sum: its cosine is the fair comparison, and its
rel_err is expected near (groups - 1) even for a perfectly "linear" network.

Unit of work: one strategy on one image (all repeats).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from . import masks as M
from .common import DEFAULT_STRATEGIES, StrategySpec, base_config, check_images
from .metrics import cosine, mean_se, relative_error
from .removal import _subject
from ..runs.store import Run


def linearity_masks(index: int, size, *, patch: int, groups: int, group_fraction: float, repeats: int,
                    seed: int) -> torch.Tensor:
    """repeats x (groups + 2) masks: [nothing visible, patch group 1..K visible, union visible]."""
    gh, gw = M.patch_grid(size, patch)
    n = gh * gw
    per = max(1, int(round(group_fraction * n)))
    if per * groups > n:
        raise ValueError(f"groups * group_fraction must be <= 1, got {groups} x {group_fraction}")
    g = M.generator(seed, index, 5)
    rows = []
    for _ in range(repeats):
        order = torch.randperm(n, generator=g)
        visible = torch.zeros(groups + 2, n, dtype=torch.bool)
        for k in range(groups):
            visible[1 + k, order[k * per:(k + 1) * per]] = True
        visible[-1] = visible[1:-1].any(0)
        rows.append(M.patches_to_mask(~visible, size, patch))
    return torch.stack(rows)


def linearity_scores(feats: torch.Tensor) -> dict:
    """feats: R x (K + 2) x D logits in linearity_masks' order -> per-repeat scores."""
    empty, parts, union = feats[:, 0], feats[:, 1:-1], feats[:, -1]
    g_union = union - empty
    g_sum = (parts - empty[:, None]).sum(1)
    return {"cosine": cosine(g_union, g_sum).numpy(), "rel_err": relative_error(g_union, g_sum).numpy(),
            "rel_err_raw": relative_error(union, parts.sum(1)).numpy()}


def linearity(model, images: torch.Tensor, strategies: StrategySpec = DEFAULT_STRATEGIES, *, groups: int = 4,
              group_fraction: float = 0.125, repeats: int = 4, patch: int = 16, seed: int = 0, mean=None,
              std=None, batch_size: Optional[int] = None, out=None, fresh: bool = False, progress: bool = True,
              image_names: Optional[Sequence[str]] = None) -> dict:
    """Run the linearity experiment; returns (and with ``out`` writes) the results dict."""
    images = check_images(images)
    if not isinstance(groups, int) or groups < 2:
        raise ValueError(f"groups must be an int >= 2, got {groups!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    size = tuple(images.shape[-2:])
    M.patch_grid(size, patch)
    subject = _subject(model, strategies, mean, std, batch_size, seed)
    config = base_config("linearity", subject, images, seed, groups=groups, group_fraction=group_fraction,
                         repeats=repeats, patch=patch)
    run = Run(out, "linearity", config, fresh=fresh, progress=progress)
    n = images.shape[0]

    def compute(key):
        name, i = key.rsplit("--", 1)
        masks = linearity_masks(int(i), size, patch=patch, groups=groups, group_fraction=group_fraction,
                                repeats=repeats, seed=seed)
        feats = subject.predict(name, images[int(i)], masks.flatten(0, 1)).view(repeats, groups + 2, -1)
        return linearity_scores(feats)

    keys = [f"{s}--{i:04d}" for s in subject.names for i in range(n)]
    units = run.map(keys, compute, desc="linearity")
    results = {"experiment": "linearity", "groups": groups, "group_fraction": group_fraction, "repeats": repeats,
               "n_images": n, "strategies": {}}
    for s in subject.names:
        row = {}
        for metric in ("cosine", "rel_err", "rel_err_raw"):
            per_image = np.array([units[f"{s}--{i:04d}"][metric].mean() for i in range(n)])
            m, se = mean_se(per_image)
            row[metric], row[f"{metric}_se"] = float(m), float(se)
        results["strategies"][s] = row
    return run.finish(results, config, image_names)
