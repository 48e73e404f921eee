"""lime package adapter: a ``classifier_fn`` for ``LimeImageExplainer.explain_instance``.

    from lime.lime_image import LimeImageExplainer
    from masked_ops.explain.adapters.lime_adapter import lime_classifier_fn

    fn = lime_classifier_fn(model, strategy="layer", mean=MEAN, std=STD)
    exp = LimeImageExplainer().explain_instance(
        image_hwc_float01, fn, hide_color=float("nan"), num_samples=1000, batch_size=50)

lime paints the removed superpixels with ``hide_color``; NaN marks them as removed, and the
classifier runs the model with layer masking (or any other strategy: with a fill strategy the
NaNs are replaced by that fill). The image must be float (H x W x 3, pixels in [0, 1]) so that
it can hold NaN. The function returns softmax probabilities, as lime expects.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..strategies import IMAGENET_MEAN, IMAGENET_STD, Strategy
from .nan_model import NaNMaskedModel


def lime_classifier_fn(model: Optional[nn.Module] = None, strategy: Union[str, Strategy] = "layer", *,
                       mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                       mode: str = "fill", device: Union[str, torch.device, None] = None,
                       softmax: bool = True):
    """``fn(images: N x H x W x 3 numpy, NaN = removed) -> N x classes numpy`` (probabilities)."""
    net = NaNMaskedModel(model, strategy, mean=mean, std=std, mode=mode, softmax=softmax)
    if device is None:
        p = next(iter(net.strategy.model.parameters()), None) if isinstance(net.strategy.model, nn.Module) else None
        device = p.device if p is not None else torch.device("cpu")

    def classifier_fn(images) -> np.ndarray:
        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"classifier_fn expects N x H x W x 3 images, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"classifier_fn expects float images in [0, 1] (to carry NaN), got {arr.dtype}; "
                            f"pass image.astype(float) / 255 to explain_instance")
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(0, 3, 1, 2).to(device)
        with torch.inference_mode():
            return net(x).float().cpu().numpy()

    return classifier_fn
