"""The one table of explanation methods: what each computes, which settings it takes, their defaults and limits.

    from masked_ops.explain.registry import METHODS
    m = METHODS["kernel-shap"]
    m.explain(strategy, image, **m.keywords(samples=500, segments=seg))
    m.options            # ('samples', 'segments', 'n_segments', 'output'): what a user may set
    m.default_samples, m.min_samples

Every front end derives from it: the command line (which options apply to ``--method``, their defaults,
the error for an option that does not apply), the dataset runner (``Settings``) and the docs. Adding a
method is one entry here beside its explainer.

Kinds:
- ``"perturbation"``: remove segments of the image (or slide a window), attributions per segment:
  LIME, KernelSHAP, occlusion. They take hard masks, so every masking strategy applies.
- ``"mask"``: learned or random masks over the image (``MapExplanation``): extremal perturbations, RISE,
  DiffMask. They need soft-mask strategies (masked_ops.explain.soft); ``samples`` is their amount of
  work: optimisation steps (extremal, per-image DiffMask) or masks (RISE).

Options (the names the command line spells ``--samples``, ``--n-segments``, ...):
``samples``, ``segments`` (a segmentation of masked_ops.explain.segmentation.METHODS), ``n_segments``,
``window`` / ``stride`` (occlusion's sliding window), ``output`` (explain the probability or the logit),
``checkpoint`` (a fitted amortised DiffMask), ``incremental`` (occlusion: recompute only each removal's
cone, for hard layer masking and the strategies that paint; masked_ops.explain.incremental).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

from .diffmask import explain_diffmask
from .extremal import explain_extremal
from .lime import explain_kernel_shap, explain_lime
from .occlusion import explain_occlusion
from .rise import explain_rise
from .soft import supports_soft

OPTIONS = ("samples", "segments", "n_segments", "window", "stride", "output", "checkpoint", "incremental",
           "calibrate")
KINDS = ("perturbation", "mask")
# the masking strategies a run compares when none are named
DEFAULT_MASKING = ("layer", "grey")


@dataclasses.dataclass(frozen=True)
class Method:
    """One explanation method (see the module docstring).

    explain: the explainer, ``explain(strategy, image, *, targets, ..., progress) -> explanation``.
    samples_keyword: the explainer's keyword for the amount of work (num_samples, n_masks, iterations, steps).
    work: what ``samples`` counts, in words ("samples", "masks", "steps").
    """

    name: str
    label: str
    kind: str
    explain: Callable
    options: Tuple[str, ...]
    default_samples: Optional[int] = None
    min_samples: int = 1
    samples_keyword: Optional[str] = None
    work: str = "samples"
    default_segments: Optional[str] = None
    default_n_segments: Optional[int] = None

    def __post_init__(self):
        unknown = [o for o in self.options if o not in OPTIONS]
        if unknown or self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: unknown options {unknown} or kind {self.kind!r}")

    def check_samples(self, samples: Optional[int], flag: str = "samples") -> int:
        """``samples`` (default when None) checked against the method's minimum; ValueError naming ``flag``."""
        value = self.default_samples if samples is None else samples
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{flag} must be an int, got {type(value).__name__}")
        if value < self.min_samples:
            raise ValueError(f"{flag} must be >= {self.min_samples} for {self.name}, got {value}")
        return value

    def keywords(self, samples: Optional[int] = None, **settings) -> dict:
        """The explainer's keyword arguments for the user-level settings (``samples`` mapped to its keyword)."""
        kwargs = dict(settings)
        if self.samples_keyword is not None:
            kwargs[self.samples_keyword] = self.check_samples(samples)
        return kwargs

    def default_masking(self) -> List[str]:
        """The strategies compared when none are named: layer masking against grey, and for mask methods
        (soft strategies) against blur, or blur and grey where layer masking takes no soft masks."""
        if self.kind == "perturbation":
            return list(DEFAULT_MASKING)
        return ["layer", "blur"] if supports_soft("layer") else ["blur", "grey"]


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("lime", "LIME", "perturbation", explain_lime, ("samples", "segments", "n_segments", "output"),
           default_samples=500, samples_keyword="num_samples", default_segments="slic", default_n_segments=50),
    # KernelSHAP's regression needs the empty and the full coalition plus one sample
    Method("kernel-shap", "KernelSHAP", "perturbation", explain_kernel_shap,
           ("samples", "segments", "n_segments", "output"), default_samples=500, min_samples=3,
           samples_keyword="num_samples", default_segments="slic", default_n_segments=50),
    Method("occlusion", "occlusion", "perturbation", explain_occlusion,
           ("segments", "n_segments", "window", "stride", "output", "incremental"), default_segments="grid",
           default_n_segments=64),
    Method("extremal", "extremal perturbations", "mask", explain_extremal, ("samples",), default_samples=300,
           samples_keyword="iterations", work="steps"),
    Method("rise", "RISE", "mask", explain_rise, ("samples", "output"), default_samples=1000,
           samples_keyword="n_masks", work="masks"),
    Method("diffmask", "DiffMask", "mask", explain_diffmask, ("samples", "checkpoint", "calibrate"), default_samples=300,
           samples_keyword="steps", work="steps"),
)}


def get_method(name: str) -> Method:
    """The method called ``name``; ValueError listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def names(kind: Optional[str] = None) -> Tuple[str, ...]:
    """The method names, all or of one kind."""
    return tuple(n for n, m in METHODS.items() if kind is None or m.kind == kind)
