"""Which strategies take soft masks, and how the learned-mask explainers get one that does.

Learned-mask explainers (extremal perturbations, DiffMask) optimise a mask by gradient descent
through ``strategy(images, masks)``, and RISE feeds it smooth random masks: they need a strategy
that takes float masks in [0, 1] and is differentiable in them (``strategy.soft``; see
masked_ops.explain.strategies). The colour and blur fills blend and are always soft; layer
masking is soft when built with ``get_strategy("layer", model, soft=True)``, which
``soft_strategy`` asks for. The imputation strategies (inpainting, noisy-linear, segment-mean)
take hard masks only.
"""
from __future__ import annotations

import contextlib

from .strategies import LAYER_STRATEGIES, Strategy, get_strategy, soft_strategy_names


def supports_soft(strategy) -> bool:
    """True when ``strategy`` (a Strategy or a name) takes float masks in [0, 1] with gradients
    (a layer strategy's name: when built by ``soft_strategy``)."""
    if isinstance(strategy, Strategy):
        return bool(getattr(strategy, "soft", False))
    return isinstance(strategy, str) and strategy in soft_strategy_names()


def soft_strategies() -> tuple:
    """The names in STRATEGIES whose strategies take soft masks."""
    return soft_strategy_names()


def require_soft(strategy, method: str) -> Strategy:
    """``strategy`` itself if it takes soft masks, else a ValueError that says what to use instead."""
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a masked_ops.explain Strategy (get_strategy(name, model)), "
                        f"got {type(strategy).__name__}")
    if not getattr(strategy, "soft", False):
        hint = (f"get_strategy({strategy.name!r}, model, soft=True)" if strategy.name in LAYER_STRATEGIES
                else f"one of {', '.join(soft_strategies())}")
        raise ValueError(
            f"{method} needs a strategy that takes soft masks in [0, 1] and is differentiable in them; "
            f"strategy {strategy.name!r} takes hard 0/1 masks only. Use {hint}")
    return strategy


def soft_strategy(name, model, method: str = "this explainer", **options) -> Strategy:
    """get_strategy(name, model, **options), asking for the soft variant of layer strategies (``soft=``
    a name of masks.SOFT_SEMANTICS picks one; else the default), checked."""
    if isinstance(name, Strategy):
        return require_soft(name, method)
    if name in LAYER_STRATEGIES and not options.get("soft"):
        options["soft"] = True  # the default soft semantics; a name in options picks another
    return require_soft(get_strategy(name, model, **options), method)


@contextlib.contextmanager
def frozen_parameters(strategy: Strategy):
    """No gradients for the parameters of the strategy's model (and of its layer-masked copy, whose
    folded weights are parameters of their own) while a mask is optimised; restored afterwards."""
    import torch

    modules = [strategy.model]
    if hasattr(type(strategy), "masked_model"):  # a layer strategy: its converted model (built here)
        modules.append(strategy.masked_model)
    params = {id(p): p for m in modules if hasattr(m, "parameters") for p in m.parameters() if p.requires_grad}
    for p in params.values():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in params.values():
            p.requires_grad_(True)
