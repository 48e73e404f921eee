"""Occlusion / feature ablation over a grid or superpixels, batched through any strategy.

The attribution of segment k is f(full image) - f(image with segment k removed), for each
target: one forward pass per segment, all in batches. A grid of patches is occlusion in the
sense of Zeiler & Fergus (non-overlapping windows); superpixels make it feature ablation.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .perturb import (Explanation, check_output, forward_samples, get_segments, prepare_image,
                      resolve_batch_size, resolve_targets)
from .strategies import Strategy


def explain_occlusion(strategy: Strategy, image: torch.Tensor, *, targets: Union[None, int, Sequence[int]] = None,
                      segments: Union[str, torch.Tensor] = "grid", n_segments: int = 64, batch_size: Optional[int] = None,
                      output: str = "prob", seed: int = 0, progress: Optional[bool] = None) -> Explanation:
    """Drop in output when each segment alone is removed (T x K weights); default segments: 8 x 8 grid."""
    image = prepare_image(image)
    check_output(output)
    batch_size = resolve_batch_size(batch_size, image.device)
    seg = get_segments(image, segments, n_segments, seed)
    k = int(seg.max()) + 1
    targets, full = resolve_targets(strategy, image, targets, output)
    samples = 1.0 - torch.eye(k, dtype=torch.float64)  # row k: everything but segment k
    outputs = forward_samples(strategy, image, seg, samples, targets, batch_size=batch_size, output=output,
                              progress=progress, desc=f"occlusion ({strategy.name})")
    weights = (full.double().cpu()[None, :] - outputs).T  # T x K
    return Explanation("occlusion", strategy.name, targets, weights.float(), seg.cpu(), samples=samples,
                       outputs=outputs)
