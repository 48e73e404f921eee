"""Perturbation explanations with any masking strategy: LIME, KernelSHAP, occlusion, and adapters.

    from masked_ops.explain import get_strategy, explain_lime
    exp = explain_lime(get_strategy("layer", model), image, num_samples=1000)

Adapters for the lime, Captum and Quantus packages live in masked_ops.explain.adapters.
"""
from .lime import explain_kernel_shap, explain_lime, weighted_ridge
from .occlusion import explain_occlusion
from .perturb import Explanation
from .segmentation import grid_segments, segment
from .strategies import STRATEGIES, Strategy, get_strategy

METHODS = {"lime": explain_lime, "occlusion": explain_occlusion, "kernel-shap": explain_kernel_shap}

__all__ = ["STRATEGIES", "Strategy", "get_strategy", "explain_lime", "explain_kernel_shap",
           "explain_occlusion", "Explanation", "segment", "grid_segments", "weighted_ridge", "METHODS"]
