"""Segment an image into features (superpixels or a grid) for LIME, SHAP and occlusion.

A segmentation is an H x W LongTensor of labels 0..K-1 (every label used). Perturbation
explainers switch whole segments on and off: ``samples[:, segments]`` turns S x K binary
samples into S x H x W masks in one indexing operation.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

METHODS = ("grid", "slic", "quickshift", "felzenszwalb")


def grid_segments(height: int, width: int, cells: int = 8, cols: Optional[int] = None) -> torch.Tensor:
    """``cells`` rows x ``cols`` columns (default: ``cells``) of rectangular segments, row-major labels."""
    cols = cells if cols is None else cols
    if cells < 1 or cols < 1:
        raise ValueError(f"cells and cols must be >= 1, got {cells} and {cols}")
    r = torch.clamp(torch.arange(height) * cells // height, max=cells - 1)
    c = torch.clamp(torch.arange(width) * cols // width, max=cols - 1)
    return r[:, None] * cols + c[None, :]


def grid_shape(height: int, width: int, n_segments: int) -> Tuple[int, int]:
    """(rows, cols) of a grid of about ``n_segments`` cells, as square as the image allows.

    rows = round(sqrt(n * H / W)), cols = round(n / rows): a square image with a square number
    gives the square grid (64 -> 8 x 8); 2 cells split the longer side (never a 1-cell grid for n >= 2).
    """
    rows = max(1, int(round((n_segments * height / width) ** 0.5)))
    cols = max(1, int(round(n_segments / rows)))
    if n_segments >= 2 and rows * cols < 2:
        rows, cols = (2, 1) if height > width else (1, 2)
    return min(rows, height), min(cols, width)


def relabel(labels) -> torch.Tensor:
    """Labels renumbered 0..K-1 in order of first appearance of the sorted unique values."""
    t = torch.as_tensor(np.asarray(labels)).long()
    _, inverse = torch.unique(t, return_inverse=True)
    return inverse


def segment(image: torch.Tensor, method: str = "slic", n_segments: int = 50, seed: int = 0,
            **options) -> torch.Tensor:
    """H x W labels 0..K-1 of a 3 x H x W image in [0, 1].

    method: "grid" (rows x cols of about ``n_segments`` cells, see ``grid_shape``), "slic"
    (``n_segments`` target, compactness 20, sigma 1), "quickshift" (LIME's default: kernel_size 4,
    max_dist 200, ratio 0.2) or "felzenszwalb". ``options`` go to the scikit-image function.
    Raises ValueError for an unknown method or a segmentation with fewer than two segments
    (nothing to explain).
    """
    if not (isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3):
        raise ValueError(f"image must be a 3 x H x W tensor, got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    h, w = image.shape[1:]
    if method == "grid":
        seg = grid_segments(h, w, *grid_shape(h, w, n_segments))
    elif method in METHODS:
        import skimage.segmentation as S

        rgb = image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy().astype(np.float64)
        if method == "slic":
            # compactness 20 and a light smoothing give compact, image-aligned superpixels on photos
            opts = dict(n_segments=n_segments, compactness=20, sigma=1, start_label=0)
            opts.update(options)
            labels = S.slic(rgb, **opts)
        elif method == "quickshift":
            opts = dict(kernel_size=4, max_dist=200, ratio=0.2, rng=seed)
            opts.update(options)
            labels = S.quickshift(rgb, **opts)
        else:
            opts = dict(scale=100, sigma=0.5, min_size=50)
            opts.update(options)
            labels = S.felzenszwalb(rgb, **opts)
        seg = relabel(labels)
    else:
        raise ValueError(f"unknown segmentation method {method!r}; expected one of {', '.join(METHODS)}")
    check_segments(seg)
    return seg


def check_segments(segments: Union[torch.Tensor, np.ndarray], shape=None) -> torch.Tensor:
    """Validate a segmentation: H x W integer labels 0..K-1, K >= 2, every label used."""
    seg = torch.as_tensor(segments)
    if seg.dim() != 2 or seg.dtype.is_floating_point or seg.dtype == torch.bool:
        raise ValueError(f"segments must be an H x W integer label map, got shape {tuple(seg.shape)} "
                         f"dtype {seg.dtype}")
    if shape is not None and tuple(seg.shape) != tuple(shape):
        raise ValueError(f"segments must have the image's shape {tuple(shape)}, got {tuple(seg.shape)}")
    k = int(seg.max()) + 1 if seg.numel() else 0
    if int(seg.min()) < 0 or torch.unique(seg).numel() != k:
        raise ValueError("segments must use every label 0..K-1 exactly (relabel it with "
                         "masked_ops.explain.segmentation.relabel)")
    if k < 2:
        raise ValueError(f"the segmentation has {k} segment(s); at least 2 are needed to explain anything "
                         f"(use more segments or a finer grid)")
    return seg.long()
