"""ROAD and SRG: removal curves of an attribution under any masking strategy.

ROAD (Rong, Leemann et al., ICML 2022, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods"): remove a growing fraction of the pixels, most relevant first (MoRF) or least
relevant first (LeRF), with a removal strategy (ROAD's own: noisy linear imputation,
``"noisy-linear"``), and track the model's accuracy. A faithful attribution makes MoRF fall fast
and LeRF stay high. SRG (Bluecher et al., TMLR 2024, "Decoupling Pixel Flipping and Occlusion
Strategy for Consistent XAI Benchmarks"): the symmetric relevance gain
``SRG = AUC(LeRF) - AUC(MoRF)``; higher = more faithful, and less dependent on how the removal
itself disturbs the model than either curve alone.

    curves = road(predict, images, attributions, labels, fractions=(0.1, 0.2, ...))
    curves["morf"]  # N x F: 1.0 where the prediction equals the label at that fraction
    srg(curves["lerf"].mean(0), curves["morf"].mean(0), fractions)

- ``predict(images, masks) -> logits``: a masking strategy (masked_ops.explain.get_strategy) or
  any callable with that interface (masks N x 1 x H x W, 1 = visible).
- ``attributions``: N x H x W (or N x 1 x H x W) relevance per pixel. Pixels are ranked by it,
  ties broken by the pixel's raster index (stable sort), and at fraction f the first
  ``floor(f * H * W)`` pixels of the ranking are removed (Quantus' ROAD: ``int(size * p / 100)``).
- ``labels``: the classes to score (accuracy); pass the clean predictions for agreement.
- ``metric``: "accuracy" (top-1 == label, ROAD's) or "probability" (softmax of the label's logit).

``quantus_perturb_func(strategy)`` gives Quantus' ``ROAD(perturb_func=...)`` the same removal:
Quantus then returns the same numbers as ``road(...)["morf"].mean(0)`` (tested). Quantus ranks
the attribution's *elements*: give it the attribution repeated over the image's channels
(N x C x H x W) and fractions whose pixel counts are whole numbers, so that it removes whole
pixels. For layer masking use ``masked_ops.explain.adapters.quantus.NaNMaskedModel`` as the
model: the perturb function then writes NaN and the model turns it into the mask.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from .metrics import auc

ORDERS = ("morf", "lerf")
METRICS = ("accuracy", "probability")
FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 10))  # ROAD's 10%..90%


def pixel_ranking(attribution: torch.Tensor, order: str = "morf") -> torch.Tensor:
    """Flat pixel indices (H * W), most relevant first ("morf") or least relevant first ("lerf");
    ties keep raster order."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    a = attribution.detach().reshape(-1).double()
    if not bool(torch.isfinite(a).all()):
        raise ValueError("attribution must be finite (no NaN or inf)")
    return torch.argsort(a, descending=(order == "morf"), stable=True)


def removal_count(fraction: float, n_pixels: int) -> int:
    """floor(fraction * n_pixels), robust to float error (0.29 * 100 counts 29 pixels, as Quantus)."""
    return int(math.floor(float(fraction) * n_pixels + 1e-9))


def road_masks(attribution: torch.Tensor, fractions: Sequence[float], order: str = "morf") -> torch.Tensor:
    """F x 1 x H x W bool masks (True = visible): the first floor(f * H * W) ranked pixels removed."""
    a = _as_map(attribution, "attribution")
    h, w = a.shape
    rank = pixel_ranking(a, order)
    masks = torch.ones(len(fractions), h * w, dtype=torch.bool)
    for i, f in enumerate(fractions):
        masks[i, rank[:removal_count(f, h * w)]] = False
    return masks.view(len(fractions), 1, h, w)


def road(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor,
         attributions: torch.Tensor, labels, *, fractions: Sequence[float] = FRACTIONS,
         orders: Sequence[str] = ORDERS, metric: str = "accuracy", batch_size: int = 16) -> Dict[str, np.ndarray]:
    """{order: N x F array} of ``metric`` per image and fraction (module docstring)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be an N x C x H x W tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    n, _, h, w = images.shape
    attr = attributions.reshape(attributions.shape[0], *attributions.shape[-2:]) \
        if isinstance(attributions, torch.Tensor) and attributions.dim() == 4 and attributions.shape[1] == 1 \
        else attributions
    if not isinstance(attr, torch.Tensor) or tuple(attr.shape) != (n, h, w):
        raise ValueError(f"attributions must have shape N x H x W = {(n, h, w)} (or N x 1 x H x W), got "
                         f"{tuple(attributions.shape) if isinstance(attributions, torch.Tensor) else attributions!r}")
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.numel() != n:
        raise ValueError(f"labels must hold one class per image ({n}), got {labels.numel()}")
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"fractions must be values in [0, 1], got {fractions}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    for o in orders:
        if o not in ORDERS:
            raise ValueError(f"orders must be among {ORDERS}, got {o!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    out = {}
    for o in orders:
        res = np.zeros((n, len(fractions)))
        for i in range(n):
            masks = road_masks(attr[i], fractions, o).to(images.device)
            vals = []
            with torch.no_grad():
                for s in range(0, masks.shape[0], batch_size):
                    m = masks[s:s + batch_size]
                    logits = predict(images[i:i + 1].expand(m.shape[0], -1, -1, -1), m).double()
                    lab = int(labels[i])
                    vals.append((logits.argmax(-1) == lab).double() if metric == "accuracy"
                                else logits.softmax(-1)[:, lab])
            res[i] = torch.cat(vals).cpu().numpy()
        out[o] = res
    return out


def srg(lerf_curve: Sequence[float], morf_curve: Sequence[float], fractions: Optional[Sequence[float]] = None
        ) -> float:
    """Symmetric relevance gain AUC(LeRF) - AUC(MoRF) (trapezoids over ``fractions``; default evenly
    spaced in [0, 1]). Positive: removing the least relevant pixels hurts less than the most relevant."""
    lerf_curve, morf_curve = np.asarray(lerf_curve, dtype=np.float64), np.asarray(morf_curve, dtype=np.float64)
    if lerf_curve.shape != morf_curve.shape or lerf_curve.ndim != 1:
        raise ValueError(f"lerf and morf curves must be 1-D of the same length, got {lerf_curve.shape} and "
                         f"{morf_curve.shape}")
    return auc(lerf_curve, fractions) - auc(morf_curve, fractions)


def quantus_perturb_func(strategy) -> Callable:
    """A ``perturb_func(arr, indices, **kwargs)`` for Quantus' ROAD that removes the pixels Quantus
    picks with ``strategy`` (module docstring).

    ``arr``: one C x H x W image; ``indices``: flat indices into it (a pixel is removed when any of
    its channels is picked). Fill strategies return the filled image; layer strategies return the
    image with NaN in the removed pixels (pair it with NaNMaskedModel).
    """
    from ..explain.strategies import LayerStrategy

    def perturb(arr: np.ndarray, indices, **kwargs) -> np.ndarray:
        a = np.asarray(arr)
        if a.ndim != 3:
            raise ValueError(f"perturb_func expects one C x H x W image, got shape {a.shape}")
        c, h, w = a.shape
        idx = np.asarray(indices, dtype=np.int64).ravel()
        removed = np.zeros(h * w, dtype=bool)
        removed[idx % (h * w)] = True
        visible = torch.from_numpy(~removed).view(1, 1, h, w)
        if isinstance(strategy, LayerStrategy):
            out = a.astype(np.result_type(a.dtype, np.float32), copy=True)
            out[:, removed.reshape(h, w)] = np.nan
            return out
        x = torch.from_numpy(np.ascontiguousarray(a))[None]
        with torch.no_grad():
            return strategy.composite(x, visible)[0].numpy().astype(a.dtype, copy=False)

    return perturb


def _as_map(attribution, what: str) -> torch.Tensor:
    if not isinstance(attribution, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor (H x W), got {type(attribution).__name__}")
    a = attribution
    while a.dim() > 2 and a.shape[0] == 1:
        a = a[0]
    if a.dim() != 2:
        raise ValueError(f"{what} must have shape H x W (or 1 x H x W), got {tuple(attribution.shape)}")
    return a
