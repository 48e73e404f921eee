"""lime package adapter: a ``classifier_fn`` for ``LimeImageExplainer.explain_instance``.

Recipe (runs as written; tests/test_adapters.py runs it)::

    from lime.lime_image import LimeImageExplainer
    from masked_ops.explain.adapters.lime_adapter import lime_classifier_fn, to_lime_image
    from masked_ops.images import load_image
    from masked_ops.models import load_model

    model, info = load_model("efficientnet-lite0")
    image = to_lime_image(info.prepare(load_image("chelsea")))   # H x W x 3 float64 in [0, 1]
    fn = lime_classifier_fn(model, strategy="layer", mean=info.mean, std=info.std)
    explanation = LimeImageExplainer(random_state=0).explain_instance(
        image, fn, hide_color=float("nan"), top_labels=1, num_samples=200, batch_size=50, random_seed=0)

lime paints the removed superpixels with ``hide_color``; NaN marks them as removed, and the
classifier runs the model with layer masking (or any other strategy: with a fill strategy the
NaNs are replaced by that fill). The image must be float so that it can hold NaN: lime fails
inside ``explain_instance`` on a uint8 image with ``hide_color=nan`` (it cannot write NaN into
uint8), so convert it first with ``to_lime_image`` (uint8 / 255, or a 3 x H x W tensor). The
function returns softmax probabilities, as lime expects.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ...images import IMAGENET_MEAN, IMAGENET_STD
from ..strategies import Strategy
from .nan_model import NaNMaskedModel


def to_lime_image(image) -> np.ndarray:
    """An H x W x 3 float64 array in [0, 1] for lime, from a uint8 array (divided by 255), a float
    array in [0, 1], or a (1 x) 3 x H x W tensor in [0, 1] (masked_ops' layout)."""
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        t = t[0] if t.dim() == 4 and t.shape[0] == 1 else t
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"image tensor must be 3 x H x W (or 1 x 3 x H x W), got {tuple(image.shape)}")
        arr = t.permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3 (or a 3 x H x W tensor), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"image must be uint8 or float in [0, 1], got {arr.dtype}")
    if arr.size and (np.nanmin(arr) < -1e-3 or np.nanmax(arr) > 1 + 1e-3):
        raise ValueError(f"image must hold pixels in [0, 1], got values in [{np.nanmin(arr):.4g}, "
                         f"{np.nanmax(arr):.4g}] (divide a 0-255 image by 255)")
    return arr.astype(np.float64)


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
            raise TypeError(f"classifier_fn expects float images in [0, 1] (to carry NaN), got {arr.dtype}: give "
                            f"explain_instance to_lime_image(image) (uint8 -> float / 255) and hide_color=float('nan')")
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(0, 3, 1, 2).to(device)
        with torch.inference_mode():
            return net(x).float().cpu().numpy()

    return classifier_fn
