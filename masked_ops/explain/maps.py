"""Pixel-map and patch-map explanations (extremal perturbations, RISE, DiffMask) as ``Explanation``.

The learned-mask and sampling explainers produce a map over pixels (or over a grid of patches)
instead of weights of superpixels. They return a ``MapExplanation``: an ``Explanation`` whose
segments are the pixels (``pixel_segments``) or the patches (``patch_segments``), so that
``heatmap()``, ``top_segments()`` and the figures work unchanged, plus the raw masks (for
extremal perturbations: one mask per area) and the run's diagnostics.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch

from .perturb import Explanation


@dataclasses.dataclass
class MapExplanation(Explanation):
    """An Explanation over pixels or patches; ``masks`` (T x A x H x W, optional) are the raw masks
    (extremal: one per area; DiffMask: the expected gate map), ``info`` the run's diagnostics."""

    masks: Optional[torch.Tensor] = None
    info: Dict = dataclasses.field(default_factory=dict)


def pixel_segments(height: int, width: int) -> torch.Tensor:
    """H x W labels: every pixel its own segment (row-major)."""
    return torch.arange(height * width, dtype=torch.int64).view(height, width)


def patch_segments(height: int, width: int, patch: int) -> torch.Tensor:
    """H x W labels of a grid of patch x patch cells (H and W multiples of patch), row-major."""
    gw = width // patch
    rows = torch.arange(height) // patch
    cols = torch.arange(width) // patch
    return rows[:, None] * gw + cols[None, :]


def map_explanation(method: str, strategy: str, targets: List[int], maps: torch.Tensor, *,
                    masks: Optional[torch.Tensor] = None, info: Optional[Dict] = None) -> MapExplanation:
    """MapExplanation from T x H x W pixel maps."""
    t, h, w = maps.shape
    return MapExplanation(method, strategy, list(targets), maps.detach().float().reshape(t, h * w).cpu(),
                          pixel_segments(h, w), masks=None if masks is None else masks.detach().float().cpu(),
                          info=dict(info or {}))
