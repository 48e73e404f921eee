"""Command line of the experiments.

    masked-ops experiment NAME [--images ...] [--strategies ...] [--seed S] [--out DIR] [--repeats R]
    python -m masked_ops.experiments NAME ...            (the same, on its own)

NAME: removal, leakage (both parts), leakage-salient, leakage-probe, faithfulness, linearity,
learned-faithfulness (DiffMask, extremal, RISE, LIME, occlusion, Grad-CAM; DiffMask trained on
--train-images, everything scored on --images), all, or report (rebuild OUT/README.md and the plots
from the results already in OUT). Every run writes OUT/<experiment>/results.json and refreshes
OUT/README.md; an interrupted run started again with the same arguments resumes from its
checkpoints (OUT/<experiment>/units/).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

EXPERIMENTS = ("removal", "leakage-salient", "leakage-probe", "faithfulness", "linearity")
EXPERIMENTS += ("learned-faithfulness",)  # issue 12: masked_ops.experiments.learned_faithfulness
NAMES = EXPERIMENTS + ("leakage", "all", "report")
DEFAULT_OUT = "out/experiments"


def _strategies(text: List[str]) -> List[str]:
    from ..explain.strategies import STRATEGIES

    names = [s for part in text for s in part.split(",") if s]
    if names == ["all"]:
        return list(STRATEGIES)
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; expected 'all' or names from {', '.join(STRATEGIES)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=NAMES, help="which experiment to run (or 'report')")
    p.add_argument("--model", default="efficientnet-lite0",
                   help="model name for masked_ops.models.load_model (default: the pretrained EfficientNet-Lite0)")
    p.add_argument("--images", nargs="+", default=["bundled"],
                   help="image specs: 'bundled' (all bundled photos), skimage names, china, flower, motorcycle, "
                        "file paths (default: bundled)")
    p.add_argument("--augment", type=int, default=0,
                   help="extra views (flip, corner crops) per photo, 0-9 (default 0; the shape probe uses "
                        "--probe-augment)")
    p.add_argument("--probe-augment", type=int, default=2, help="extra views per photo for the shape probe")
    p.add_argument("--strategies", nargs="+", default=["all"],
                   help="masking strategies, space or comma separated, or 'all' (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of masks, orders and LIME samples (default 0)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output and checkpoint directory (default {DEFAULT_OUT})")
    p.add_argument("--repeats", type=int, default=None,
                   help="random orders per image (removal, default 5) / patch draws per image (linearity, default 4)")
    p.add_argument("--samples", type=int, default=200, help="LIME samples per image (faithfulness)")
    p.add_argument("--steps", type=int, default=11, help="points on the deletion/insertion curves (faithfulness)")
    p.add_argument("--evaluators", nargs="+", default=None,
                   help="strategies that score the explanations (faithfulness; default: --strategies)")
    p.add_argument("--train-images", nargs="+", default=None,
                   help="learned-faithfulness: photos DiffMask trains on (default: the bundled photos not in --images)")
    p.add_argument("--explainers", nargs="+", default=None,
                   help="learned-faithfulness: explainers (default: all of learned_faithfulness.EXPLAINERS)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's input size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--fresh", action="store_true", help="discard this experiment's checkpoints in OUT first")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``experiment`` on the ``masked-ops`` command line (called from masked_ops/cli.py)."""
    p = subparsers.add_parser("experiment", help="run the paper's experiments and write a report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_from_args, _prog="masked-ops experiment")
    return p


def _command(args) -> str:
    """The command line that produced a result, for the report."""
    import shlex

    argv = getattr(args, "_argv", None)
    if argv is None:
        argv = sys.argv[sys.argv.index("experiment") + 1:] if "experiment" in sys.argv else sys.argv[1:]
    return " ".join([getattr(args, "_prog", "masked-ops experiment")] + [shlex.quote(a) for a in argv])


def run_from_args(args) -> int:
    """Run what ``args`` asks for; bad input -> message on stderr and exit status 2."""
    try:
        return _run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    # (functions, not modules: the package re-exports ``linearity`` the function under the module's name)
    from . import report
    from .faithfulness import lime_faithfulness
    from .images import BUNDLED, image_set
    from .leakage import salient_vs_moved, shape_probe
    from .linearity import linearity
    from .removal import removal_curves

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.name == "report":
        path = report.write_report(args.out)
        print(f"report: {path}")
        return 0
    from ..models import load_model

    strategies = _strategies(args.strategies)
    model, info = load_model(args.model)
    size = args.size or info.input_size
    common = dict(seed=args.seed, mean=info.mean, std=info.std, batch_size=args.batch_size, out=args.out,
                  fresh=args.fresh, progress=not args.no_progress)
    todo = {"all": EXPERIMENTS, "leakage": ("leakage-salient", "leakage-probe")}.get(args.name, (args.name,))
    imgs, names = image_set(args.images, size, args.augment)
    for exp in todo:
        start, cpu = time.time(), time.process_time()
        if exp == "removal":
            res = removal_curves(model, imgs, strategies, repeats=args.repeats or 5, image_names=names,
                                   class_names=list(info.class_names), **common)
        elif exp == "leakage-salient":
            res = salient_vs_moved(model, imgs, strategies, image_names=names, **common)
        elif exp == "leakage-probe":
            pimgs, pnames = image_set(args.images, size, args.probe_augment)
            res = shape_probe(model, pimgs, strategies, groups=[n.split(":")[0] for n in pnames], **common)
        elif exp == "faithfulness":
            evaluators = _strategies(args.evaluators) if args.evaluators else None
            res = lime_faithfulness(model, imgs, strategies, evaluators=evaluators, samples=args.samples,
                                           steps=[i / (args.steps - 1) for i in range(args.steps)],
                                           image_names=names, **common)
        elif exp == "learned-faithfulness":  # issue 12
            from .learned_faithfulness import EXPLAINERS, EVALUATORS, learned_faithfulness

            train_specs = args.train_images or [b for b in BUNDLED if b not in set(args.images)]
            timgs, tnames = image_set(train_specs, size, 0)
            evaluators = _strategies(args.evaluators) if args.evaluators else list(EVALUATORS)
            explainers = [e for part in (args.explainers or EXPLAINERS) for e in part.split(",") if e]
            res = learned_faithfulness(model, imgs, timgs, explainers=explainers, evaluators=evaluators,
                                       steps=[i / (args.steps - 1) for i in range(args.steps)], image_names=names,
                                       train_names=tnames, lime_samples=args.samples, **common)
        elif exp == "linearity":
            res = linearity(model, imgs, strategies, repeats=args.repeats or 4, image_names=names, **common)
        if res.get("units_computed") or not report.has_record(args.out, exp):
            # a rerun that only reloads checkpoints keeps the record of the run that did the work
            report.record_command(args.out, exp, _command(args), time.time() - start, time.process_time() - cpu)
        print(f"{exp}: done in {time.time() - start:.0f} s -> {args.out}/{exp}/results.json", file=sys.stderr)
    path = report.write_report(args.out)
    print(f"report: {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m masked_ops.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    args._prog = "python -m masked_ops.experiments"
    args._argv = list(sys.argv[1:] if argv is None else argv)
    return run_from_args(args)
