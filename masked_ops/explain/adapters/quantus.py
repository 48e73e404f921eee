"""Quantus adapter: faithfulness metrics that remove pixels with layer masking.

    import quantus
    from masked_ops.explain.adapters.quantus import NaNMaskedModel, nan_perturb_func

    net = NaNMaskedModel(model, "layer", mean=MEAN, std=STD).eval()   # pixel-space input
    metric = quantus.PixelFlipping(features_in_step=224, perturb_func=nan_perturb_func,
                                   disable_warnings=True)
    scores = metric(model=net, x_batch=x, y_batch=y, a_batch=a, device="cpu")

Quantus' PixelFlipping and RegionPerturbation call ``perturb_func(arr=N x F, indices=N x I)`` on
flattened batches; ``nan_perturb_func`` writes NaN there instead of a baseline colour, and
``NaNMaskedModel`` turns the NaNs into the mask (a pixel is removed once any of its channels is
NaN). ``x_batch`` must be float, in pixel space ([0, 1]): the wrapper normalises.
``nan_perturb_func_unbatched`` is the same for metrics that perturb one sample with slices
(``arr, indices, indexed_axes``).
"""
from __future__ import annotations

import numpy as np

from .nan_model import NaNMaskedModel, nan_mask

__all__ = ["NaNMaskedModel", "nan_mask", "nan_perturb_func", "nan_perturb_func_unbatched"]


def nan_perturb_func(arr: np.ndarray, indices: np.ndarray, **kwargs) -> np.ndarray:
    """Batched: a copy of ``arr`` (N x F) with ``arr[n, indices[n]] = NaN``."""
    arr = np.asarray(arr)
    if arr.ndim != 2 or np.asarray(indices).ndim != 2:
        raise ValueError(f"nan_perturb_func expects arr N x F and indices N x I, got {arr.shape} and "
                         f"{np.asarray(indices).shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"arr must be floating point to hold NaN, got {arr.dtype}")
    out = arr.copy()
    out[np.arange(arr.shape[0])[:, None], indices] = np.nan
    return out


def nan_perturb_func_unbatched(arr: np.ndarray, indices, indexed_axes, **kwargs) -> np.ndarray:
    """One sample: like quantus' baseline_replacement_by_indices, with NaN as the baseline."""
    from quantus.helpers.utils import expand_indices

    out = np.array(arr, dtype=np.result_type(arr, np.float32), copy=True)
    out[expand_indices(out, indices, indexed_axes)] = np.nan
    return out
