"""Experiment 1: removal curves (the paper's random patch removal).

For every image, ``repeats`` random orders of its 16 x 16 patches; at each fraction f in
0, 0.1, ..., 1 the first round(f * P) patches of an order are removed (nested masks), and every
strategy predicts on the very same masks. Metrics per strategy and fraction:

- ``agreement``: top-1 agreement with the clean prediction (the paper's top-1 accuracy, with the
  clean prediction standing in for the label: the bundled photos have none);
- ``kl``: KL(p_clean || p_masked) in nats;
- ``entropy_bits``: entropy of the histogram of predicted classes over all images and orders
  (a collapse onto one class, e.g. grey fill's "maze", drives it towards 0);
- ``top_class``/``top_share``: the most frequent prediction and its share;
- ``mean_agreement``: agreement averaged over the fractions (the paper's summary number), with a
  bootstrap confidence interval over images.
- with ``labels`` (an image folder in ImageFolder layout): ``accuracy`` per fraction and
  ``mean_accuracy`` (top-1 equal to the label: the paper's own measure), over the images that have a
  label, beside the agreement; ``clean_accuracy`` is the unmasked model's. Labels change only the
  summary, never a unit: adding them to a finished run recomputes nothing.

Unit of work (one checkpoint): one strategy on one image, all fractions and orders.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from . import masks as M
from .common import DEFAULT_STRATEGIES, StrategySpec, Subject, base_config, check_images
from .metrics import (agreement, bootstrap_ci, class_histogram_entropy, group_means, kl_divergence, mean_se,
                      most_common)
from ..runs.store import Run

FRACTIONS = tuple(round(0.1 * i, 1) for i in range(11))
PAPER = {"model": "torchvision ResNet-50", "mean_agreement": {"layer": 0.585, "grey": 0.246}}


def removal_masks_for_image(index: int, size, *, patch: int, fractions: Sequence[float], repeats: int,
                            seed: int) -> torch.Tensor:
    """(F * R) x 1 x H x W masks of one image, fraction-major: row f * R + r is order r at fraction f."""
    gh, gw = M.patch_grid(size, patch)
    orders = M.random_orders(gh * gw, repeats, M.generator(seed, index))
    per_order = [M.removal_masks(size, patch, fractions, o) for o in orders]  # R x (F x 1 x H x W)
    return torch.stack(per_order, dim=1).flatten(0, 1)


def _unit(subject: Subject, name: str, image: torch.Tensor, masks: torch.Tensor, clean: torch.Tensor,
          n_fractions: int, repeats: int, fractions: Sequence[float]) -> Mapping[str, np.ndarray]:
    # Masks at 0% and 100% are the same for every order: predict them once and share.
    src = [f * repeats if fractions[f] in (0.0, 1.0) else f * repeats + r
           for f in range(n_fractions) for r in range(repeats)]
    unique = sorted(set(src))
    logits_u = subject.predict(name, image, masks[unique])
    index = {u: j for j, u in enumerate(unique)}
    logits = logits_u[[index[u] for u in src]]
    clean_pred = int(clean.argmax())
    probs = logits.double().softmax(-1)
    return dict(
        pred=logits.argmax(-1).view(n_fractions, repeats).numpy(),
        kl=kl_divergence(clean[None].expand_as(logits), logits).view(n_fractions, repeats).numpy(),
        p_clean=probs[:, clean_pred].view(n_fractions, repeats).numpy(),
    )


def removal_curves(model, images: torch.Tensor, strategies: StrategySpec = DEFAULT_STRATEGIES, *,
                   fractions: Sequence[float] = FRACTIONS, repeats: int = 5, patch: int = 16, seed: int = 0,
                   mean=None, std=None, batch_size: Optional[int] = None, out=None, fresh: bool = False,
                   progress: bool = True, image_names: Optional[Sequence[str]] = None,
                   class_names: Optional[Sequence[str]] = None, labels: Optional[Sequence[int]] = None) -> dict:
    """Run the removal-curve experiment; returns (and with ``out`` writes) the results dict."""
    images = check_images(images)
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"fractions must be values in [0, 1], got {fractions}")
    size = tuple(images.shape[-2:])
    M.patch_grid(size, patch)
    # segment-mean's segments are the patches themselves (each removed patch takes its own mean)
    subject = _subject(model, strategies, mean, std, batch_size, seed, {"segment-mean": {"segment_size": patch}})
    config = base_config("removal", subject, images, seed, fractions=fractions, repeats=repeats, patch=patch)
    run = Run(out, "removal", config, fresh=fresh, progress=progress)

    clean = run.map(["clean"], lambda _: {"logits": subject.clean_logits(images).numpy()},
                    desc="removal: clean")["clean"]["logits"]
    clean = torch.from_numpy(clean)
    n, nf = images.shape[0], len(fractions)
    keys = [f"{s}--{i:04d}" for s in subject.names for i in range(n)]

    def compute(key):
        name, i = key.rsplit("--", 1)
        i = int(i)
        masks = removal_masks_for_image(i, size, patch=patch, fractions=fractions, repeats=repeats, seed=seed)
        return _unit(subject, name, images[i], masks, clean[i], nf, repeats, fractions)

    units = run.map(keys, compute, desc="removal")
    # Views of one photo (flips, crops: names "photo:view") are not independent: CIs resample photos.
    groups = [str(n).split(":")[0] for n in image_names] if image_names is not None else None
    results = summarise(units, clean.argmax(-1).numpy(), subject.names, fractions, repeats, seed=seed,
                        class_names=class_names, labels=labels, groups=groups)
    return run.finish(results, config, image_names, paper=PAPER)


def _subject(model, strategies, mean, std, batch_size, seed, options=None) -> Subject:
    kw = {}
    if options and not isinstance(strategies, Mapping):
        kw["options"] = {k: v for k, v in options.items() if k in list(strategies)}
    if mean is not None:
        kw["mean"] = mean
    if std is not None:
        kw["std"] = std
    return Subject(model, strategies, batch_size=batch_size, seed=seed, **kw)


def summarise(units: Mapping[str, Mapping[str, np.ndarray]], clean_pred: np.ndarray, names: Sequence[str],
              fractions: Sequence[float], repeats: int, *, seed: int = 0,
              class_names: Optional[Sequence[str]] = None, labels: Optional[Sequence[int]] = None,
              groups: Optional[Sequence[str]] = None) -> dict:
    """Aggregate per-unit arrays into per-strategy curves (see the module docstring).

    ``groups`` (one source-photo name per image): confidence intervals resample photos, each
    photo's views averaged first (views of one photo are not independent samples). ``labels``:
    top-1 accuracy against them beside agreement with the clean prediction.
    """
    n = len(clean_pred)
    labelled = check_labels(labels, n)
    out = {"experiment": "removal", "fractions": list(fractions), "repeats": repeats, "n_images": n,
           "n_photos": len(set(groups)) if groups is not None else n,
           "max_entropy_bits": float(np.log2(n * repeats)),
           "clean_entropy_bits": class_histogram_entropy(np.asarray(clean_pred)), "strategies": {}}
    if labelled is not None:
        lab, sel = labelled
        out.update(labels=lab.tolist(), n_labelled=int(sel.sum()),
                   clean_accuracy=float(agreement(lab[sel], np.asarray(clean_pred)[sel]).mean()))
    per_image, per_image_acc = {}, {}
    for s in names:
        pred = np.stack([units[f"{s}--{i:04d}"]["pred"] for i in range(n)])          # N x F x R
        kl = np.stack([units[f"{s}--{i:04d}"]["kl"] for i in range(n)])
        pc = np.stack([units[f"{s}--{i:04d}"]["p_clean"] for i in range(n)])
        agree = agreement(clean_pred[:, None, None], pred)
        per_image_agree = agree.mean(axis=2)                                       # N x F
        a_mean, a_se = mean_se(per_image_agree)
        k_mean, k_se = mean_se(kl.mean(axis=2))
        tops = [most_common(pred[:, f]) for f in range(len(fractions))]
        per_image_curve_mean = per_image_agree.mean(axis=1)
        lo, hi = bootstrap_ci(group_means(per_image_curve_mean, groups), seed=seed)
        out["strategies"][s] = {
            "agreement": a_mean.tolist(), "agreement_se": a_se.tolist(),
            "kl": k_mean.tolist(), "kl_se": k_se.tolist(),
            "p_clean": pc.mean(axis=(0, 2)).tolist(),
            "entropy_bits": [class_histogram_entropy(pred[:, f]) for f in range(len(fractions))],
            "top_class": [c for c, _ in tops], "top_share": [sh for _, sh in tops],
            "top_class_name": [class_names[c] if class_names else str(c) for c, _ in tops],
            "mean_agreement": float(per_image_curve_mean.mean()), "mean_agreement_ci95": [lo, hi],
            "mean_kl": float(kl.mean()),
        }
        if labelled is not None:
            acc = agreement(lab[sel][:, None, None], pred[sel]).mean(axis=2)                  # N_l x F
            c_mean, c_se = mean_se(acc)
            curve = acc.mean(axis=1)
            lo, hi = bootstrap_ci(curve, seed=seed)
            out["strategies"][s].update(accuracy=c_mean.tolist(), accuracy_se=c_se.tolist(),
                                        mean_accuracy=float(curve.mean()), mean_accuracy_ci95=[lo, hi])
            per_image_acc[s] = curve
        per_image[s] = per_image_curve_mean
    # Paired over images (same images, same masks): layer masking minus each other strategy.
    out["paired_vs_layer"] = {}
    if "layer" in per_image:
        for s in names:
            if s != "layer":
                d = per_image["layer"] - per_image[s]
                lo, hi = bootstrap_ci(group_means(d, groups), seed=seed)
                out["paired_vs_layer"][s] = {"mean_agreement_difference": float(d.mean()), "ci95": [lo, hi]}
                if s in per_image_acc:
                    d = per_image_acc["layer"] - per_image_acc[s]
                    lo, hi = bootstrap_ci(d, seed=seed)
                    out["paired_vs_layer"][s].update(mean_accuracy_difference=float(d.mean()),
                                                     accuracy_ci95=[lo, hi])
    return out


def check_labels(labels, n: int):
    """(labels as int64, mask of labelled images) or None when no image has a label (-1 = none)."""
    if labels is None:
        return None
    lab = np.asarray(labels)
    if lab.shape != (n,) or lab.dtype.kind not in "iu":
        raise ValueError(f"labels must be {n} integer class indices (-1 = no label), got shape {lab.shape} "
                         f"dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    sel = lab >= 0
    return (lab, sel) if sel.any() else None
