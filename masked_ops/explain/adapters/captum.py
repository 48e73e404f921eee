"""Captum adapter: the mask travels as a 4th input channel, so Captum's baselines never hold NaN.

Captum perturbs by blending ``input * keep + baseline * (1 - keep)``; a NaN baseline would poison
every sample (NaN * 0 = NaN). So the input is ``cat(image, ones)`` (N x 4 x H x W), its baseline
``cat(image, zeros)``: ablating a feature leaves the image channels alone and zeroes the mask
channel there, and ``CaptumForward`` runs the strategy with that channel as the mask.

Recipe (runs as written; tests/test_adapters.py runs it)::

    import torch
    from captum.attr import FeatureAblation, KernelShap, Lime, Occlusion
    from masked_ops.explain import segment
    from masked_ops.explain.adapters.captum import CaptumForward, captum_inputs
    from masked_ops.images import load_image
    from masked_ops.models import load_model

    model, info = load_model("efficientnet-lite0")          # any CNN, with its mean and std
    images = info.prepare(load_image("chelsea"))            # N x 3 x H x W, pixels in [0, 1]
    segments = segment(images[0], "slic", n_segments=50)    # H x W labels, or N x H x W (one map per image)
    fwd = CaptumForward(model, "layer", mean=info.mean, std=info.std).eval()
    args = captum_inputs(images, segments)                  # dict(inputs=, baselines=, feature_mask=)
    with torch.no_grad():
        target = int(fwd(args["inputs"]).argmax())          # the top-1 class
        ablation = FeatureAblation(fwd).attribute(**args, target=target, perturbations_per_eval=16)
        lime = Lime(fwd).attribute(**args, target=target, n_samples=200, perturbations_per_eval=16)
        shap = KernelShap(fwd).attribute(**args, target=target, n_samples=200, perturbations_per_eval=16)
        # Occlusion slides windows instead of using segments; cover all 4 channels:
        occlusion = Occlusion(fwd).attribute(args["inputs"], sliding_window_shapes=(4, 56, 56),
                                             strides=(4, 28, 28), baselines=args["baselines"],
                                             target=target, perturbations_per_eval=16)
    attributions = ablation[:, :3]   # the image channels (the 4th channel holds the mask's copy)

A mask channel value below 0.5 counts as removed (Lime/KernelShap blend with exactly 0 or 1).
``CaptumForward`` returns logits (``softmax=True``: probabilities).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..perturb import check_pixel_range
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
    """``inputs``, ``baselines`` and (with segments) ``feature_mask`` for Captum's perturbation methods.

    images: N x C x H x W (or C x H x W) pixels in [0, 1]. segments: one H x W label map for all
    images, or N x H x W (one map per image; Captum then ablates each image's own segments).
    """
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        raise ValueError(f"images must be an N x C x H x W (or C x H x W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.dim() == 3:
        images = images[None]
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}")
    check_pixel_range(images, "images")
    n, c, h, w = images.shape
    args = {"inputs": with_mask_channel(images, 1.0), "baselines": with_mask_channel(images, 0.0)}
    if segments is not None:
        seg = torch.as_tensor(segments, device=images.device)
        if seg.dtype.is_floating_point or seg.dtype == torch.bool:
            raise TypeError(f"segments must hold integer labels, got {seg.dtype}")
        if seg.dim() == 2:
            seg = seg[None]
        if seg.dim() != 3 or tuple(seg.shape[-2:]) != (h, w) or seg.shape[0] not in (1, n):
            raise ValueError(f"segments must be H x W or N x H x W with H x W = {h} x {w} and N = {n}, got "
                             f"{tuple(torch.as_tensor(segments).shape)}")
        args["feature_mask"] = seg.long()[:, None].expand(seg.shape[0], c + 1, h, w)
    return args
