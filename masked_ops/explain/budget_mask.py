"""The smallest set of patches that meets a KL budget, taken in the order a learned mask ranks them.

DiffMask's gates answer "which patches does the model need?" with a soft, sampled answer; a user who
asks for a mask that keeps the output distribution within ``eps`` wants a 0/1 mask that does. Given a
ranking of the patches (the gate logits), ``smallest_sufficient`` keeps the top k and finds the
smallest k with KL(clean || masked) <= eps by bisection: ceil(log2(N + 1)) masked forwards of the batch
for N patches (8 for 196), against the hundreds of steps that learned the ranking. Bisection assumes
that keeping more of the ranking never raises the KL much; where it does, the k returned still meets
the budget (only measured k that meet it are ever returned) but may not be the smallest that does.
Keeping every patch reproduces the model (the strategies' all-ones invariant), so k = N always meets it.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch


def top_k_gates(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """B x 1 x gh x gw 0/1 gates (float, like ``scores``) keeping the ``k[b]`` highest-scored patches
    of image b; ties go to the patch that comes first in row-major order."""
    flat = scores.detach().flatten(1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return (rank < k.to(flat.device)[:, None]).to(scores.dtype).view_as(scores)


@torch.no_grad()
def smallest_sufficient(masked_kl: Callable[[torch.Tensor], torch.Tensor], scores: torch.Tensor,
                        eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gates, kept fraction, KL) per image: the top-k patches of ``scores`` for the smallest k found
    with ``masked_kl(gates) <= eps``. ``masked_kl`` maps B x 1 x gh x gw 0/1 gates to B KL values."""
    b, n = scores.shape[0], scores[0].numel()
    lo = torch.full((b,), -1, dtype=torch.long)          # below the smallest k known to miss (or -1)
    hi = torch.full((b,), n, dtype=torch.long)           # the smallest k known to meet the budget
    kl_hi = torch.zeros(b)
    while bool((hi - lo > 1).any()):
        mid = torch.where(hi - lo > 1, (lo + hi) // 2, hi)
        kl = masked_kl(top_k_gates(scores, mid)).float().cpu()
        ok = kl <= eps
        moved = mid != hi
        hi = torch.where(ok & moved, mid, hi)
        kl_hi = torch.where(ok & moved, kl, kl_hi)
        lo = torch.where(~ok & moved, mid, lo)
    gates = top_k_gates(scores, hi)
    full = hi == n
    if bool(full.any()):  # k = N was never measured: measure it rather than trust the invariant
        kl_hi = torch.where(full, masked_kl(gates).float().cpu(), kl_hi)
    return gates, hi.float() / n, kl_hi
