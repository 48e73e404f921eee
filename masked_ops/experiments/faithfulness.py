"""Experiment 3: LIME faithfulness under every masking strategy.

For every image: one segmentation (SLIC) and one set of binary LIME samples, shared by all
strategies. For each *explaining* strategy E, LIME (LIME's kernel on cosine distance, weighted
ridge) gives a weight per segment for the clean class. Each explanation is then scored under
each *evaluating* strategy V, on the same segments:

- deletion curve: remove the segments in decreasing weight order (0%, 10%, ..., 100% of them)
  and track the clean class's probability under V; lower area = more faithful;
- insertion curve: start from everything removed and reveal the segments in the same order;
  higher area = more faithful;
- least-relevant-first (LeRF) curve: remove the segments in *increasing* weight order; with the
  deletion curve (most relevant first, MoRF) it gives SRG = AUC(LeRF) - AUC(MoRF) (Bluecher et
  al. 2024, masked_ops.experiments.road), higher = more faithful. Both are tracked as the clean
  class's probability and as ROAD's accuracy (here: top-1 agreement with the clean prediction).

A random segment order ("random", seeded per image) is scored the same way as a floor. The
E x V matrices say whether an explanation is only good when judged by the strategy that made it.

Unit of work: one image under one explaining strategy (LIME samples plus every V's curves).
"segment-mean" (lime's own fill) uses each image's SLIC segments as its segments.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from . import masks as M
from .common import DEFAULT_STRATEGIES, StrategySpec, base_config, check_images
from .metrics import auc, bootstrap_ci, group_means, mean_se
from .road import srg
from .removal import _subject
from ..runs.store import Run
from ..explain.strategies import strategies_for

STEPS = tuple(round(0.1 * i, 1) for i in range(11))
KERNEL_WIDTH = 0.25  # lime.lime_image.LimeImageExplainer's default


def segment(image: torch.Tensor, n_segments: int) -> torch.Tensor:
    """H x W int64 segment ids 0..S-1 (SLIC on the image, as LIME's usual set-up)."""
    from skimage.segmentation import slic

    arr = image.permute(1, 2, 0).double().numpy()
    seg = slic(arr, n_segments=n_segments, compactness=10, start_label=0, channel_axis=-1)
    _, seg = np.unique(seg, return_inverse=True)  # consecutive ids
    return torch.from_numpy(seg.reshape(arr.shape[:2]).astype(np.int64))


def segment_masks(segments: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """B x S bool (True = segment visible) -> B x 1 x H x W float masks, by indexing the segment map."""
    return keep[:, segments].float()[:, None]


def lime_samples(n_segments: int, n_samples: int, g: torch.Generator) -> torch.Tensor:
    """n_samples x S bool; row 0 keeps everything (LIME's convention), the rest are fair coin flips."""
    z = torch.rand(n_samples, n_segments, generator=g) < 0.5
    z[0] = True
    return z


def lime_weights(z: torch.Tensor, y: torch.Tensor, kernel_width: float = KERNEL_WIDTH,
                 alpha: float = 1.0) -> torch.Tensor:
    """LIME's segment weights: ridge(alpha) of y on z, weighted by sqrt(exp(-d^2 / width^2)), d the
    cosine distance of each sample to the all-visible one (as lime_image + lime_base, all features)."""
    x = z.double()
    y = y.double()
    ones = torch.ones(x.shape[1], dtype=torch.float64)
    cos = (x @ ones) / (x.norm(dim=1) * ones.norm()).clamp_min(1e-12)
    d = 1.0 - cos
    w = torch.sqrt(torch.exp(-(d ** 2) / kernel_width ** 2))
    sw = w / w.sum()
    xm, ym = (sw[:, None] * x).sum(0), (sw * y).sum()
    xc, yc = x - xm, y - ym
    a = xc.T @ (w[:, None] * xc) + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(a, xc.T @ (w * yc))


def curve_masks(order: torch.Tensor, steps: Sequence[float]) -> tuple:
    """(deletion, insertion) visibility per step, each len(steps) x S bool, for a segment ranking:
    the first round(t * S) segments removed, or the only ones shown."""
    first = M.ranked_first(order, steps)
    return ~first, first


def lime_faithfulness(model, images: torch.Tensor, strategies: StrategySpec = DEFAULT_STRATEGIES, *,
                      evaluators: Optional[Sequence[str]] = None, samples: int = 200, n_segments: int = 50, steps: Sequence[float] = STEPS, seed: int = 0,
                      mean=None, std=None, batch_size: Optional[int] = None, out=None, fresh: bool = False,
                      progress: bool = True, image_names: Optional[Sequence[str]] = None) -> dict:
    """Run the LIME faithfulness experiment; returns (and with ``out`` writes) the results dict.

    ``strategies`` explain; ``evaluators`` (names, default: the same strategies) score. With a
    mapping of predictors as ``strategies``, evaluators must be keys of it.
    """
    images = check_images(images)
    if not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an int >= 2, got {samples!r}")
    if isinstance(strategies, str):
        strategies = [strategies]
    if strategies is DEFAULT_STRATEGIES:  # every strategy the model takes (a ViT: no CNN-only layer modes)
        strategies = strategies_for(model, strategies)
    explain_names = list(strategies)
    evaluators = list(evaluators) if evaluators is not None else explain_names
    if not isinstance(strategies, Mapping):
        strategies = explain_names + [v for v in evaluators if v not in explain_names]
    subject = _subject(model, strategies, mean, std, batch_size, seed)
    missing = [v for v in evaluators if v not in subject.strategies]
    if missing:
        raise ValueError(f"evaluators {missing} are not among the strategies {subject.names}")
    steps = [float(t) for t in steps]
    if len(steps) < 2:
        raise ValueError(f"steps: need at least 2 points on the curves, got {steps}")
    config = base_config("faithfulness", subject, images, seed, samples=samples, n_segments=n_segments,
                         steps=steps, explainers=explain_names, evaluators=evaluators,
                         curves=["deletion", "insertion", "lerf"])
    run = Run(out, "faithfulness", config, fresh=fresh, progress=progress)
    n = images.shape[0]

    def prepare(_):
        clean = subject.clean_logits(images)
        segs = torch.stack([segment(images[i], n_segments) for i in range(n)])
        for i in range(n):
            if int(segs[i].max()) < 1:
                name = image_names[i] if image_names is not None else f"#{i}"
                raise ValueError(f"image {name}: SLIC found a single segment; LIME needs at least 2 "
                                 f"(use a larger n_segments or a less uniform image)")
        return {"clean": clean.numpy(), "segments": segs.numpy()}

    base = run.map(["segments"], prepare, desc="faithfulness: segments")["segments"]
    clean_cls = torch.from_numpy(base["clean"]).argmax(-1)
    segs = torch.from_numpy(base["segments"])
    explainers = explain_names + ["random"]

    def outputs(name, i, keep):
        """(clean class probability, top-1 agreement with the clean class) per row of ``keep``."""
        fn = subject.strategies[name]
        if getattr(fn, "name", None) == "segment-mean":
            fn.segments = segs[i]  # lime's hide_color=None: the superpixels themselves
        # Curves share masks (the LeRF curve passes through the insertion curve's masks; all curves start
        # or end at everything visible / removed): predict each distinct mask once.
        uniq, inverse = torch.unique(keep, dim=0, return_inverse=True)
        logits = subject.predict(name, images[i], segment_masks(segs[i], uniq)).double()[inverse]
        c = int(clean_cls[i])
        return logits.softmax(-1)[:, c], (logits.argmax(-1) == c).double()

    def prob(name, i, keep):
        return outputs(name, i, keep)[0]

    def compute(key):
        e, i = key.rsplit("--", 1)
        i = int(i)
        n_seg = int(segs[i].max()) + 1
        if e == "random":
            weights = torch.rand(n_seg, generator=M.generator(seed, i, 13)).double()
        else:
            z = lime_samples(n_seg, samples, M.generator(seed, i, 11))
            weights = lime_weights(z, prob(e, i, z))
        order = torch.argsort(weights, descending=True, stable=True)
        deletion, insertion = curve_masks(order, steps)
        lerf, _ = curve_masks(order.flip(0), steps)
        res = {"weights": weights.numpy()}
        k = len(steps)
        for v in evaluators:
            p, agree = outputs(v, i, torch.cat([deletion, insertion, lerf]))
            res[f"del_{v}"], res[f"ins_{v}"], res[f"lerf_{v}"] = p[:k].numpy(), p[k:2 * k].numpy(), p[2 * k:].numpy()
            res[f"dela_{v}"], res[f"lerfa_{v}"] = agree[:k].numpy(), agree[2 * k:].numpy()
        return res

    keys = [f"{e}--{i:04d}" for e in explainers for i in range(n)]
    units = run.map(keys, compute, desc="faithfulness")
    results = {"experiment": "faithfulness", "explainers": explainers, "evaluators": evaluators,
               "steps": steps, "n_images": n, "samples": samples,
               "n_segments_mean": float(np.mean([int(s.max()) + 1 for s in segs])),
               "deletion_auc": {}, "insertion_auc": {}, "deletion_auc_se": {}, "insertion_auc_se": {},
               "deletion_curve": {}, "insertion_curve": {}, "lerf_auc": {}, "lerf_auc_se": {}, "lerf_curve": {},
               "road_morf_auc": {}, "road_morf_auc_se": {}, "road_lerf_auc": {}, "road_lerf_auc_se": {},
               "srg": {}, "srg_se": {}, "srg_ci95": {}, "road_srg": {}, "road_srg_se": {}}
    groups = [str(nm).split(":")[0] for nm in image_names] if image_names is not None else None
    for e in explainers:
        u = [units[f"{e}--{i:04d}"] for i in range(n)]
        for kind, short in (("deletion", "del"), ("insertion", "ins"), ("lerf", "lerf"), ("road_morf", "dela"),
                            ("road_lerf", "lerfa")):
            aucs = np.array([[auc(u[i][f"{short}_{v}"], steps) for v in evaluators] for i in range(n)])  # N x V
            m, se = mean_se(aucs)
            results[f"{kind}_auc"][e] = dict(zip(evaluators, m.tolist()))
            results[f"{kind}_auc_se"][e] = dict(zip(evaluators, se.tolist()))
            if kind in ("deletion", "insertion", "lerf"):
                results[f"{kind}_curve"][e] = {v: np.mean([x[f"{short}_{v}"] for x in u], axis=0).tolist()
                                               for v in evaluators}
        for key, (hi, lo) in (("srg", ("lerf", "del")), ("road_srg", ("lerfa", "dela"))):
            vals = np.array([[srg(u[i][f"{hi}_{v}"], u[i][f"{lo}_{v}"], steps) for v in evaluators]
                             for i in range(n)])
            m, se = mean_se(vals)
            results[key][e] = dict(zip(evaluators, m.tolist()))
            results[f"{key}_se"][e] = dict(zip(evaluators, se.tolist()))
            if key == "srg":
                results["srg_ci95"][e] = {v: list(bootstrap_ci(group_means(vals[:, j], groups), seed=seed))
                                          for j, v in enumerate(evaluators)}
    return run.finish(results, config, image_names)
