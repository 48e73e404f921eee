"""The batch size of the explainers' forwards: chosen by measurement by default, or a given int.

Why measure: the fastest batch per image depends on the model, its mode (eager or compiled), the layout
and the host's caches, and it is far from any one constant. On the 2-core host of bench/README.md
("Batch size of the explainers' forwards") batch 4 beat the old CPU default 16 by 1.2x-1.85x per image
for EfficientNet-Lite0 and ResNet-50, plain and layer-masked, eager and compiled, while an earlier host
preferred 10-16; LIME end to end (1,000 samples, Lite0) ran 1.45x-2.2x faster with the timed choice,
its timing included, than at 16. ``choose_batch_size`` times one forward per candidate size on the
explainer's own masks and keeps the fastest per image.

- ``batch_size=None`` (the default): timed for long runs of an eager model; the constant
  ``default_batch_size`` for short runs and for a compiled model (timing it would compile it once per
  candidate size);
- ``"auto"``: timed for long runs, compiled models too;
- an int: as given.

What timing costs and what it changes:
- two timed forwards per candidate (plus one warm-up, which compiles a compiled model for that size),
  stopping once a size is clearly slower than the best; the choice is cached per model object,
  strategy, image shape, dtype, device and mask kind, so a process pays it once (the dataset runner
  and a loop over images), not once per explanation;
- only long runs are tuned (at least ``MIN_WORK`` forwards of images): a short explanation keeps the
  constant default, where timing would cost more than it can save;
- the batches change, so the outputs may differ from a constant batch size by float rounding of
  batched kernels (fp32: ~1e-6 relative), never more; the masks, samples and random draws of every
  explainer do not depend on the batch size. The size chosen is reported (``last_choice``) and the
  dataset runner stores "auto" in its configuration.
"""
from __future__ import annotations

import time
import weakref
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from .strategies import bound_forward

__all__ = ["AUTO", "CPU_DEFAULT", "GPU_DEFAULT", "MIN_WORK", "check_batch_size", "default_batch_size",
           "choose_batch_size", "batch_size_for", "candidates_for", "clear_cache", "last_choice", "is_compiled"]

AUTO = "auto"
# Short runs and compiled models. Measured on the 2-core host (bench/README.md): 4 fastest per image in 7 of
# 8 model/mode cases, 9% behind the best (8) in the eighth; 16, the earlier constant, 1.2x-1.85x slower.
CPU_DEFAULT = 4
GPU_DEFAULT = 64  # to fill the device
CPU_CANDIDATES = (2, 4, 8, 16, 32)
GPU_CANDIDATES = (16, 32, 64, 128, 256)
MIN_WORK = 256  # images: below this a run keeps the constant default
REPEATS = 2  # timed forwards per candidate
SLOWER = 1.25  # a size this much slower per image than the best so far ends the search (larger ones are too)

BatchSize = Union[None, int, str]
# model -> {(strategy name, shape, dtype, device, mask kind): size}; weak: a freed model drops its entries
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LAST: Dict[str, object] = {}


def check_batch_size(batch_size: BatchSize) -> BatchSize:
    """None, "auto" or an int >= 1 (ValueError naming the argument otherwise)."""
    if batch_size is None or batch_size == AUTO:
        return batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, None (the default: chosen by timing for long runs of an "
                         f"eager model, else {CPU_DEFAULT} on CPU, {GPU_DEFAULT} on GPU) or 'auto' (chosen by timing, "
                         f"compiled models too), got {batch_size!r}")
    return batch_size


def default_batch_size(device) -> int:
    return CPU_DEFAULT if torch.device(device).type == "cpu" else GPU_DEFAULT


def candidates_for(device) -> Tuple[int, ...]:
    return CPU_CANDIDATES if torch.device(device).type == "cpu" else GPU_CANDIDATES


def clear_cache() -> None:
    _CACHE.clear()
    _LAST.clear()


def last_choice() -> Dict[str, object]:
    """The most recent choice: size, per-image milliseconds per candidate, whether it came from the cache."""
    return dict(_LAST)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_compiled(strategy) -> bool:
    """Whether the model a strategy runs is a torch.compile'd module (its plain or converted model)."""
    # ``_masked``, not the ``masked_model`` property: asking must not convert the model
    models = [strategy, getattr(strategy, "model", None), getattr(strategy, "_masked", None)]
    return any(type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod") for m in models if m is not None)


def batch_size_for(batch_size: BatchSize, strategy, image: torch.Tensor, make_masks: Callable[[int], torch.Tensor],
                   work: int) -> int:
    """The int batch size of a run of ``work`` forwards: ``batch_size`` as given, or chosen (module
    docstring: None times eager models' long runs, "auto" every long run)."""
    batch_size = check_batch_size(batch_size)
    if isinstance(batch_size, int):
        return batch_size
    if batch_size is None and is_compiled(strategy):
        return default_batch_size(image.device)
    return choose_batch_size(strategy, image, make_masks, work)


def choose_batch_size(strategy, image: torch.Tensor, make_masks: Callable[[int], torch.Tensor], work: int,
                      *, candidates: Optional[Sequence[int]] = None) -> int:
    """The batch size for ``work`` forwards of ``strategy(image[None], masks)``: the fastest per image
    among ``candidates`` (default: candidates_for(device)), timed on ``make_masks(b)`` (b masks of the
    kind the explainer will run), cached; the constant default when ``work < MIN_WORK``."""
    device = image.device
    if work < MIN_WORK:
        return default_batch_size(device)
    cands = sorted({int(c) for c in (candidates or candidates_for(device)) if c <= work})
    probe = make_masks(1)
    key = (getattr(strategy, "name", type(strategy).__name__), tuple(image.shape), image.dtype, str(device),
           probe.dtype, tuple(cands))
    model = getattr(strategy, "model", strategy)
    try:
        per_model = _CACHE.setdefault(model, {})
    except TypeError:  # not weak-referenceable: no cache
        per_model = {}
    if key in per_model:
        _LAST.update(size=per_model[key], cached=True)
        return per_model[key]
    ms: Dict[int, float] = {}
    best = None
    with torch.inference_mode():
        forward = bound_forward(strategy, image)  # timed as the run will call it
        for b in cands:
            masks = make_masks(b)
            forward(masks)  # warm-up (and a compiled model's compile for this size)
            times = []
            for _ in range(REPEATS):
                _sync(device)
                t = time.perf_counter()
                forward(masks)
                _sync(device)
                times.append(time.perf_counter() - t)
            ms[b] = min(times) * 1e3 / b  # the minimum: the least disturbed by a shared host's load
            if best is None or ms[b] < ms[best]:
                best = b
            elif ms[b] > SLOWER * ms[best]:
                break
    per_model[key] = best
    _LAST.clear()
    _LAST.update(size=best, cached=False, ms_per_image={str(k): round(v, 3) for k, v in ms.items()})
    return best
