"""The one table of experiments: name -> how to run it on a model and an image set.

    from masked_ops.experiments.registry import EXPERIMENTS, Inputs, expand
    for name in expand("all"):
        results = EXPERIMENTS[name].run(inputs)

``Inputs`` holds what every experiment may read (the model and its ModelInfo, the images, labels and
names, the options of the command line as plain values, and the keyword arguments they all share:
seed, normalisation, batch size, output folder, fresh, progress). Each entry calls the experiment's own
function (one module per experiment); adding an experiment is one function and one entry here, and
the command line (masked_ops.cli.experiment) offers it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


@dataclasses.dataclass
class Inputs:
    """What an experiment runs on (see the module docstring)."""

    model: torch.nn.Module
    info: object                     # masked_ops.models.ModelInfo
    images: torch.Tensor             # N x 3 x S x S in [0, 1]
    names: List[str]
    labels: Optional[np.ndarray]     # N class indices (-1: none), or None when no image has a label
    strategies: List[str]
    common: dict                     # seed, mean, std, batch_size, out, fresh, progress
    image_specs: Sequence[str] = ("bundled",)
    size: int = 224
    repeats: Optional[int] = None
    patch: int = 16
    samples: int = 200
    steps: int = 11
    evaluators: Optional[List[str]] = None
    probe_augment: int = 2
    train_images: Optional[Sequence[str]] = None
    explainers: Optional[List[str]] = None

    def curve_steps(self) -> List[float]:
        """``steps`` points from 0 to 1 (the deletion / insertion curves)."""
        return [i / (self.steps - 1) for i in range(self.steps)]


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    run: Callable[[Inputs], dict]
    what: str


def _removal(a: Inputs) -> dict:
    from .removal import removal_curves

    return removal_curves(a.model, a.images, a.strategies, repeats=a.repeats or 5, image_names=a.names,
                          patch=a.patch, class_names=list(a.info.class_names), labels=a.labels, **a.common)


def _leakage_salient(a: Inputs) -> dict:
    from .leakage import salient_vs_moved

    return salient_vs_moved(a.model, a.images, a.strategies, image_names=a.names, labels=a.labels, **a.common)


def _leakage_probe(a: Inputs) -> dict:
    from .images import labelled_image_set
    from .leakage import shape_probe

    pset = labelled_image_set(a.image_specs, a.size, a.probe_augment)
    return shape_probe(a.model, pset.images, a.strategies, groups=[n.split(":")[0] for n in pset.names], **a.common)


def _faithfulness(a: Inputs) -> dict:
    from .faithfulness import lime_faithfulness

    return lime_faithfulness(a.model, a.images, a.strategies, evaluators=a.evaluators, samples=a.samples,
                             steps=a.curve_steps(), image_names=a.names, **a.common)


def _learned_faithfulness(a: Inputs) -> dict:
    from ..images import BUNDLED
    from .images import image_set
    from .learned_faithfulness import EVALUATORS, EXPLAINERS, learned_faithfulness

    train_specs = a.train_images or [b for b in BUNDLED if b not in set(a.image_specs)]
    timgs, tnames = image_set(train_specs, a.size, 0)
    return learned_faithfulness(a.model, a.images, timgs, explainers=a.explainers or list(EXPLAINERS),
                                evaluators=a.evaluators or list(EVALUATORS), steps=a.curve_steps(),
                                image_names=a.names, train_names=tnames, lime_samples=a.samples, **a.common)


def _linearity(a: Inputs) -> dict:
    from .linearity import linearity

    return linearity(a.model, a.images, a.strategies, repeats=a.repeats or 4, image_names=a.names, patch=a.patch,
                     **a.common)


EXPERIMENTS: Dict[str, Experiment] = {e.name: e for e in (
    Experiment("removal", _removal, "random 16 x 16 patch removal at 0..100%: agreement, KL, class entropy"),
    Experiment("leakage-salient", _leakage_salient, "the salient region removed vs the same mask moved away"),
    Experiment("leakage-probe", _leakage_probe, "a probe that reads the mask's shape from the output"),
    Experiment("faithfulness", _faithfulness, "LIME under each strategy, scored by deletion/insertion"),
    Experiment("linearity", _linearity, "features of a union of patches vs the sum of the patches' features"),
    Experiment("learned-faithfulness", _learned_faithfulness,
               "DiffMask, extremal, RISE, LIME, occlusion, Grad-CAM: deletion/insertion under each evaluator"),
)}
# names that stand for several experiments, in the order they run
GROUPS: Dict[str, Tuple[str, ...]] = {
    "all": ("removal", "leakage-salient", "leakage-probe", "faithfulness", "linearity", "learned-faithfulness"),
    "leakage": ("leakage-salient", "leakage-probe"),
}


def expand(name: str) -> Tuple[str, ...]:
    """The experiments a name stands for (a group or one experiment); ValueError for an unknown name."""
    if name in GROUPS:
        return GROUPS[name]
    if name in EXPERIMENTS:
        return (name,)
    raise ValueError(f"unknown experiment {name!r}; expected one of {', '.join(list(EXPERIMENTS) + list(GROUPS))}")
