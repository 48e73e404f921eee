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

# learned-mask and random-mask explainers
from .diffmask import DiffMask, explain_diffmask  # noqa: E402
from .extremal import explain_extremal  # noqa: E402
from .maps import MapExplanation  # noqa: E402
from .rise import explain_rise  # noqa: E402
from .vit_diffmask import VisionDiffMask, explain_vision_diffmask  # noqa: E402  (Vision DiffMask on ViTs)
# the one table of methods, their settings, defaults and limits
from .registry import METHODS, Method, get_method  # noqa: E402

__all__ = ["STRATEGIES", "Strategy", "get_strategy", "explain_lime", "explain_kernel_shap",
           "explain_occlusion", "Explanation", "segment", "grid_segments", "weighted_ridge", "METHODS", "Method",
           "get_method"]
__all__ += ["explain_extremal", "explain_rise", "DiffMask", "explain_diffmask", "MapExplanation"]
__all__ += ["VisionDiffMask", "explain_vision_diffmask"]
