"""Hard-concrete gates (Louizos, Welling & Kingma 2018) with Vision DiffMask's settings, and the KL.

A gate z = clamp(sigmoid((log u - log(1 - u) + log_alpha) / 0.2) * 1.2 - 0.2, 0, 1), u uniform:
exactly 0 with positive probability, differentiable in log_alpha where 0 < z < 1 (Vision DiffMask's
``RectifiedStreched(BinaryConcrete(0.2, logits), l=-0.2, r=1.0)``; with r = 1.0 the stretch does
not reach past 1, so z = 1 only where the sigmoid rounds to 1). P(z != 0) = sigmoid(log_alpha -
0.2 log(0.2 / 1.0)) is the gate's expected L0.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

TEMPERATURE = 0.2
STRETCH = (-0.2, 1.0)


def hard_concrete_sample(log_alpha: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One reparameterised hard-concrete sample per logit, in [0, 1] (exact 0 and 1 included)."""
    u = torch.rand(log_alpha.shape, generator=generator, dtype=log_alpha.dtype).to(log_alpha.device)
    u = u.clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / TEMPERATURE)
    lo, hi = STRETCH
    return (s * (hi - lo) + lo).clamp(0, 1)


def straight_through_gates(z: torch.Tensor, log_alpha: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """The sampled gates z as values (at least ``floor``), with the gradient of their open probability.

    Why: z's own gradient is 0 wherever the stretch is clamped (z exactly 0 or 1), so a shut gate
    never hears from the KL term while the L0 term, which reads the open probability, keeps pushing
    it shut. On EfficientNet-Lite0 with layer masking the amortised gates all shut within 20 steps
    once the L0 term had the upper hand, and stayed shut with the Lagrange multiplier at 97 (KL 4.3,
    eps 0.1). Routing the KL's gradient through the open probability, the quantity the L0 term
    also reads, lets both terms act on every gate at every step (a straight-through estimator).
    ``floor`` > 0 keeps a shut gate faintly open in value: a strategy's mask gradient at a pixel that is
    exactly removed cannot depend on that pixel (layer masking never reads it), so only a gate above 0
    can learn that opening it would help.
    """
    p = open_probability(log_alpha)
    return z.detach().clamp_min(floor) + (p - p.detach())


def open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate != 0): the expected L0 of each gate."""
    lo, hi = STRETCH
    return torch.sigmoid(log_alpha - TEMPERATURE * math.log(-lo / hi))


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """The test-time gate (Louizos et al.): the stretched sigmoid without noise, clamped to [0, 1]."""
    lo, hi = STRETCH
    return (torch.sigmoid(log_alpha) * (hi - lo) + lo).clamp(0, 1)


def kl_divergence(logits_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits_ref) || softmax(logits)) per row."""
    ref = F.log_softmax(logits_ref.float(), dim=-1)
    out = F.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - out)).sum(-1)


def gates_to_mask(gates: torch.Tensor, patch: int) -> torch.Tensor:
    """B x 1 x gh x gw gates -> B x 1 x (gh patch) x (gw patch) pixel mask (nearest)."""
    return gates.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
