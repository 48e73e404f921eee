"""A model that reads removed pixels as NaN: the bridge between NaN-painting tools and strategies."""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn

from ..perturb import check_pixel_range
from ...images import IMAGENET_MEAN, IMAGENET_STD
from ..strategies import Strategy, get_strategy


def nan_mask(images: torch.Tensor, negative_zero: bool = False) -> torch.Tensor:
    """N x 1 x H x W bool mask: a pixel is visible iff none of its channels is NaN (and, with
    ``negative_zero``, not all of its channels are -0.0, the marker that survives arithmetic)."""
    visible = ~torch.isnan(images).any(dim=1, keepdim=True)
    if negative_zero:
        marked = ((images == 0) & torch.signbit(images)).all(dim=1, keepdim=True)
        visible &= ~marked
    return visible


class StrategyModule(nn.Module):
    """An nn.Module around a masking strategy, given as a Strategy or by name (then built from
    ``model``/``mean``/``std``/``mode``); the base of the tool adapters."""

    def __init__(self, model: nn.Module = None, strategy: Union[str, Strategy] = "layer", *,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 mode: str = "fill", softmax: bool = False):
        super().__init__()
        if not isinstance(strategy, Strategy):
            if model is None:
                raise ValueError("model is required when strategy is given by name")
            strategy = get_strategy(strategy, model, mean=mean, std=std, mode=mode)
        self.strategy = strategy
        # Registered so that .to(device) / .eval() reach the wrapped model.
        self.model = strategy.model if isinstance(strategy.model, nn.Module) else None
        self.softmax = softmax


class NaNMaskedModel(StrategyModule):
    """``forward(images) -> logits`` for pixel-space images whose removed pixels are NaN.

    ``strategy`` is a Strategy or a strategy name (default "layer": layer masking); with a name,
    ``model``/``mean``/``std``/``mode`` build it. Removed values are replaced by 0 before the
    strategy sees them (strategies never read them anyway), so NaN never reaches the model.
    ``softmax=True`` returns probabilities instead of logits. ``negative_zero=True`` also reads a
    pixel whose channels are all -0.0 as removed (the marker of the Quantus adapter's
    ``negzero_perturb_func``). The visible pixels must lie in [0, 1] (checked: a 0-255 or an
    already normalised image is refused instead of giving meaningless outputs).
    """

    def __init__(self, *args, negative_zero: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.negative_zero = bool(negative_zero)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"NaNMaskedModel expects N x C x H x W images, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        visible = nan_mask(images, self.negative_zero)
        clean = torch.where(visible, images, torch.zeros((), dtype=images.dtype, device=images.device))
        check_pixel_range(clean, "NaNMaskedModel input")
        out = self.strategy(clean, visible)
        return out.softmax(1) if self.softmax else out
