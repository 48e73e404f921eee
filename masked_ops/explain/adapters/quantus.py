"""Quantus adapter: faithfulness metrics that remove pixels with layer masking.

Recipe (runs as written; tests/test_adapters.py runs it)::

    import numpy as np
    import quantus
    import torch
    from masked_ops.explain import explain_occlusion, get_strategy
    from masked_ops.explain.adapters.quantus import NaNMaskedModel, nan_perturb_func
    from masked_ops.images import load_image
    from masked_ops.models import load_model

    model, info = load_model("efficientnet-lite0")
    images = info.prepare(load_image("chelsea"))                         # N x 3 x 224 x 224, pixels in [0, 1]
    net = NaNMaskedModel(model, "layer", mean=info.mean, std=info.std).eval()   # pixel-space input
    with torch.no_grad():
        y = net(images).argmax(1).numpy()                                # explain the top-1 class
    exp = explain_occlusion(get_strategy("layer", model, mean=info.mean, std=info.std), images[0], targets=int(y[0]))
    x = images.numpy()
    a = np.repeat(exp.numpy()[None, None], 3, axis=1)                    # N x 3 x H x W (why: see below)
    pixel_flipping = quantus.PixelFlipping(features_in_step=224 * 14, perturb_func=nan_perturb_func,
                                           disable_warnings=True)
    curve = pixel_flipping(model=net, x_batch=x, y_batch=y, a_batch=a, device="cpu", softmax=True)
    road = quantus.ROAD(percentages=[10, 30, 50, 70, 90], perturb_func=nan_perturb_func, disable_warnings=True)
    road_scores = road(model=net, x_batch=x, y_batch=y, a_batch=a, device="cpu")

``NaNMaskedModel`` turns NaN into the mask (a pixel is removed once any channel is NaN) and runs
the strategy on pixel-space images (``x_batch`` must be float in [0, 1]; the wrapper normalises).

``nan_perturb_func`` removes **whole pixels, in the order Quantus gives them**: every index
Quantus passes names a value of the C x H x W input; its pixel (index mod H*W) loses all its
channels. It takes every calling convention of Quantus 0.6's faithfulness metrics: flattened
batches (``arr`` N x F, ``indices`` N x I: PixelFlipping, RegionPerturbation, Selectivity,
SensitivityN, FaithfulnessCorrelation, FaithfulnessEstimate, MonotonicityCorrelation, Monotonicity,
Infidelity), one sample (``arr`` C x H x W, ``indices`` I: ROAD) and masks (``arr`` N x C x H x W,
``mask`` N x 1 x H x W: IROF). ``channels`` (default 3) says how many channels a flattened row has.

Counting: Quantus 0.6 ranks all C x H x W values of the attribution (a 1-channel one is broadcast
to C channels first), so each pixel takes C consecutive places in its order. A step of
``features_in_step`` values therefore removes ``features_in_step / C`` whole pixels, and the
curve has C x H x W / ``features_in_step`` points, the last with every pixel removed (the pixels
Quantus's own baseline replacement would have overwritten completely by then). The recipe's
step of 224 * 14 values removes a third of that, 1,045 or 1,046 pixels, over 48 points (Quantus
wants the step to divide H * W, so on a 224 x 224 image it cannot be a multiple of 3 and a
pixel's channels may straddle two steps: the pixel goes at the first). Quantus's loop fixes the number of steps,
so no perturb function can make a step of 224 values remove 224 pixels without the curve ending
early and repeating the empty image. ROAD counts its percentages in places of the *given*
attribution: pass it with the image's C channels (``np.repeat``, as above) so that 10% means 10%
of the pixels (a 1 x H x W attribution would mean 10% / C).

Infidelity subtracts the perturbed input from the input, which NaN makes NaN: use
``negzero_perturb_func`` with ``NaNMaskedModel(..., negative_zero=True)`` there. It marks removed
pixels with -0.0 in every channel, which reads as removed to the model and as 0 (black) to
Infidelity's arithmetic, as Quantus's default black baseline does.

Quantus 0.6's Monotonicity (Arya et al.) starts from an image filled with ``perturb_baseline``
and applies the perturb function to it, so it never puts original pixels back (with its own
baseline replacement every prediction is the same); with ``nan_perturb_func`` it removes pixels
from that filled image. It runs, but measures what Quantus's loop measures.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .nan_model import NaNMaskedModel, nan_mask

__all__ = ["NaNMaskedModel", "nan_mask", "nan_perturb_func", "negzero_perturb_func", "nan_perturb_func_unbatched"]


def _remove_pixels(arr: np.ndarray, value: float, indices=None, mask=None, channels: int = 3) -> np.ndarray:
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"arr must be floating point to hold the removal marker, got {arr.dtype}")
    if mask is not None:  # IROF: arr N x C x H x W, mask N x 1 x H x W (or broadcastable), True = remove
        m = np.asarray(mask, dtype=bool)
        if arr.ndim != 4 or m.ndim != 4 or m.shape[1] != 1:
            raise ValueError(f"with a mask, arr must be N x C x H x W and mask N x 1 x H x W, got {arr.shape} "
                             f"and {m.shape}")
        out = arr.copy()
        out[np.broadcast_to(m, arr.shape)] = value
        return out
    if indices is None:
        raise ValueError("the perturb function needs indices (or a mask)")
    idx = np.asarray(indices)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"indices must be integers (positions in the flattened input), got {idx.dtype}")
    if arr.ndim == 2:  # batched, flattened: arr N x (C*H*W), indices N x I
        if idx.ndim == 1:
            idx = np.broadcast_to(idx, (arr.shape[0], idx.shape[0]))
        if idx.ndim != 2 or idx.shape[0] != arr.shape[0]:
            raise ValueError(f"indices must be N x I for arr N x F, got {idx.shape} for {arr.shape}")
        if arr.shape[1] % channels:
            raise ValueError(f"a flattened row of {arr.shape[1]} values is not {channels} channels of pixels; "
                             f"pass perturb_func_kwargs={{'channels': C}}")
        pixels = arr.shape[1] // channels
        out = arr.reshape(arr.shape[0], channels, pixels).copy()
        rows = np.arange(arr.shape[0])[:, None]
        out[rows, :, idx % pixels] = value  # every channel of each named pixel
        return out.reshape(arr.shape)
    if arr.ndim >= 3:  # one sample, C x H x W (ROAD): indices into its flattened values
        c = arr.shape[0]
        pixels = arr[0].size
        out = arr.reshape(c, pixels).copy()
        out[:, idx.reshape(-1) % pixels] = value
        return out.reshape(arr.shape)
    raise ValueError(f"arr must be N x F (flattened batch), C x H x W (one sample) or N x C x H x W with a mask, "
                     f"got shape {arr.shape}")


def nan_perturb_func(arr: np.ndarray, indices: Optional[np.ndarray] = None, mask: Optional[np.ndarray] = None,
                     channels: int = 3, **kwargs) -> np.ndarray:
    """A copy of ``arr`` with every pixel named by ``indices`` (or ``mask``) set to NaN in all channels.

    See the module docstring for the calling conventions; extra keyword arguments Quantus passes
    (``perturb_baseline``, ``indexed_axes``, ``noise``, ...) are ignored: the removal is the mask.
    """
    return _remove_pixels(arr, np.nan, indices, mask, channels)


def negzero_perturb_func(arr: np.ndarray, indices: Optional[np.ndarray] = None, mask: Optional[np.ndarray] = None,
                         channels: int = 3, **kwargs) -> np.ndarray:
    """Like ``nan_perturb_func``, marking removed pixels with -0.0 (for Infidelity; the model must be
    ``NaNMaskedModel(..., negative_zero=True)``)."""
    return _remove_pixels(arr, -0.0, indices, mask, channels)


# The name of the per-sample variant in earlier versions; nan_perturb_func takes every convention now.
nan_perturb_func_unbatched = nan_perturb_func
