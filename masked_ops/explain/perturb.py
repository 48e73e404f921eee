"""Shared machinery of perturbation explainers: binary samples -> masks -> batched model outputs.

Also the ``Explanation`` result (per-segment weights, the segmentation, the heatmap), its .npz file
format (``save_explanations`` / ``load_explanations``) and the pixel-range check of the explainers.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .._util.progress import progress_bar
from .segmentation import check_segments, segment
from .strategies import Strategy, bound_forward

OUTPUTS = ("prob", "logit")


@dataclasses.dataclass
class Explanation:
    """Per-segment attributions of one image for one or more target classes.

    weights: T x K (one row per target); segments: H x W labels 0..K-1; intercept/score: T
    (regression explainers), samples: S x K binary samples, outputs: S x T model outputs;
    output: what was explained, "prob" (softmax probabilities) or "logit"; meta: free-form
    JSON-able facts (model, weights, image, ...) kept by ``save``.

        exp.heatmap()          # H x W tensor: every pixel carries its segment's weight
        exp.numpy()            # the same as a NumPy array (numpy(None): T x H x W, all targets)
        exp.save("cat.npz")    # arrays + metadata; Explanation.load("cat.npz") reads it back
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
    output: str = "prob"
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def heatmap(self, target_index: int = 0) -> torch.Tensor:
        """H x W map: every pixel carries its segment's weight (for target ``targets[target_index]``)."""
        return self.weights[target_index].detach().to(self.segments.device)[self.segments]

    def top_segments(self, k: int = 5, target_index: int = 0) -> torch.Tensor:
        """Indices of the k segments with the largest positive weight."""
        return self.weights[target_index].topk(min(k, self.weights.shape[1])).indices

    def numpy(self, target_index: Optional[int] = 0):
        """The attribution map as a float32 NumPy array: H x W for ``targets[target_index]``, or
        T x H x W (one map per target) with ``target_index=None``."""
        if target_index is None:
            maps = self.weights.detach().float().cpu()[:, self.segments.cpu()]
        else:
            maps = self.heatmap(target_index).detach().float().cpu()
        return maps.numpy()

    def save(self, path, **meta) -> None:
        """Write this explanation to an .npz file, atomically; ``meta`` (JSON-able) is stored with
        ``self.meta`` and comes back in the loaded explanation's ``meta``. ``Explanation.load(path)``
        reads it back; see ``save_explanations`` for the layout."""
        save_explanations(path, [dataclasses.replace(self, meta={**self.meta, **meta})])

    @classmethod
    def load(cls, path, strategy: Optional[str] = None) -> "Explanation":
        """The explanation stored in ``path`` (an .npz written by ``save`` or ``masked-ops explain --save``).

        A file holding several (one per masking strategy) needs ``strategy`` to pick one.
        """
        exps, _ = load_explanations(path)
        if strategy is not None:
            exps = [e for e in exps if e.strategy == strategy]
            if not exps:
                raise ValueError(f"{path}: no explanation with strategy {strategy!r}")
        if len(exps) != 1:
            raise ValueError(f"{path} holds {len(exps)} explanations (strategies "
                             f"{', '.join(e.strategy for e in exps)}): pick one with strategy=..., or read all "
                             f"with masked_ops.explain.perturb.load_explanations")
        return exps[0]


# ----------------------------------------------------------------------------- files
_TENSORS = ("weights", "segments", "intercept", "score", "samples", "outputs")
FORMAT = "masked_ops.explanations/1"


def save_explanations(path, explanations: Sequence[Explanation], *, image: Optional[torch.Tensor] = None,
                      meta: Optional[Dict[str, Any]] = None) -> None:
    """Write explanations to one .npz file (atomically, normal permissions).

    Layout (readable without masked_ops: ``numpy.load``): ``attributions`` E x T x H x W float32
    (explanation e's map for each target; only when all share the shape), ``e{i}/weights``,
    ``e{i}/segments``, ``e{i}/targets`` and the other tensors of explanation i, ``image`` 3 x H x W
    (optional), and ``meta``: a JSON string {"format", "explanations": [{method, strategy, output,
    targets, meta}], plus ``meta``'s keys}.
    """
    import json

    import numpy as np

    from .._util.io import atomic_write

    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"explanations are saved as .npz files, got {path!r}")
    explanations = list(explanations)
    if not explanations or not all(isinstance(e, Explanation) for e in explanations):
        raise TypeError("explanations must be a non-empty sequence of Explanation")
    arrays: Dict[str, Any] = {}
    info = []
    for i, e in enumerate(explanations):
        for name in _TENSORS:
            value = getattr(e, name)
            if value is not None:
                arrays[f"e{i}/{name}"] = torch.as_tensor(value).detach().cpu().numpy()
        arrays[f"e{i}/targets"] = np.asarray(e.targets, dtype=np.int64)
        info.append({"method": e.method, "strategy": e.strategy, "output": e.output,
                     "targets": [int(t) for t in e.targets], "meta": e.meta})
    maps = [e.numpy(None) for e in explanations]
    if all(m.shape == maps[0].shape for m in maps):
        arrays["attributions"] = np.stack(maps)
    if image is not None:
        arrays["image"] = torch.as_tensor(image).detach().float().cpu().numpy()
    header = {"format": FORMAT, "explanations": info, **(meta or {})}
    arrays["meta"] = np.asarray(json.dumps(header, default=str))
    with atomic_write(path) as f:
        np.savez_compressed(f, **arrays)


def load_explanations(path) -> Tuple[List[Explanation], Dict[str, Any]]:
    """(explanations, file metadata) from an .npz written by ``save_explanations``."""
    import json

    import numpy as np

    with np.load(os.fspath(path), allow_pickle=False) as z:
        if "meta" not in z.files:
            raise ValueError(f"{path} is not an explanation file (no 'meta' entry)")
        header = json.loads(str(z["meta"]))
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown format {header.get('format')!r}, expected {FORMAT!r}")
        exps = []
        for i, info in enumerate(header["explanations"]):
            tensors = {n: torch.from_numpy(z[f"e{i}/{n}"]) for n in _TENSORS if f"e{i}/{n}" in z.files}
            exps.append(Explanation(info["method"], info["strategy"], [int(t) for t in z[f"e{i}/targets"]],
                                    output=info.get("output", "prob"), meta=info.get("meta", {}), **tensors))
    meta = {k: v for k, v in header.items() if k != "explanations"}
    return exps, meta


# ----------------------------------------------------------------------------- shared checks
PIXEL_TOLERANCE = 1e-3


def check_pixel_range(image: torch.Tensor, name: str = "image") -> None:
    """Raise unless the finite values of ``image`` lie in [0, 1] (within 1e-3).

    Everything here works in pixel space; a 0-255 image (or an already normalised one) would be
    explained without complaint and give meaningless weights, so it is refused.
    """
    finite = image[torch.isfinite(image)] if image.is_floating_point() else image
    if finite.numel() == 0:
        return
    lo, hi = float(finite.min()), float(finite.max())
    if lo < -PIXEL_TOLERANCE or hi > 1 + PIXEL_TOLERANCE:
        hint = ("divide a 0-255 image by 255" if hi > 2 else
                "pass pixels, not normalised values: the strategies normalise with mean/std themselves")
        raise ValueError(f"{name} must hold pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}]: {hint}")


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
    if not bool(torch.isfinite(image).all()):
        raise ValueError("image holds NaN or inf: explainers need the whole image (they remove parts themselves)")
    check_pixel_range(image)
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


def resolve_batch_size(batch_size, device: torch.device):
    """The forward batch argument of the explainers, checked: an int, "auto" or None (the default), the
    last two resolved by the run itself on its own masks (``batching.batch_size_for``: timed for long runs,
    cached per model)."""
    from .batching import check_batch_size

    return check_batch_size(batch_size)


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


def per_image_targets(targets, logits: torch.Tensor) -> List[int]:
    """One target class per image of a batch whose outputs are ``logits`` (N x classes): None = each
    image's top-1 class, an int = that class for all, or a sequence of N ints (ValueError otherwise)."""
    n, classes = logits.shape[0], logits.shape[1]
    if targets is None:
        targets = logits.argmax(1).tolist()
    elif isinstance(targets, int):
        targets = [targets] * n
    targets = [int(t) for t in targets]
    if len(targets) != n:
        raise ValueError(f"targets: need one per image ({n}), got {len(targets)}")
    for t in targets:
        if not 0 <= t < classes:
            raise ValueError(f"target class {t} is out of range: the model has {classes} outputs")
    return targets


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
    if not isinstance(batch_size, int):
        from .batching import batch_size_for

        def first_masks(b):  # the run's own first samples (repeated when there are fewer)
            rows = torch.arange(b) % samples.shape[0]
            return samples[rows].to(image.device, torch.bool)[:, seg].unsqueeze(1)

        batch_size = batch_size_for(batch_size, strategy, image, first_masks, samples.shape[0])
    out = []
    forward = bound_forward(strategy, image)
    # a bar only for long runs (many samples), never in tiny calls
    with progress_bar(samples.shape[0], desc, "sample", enabled=progress, auto_min=256) as bar:
        for start in range(0, samples.shape[0], batch_size):
            z = samples[start:start + batch_size].to(image.device, torch.bool)
            masks = z[:, seg].unsqueeze(1)  # B x 1 x H x W
            logits = forward(masks).float()
            vals = logits.softmax(1) if output == "prob" else logits
            out.append(vals[:, idx].cpu())
            bar.update(z.shape[0])
    return torch.cat(out).double()
