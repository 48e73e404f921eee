"""Adapters: layer masking (or any masking strategy) inside the tools people already use.

- masked_ops.explain.adapters.lime_adapter: ``lime_classifier_fn`` for lime's LimeImageExplainer
  (removed superpixels arrive as NaN: pass ``hide_color=float("nan")``).
- masked_ops.explain.adapters.captum: ``CaptumForward`` + ``captum_inputs`` (the mask travels as a
  4th input channel with baseline 0) for Captum's Lime, KernelShap, FeatureAblation, Occlusion.
- masked_ops.explain.adapters.quantus: ``NaNMaskedModel`` + ``nan_perturb_func`` for Quantus'
  faithfulness metrics (PixelFlipping, RegionPerturbation, ...).
- masked_ops.explain.adapters.shap_adapter: ``shap_model`` for shap's image explainer with
  ``shap.maskers.Image(np.nan, shape)`` (removed pixels arrive as NaN).

Common idea: a removed pixel is a NaN in any channel (the convention ``layer_mask`` already
understands); ``NaNMaskedModel`` turns NaNs into a mask and runs a strategy, which never reads
the removed values. Each module imports its package lazily, so importing this one is cheap.
"""
from .nan_model import NaNMaskedModel, nan_mask

__all__ = ["NaNMaskedModel", "nan_mask"]
