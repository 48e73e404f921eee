"""Captum adapter: the mask travels as a 4th input channel, so Captum's baselines never hold NaN.

Captum perturbs by blending ``input * keep + baseline * (1 - keep)``; a NaN baseline would poison
every sample (NaN * 0 = NaN). So the input is ``cat(image, ones)`` (N x 4 x H x W), its baseline
``cat(image, zeros)``: ablating a feature leaves the image channels alone and zeroes the mask
channel there, and ``CaptumForward`` runs the strategy with that channel as the mask.

Recipe (``segments``: H x W labels, e.g. from masked_ops.explain.segment)::

    from captum.attr import Lime, KernelShap, FeatureAblation, Occlusion
    fwd = CaptumForward(model, "layer", mean=MEAN, std=STD)
    args = captum_inputs(images, segments)        # dict(inputs=, baselines=, feature_mask=)
    FeatureAblation(fwd).attribute(**args, target=285, perturbations_per_eval=32)
    Lime(fwd).attribute(**args, target=285, n_samples=1000, perturbations_per_eval=32)
    KernelShap(fwd).attribute(**args, target=285, n_samples=1000, perturbations_per_eval=32)
    # Occlusion slides windows instead of using segments; cover all 4 channels:
    Occlusion(fwd).attribute(args["inputs"], sliding_window_shapes=(4, 32, 32), strides=(4, 16, 16),
                             baselines=args["baselines"], target=285, perturbations_per_eval=32)
    attributions[:, :3]  # the image channels' attributions (the 4th is the mask's copy)

A mask channel value below 0.5 counts as removed (Lime/KernelShap blend with exactly 0 or 1).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .nan_model import StrategyModule


class CaptumForward(StrategyModule):
    """``forward(x4) -> logits``: x4 = N x (C+1) x H x W, image channels then the mask channel."""

    def forward(self, x4: torch.Tensor) -> torch.Tensor:
        if x4.dim() != 4 or x4.shape[1] < 2:
            raise ValueError(f"CaptumForward expects N x (C+1) x H x W (image channels, then the mask "
                             f"channel), got shape {tuple(x4.shape)}")
        images, visible = x4[:, :-1], x4[:, -1:] > 0.5
        out = self.strategy(images, visible)
        return out.softmax(1) if self.softmax else out


def with_mask_channel(images: torch.Tensor, value: float = 1.0) -> torch.Tensor:
    """N x C x H x W -> N x (C+1) x H x W with a constant mask channel (1 = all visible)."""
    return torch.cat([images, torch.full_like(images[:, :1], value)], dim=1)


def captum_inputs(images: torch.Tensor, segments: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """``inputs``, ``baselines`` and (with segments) ``feature_mask`` for Captum's perturbation methods."""
    if images.dim() == 3:
        images = images[None]
    args = {"inputs": with_mask_channel(images, 1.0), "baselines": with_mask_channel(images, 0.0)}
    if segments is not None:
        seg = torch.as_tensor(segments, device=images.device).long()
        if tuple(seg.shape[-2:]) != tuple(images.shape[-2:]):
            raise ValueError(f"segments must be H x W = {tuple(images.shape[-2:])}, got {tuple(seg.shape)}")
        args["feature_mask"] = seg.reshape(1, 1, *seg.shape[-2:]).expand(1, images.shape[1] + 1, -1, -1)
    return args
