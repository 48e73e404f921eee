"""LIME and KernelSHAP for images, in torch: batched, seeded, on CPU or GPU.

    from masked_ops.explain import explain_lime, get_strategy
    exp = explain_lime(get_strategy("layer", model), image, num_samples=1000, seed=0)
    heat = exp.heatmap()     # H x W, each pixel = its segment's weight

LIME (Ribeiro et al. 2016, as in the ``lime`` package's LimeImageExplainer): K segments, S binary
samples (row 0 = all kept, the rest uniform), the model's output for each sample, weights
sqrt(exp(-d^2 / width^2)) with d the cosine distance of the sample to the all-ones row (width 0.25
for images), and a weighted ridge regression (alpha 1, with intercept), solved in closed form in
float64. Given the same segments and samples it reproduces lime_base.LimeBase's coefficients
(feature_selection="none"). KernelSHAP (Lundberg & Lee 2017): coalition sizes drawn from the
Shapley kernel, the empty and full coalitions pinned with a large weight, (almost) unregularised
regression, so that the weights sum to f(full) - f(empty).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .perturb import (Explanation, check_output, check_positive, forward_samples, get_segments, prepare_image,
                      resolve_batch_size, resolve_targets)
from .strategies import Strategy

LIME_IMAGE_KERNEL_WIDTH = 0.25


def lime_samples(num_samples: int, num_features: int, seed: int = 0) -> torch.Tensor:
    """S x K float64 0/1 samples: row 0 all ones (the original image), the rest uniform (seeded)."""
    g = torch.Generator().manual_seed(int(seed))
    z = torch.randint(0, 2, (num_samples, num_features), generator=g).double()
    z[0] = 1
    return z


def cosine_distance_to_ones(samples: torch.Tensor) -> torch.Tensor:
    """1 - cos(z, 1) per row (sklearn's convention: an all-zero row has similarity 0)."""
    z = samples.double()
    k = z.shape[1]
    dot = z.sum(1)
    norm = z.norm(dim=1) * math.sqrt(k)
    sim = torch.where(norm > 0, dot / norm.clamp_min(1e-300), torch.zeros_like(dot))
    return 1.0 - sim


def lime_kernel(distances: torch.Tensor, kernel_width: float = LIME_IMAGE_KERNEL_WIDTH) -> torch.Tensor:
    """LIME's exponential kernel as the lime package writes it: sqrt(exp(-d^2 / width^2))."""
    return torch.sqrt(torch.exp(-(distances ** 2) / kernel_width ** 2))


def weighted_ridge(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                   alpha: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn Ridge(alpha, fit_intercept=True).fit(x, y, sample_weight=weights), for every column of y.

    x: S x K, y: S x T, weights: S. Returns (coef T x K, intercept T, weighted R^2 T), float64.
    Closed form: centre x and y on their weighted means, solve (Xc' W Xc + alpha I) b = Xc' W yc.
    """
    x, y, w = x.double(), y.double(), weights.double()
    if y.dim() == 1:
        y = y[:, None]
    wsum = w.sum()
    x_off = (w[:, None] * x).sum(0) / wsum
    y_off = (w[:, None] * y).sum(0) / wsum
    xc, yc = x - x_off, y - y_off
    xtw = xc.T * w
    a = xtw @ xc + alpha * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    coef = torch.linalg.solve(a, xtw @ yc).T  # T x K
    intercept = y_off - coef @ x_off
    pred = x @ coef.T + intercept
    ss_res = (w[:, None] * (y - pred) ** 2).sum(0)
    ss_tot = (w[:, None] * (y - y_off) ** 2).sum(0)
    score = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(1e-300), torch.zeros_like(ss_tot))
    return coef, intercept, score


def _run(method, strategy, image, samples, weights, alpha, *, targets, segments, batch_size, output,
         progress):
    outputs = forward_samples(strategy, image, segments, samples, targets, batch_size=batch_size,
                              output=output, progress=progress, desc=f"{method} ({strategy.name})")
    coef, intercept, score = weighted_ridge(samples, outputs, weights, alpha)
    return Explanation(method, strategy.name, list(targets), coef.float(), segments.cpu(),
                       intercept.float(), score.float(), samples, outputs, output=output)


def explain_lime(strategy: Strategy, image: torch.Tensor, *, targets: Union[None, int, Sequence[int]] = None,
                 segments: Union[str, torch.Tensor] = "slic", n_segments: int = 50, num_samples: int = 1000,
                 seed: int = 0, kernel_width: float = LIME_IMAGE_KERNEL_WIDTH, alpha: float = 1.0,
                 batch_size: Optional[int] = None, output: str = "prob", samples: Optional[torch.Tensor] = None,
                 progress: Optional[bool] = None) -> Explanation:
    """LIME weights of ``image`` (3 x H x W pixels in [0, 1], on the model's device) under ``strategy``.

    targets: class indices (default: the top-1 class of the full image). segments: a method name of
    masked_ops.explain.segmentation.segment or an H x W label map. output: regress probabilities
    ("prob", as lime's examples) or logits. samples: your own S x K 0/1 samples (else seeded ones).
    """
    image = prepare_image(image)
    check_output(output)
    check_positive(num_samples, "num_samples")
    batch_size = resolve_batch_size(batch_size, image.device)
    seg = get_segments(image, segments, n_segments, seed)
    k = int(seg.max()) + 1
    z = lime_samples(num_samples, k, seed) if samples is None else torch.as_tensor(samples).double()
    if z.dim() != 2 or z.shape[1] != k:
        raise ValueError(f"samples must have shape S x {k} (one column per segment), got {tuple(z.shape)}")
    targets, _ = resolve_targets(strategy, image, targets, output)
    w = lime_kernel(cosine_distance_to_ones(z), kernel_width)
    return _run("lime", strategy, image, z, w, alpha, targets=targets, segments=seg, batch_size=batch_size,
                output=output, progress=progress)


def shap_samples(num_samples: int, num_features: int, seed: int = 0) -> torch.Tensor:
    """Row 0 all ones, row 1 all zeros, the rest with coalition sizes drawn from the Shapley kernel."""
    if num_samples < 3:
        raise ValueError(f"num_samples must be >= 3 for KernelSHAP, got {num_samples}")
    g = torch.Generator().manual_seed(int(seed))
    m = num_features
    sizes = torch.arange(1, m, dtype=torch.float64)
    p = (m - 1) / (sizes * (m - sizes))
    size = torch.multinomial(p / p.sum(), num_samples - 2, replacement=True, generator=g) + 1
    ranks = torch.rand(num_samples - 2, m, generator=g).argsort(1).argsort(1)
    z = (ranks < size[:, None]).double()
    return torch.cat([torch.ones(1, m, dtype=torch.float64), torch.zeros(1, m, dtype=torch.float64), z])


def explain_kernel_shap(strategy: Strategy, image: torch.Tensor, *, targets=None,
                        segments: Union[str, torch.Tensor] = "slic", n_segments: int = 50,
                        num_samples: int = 1000, seed: int = 0, batch_size: Optional[int] = None,
                        output: str = "prob", progress: Optional[bool] = None) -> Explanation:
    """KernelSHAP weights (sampled coalitions, Shapley-kernel sizes, unit weights; see module docstring)."""
    image = prepare_image(image)
    check_output(output)
    check_positive(num_samples, "num_samples")
    seg = get_segments(image, segments, n_segments, seed)
    z = shap_samples(num_samples, int(seg.max()) + 1, seed)
    w = torch.ones(z.shape[0], dtype=torch.float64)
    w[:2] = 1e6  # pin f(full) and f(empty): efficiency, sum of weights = f(full) - f(empty)
    targets, _ = resolve_targets(strategy, image, targets, output)
    return _run("kernel-shap", strategy, image, z, w, 1e-6, targets=targets, segments=seg,
                batch_size=batch_size, output=output, progress=progress)
