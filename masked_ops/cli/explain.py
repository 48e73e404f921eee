"""``masked-ops explain``: explain one image, or every image of a folder (masked_ops.cli.folder).

    masked-ops explain IMAGE [options]   explain one image: a file or a bundled sample (chelsea, china, ...)
    masked-ops explain --demo            scikit-image's cat, LIME, layer masking vs grey
    masked-ops explain DIR --out results.h5 [--top-k K] [--batch-images N] [--fresh]
                                         every image of a folder into one HDF5 file (masked_ops.dataset);
                                         also `torchrun --nproc-per-node G -m masked_ops.cli explain DIR ...`
    masked-ops explain IMAGE --method extremal|rise|diffmask [--checkpoint FILE]
                                         learned / random masks

``explain`` options, by group (``masked-ops explain --help`` says more):

    model    --model NAME  --weights DEFAULT|TAG|random|FILE  --device  --threads  --batch-size
    method   --method lime|occlusion|kernel-shap|extremal|rise|diffmask  --samples N  --seed S
             --segments slic|quickshift|grid|felzenszwalb  --n-segments K  --window W  --stride S
             --incremental (occlusion)  --checkpoint FILE  --calibrate (diffmask)
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

Methods, the options that apply to each, their defaults and limits come from the one method table,
masked_ops.explain.registry.METHODS: adding a method there adds it here. Adding an output format:
an entry in ``SAVE_FORMATS``.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

from .common import CliError, batch_size_arg, parse_strategies, pixel_size, positive_int, require_module

DEMO_IMAGE = "chelsea"
DEMO_OUT = "masked-ops-demo.png"
# argparse dest -> flag, for the options of the method table (masked_ops.explain.registry.OPTIONS)
OPTION_FLAGS = {"samples": "--samples", "segments": "--segments", "n_segments": "--n-segments",
                "window": "--window", "stride": "--stride", "output": "--output", "checkpoint": "--checkpoint",
                "incremental": "--incremental", "calibrate": "--calibrate"}


def _methods():
    from ..explain.registry import METHODS

    return METHODS


def default_masking_text(kind: str = "perturbation") -> str:
    from ..explain.registry import DEFAULT_MASKING, names

    return ",".join(DEFAULT_MASKING if kind == "perturbation" else _methods()[names("mask")[0]].default_masking())


def check_method_options(args):
    """The method of ``--method``; CliError for an option given that does not apply to it."""
    methods = _methods()
    method = methods[args.method]
    for dest, flag in OPTION_FLAGS.items():
        if getattr(args, dest, None) is not None and dest not in method.options:
            users = [m for m, spec in methods.items() if dest in spec.options]
            raise CliError(f"{flag} does not apply to --method {args.method} (it applies to {', '.join(users)})")
    return method


def _incremental_strategies(args, strategies) -> List[str]:
    """The names of the strategies that run incrementally under --incremental (those that paint the removed
    pixels and hard layer masking of a CNN); CliError when --incremental is given and none of --masking does."""
    if not getattr(args, "incremental", None):
        return []
    from ..explain.incremental import incremental_strategies

    try:
        return incremental_strategies(strategies)
    except ValueError as e:
        raise CliError(f"--incremental (of --masking): {e}") from None


def masking_of(args, method) -> List[str]:
    """--masking, or the method's default strategies."""
    if args.masking is not None:
        return parse_strategies([args.masking], "--masking")
    return method.default_masking()


# ----------------------------------------------------------------------------- method settings
def _segments(args, image, method) -> Tuple[object, str]:
    from ..explain.segmentation import segment

    name = args.segments or method.default_segments
    seg = segment(image.cpu(), name, n_segments=args.n_segments or method.default_n_segments, seed=args.seed)
    return seg.to(image.device), f"{int(seg.max()) + 1} {name} segments"


def method_settings(method, args, image) -> Tuple[dict, str]:
    """(the explainer's keyword arguments, a short description for logs and titles, e.g. "LIME, 500
    samples, 50 slic segments") for a perturbation method; mask methods: ({}, description)."""
    try:
        samples = method.check_samples(args.samples, "--samples") if method.samples_keyword else None
    except (TypeError, ValueError) as e:
        raise CliError(str(e)) from None
    if method.kind == "mask":
        if method.name == "diffmask" and args.checkpoint is not None:
            return {}, f"DiffMask (amortised, {args.checkpoint})"
        what = {"extremal": f"{method.label}, {samples} steps (fast preset)",
                "diffmask": f"{method.label} per image, {samples} steps"}.get(method.name,
                                                                            f"{method.label}, {samples} {method.work}")
        return {}, what
    if "window" in method.options and args.window is not None:
        for dest in ("segments", "n_segments"):
            if getattr(args, dest) is not None:
                raise CliError(f"{OPTION_FLAGS[dest]} does not apply with --window: occlusion slides a window "
                               f"or removes segments, not both")
        h, w = image.shape[-2:]
        if args.window[0] > h or args.window[1] > w:
            raise CliError(f"--window {args.window[0]}x{args.window[1]} is larger than the {h} x {w} model input")
        stride = args.stride or args.window
        return ({"window": args.window, "stride": stride},
                f"{method.label}, {args.window[0]}x{args.window[1]} px windows, stride {stride[0]}x{stride[1]}")
    if "stride" in method.options and args.stride is not None:
        raise CliError("--stride needs --window (sliding windows); without them occlusion removes segments")
    seg, what = _segments(args, image, method)
    if samples is None:
        return {"segments": seg}, f"{method.label} of {what}"
    return method.keywords(samples, segments=seg), f"{method.label}, {samples} samples, {what}"


# ----------------------------------------------------------------------------- the parser, by option group
def _add_input_options(p) -> None:
    lime = _methods()["lime"]
    p.add_argument("image", nargs="?",
                   help="image file, or a bundled sample: scikit-image's chelsea, coffee, astronaut, rocket, ..., "
                        "motorcycle; scikit-learn's china, flower; a folder: see below")
    p.add_argument("--demo", action="store_true",
                   help=f"run on scikit-image's cat with LIME, masking {default_masking_text()}, "
                        f"{lime.default_samples} samples")


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
    g.add_argument("--batch-size", type=batch_size_arg, default=None,
                   help="images per forward, or auto: the fastest per image, timed on the first forwards of a long "
                        "run (256+ forwards) and kept for the process (default: auto; 4 on CPU, 64 on GPU for "
                        "short runs)")


def _work_help() -> str:
    parts = []
    for m in _methods().values():
        if m.samples_keyword is not None:
            parts.append(f"{m.name}: {m.work}, default {m.default_samples}"
                         + (f", at least {m.min_samples}" if m.min_samples > 1 else ""))
    return "the amount of work: " + "; ".join(parts)


def _add_method_options(p) -> None:
    from ..explain.segmentation import METHODS as SEGMENTATIONS

    g = p.add_argument_group("method")
    g.add_argument("--method", choices=tuple(_methods()), default="lime")
    g.add_argument("--samples", type=positive_int, default=None, help=_work_help())
    g.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="diffmask only: a fitted DiffMask checkpoint (amortised: one forward pass); without it "
                        "diffmask optimises the gates of this one image")
    g.add_argument("--calibrate", action="store_const", const=True, default=None,
                   help="diffmask only: also find the smallest top-k of the gates whose 0/1 mask keeps KL(clean || "
                        "masked) within the budget (~8 more forwards); its kept share and KL are printed and saved "
                        "with --save (meta 'calibrated')")
    g.add_argument("--segments", choices=SEGMENTATIONS, default=None,
                   help="segmentation (default: slic for lime/kernel-shap, grid for occlusion)")
    g.add_argument("--n-segments", type=positive_int, default=None,
                   help="about how many segments (default 50; occlusion: 64 grid cells)")
    g.add_argument("--window", type=pixel_size, default=None,
                   help="occlusion only: slide a window of N (or HxW) pixels instead of removing segments")
    g.add_argument("--stride", type=pixel_size, default=None,
                   help="occlusion only: window step in pixels, N or HxW (default: the window)")
    g.add_argument("--incremental", action="store_const", const=True, default=None,
                   help="occlusion only: recompute only what each removal changes, on top of one clean forward "
                        "(exact; for layer masking and the strategies that paint: grey, black, blur, ...; the others "
                        "run full forwards). Pays for small windows on models whose early layers hold the time "
                        "(ResNet-50)")
    g.add_argument("--seed", type=int, default=0)


def _add_target_options(p) -> None:
    g = p.add_argument_group("what is explained")
    g.add_argument("--target", default=None,
                   help="class to explain: an index or a class name (default: the model's top-1 class)")
    g.add_argument("--output", choices=("prob", "logit"), default=None,
                   help="explain the softmax probability (default) or the logit of the target (not for extremal "
                        "and diffmask, whose objectives are fixed)")
    g.add_argument("--masking", default=None,
                   help=f"comma-separated strategies (default {default_masking_text()}; extremal, rise and "
                        f"diffmask: {default_masking_text('mask')}); see masked_ops.explain.STRATEGIES")


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


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``explain`` on the ``masked-ops`` command line."""
    p = sub.add_parser("explain", help="explain one image with LIME / occlusion under several masking strategies",
                       description="Explain a classifier's prediction on one image under several masking "
                                   "strategies; write the heatmaps to a PNG and/or the attributions to a file.")
    _add_input_options(p)
    _add_model_options(p)
    _add_method_options(p)
    _add_target_options(p)
    _add_output_options(p)
    from .folder import add_arguments as add_folder_arguments  # IMAGE may be a folder (masked_ops.dataset)

    add_folder_arguments(p)
    p.set_defaults(func=run_explain)
    return p


# ----------------------------------------------------------------------------- outputs
def _save_npz(path: str, explanations, image, meta) -> None:
    from ..explain.perturb import save_explanations

    save_explanations(path, explanations, image=image, meta=meta)


def _save_h5(path: str, explanations, image, meta) -> None:
    from ..dataset.h5 import write_h5

    settings = {k: (v if isinstance(v, (str, int, float, bool)) else repr(v))
                for k, v in meta.items() if k not in ("top", "image")}
    write_h5(path, explanations, image=meta["image"], top=meta["top"], image_size=tuple(image.shape[-2:]),
             settings=settings)


# extension -> writer(path, explanations, image 3 x H x W, metadata dict)
SAVE_FORMATS: Dict[str, Callable] = {".npz": _save_npz, ".h5": _save_h5, ".hdf5": _save_h5}


def check_writable(path: str, flag: str, example: str = "cat.png") -> None:
    from .._util.io import check_writable as check

    try:
        check(path, flag, example)
    except ValueError as e:
        raise CliError(str(e)) from None


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

    from .._util.io import atomic_write

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

    from .. import models as M
    from ..explain import get_strategy
    from ..images import load_image

    if args.image and os.path.isdir(str(args.image)) and not args.demo:  # a folder of images
        from .folder import run_folder

        return run_folder(args)
    if args.demo:
        args.image = args.image or DEMO_IMAGE
    if not args.image:
        raise CliError("explain needs an IMAGE (a file or a bundled sample name), or --demo")
    method = check_method_options(args)
    mask_method = method.kind == "mask"  # learned / random masks: soft strategies, mask figure
    masking = masking_of(args, method)
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

    image = load_image(args.image)
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

    kwargs, method_desc = method_settings(method, args, x)
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
        explanations = explain_masks(args, method, x, model, info, masking, target)
    else:
        fn = method.explain
        explanations = []
        incremental = _incremental_strategies(args, strategies)
        for s in strategies:
            t0 = time.perf_counter()
            extra = {"incremental": True} if s.name in incremental else {}
            exp = fn(s, x, targets=[target], output=output, batch_size=args.batch_size, seed=args.seed,
                     progress=False if args.no_progress else None, **kwargs, **extra)
            forwards = (exp.samples.shape[0] if exp.samples is not None else 0) + 1
            how = {True: " (incremental)", False: " (full forwards: incremental inference would save nothing "
                                                   "for this model)"}.get(exp.meta.get("incremental"), "")
            print(f"{args.method} with {s.name} masking: {forwards} forward passes{how}, "
                  f"{time.perf_counter() - t0:.1f} s")
            explanations.append(exp)

    meta = {"image": str(args.image), "model": info.as_dict(), "method": args.method, "settings": method_desc,
            "target": target, "target_name": info.class_name(target), "target_probability": float(probs[target]),
            "output": output, "seed": args.seed, "masking": masking, "top": top}
    if save is not None:
        SAVE_FORMATS[os.path.splitext(save)[1].lower()](save, explanations, x.cpu(), meta)
        print(f"wrote {os.path.abspath(save)}")
    if png is not None:
        from ..explain.figure import explanation_figure, mask_figure

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


def explain_masks(args, method, x, model, info, masking, target: int) -> list:
    """The explanations of ``x`` (3 x S x S, pixel space) for ``target`` by a mask method: one per masking
    strategy, or one from the fitted DiffMask of ``--checkpoint`` (its training strategy, whatever
    --masking says)."""
    from ..explain.diffmask import DiffMask
    from ..explain.soft import soft_strategy

    work = method.check_samples(args.samples, "--samples")
    progress = False if args.no_progress else None
    if method.name == "diffmask" and args.checkpoint is not None:
        t0 = time.perf_counter()
        dm = DiffMask.load(args.checkpoint, model, mean=info.mean, std=info.std)
        try:
            if tuple(x.shape[-2:]) != (dm.image_size, dm.image_size):
                raise ValueError(f"--checkpoint {args.checkpoint!r} explains {dm.image_size} px images; the model "
                                 f"{info.name} takes {x.shape[-1]} px")
            exp = dm.explain(x, targets=target, calibrate=bool(args.calibrate))
        finally:
            dm.close()
        print(f"diffmask (amortised, trained with {exp.strategy} masking): one forward pass, "
              f"{time.perf_counter() - t0:.2f} s")
        _report_calibrated(exp)
        return [exp]
    explanations = []
    for name in masking:
        s = soft_strategy(name, model, f"--method {method.name}", mean=info.mean, std=info.std, seed=args.seed)
        t0 = time.perf_counter()
        kwargs = dict(targets=[target], seed=args.seed, progress=progress)
        if method.name == "extremal":
            kwargs["preset"] = "fast"
        elif method.name == "rise":
            kwargs.update(output=args.output or "prob", batch_size=args.batch_size)
        elif method.name == "diffmask":
            kwargs["patch"] = 16 if x.shape[-1] % 16 == 0 and x.shape[-2] % 16 == 0 else 8
            kwargs["calibrate"] = bool(args.calibrate)
        exp = method.explain(s, x, **method.keywords(work, **kwargs))
        what = {"extremal": f"{work} steps x {len(exp.info.get('areas', []))} areas",
                "diffmask": f"{work} steps, per image, kept {exp.info.get('kept', float('nan')):.0%}"
                }.get(method.name, f"{work} {method.work}")
        print(f"{method.name} with {s.name} masking: {what}, {time.perf_counter() - t0:.1f} s")
        _report_calibrated(exp)
        explanations.append(exp)
    return explanations


def _report_calibrated(exp) -> None:
    """--calibrate: print the calibrated mask's kept share and KL and keep them in the saved meta."""
    cal = getattr(exp, "info", {}).get("calibrated")
    if cal is None:
        return
    exp.meta["calibrated"] = {"kept": round(float(cal["kept"]), 6), "kl": round(float(cal["kl"]), 6)}
    print(f"  calibrated ({exp.strategy}): the smallest top-k of the gates within the KL budget keeps "
          f"{cal['kept']:.0%} of the patches (KL {cal['kl']:.3f})")
