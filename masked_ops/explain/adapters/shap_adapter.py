"""SHAP's image explainer (the ``shap`` package) with layer masking: removed pixels arrive as NaN.

``shap.maskers.Image(np.nan, shape)`` writes NaN into the pixels SHAP removes; ``shap_model`` wraps a
masking strategy as the function SHAP calls (N x H x W x C NumPy images in [0, 1], NaN where removed ->
N x classes outputs), so the CNN never sees a colour painted into the holes. Recipe (the tests run it
as written)::

    import numpy as np
    import shap
    from masked_ops.explain.adapters.shap_adapter import shap_model
    from masked_ops.images import load_image
    from masked_ops.models import load_model

    model, info = load_model("efficientnet-lite0")
    image = info.prepare(load_image("chelsea"))[0].permute(1, 2, 0).numpy()   # H x W x 3 in [0, 1]
    f = shap_model(model, "layer", mean=info.mean, std=info.std)               # layer masking
    masker = shap.maskers.Image(np.nan, image.shape)                           # removed pixels: NaN
    explainer = shap.Explainer(f, masker, output_names=list(info.class_names))
    sv = explainer(image[None], max_evals=200, batch_size=50, outputs=shap.Explanation.argsort.flip[:1])
    heat = sv.values[0, :, :, :, 0].sum(-1)                                     # H x W, the top class

Any strategy name works (``"grey"``, ``"blur"``, ...: masked_ops.explain.STRATEGIES); with ``"black"``
the result is SHAP's own ``shap.maskers.Image(0.0, shape)`` on the plain model (tested). SHAP's image
masker removes pixels channel by channel; a pixel with any channel NaN is removed as a whole (the
masked_ops convention: a pixel is visible or not).
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from ...images import IMAGENET_MEAN, IMAGENET_STD
from ..strategies import Strategy
from .nan_model import NaNMaskedModel


class shap_model:  # noqa: N801 (used like a function: shap calls it)
    """``f(images) -> outputs`` for SHAP: N x H x W x C (or H x W x C) NumPy or torch images in [0, 1], NaN
    in removed pixels -> N x classes NumPy array (softmax probabilities; ``softmax=False``: logits).

    ``strategy``: a Strategy or a strategy name built from ``model``/``mean``/``std`` (default "layer").
    ``batch_size`` caps the images per forward (SHAP passes its own batches; this bounds memory).
    """

    def __init__(self, model=None, strategy: Union[str, Strategy] = "layer", *,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 softmax: bool = True, batch_size: int = 64, device=None):
        self.module = NaNMaskedModel(model, strategy, mean=mean, std=std, softmax=softmax)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None

    @torch.inference_mode()
    def __call__(self, images) -> np.ndarray:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"images must be N x H x W x C (channels last, as shap.maskers.Image passes "
                             f"them), got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2)
        if self.device is not None:
            x = x.to(self.device)
        out = [self.module(x[i:i + self.batch_size]).float().cpu() for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(out).numpy()
