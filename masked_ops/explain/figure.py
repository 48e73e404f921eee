"""Pictures of explanations (matplotlib).

``visualize(attribution, image)`` draws any attribution map (an Explanation, or an array or tensor
H x W, C x H x W, H x W x C, 1 x C x H x W; channels are summed) over the image, with a labelled
colour bar, like Captum's ``visualize_image_attr``::

    from masked_ops.explain.figure import visualize
    fig, ax = visualize(exp, image, sign="all")          # exp: an Explanation; image 3 x H x W in [0, 1]
    fig, ax = visualize(captum_attr[0, :3], image, sign="positive", label="Captum Lime weight")

``explanation_figure`` is the picture of ``masked-ops explain``: the image, then per masking
strategy the heatmap (top) and its top-k segments (bottom), wrapped into rows of ``columns``
panels; one colour scale per strategy or, with ``shared_scale=True``, one for all.

``mask_figure`` is the picture of the mask methods (extremal, RISE, DiffMask): per masking strategy the
map over the image (top) and the learned mask over the image (bottom: the image where the mask keeps
it, washed to grey elsewhere).
"""
from __future__ import annotations

import math
import textwrap
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .perturb import Explanation

SIGNS = ("all", "positive", "negative", "absolute")
_CMAPS = {"all": "RdBu_r", "positive": "Reds", "negative": "Blues", "absolute": "magma"}

# What an attribution of each method is, for colour bar labels ({output}: "p" or "logit").
_MEANING = {
    "lime": "LIME weight, change of {output}",
    "kernel-shap": "SHAP value, share of {output}",
    "occlusion": "drop in {output} when removed",
}


# ... and of each map method (MapExplanation)
_MAP_MEANING = {
    "extremal": "mean of the masks over the areas (1: kept by all)",
    "rise": "mean {output} when visible",
    "diffmask": "probability the gate keeps the patch",
}


def attribution_label(exp, class_name: Optional[str] = None) -> str:
    """The colour bar label of an explanation (an Explanation or a MapExplanation): what its numbers are,
    for which class."""
    output = "logit" if (getattr(exp, "output", None) or getattr(exp, "info", {}).get("output")) == "logit" else "p"
    if class_name:
        output = f"{output}({class_name})"
    if exp.method in _MAP_MEANING:
        return _MAP_MEANING[exp.method].format(output=output)
    return _MEANING.get(exp.method, exp.method + " attribution, {output}").format(output=output)


def _boundaries(rgb: np.ndarray, segments: np.ndarray) -> np.ndarray:
    from skimage.segmentation import mark_boundaries

    return mark_boundaries(rgb, segments, color=(1, 1, 0), mode="inner")


def top_segments_image(rgb: np.ndarray, exp: Explanation, k: int = 5, grey: float = 0.5) -> np.ndarray:
    """The image with only the k most positive segments kept, the rest washed to grey."""
    seg = exp.segments.numpy()
    keep = np.isin(seg, exp.top_segments(k).numpy())
    out = rgb * 0.25 + grey * 0.75
    out[keep] = rgb[keep]
    return _boundaries(out, np.where(keep, 1, 0))


# ----------------------------------------------------------------------------- visualize
def _as_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64 if np.asarray(a).dtype == np.float64 else np.float32)


def attribution_map(attribution) -> np.ndarray:
    """H x W float map of an attribution: an Explanation (its first target), or an array / tensor
    H x W, C x H x W or H x W x C (C = 1 or 3; channels summed), with an optional leading batch of 1."""
    if isinstance(attribution, Explanation):
        return attribution.numpy()
    a = _as_numpy(attribution)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"attribution: a batch of {a.shape[0]} maps; pass one (e.g. attr[0])")
        a = a[0]
    if a.ndim == 3:
        if a.shape[0] in (1, 3):
            a = a.sum(0)
        elif a.shape[2] in (1, 3):
            a = a.sum(2)
        else:
            raise ValueError(f"attribution of shape {a.shape}: expected 1 or 3 channels first or last (with "
                             f"the Captum adapter, pass attributions[0, :3]: the 4th channel is the mask's)")
    if a.ndim != 2:
        raise ValueError(f"attribution must be H x W, C x H x W or H x W x C, got shape {a.shape}")
    return a


def _rgb(image) -> Optional[np.ndarray]:
    if image is None:
        return None
    a = _as_numpy(image) if not (isinstance(image, np.ndarray) and image.dtype == np.uint8) else image
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3):
        raise ValueError(f"image must be 3 x H x W or H x W x 3, got shape {a.shape}")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.size and np.nanmax(a) > 1.0 + 1e-3:
        raise ValueError(f"image must hold pixels in [0, 1] (or be uint8), got values up to {np.nanmax(a):.4g}")
    a = np.clip(a, 0, 1)
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def _signed(a: np.ndarray, sign: str) -> np.ndarray:
    if sign == "positive":
        return np.clip(a, 0, None)
    if sign == "negative":
        return np.clip(-a, 0, None)
    if sign == "absolute":
        return np.abs(a)
    return a


def draw_attribution(ax, heat: np.ndarray, rgb: Optional[np.ndarray] = None, *, sign: str = "all",
                     vmax: Optional[float] = None, cmap: Optional[str] = None, alpha: float = 0.75,
                     label: Optional[str] = None, colorbar: bool = True):
    """Draw an H x W map on ``ax`` (over the image when given); returns the image artist."""
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
    if rgb is not None and rgb.shape[:2] != heat.shape:
        raise ValueError(f"the image ({rgb.shape[0]} x {rgb.shape[1]}) and the attribution "
                         f"({heat.shape[0]} x {heat.shape[1]}) differ in size")
    values = _signed(heat, sign)
    if vmax is None:
        vmax = float(np.nanmax(np.abs(values))) if values.size else 0.0
    vmax = vmax or 1.0
    vmin = -vmax if sign == "all" else 0.0
    if rgb is not None:
        ax.imshow(rgb, alpha=0.35 if alpha < 1 else 1.0)
    im = ax.imshow(values, cmap=cmap or _CMAPS[sign], vmin=vmin, vmax=vmax, alpha=alpha if rgb is not None else 1.0)
    ax.axis("off")
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        if label:
            cb.set_label(label if sign in ("all", "positive") else f"{label} ({sign})", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    return im


def visualize(attribution, image=None, *, sign: str = "all", vmax: Optional[float] = None,
              cmap: Optional[str] = None, alpha: float = 0.75, label: Optional[str] = None,
              title: Optional[str] = None, ax=None, colorbar: bool = True) -> Tuple[object, object]:
    """Draw an attribution map over an image; returns (figure, axes).

    attribution: an Explanation, or an array/tensor H x W, C x H x W, H x W x C (channels summed),
    with an optional batch of 1. image: 3 x H x W or H x W x 3, float in [0, 1] or uint8 (optional).
    sign: "all" (diverging colours, symmetric scale), "positive", "negative" (shown as magnitudes)
    or "absolute". vmax: the colour scale's end (default: the largest magnitude shown; give the same
    value to several pictures to compare them). label: the colour bar label (default for an
    Explanation: what its numbers are, e.g. "LIME weight, change of p"). ax: draw into these axes.
    """
    import matplotlib.pyplot as plt

    heat = attribution_map(attribution)
    if label is None and isinstance(attribution, Explanation):
        label = attribution_label(attribution)
    if ax is None:
        # constrained layout keeps the title, the colour bar and its ticks inside the figure when saved
        fig, ax = plt.subplots(figsize=(4.2, 3.6), layout="constrained")
    else:
        fig = ax.figure
    draw_attribution(ax, heat, _rgb(image), sign=sign, vmax=vmax, cmap=cmap, alpha=alpha, label=label,
                     colorbar=colorbar)
    if title:
        ax.set_title(textwrap.fill(title, 48), fontsize=10)  # a long title wraps instead of being clipped
    return fig, ax


# ----------------------------------------------------------------------------- the CLI's figure
def explanation_figure(image: torch.Tensor, explanations: Sequence[Explanation], class_name: str,
                       title: Optional[str] = None, top_k: int = 5, shared_scale: bool = False,
                       columns: int = 5, title_color: Optional[str] = None):
    """Figure: the image and its segments, then per strategy its heatmap (top) and top-k segments
    (bottom); ``columns`` panels per row (the image counts as one), more strategies wrap onto more rows.
    ``shared_scale``: one colour scale for all heatmaps (the largest magnitude among them)."""
    import matplotlib.pyplot as plt

    if not explanations:
        raise ValueError("explanation_figure needs at least one explanation")
    if columns < 2:
        raise ValueError(f"columns must be >= 2, got {columns}")
    rgb = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    heats = [e.numpy() for e in explanations]
    shared = max(float(np.abs(h).max()) for h in heats) if shared_scale else None
    n = len(explanations) + 1
    ncols = min(columns, n)
    blocks = math.ceil(n / ncols)
    fig, axes = plt.subplots(2 * blocks, ncols, figsize=(3.3 * ncols, 3.2 * 2 * blocks + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title("image", fontsize=10)
    axes[1, 0].imshow(_boundaries(rgb, explanations[0].segments.numpy()))
    axes[1, 0].set_title(f"{int(explanations[0].segments.max()) + 1} segments", fontsize=10)
    for i, (exp, heat) in enumerate(zip(explanations, heats), 1):
        block, col = divmod(i, ncols)
        top, bottom = axes[2 * block, col], axes[2 * block + 1, col]
        draw_attribution(top, heat, rgb, vmax=shared, label=attribution_label(exp, class_name))
        top.set_title(f"{exp.strategy} masking", fontsize=10)
        bottom.imshow(top_segments_image(rgb, exp, top_k))
        bottom.set_title(f"{exp.strategy}: top {top_k} segments", fontsize=10)
    if title:
        fig.suptitle(title + (" (one colour scale for all)" if shared_scale else ""), fontsize=11,
                     color=title_color)
    fig.tight_layout()
    return fig


def mask_figure(image: torch.Tensor, explanations: Sequence, class_name: str, title: Optional[str] = None):
    """Column 0 the image; column i the map of explanation i over the image (top) and its mask (bottom)."""
    import matplotlib.pyplot as plt

    rgb = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    n = len(explanations)
    fig, axes = plt.subplots(2, n + 1, figsize=(3.2 * (n + 1), 6.6), squeeze=False)
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title("image")
    axes[1, 0].axis("off")
    for i, exp in enumerate(explanations, 1):
        heat = exp.heatmap().numpy()
        axes[0, i].imshow(rgb, alpha=0.35)
        im = axes[0, i].imshow(heat, cmap="viridis", alpha=0.75)
        axes[0, i].set_title(f"{exp.method} ({exp.strategy}): {class_name}", fontsize=9)
        bar = fig.colorbar(im, ax=axes[0, i], fraction=0.046, pad=0.02)
        bar.set_label(attribution_label(exp), fontsize=8)
        keep, label = shown_mask(exp)
        axes[1, i].imshow(rgb * keep[:, :, None] + 0.5 * (1 - keep[:, :, None]))
        axes[1, i].set_title(label, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def shown_mask(exp):
    """(H x W mask in [0, 1], caption) to draw over the image for a MapExplanation."""
    if exp.method == "extremal" and exp.masks is not None:
        areas = exp.info.get("areas", [])
        k = int(np.argmin([abs(a - 0.1) for a in areas])) if areas else 0
        return exp.masks[0, k].numpy(), f"mask, area {areas[k]:g}" if areas else "mask"
    if exp.method == "diffmask" and exp.masks is not None:
        m = exp.masks
        m = m[0] if m.dim() == 3 else m
        return m.numpy(), f"gates (kept {exp.info.get('kept', float(m.mean())):.0%})"
    heat = exp.heatmap()
    cut = torch.quantile(heat.flatten().float(), 0.8)
    return (heat >= cut).float().numpy(), "top 20% of pixels"
