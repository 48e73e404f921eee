"""Metrics of the experiments, as small pure functions (tested on constructed cases)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch


def kl_divergence(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p) per row, in nats, from logits (softmax taken here). >= 0, 0 iff equal."""
    lp = torch.log_softmax(clean_logits.double(), dim=-1)
    lq = torch.log_softmax(logits.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def agreement(clean_pred: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """1.0 where the top-1 class equals the clean top-1 class, else 0.0 (broadcasts)."""
    return (np.asarray(pred) == np.asarray(clean_pred)).astype(np.float64)


def class_histogram_entropy(preds: np.ndarray) -> float:
    """Entropy (bits) of the histogram of predicted classes: log2(#images) when all differ, 0 when
    every prediction is the same class (the collapse grey fill causes)."""
    _, counts = np.unique(np.asarray(preds).ravel(), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0


def most_common(preds: np.ndarray) -> Tuple[int, float]:
    """(class, share) of the most frequent prediction."""
    values, counts = np.unique(np.asarray(preds).ravel(), return_counts=True)
    i = int(counts.argmax())
    return int(values[i]), float(counts[i] / counts.sum())


def auc(y: Sequence[float], x: Sequence[float] = None) -> float:
    """Area under a curve by the trapezoid rule, x defaulting to evenly spaced points in [0, 1]."""
    y = np.asarray(y, dtype=np.float64)
    if x is None:
        x = np.linspace(0.0, 1.0, len(y))
    x = np.asarray(x, dtype=np.float64)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def relative_error(target: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """||target - approx|| / ||target|| per row (eps-guarded)."""
    t, a = target.double(), approx.double()
    return (t - a).norm(dim=-1) / t.norm(dim=-1).clamp_min(1e-12)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def mean_se(values: np.ndarray, axis: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and its standard error along ``axis`` (0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[axis]
    se = v.std(axis=axis, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(v.mean(axis=axis))
    return v.mean(axis=axis), se


def bootstrap_ci(values: np.ndarray, seed: int = 0, n_boot: int = 2000, level: float = 0.95
                 ) -> Tuple[float, float]:
    """Percentile bootstrap CI of the mean of 1-D ``values`` (resampling the units, e.g. images)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size < 2:
        m = float(v.mean()) if v.size else float("nan")
        return m, m
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def group_means(values: np.ndarray, groups: Optional[Sequence] = None) -> np.ndarray:
    """Mean of ``values`` (1-D, one per image) within each group, groups in order of first appearance;
    ``groups=None``: the values unchanged (every image its own group)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if groups is None:
        return v
    g = list(groups)
    if len(g) != v.size:
        raise ValueError(f"groups must name one group per value ({v.size}), got {len(g)}")
    order = list(dict.fromkeys(g))
    return np.array([v[[i for i, x in enumerate(g) if x == k]].mean() for k in order])
