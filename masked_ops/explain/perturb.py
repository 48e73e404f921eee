"""Shared machinery of perturbation explainers: binary samples -> masks -> batched model outputs.

Also the ``Explanation`` result (per-segment weights, the segmentation, the heatmap).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Union

import torch

from .segmentation import check_segments, segment
from .strategies import Strategy

OUTPUTS = ("prob", "logit")


@dataclasses.dataclass
class Explanation:
    """Per-segment attributions of one image for one or more target classes.

    weights: T x K (one row per target); segments: H x W labels 0..K-1; intercept/score: T
    (regression explainers), samples: S x K binary samples, outputs: S x T model outputs.
    """

    method: str
    strategy: str
    targets: List[int]
    weights: torch.Tensor
    segments: torch.Tensor
    intercept: Optional[torch.Tensor] = None
    score: Optional[torch.Tensor] = None
    samples: Optional[torch.Tensor] = None
    outputs: Optional[torch.Tensor] = None

    def heatmap(self, target_index: int = 0) -> torch.Tensor:
        """H x W map: every pixel carries its segment's weight (for target ``targets[target_index]``)."""
        return self.weights[target_index].detach().to(self.segments.device)[self.segments]

    def top_segments(self, k: int = 5, target_index: int = 0) -> torch.Tensor:
        """Indices of the k segments with the largest positive weight."""
        return self.weights[target_index].topk(min(k, self.weights.shape[1])).indices


def prepare_image(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor of shape 3 x H x W (pixels in [0, 1]), "
                        f"got {type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3:
        raise ValueError(f"image must have shape 3 x H x W or 1 x 3 x H x W, got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be floating point in [0, 1], got {image.dtype}")
    return image


def get_segments(image: torch.Tensor, segments: Union[str, torch.Tensor], n_segments: int,
                 seed: int) -> torch.Tensor:
    if isinstance(segments, str):
        seg = segment(image, segments, n_segments=n_segments, seed=seed)
    else:
        seg = check_segments(segments, image.shape[1:])
    return seg.to(image.device)


def check_output(output: str) -> str:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    return output


def check_positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def resolve_batch_size(batch_size: Optional[int], device: torch.device) -> int:
    """The forward batch of the explainers; None picks one per device.

    CPU: 16. Per image, EfficientNet-Lite0 and ResNet-50 run ~40% faster on 2 cores in batches of
    10-16 than of 64 (the activations of a big batch spill out of cache), so small batches win.
    GPU: 64, to fill the device.
    """
    if batch_size is None:
        return 16 if torch.device(device).type == "cpu" else 64
    return check_positive(batch_size, "batch_size")


def _progress(total: int, desc: str, enabled: Optional[bool]):
    from tqdm.auto import tqdm

    # Default: a bar only for long runs (many samples), never in tiny calls.
    disable = (total < 256) if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit="sample", disable=disable, leave=False)


@torch.no_grad()
def resolve_targets(strategy: Strategy, image: torch.Tensor, targets, output: str):
    """(target list, full-image outputs for them): default target = the top-1 class of the full image."""
    full = strategy(image[None], torch.ones(1, 1, *image.shape[1:], dtype=torch.bool, device=image.device))
    full = full.float()
    if targets is None:
        targets = [int(full[0].argmax())]
    elif isinstance(targets, int):
        targets = [targets]
    targets = [int(t) for t in targets]
    n = full.shape[1]
    for t in targets:
        if not 0 <= t < n:
            raise ValueError(f"target class {t} is out of range: the model has {n} outputs")
    vals = full.softmax(1) if output == "prob" else full
    return targets, vals[0, targets]


@torch.inference_mode()
def forward_samples(strategy: Strategy, image: torch.Tensor, segments: torch.Tensor, samples: torch.Tensor,
                    targets: Sequence[int], *, batch_size: Optional[int] = None, output: str = "prob",
                    progress: Optional[bool] = None, desc: str = "explain") -> torch.Tensor:
    """S x T outputs (probabilities or logits of ``targets``) of ``image`` with each sample's segments kept.

    samples: S x K, 1 = segment kept. Masks are built by indexing the segment map (one gather per
    batch, no loop over segments) and each batch goes through the strategy at once.
    """
    batch_size = resolve_batch_size(batch_size, image.device)
    seg = segments.to(image.device)
    idx = torch.as_tensor(list(targets), device=image.device)
    out = []
    with _progress(samples.shape[0], desc, progress) as bar:
        for start in range(0, samples.shape[0], batch_size):
            z = samples[start:start + batch_size].to(image.device, torch.bool)
            masks = z[:, seg].unsqueeze(1)  # B x 1 x H x W
            logits = strategy(image[None], masks).float()
            vals = logits.softmax(1) if output == "prob" else logits
            out.append(vals[:, idx].cpu())
            bar.update(z.shape[0])
    return torch.cat(out).double()
