"""``masked-ops experiment``: the paper's experiments (masked_ops.experiments) from the command line.

    masked-ops experiment NAME [--images ...] [--strategies ...] [--seed S] [--out DIR] [--repeats R]
    python -m masked_ops.experiments NAME ...            (the same, on its own)

NAME: removal, leakage (both parts), leakage-salient, leakage-probe, faithfulness, linearity,
learned-faithfulness (DiffMask, extremal, RISE, LIME, occlusion, Grad-CAM; DiffMask trained on
--train-images, everything scored on --images), all,
or report (rebuild OUT/README.md and the plots from the results already in OUT), or summary (one
page comparing the models whose results lie in OUT/<model>/, masked_ops.experiments.summary). Every run writes
OUT/<experiment>/results.json (naming the model and its weights under "model") and refreshes
OUT/README.md; an interrupted run started again with the same arguments resumes from its
checkpoints (OUT/<experiment>/units/). Errors are one line starting with "masked-ops:".

``--images DIR`` runs on every image of a folder; in the ImageFolder layout (``DIR/<class>/<image>``,
class folders named by class index, ImageNet WordNet id or class name) removal and leakage-salient
also report top-1 accuracy against the labels beside agreement with the clean prediction. Under
``torchrun --nproc-per-node G -m masked_ops.cli experiment ...`` the units are shared out over the
ranks (gloo) and rank 0 writes the results and the report (OUT on a filesystem all ranks see).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from .common import Parser, int_at_least, parse_strategies, report_error, report_interrupt

DEFAULT_OUT = "out/experiments"
# besides the experiments and their groups (masked_ops.experiments.registry)
COMMANDS = ("report", "summary")


def _names():
    from ..experiments.registry import EXPERIMENTS, GROUPS

    return tuple(EXPERIMENTS) + tuple(GROUPS) + COMMANDS


def add_arguments(p: argparse.ArgumentParser) -> None:
    count, positive = int_at_least(0), int_at_least(1)
    p.add_argument("name", choices=_names(), help="which experiment to run (or 'report')")
    p.add_argument("--model", default="efficientnet-lite0",
                   help="model name for masked_ops.models.load_model (default: the pretrained EfficientNet-Lite0)")
    p.add_argument("--weights", default=None,
                   help="weights for --model: DEFAULT, a torchvision weight name or timm tag (from the local cache, "
                        "never downloaded), random, or a state_dict file (masked_ops.models.load_model)")
    p.add_argument("--images", nargs="+", default=["bundled"],
                   help="image specs: 'bundled' (all bundled photos), skimage names, china, flower, motorcycle, "
                        "file paths, or a folder (DIR/<class>/<image> gives labels) (default: bundled)")
    p.add_argument("--augment", type=count, default=0,
                   help="extra views (flip, corner crops) per photo, 0-9 (default 0; the shape probe uses "
                        "--probe-augment)")
    p.add_argument("--probe-augment", type=count, default=2, help="extra views per photo for the shape probe")
    p.add_argument("--strategies", nargs="+", default=["all"],
                   help="masking strategies, space or comma separated, or 'all' (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of masks, orders and LIME samples (default 0)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output and checkpoint directory (default {DEFAULT_OUT})")
    p.add_argument("--repeats", type=positive, default=None,
                   help="random orders per image (removal, default 5) / patch draws per image (linearity, default 4)")
    p.add_argument("--samples", type=positive, default=200, help="LIME samples per image (faithfulness)")
    p.add_argument("--steps", type=int_at_least(2), default=11, help="points on the deletion/insertion curves (faithfulness)")
    p.add_argument("--evaluators", nargs="+", default=None,
                   help="strategies that score the explanations (faithfulness; default: --strategies)")
    p.add_argument("--patch", type=positive, default=16,
                   help="patch side in pixels (removal, linearity; must divide the image size; default 16)")
    p.add_argument("--train-images", nargs="+", default=None,
                   help="learned-faithfulness: photos DiffMask trains on (default: the bundled photos not in --images)")
    p.add_argument("--explainers", nargs="+", default=None,
                   help="learned-faithfulness: explainers (default: all of learned_faithfulness.EXPLAINERS)")
    p.add_argument("--size", type=positive, default=None, help="image side in pixels (default: the model's input size)")
    p.add_argument("--batch-size", type=positive, default=None,
                   help="images per forward (default: 4 on CPU, 64 on GPU: measured, masked_ops.explain.batching)")
    p.add_argument("--threads", type=positive, default=None,
                   help="torch CPU threads (default: torch's choice; 1 per process under torchrun)")
    p.add_argument("--channels-last", action="store_true",
                   help="run the model in channels_last memory format (faster depthwise convs on CPU)")
    p.add_argument("--fresh", action="store_true", help="discard this experiment's checkpoints in OUT first")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``experiment`` on the ``masked-ops`` command line."""
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
    """Run what ``args`` asks for; bad input -> one ``masked-ops: error:`` line on stderr and exit status 2."""
    args.resume_hint = (f"the finished units are kept in {args.out}/: run the same command again to resume "
                        f"(--fresh starts over)")
    try:
        return _run(args)
    except (ValueError, TypeError, OSError) as e:
        return report_error(e)
    finally:
        from ..runs.distributed import leave

        leave()  # torchrun: leave the process group (nothing to do in a world of one)


def _run(args) -> int:
    import torch

    from ..experiments import report
    from ..experiments.images import labelled_image_set
    from ..experiments.registry import EXPERIMENTS, Inputs, expand
    from ..models import load_model
    from ..runs.distributed import env_world, join
    from ..runs.store import annotate_results

    rank, world, _ = env_world()
    if args.threads or world > 1:
        torch.set_num_threads(args.threads or 1)
    if args.name == "report":
        if rank != 0:  # under torchrun the report is rank 0's
            return 0
        path = report.write_report(args.out)
        print(f"report: {path}")
        return 0
    if args.name == "summary":
        from ..experiments.summary import write_summary

        print(f"summary: {write_summary(args.out)}")
        return 0
    todo = expand(args.name)
    strategies = parse_strategies(args.strategies, "--strategies", allow_all=True)
    evaluators = parse_strategies(args.evaluators, "--evaluators", allow_all=True) if args.evaluators else None
    explainers = [e for part in args.explainers for e in part.split(",") if e] if args.explainers else None
    model, info = load_model(args.model, args.weights)
    print(f"model: {info.describe()}")
    strategies, evaluators = _for_model(model, args, strategies, evaluators)
    if getattr(args, "channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    size = args.size or info.input_size
    dist = join()  # a world of one without torchrun
    main = dist.is_main
    common = dict(seed=args.seed, mean=info.mean, std=info.std, batch_size=args.batch_size, out=args.out,
                  fresh=args.fresh, progress=not args.no_progress and main)
    iset = labelled_image_set(args.images, size, args.augment, class_names=list(info.class_names))
    names = iset.names
    if main and any(iset.label_names):
        n_lab = int((iset.labels >= 0).sum())
        print(f"labels: {n_lab} of {len(names)} images have a class folder naming a class of {info.name}"
              + ("" if n_lab else " (accuracy is not reported)"), file=sys.stderr)
    inputs = Inputs(model, info, iset.images, names, iset.labels if iset.labelled else None, strategies, common,
                    image_specs=args.images, size=size, repeats=args.repeats, patch=args.patch, samples=args.samples,
                    steps=args.steps, evaluators=evaluators, probe_augment=args.probe_augment,
                    train_images=args.train_images, explainers=explainers)
    for exp in todo:
        start, cpu = time.time(), time.process_time()
        res = EXPERIMENTS[exp].run(inputs)
        if not main:
            continue
        annotate_results(args.out, exp, model=info.as_dict())  # results name the model and its weights
        if res.get("units_computed") or not report.has_record(args.out, exp):
            # a rerun that only reloads checkpoints keeps the record of the run that did the work
            report.record_command(args.out, exp, _command(args), time.time() - start, time.process_time() - cpu,
                                  report.units_elapsed(args.out, exp))
        print(f"{exp}: done in {time.time() - start:.0f} s -> {args.out}/{exp}/results.json", file=sys.stderr)
        if "clean_accuracy" in res:
            print(accuracy_line(exp, res))
    if not main:
        return 0
    path = report.write_report(args.out)
    print(f"report: {path}")
    return 0


def _is_all(parts) -> bool:
    return parts is not None and [n for p in parts for n in p.replace(" ", ",").split(",") if n] == ["all"]


def _for_model(model, args, strategies, evaluators):
    """'all' means every strategy the model takes: a vision transformer (token dropping) has no CNN layer
    modes (layer-renorm, layer-zero); said on stderr. Named explicitly, they are refused (get_strategy)."""
    from ..explain.strategies import strategies_for

    out = []
    for flag, parts, names in (("--strategies", args.strategies, strategies), ("--evaluators", args.evaluators,
                                                                              evaluators)):
        if names is not None and _is_all(parts):
            kept = strategies_for(model, names)
            if kept != names:
                print(f"masked-ops: note: {flag} all: {', '.join(n for n in names if n not in kept)} left out: "
                      f"{type(model).__name__} is a vision transformer, layer-masked by token dropping "
                      f"(no CNN layer modes)", file=sys.stderr)
            names = kept
        out.append(names)
    return out


def accuracy_line(exp: str, res: dict) -> str:
    """One line: top-1 accuracy against the labels beside agreement with the clean prediction."""
    if exp == "removal":
        parts = [f"{s} {v['mean_accuracy']:.3f} (agreement {v['mean_agreement']:.3f})"
                 for s, v in res["strategies"].items()]
        what = "mean top-1 accuracy over the fractions"
    else:
        parts = [f"{s} {v['accuracy_salient']:.3f} (agreement {v['agreement_salient']:.3f})"
                 for s, v in res["strategies"].items()]
        what = "top-1 accuracy with the salient region removed"
    return (f"{exp}: {what}, {res['n_labelled']} labelled images (clean accuracy {res['clean_accuracy']:.3f}): "
            + ", ".join(parts))


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m masked_ops.experiments``: the experiment command on its own."""
    p = Parser(prog="python -m masked_ops.experiments", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    args._prog = "python -m masked_ops.experiments"
    args._argv = list(sys.argv[1:] if argv is None else argv)
    from .._util.malloc import keep_freed_memory_unless_opted_out

    keep_freed_memory_unless_opted_out()  # as the masked-ops command does (masked_ops/_util/malloc.py)
    try:
        return run_from_args(args)
    except KeyboardInterrupt as e:
        report_interrupt(args, e)
        return 130
    except Exception as e:  # one "masked-ops:" line, as `masked-ops experiment` gives
        if os.environ.get("MASKED_OPS_DEBUG") == "1":
            raise
        return report_error(e)
