"""The paper's experiments as runnable functions (issue 6; results in reports/).

Each takes any classifier ``model``, images (N x 3 x H x W in [0, 1]) and masking strategies by
name (masked_ops.explain.strategies) or as ``{name: predict(images, masks) -> logits}``:

- ``removal_curves``: random 16 x 16 patch removal at 0..100% (agreement, KL, class entropy);
- ``salient_vs_moved`` and ``shape_probe``: how much the mask's shape leaks;
- ``lime_faithfulness``: LIME under each strategy, scored by deletion/insertion under each;
- ``linearity``: features of a union of patches against the sum of the patches' features.

With ``out=DIR`` every unit of work is checkpointed under DIR/<experiment>/units and a run
started again resumes; ``masked-ops experiment NAME`` / ``python -m masked_ops.experiments NAME``
run them from the command line (masked_ops.cli.experiment).
"""
from .faithfulness import lime_faithfulness
from .images import BUNDLED, image_set
from .leakage import salient_vs_moved, shape_probe
from .linearity import linearity
from .removal import removal_curves
from ..runs.store import Run

__all__ = ["removal_curves", "salient_vs_moved", "shape_probe", "lime_faithfulness", "linearity", "image_set",
           "BUNDLED", "Run"]
