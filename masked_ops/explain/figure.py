"""Pictures of explanations (matplotlib): the image, then one column per masking strategy."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .perturb import Explanation


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


def explanation_figure(image: torch.Tensor, explanations: Sequence[Explanation], class_name: str,
                       title: Optional[str] = None, top_k: int = 5):
    """Figure: column 0 the image; column i the heatmap (top) and top-k segments (bottom) of strategy i."""
    import matplotlib.pyplot as plt

    rgb = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    n = len(explanations)
    fig, axes = plt.subplots(2, n + 1, figsize=(3.2 * (n + 1), 6.6), squeeze=False)
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title("image")
    axes[1, 0].imshow(_boundaries(rgb, explanations[0].segments.numpy()))
    axes[1, 0].set_title(f"{int(explanations[0].segments.max()) + 1} segments")
    for i, exp in enumerate(explanations, 1):
        heat = exp.heatmap().numpy()
        lim = float(np.abs(heat).max()) or 1.0
        axes[0, i].imshow(rgb, alpha=0.35)
        im = axes[0, i].imshow(heat, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.75)
        axes[0, i].set_title(f"{exp.strategy}: {class_name}", fontsize=10)
        fig.colorbar(im, ax=axes[0, i], fraction=0.046, pad=0.02)
        axes[1, i].imshow(top_segments_image(rgb, exp, top_k))
        axes[1, i].set_title(f"{exp.strategy}: top {top_k} segments", fontsize=10)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
