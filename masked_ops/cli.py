"""The ``masked-ops`` command line (also ``python -m masked_ops.cli``).

    masked-ops explain IMAGE [--model efficientnet-lite0] [--method lime|occlusion|kernel-shap]
                             [--masking layer,grey,...] [--samples N] [--seed S] [--out out.png]
    masked-ops explain IMAGE --method extremal|rise|diffmask [--checkpoint FILE] --masking blur,...
                             (learned / random masks: masked_ops.explain.mask_cli)
    masked-ops explain --demo          # scikit-image's cat, LIME, layer masking vs grey
    masked-ops experiment ...          # the paper's experiments (masked_ops.experiments.cli)

``explain`` prints the model's top-5 classes and writes a PNG: the image, then for each masking
strategy a heatmap of the segment weights (top row) and the top segments kept on grey (bottom
row), titled with the strategy and the explained class (the model's top-1 on the full image,
the same for every strategy so that they can be compared). Bad input (unreadable or non-RGB
image, unknown model or strategy, samples < 1, a one-segment segmentation) gives a message on
stderr and exit status 2; the PNG is written to a temporary file and renamed, so a failed run
never leaves a half-written picture.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import List, Optional, Sequence

DEMO_IMAGE = "chelsea"
DEMO_MASKING = "layer,grey"
DEMO_SAMPLES = 500
DEMO_OUT = "masked-ops-demo.png"
METHOD_NAMES = ("lime", "occlusion", "kernel-shap")
MASK_METHOD_NAMES = ("extremal", "rise", "diffmask")  # issue 12: masked_ops.explain.mask_cli
SEGMENTATIONS = ("slic", "quickshift", "grid", "felzenszwalb")


class CliError(ValueError):
    """Bad input detected by the command line itself."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_masking(text: str) -> List[str]:
    from .explain.strategies import STRATEGIES

    names = [n.strip() for n in text.replace(" ", ",").split(",") if n.strip()]
    if not names:
        raise CliError("--masking needs at least one strategy name")
    for n in names:
        if n not in STRATEGIES:
            raise CliError(f"unknown masking strategy {n!r}; expected names from {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


def _add_explain(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("explain", help="explain one image with LIME / occlusion under several masking strategies",
                       description="Explain a classifier's top prediction on one image under several masking "
                                   "strategies and write the heatmaps side by side to a PNG.")
    p.add_argument("image", nargs="?", help="image file or scikit-image sample name (chelsea, coffee, ...)")
    p.add_argument("--demo", action="store_true",
                   help=f"run on scikit-image's cat with LIME, masking {DEMO_MASKING}, {DEMO_SAMPLES} samples")
    p.add_argument("--model", default="efficientnet-lite0",
                   help="efficientnet-lite0 (default, real ImageNet weights), a torchvision/timm name (random "
                        "weights) or module:callable")
    p.add_argument("--method", choices=METHOD_NAMES + MASK_METHOD_NAMES, default="lime")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="--method diffmask: a fitted DiffMask checkpoint (amortised: one forward pass); without "
                        "it diffmask optimises the gates of this one image")
    p.add_argument("--masking", default=None,
                   help=f"comma-separated strategies (default {DEMO_MASKING}); see masked_ops.explain.STRATEGIES")
    p.add_argument("--samples", type=_positive_int, default=None,
                   help=f"perturbation samples for lime/kernel-shap (default {DEMO_SAMPLES}); masks for rise "
                        f"(default 1000); optimisation steps for extremal and per-image diffmask (default 300)")
    p.add_argument("--segments", choices=SEGMENTATIONS, default=None,
                   help="segmentation (default: slic for lime/kernel-shap, grid for occlusion)")
    p.add_argument("--n-segments", type=_positive_int, default=None,
                   help="target number of segments (default 50; 64 grid cells for occlusion)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per forward (default: 16 on CPU, 64 on GPU)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="output PNG (default: <image>-<method>.png, demo: "
                                                  f"{DEMO_OUT})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_explain)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="masked-ops", description="Layer masking for CNNs: explanations and "
                                                                     "experiments.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_explain(sub)
    try:
        from .experiments import cli as experiments_cli
    except ImportError:
        experiments_cli = None
    if experiments_cli is not None and hasattr(experiments_cli, "add_parser"):
        experiments_cli.add_parser(sub)
    return parser


# ----------------------------------------------------------------------------- explain
def _output_path(args) -> str:
    out = args.out
    if out is None:
        if args.demo:
            out = DEMO_OUT
        else:
            stem = os.path.splitext(os.path.basename(str(args.image)))[0] or "image"
            out = f"{stem}-{args.method}.png"
    if not out.lower().endswith(".png"):
        raise CliError(f"--out must name a .png file, got {out!r}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise CliError(f"--out: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise CliError(f"--out: the folder {folder!r} is not writable")
    return out


def run_explain(args) -> int:
    import torch

    from . import models as M
    from .explain import METHODS, get_strategy

    if args.demo:
        args.image = args.image or DEMO_IMAGE
    if not args.image:
        raise CliError("explain needs an IMAGE (file or scikit-image name), or --demo")
    masking = parse_masking(args.masking or DEMO_MASKING)
    samples = args.samples or DEMO_SAMPLES
    seg_method = args.segments or ("grid" if args.method == "occlusion" else "slic")
    n_segments = args.n_segments or (64 if args.method == "occlusion" else 50)
    if args.method == "kernel-shap" and samples < 3:
        raise CliError(f"--samples must be >= 3 for kernel-shap, got {samples}")
    if args.checkpoint is not None and args.method != "diffmask":  # issue 12
        raise CliError(f"--checkpoint is for --method diffmask only (got --method {args.method})")
    out = _output_path(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise CliError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {args.device}: CUDA is not available on this machine")

    image = M.load_image(args.image)
    model, info = M.load_model(args.model)
    model = model.to(device)
    if device.type == "cpu":  # oneDNN runs (depthwise) convs much faster channels_last
        model = model.to(memory_format=torch.channels_last)
    x = info.prepare(image).to(device)[0]

    from .explain.segmentation import segment

    seg = segment(x.cpu(), seg_method, n_segments=n_segments, seed=args.seed)
    strategies = [get_strategy(n, model, mean=info.mean, std=info.std, seed=args.seed) for n in masking]
    with torch.inference_mode():
        logits = strategies[0].model(strategies[0].normalise(x[None]))[0]
    top = M.top_classes(logits, info, k=5)
    print(f"{args.image} with {info.name}{'' if info.pretrained else ' (RANDOM weights)'}: top-5 classes")
    for rank, (idx, name, p) in enumerate(top, 1):
        print(f"  {rank}. {name} (class {idx}): {p:.3f}")
    target = top[0][0]
    if args.method in MASK_METHOD_NAMES:  # issue 12: learned / random masks
        from .explain.mask_cli import run_mask_method

        return run_mask_method(args, x, model, info, masking, target, out, _save_png)

    fn = METHODS[args.method]
    opts = dict(targets=[target], segments=seg, batch_size=args.batch_size, seed=args.seed,
                progress=False if args.no_progress else None)
    if args.method != "occlusion":
        opts["num_samples"] = samples
    explanations = []
    for s in strategies:
        t0 = time.perf_counter()
        exp = fn(s, x, **opts)
        dt = time.perf_counter() - t0
        n = samples if args.method != "occlusion" else int(seg.max()) + 1
        print(f"{args.method} with {s.name} masking: {n} forward passes, {dt:.1f} s")
        explanations.append(exp)

    from .explain.figure import explanation_figure

    title = f"{args.method} on {info.class_name(target)} ({info.name}, {int(seg.max()) + 1} segments)"
    fig = explanation_figure(x.cpu(), explanations, info.class_name(target), title=title)
    _save_png(fig, out)
    print(f"wrote {os.path.abspath(out)}")
    return 0


def _save_png(fig, out: str) -> None:
    """Write to a temporary file beside ``out``, then rename: never a half-written PNG."""
    import matplotlib.pyplot as plt

    folder = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(prefix=".masked-ops-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input (CliError included): one clear line, no traceback
        print(f"masked-ops: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("masked-ops: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
