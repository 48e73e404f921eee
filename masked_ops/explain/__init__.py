"""Perturbation explanations with any masking strategy: LIME, KernelSHAP, occlusion, and adapters.

    from masked_ops.explain import get_strategy, explain_lime
    exp = explain_lime(get_strategy("layer", model), image, num_samples=1000)

Adapters for the lime, Captum and Quantus packages live in masked_ops.explain.adapters.
Learned masks and random masks (soft masks through any soft strategy): explain_extremal,
explain_rise, DiffMask (amortised) and explain_diffmask (per image).
"""
from .lime import explain_kernel_shap, explain_lime, weighted_ridge
from .occlusion import explain_occlusion
from .perturb import Explanation
from .segmentation import grid_segments, segment
from .strategies import STRATEGIES, Strategy, get_strategy

METHODS = {"lime": explain_lime, "occlusion": explain_occlusion, "kernel-shap": explain_kernel_shap}

# learned-mask and random-mask explainers (methods of their own: masked_ops.explain.mask_cli drives them)
from .diffmask import DiffMask, explain_diffmask  # noqa: E402
from .extremal import explain_extremal  # noqa: E402
from .maps import MapExplanation  # noqa: E402
from .rise import explain_rise  # noqa: E402

MASK_METHODS = {"extremal": explain_extremal, "rise": explain_rise, "diffmask": explain_diffmask}

__all__ = ["STRATEGIES", "Strategy", "get_strategy", "explain_lime", "explain_kernel_shap",
           "explain_occlusion", "Explanation", "segment", "grid_segments", "weighted_ridge", "METHODS"]
__all__ += ["explain_extremal", "explain_rise", "DiffMask", "explain_diffmask", "MapExplanation",
            "MASK_METHODS"]
