"""Experiment 2: mask-shape leakage. How much does the removed region's *shape* alone tell the model?

(a) ``salient_vs_moved``: the paper's comparison. For every image a blob covering ``area`` of it is
    laid over the most salient region (gradient saliency of the plain model for its clean class,
    smoothed; no masking strategy involved, so every strategy removes the same pixels). The same
    blob moved to where it overlaps the salient one least is the control. Reported per strategy:
    agreement with the clean prediction and the clean class's probability under both masks.
    Removing the object should destroy the prediction: high agreement under the salient mask means
    the hole's outline still gives the class away (leakage; the paper: lowest with layer masking).
    Under the moved mask the object is intact: low agreement there is the hole itself misleading
    the model (missingness bias). With ``labels`` (an image folder in ImageFolder layout) also the
    top-1 accuracy against the labels under both masks, and the clean accuracy.

(b) ``shape_probe``: fixed mask shapes (square, disk, bars, triangle, cross; equal area, jittered
    position) on many images; a cross-validated logistic regression on the model's log-probabilities
    predicts which shape was removed, per strategy. Folds are grouped by source photo (crops and
    flips of one photo never sit on both sides). Chance is 1 / #shapes; a label-shuffled run gives
    the empirical floor. Accuracy far above chance = the output encodes the mask shape.

Units: (a) the saliency blobs once, then one unit per strategy; (b) one unit per strategy and image.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from . import masks as M
from .common import DEFAULT_STRATEGIES, StrategySpec, Subject, base_config, check_images
from .metrics import agreement, kl_divergence, mean_se
from .removal import _subject, check_labels
from ..runs.store import Run

PROBE_SHAPES = M.SHAPES


def gradient_saliency(subject: Subject, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """N x H x W: |d logit_class / d pixel| summed over channels, of the plain model."""
    out = []
    for i in range(images.shape[0]):
        x = images[i:i + 1].clone().requires_grad_(True)
        with torch.enable_grad():
            logit = subject.model(subject.normalise(x))[0, int(classes[i])]
            (g,) = torch.autograd.grad(logit, x)
        out.append(g.abs().sum(1)[0])
    return torch.stack(out)


def salient_vs_moved(model, images: torch.Tensor, strategies: StrategySpec = DEFAULT_STRATEGIES, *,
                     area: float = 0.25, seed: int = 0, mean=None, std=None, batch_size: Optional[int] = None, out=None,
                     fresh: bool = False, progress: bool = True,
                     image_names: Optional[Sequence[str]] = None, labels: Optional[Sequence[int]] = None) -> dict:
    """Leakage (a); returns (and with ``out`` writes under out/leakage-salient) the results dict."""
    images = check_images(images)
    if not 0.0 < area < 1.0:
        raise ValueError(f"area must be in (0, 1), got {area!r}")
    subject = _subject(model, strategies, mean, std, batch_size, seed)
    config = base_config("leakage-salient", subject, images, seed, area=area)
    run = Run(out, "leakage-salient", config, fresh=fresh, progress=progress)
    n = images.shape[0]

    def blobs(_):
        clean = subject.clean_logits(images)
        sal = gradient_saliency(subject, images, clean.argmax(-1))
        salient, moved, overlap = [], [], []
        for i in range(n):
            region = M.salient_blob(sal[i], area)
            away, ov = M.move_away(region)
            salient.append(region)
            moved.append(away)
            overlap.append(ov)
        return dict(clean=clean.numpy(), salient=torch.stack(salient).numpy(), moved=torch.stack(moved).numpy(),
                    overlap=np.asarray(overlap))

    base = run.map(["blobs"], blobs, desc="leakage: saliency")["blobs"]
    clean = torch.from_numpy(base["clean"])
    clean_pred = clean.argmax(-1).numpy()
    regions = {"salient": torch.from_numpy(base["salient"]), "moved": torch.from_numpy(base["moved"])}

    def compute(name):
        res = {}
        for which, reg in regions.items():
            logits = subject.predict_pairs(name, images, (~reg).float()[:, None])
            res[f"pred_{which}"] = logits.argmax(-1).numpy()
            res[f"p_clean_{which}"] = logits.double().softmax(-1)[torch.arange(n), clean.argmax(-1)].numpy()
            res[f"kl_{which}"] = kl_divergence(clean, logits).numpy()
        return res

    units = run.map(subject.names, compute, desc="leakage (a)")
    results = {"experiment": "leakage-salient", "area": area, "n_images": n,
               "removed_area": float(base["salient"].mean()),
               "moved_overlap_mean": float(base["overlap"].mean()), "strategies": {}}
    labelled = check_labels(labels, n)
    if labelled is not None:
        lab, sel = labelled
        results.update(labels=lab.tolist(), n_labelled=int(sel.sum()),
                       clean_accuracy=float(agreement(lab[sel], clean_pred[sel]).mean()))
    for s in subject.names:
        u = units[s]
        row = {}
        for which in regions:
            if labelled is not None:
                c_m, c_se = mean_se(agreement(lab[sel], u[f"pred_{which}"][sel]))
                row.update({f"accuracy_{which}": float(c_m), f"accuracy_{which}_se": float(c_se)})
            a_m, a_se = mean_se(agreement(clean_pred, u[f"pred_{which}"]))
            p_m, p_se = mean_se(u[f"p_clean_{which}"])
            k_m, k_se = mean_se(u[f"kl_{which}"])
            row.update({f"agreement_{which}": float(a_m), f"agreement_{which}_se": float(a_se),
                        f"p_clean_{which}": float(p_m), f"p_clean_{which}_se": float(p_se),
                        f"kl_{which}": float(k_m), f"kl_{which}_se": float(k_se)})
        # How much more the prediction survives when the object is intact than when it is removed.
        row["p_clean_gap"] = row["p_clean_moved"] - row["p_clean_salient"]
        results["strategies"][s] = row
    return run.finish(results, config, image_names)


def probe_masks(index: int, size: int, *, shapes: Sequence[str], area: float, jitter: int, seed: int
                ) -> torch.Tensor:
    """K x 1 x H x W: every probe shape once on image ``index``, each at its own random offset."""
    g = M.generator(seed, index, 7)
    offsets = torch.randint(-jitter, jitter + 1, (len(shapes), 2), generator=g) if jitter else \
        torch.zeros(len(shapes), 2, dtype=torch.long)
    return torch.cat([M.shape_mask(k, size, area, tuple(offsets[j].tolist())) for j, k in enumerate(shapes)])


def probe_accuracy(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, seed: int = 0,
                   folds: int = 5, shuffle_labels: bool = False) -> np.ndarray:
    """Per-fold test accuracy of a standardised L2 logistic regression, folds grouped by ``groups``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels)
    if shuffle_labels:
        y = np.random.default_rng(seed).permutation(y)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError("the shape probe needs images from at least 2 different photos (cross-validation "
                         "is grouped by photo)")
    accs = []
    for train, test in GroupKFold(n_splits=min(folds, n_groups)).split(features, y, groups):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000))
        clf.fit(features[train], y[train])
        accs.append(float((clf.predict(features[test]) == y[test]).mean()))
    return np.asarray(accs)


def shape_probe(model, images: torch.Tensor, strategies: StrategySpec = DEFAULT_STRATEGIES, *,
                groups: Optional[Sequence[str]] = None, shapes: Sequence[str] = PROBE_SHAPES,
                area: float = 0.15, jitter: int = 24, folds: int = 5, seed: int = 0, mean=None, std=None,
                batch_size: Optional[int] = None, out=None, fresh: bool = False, progress: bool = True) -> dict:
    """Leakage (b); ``groups`` names each image's source photo (default: every image its own)."""
    images = check_images(images)
    h, w = images.shape[-2:]
    if h != w:
        raise ValueError(f"the shape probe needs square images, got {h} x {w}")
    unknown = [s for s in shapes if s not in M.SHAPES]
    if unknown or len(shapes) < 2:
        raise ValueError(f"shapes must be at least 2 of {M.SHAPES}, got {list(shapes)}")
    n = images.shape[0]
    groups = list(groups) if groups is not None else [str(i) for i in range(n)]
    if len(groups) != n:
        raise ValueError(f"groups must name one source photo per image ({n}), got {len(groups)}")
    subject = _subject(model, strategies, mean, std, batch_size, seed)
    config = base_config("leakage-probe", subject, images, seed, shapes=list(shapes), area=area, jitter=jitter,
                         folds=folds)
    run = Run(out, "leakage-probe", config, fresh=fresh, progress=progress)
    keys = [f"{s}--{i:04d}" for s in subject.names for i in range(n)]

    def compute(key):
        name, i = key.rsplit("--", 1)
        masks = probe_masks(int(i), h, shapes=shapes, area=area, jitter=jitter, seed=seed)
        return {"logprob": torch.log_softmax(subject.predict(name, images[int(i)], masks), -1).numpy()}

    units = run.map(keys, compute, desc="leakage (b)")
    labels = np.tile(np.arange(len(shapes)), n)
    group_ids = np.repeat(np.unique(groups, return_inverse=True)[1], len(shapes))
    results = {"experiment": "leakage-probe", "shapes": list(shapes), "n_images": n,
               "n_photos": int(len(set(groups))), "chance": 1.0 / len(shapes),
               "removed_area": M.describe_shapes(h, area), "features": "log-probabilities (all classes)",
               "strategies": {}}
    for s in subject.names:
        feats = np.concatenate([units[f"{s}--{i:04d}"]["logprob"] for i in range(n)])
        accs = probe_accuracy(feats, labels, group_ids, seed=seed, folds=folds)
        floor = probe_accuracy(feats, labels, group_ids, seed=seed, folds=folds, shuffle_labels=True)
        m, se = mean_se(accs)
        results["strategies"][s] = {"accuracy": float(m), "accuracy_se": float(se), "fold_accuracy": accs.tolist(),
                                    "shuffled_accuracy": float(floor.mean())}
    return run.finish(results, config)
