"""Whole explanations against what users would pick instead: masked_ops, Captum, the lime package, TorchRay.

    python bench/bench_explainers.py                      # CPU, EfficientNet-Lite0, every contender, 3 rounds
    python bench/bench_explainers.py --only lime rise     # two explainers (and their floors)
    python bench/bench_explainers.py --only 'lime/captum_*' --repeats 5
    python bench/bench_explainers.py --compile            # every model under torch.compile, warmed up
    python bench/bench_explainers.py --smoke              # 4 samples, masks, segments, windows: tests the script

One model (--model, in --format), one photo (scikit-image's cat, 224 px), one SLIC segmentation (50
asked, K found) and one target class (the top-1 class of the full image) for every contender; all
contenders of all explainers run interleaved in the same rounds (bench/harness.py: each round rotates
their order), so a shared host's load hits them alike. Contenders, by explainer (the group before
"/"):

- ``floor/<N>``: the plain model's forward of N copies of the normalised image in batches of
  --batch-size, nothing else: what any explainer that paints pixels and runs the plain model must at
  least spend on N perturbed images. Each explainer's ratio is to the floor of its own N (LIME,
  KernelSHAP: --samples; RISE: --masks; occlusion: the number of windows; ablation: K segments).
- ``lime/``: masked_ops ``explain_lime`` (grey fill, layer masking); the ``lime`` package's
  LimeImageExplainer (hide_color = the ImageNet mean, i.e. grey; same segments, same batch size unless
  --lime-batch-size); Captum's ``Lime`` on the plain model with the grey baseline (0 in the normalised
  space = the ImageNet mean colour) and the segments as feature_mask, and the same ``Lime`` driven
  with layer masking through masked_ops.explain.adapters.captum (the mask as a 4th input channel).
- ``kernel_shap/``: masked_ops ``explain_kernel_shap`` (grey, layer); Captum's ``KernelShap`` (grey
  baseline, layer masking through the adapter).
- ``ablation/``: occlusion over the SLIC segments, one forward per segment: masked_ops
  ``explain_occlusion(segments=...)`` (grey, layer); Captum's ``FeatureAblation`` (feature_mask = the
  segments; grey baseline, and layer masking through the adapter).
- ``occlusion/``: sliding-window occlusion (--window, --stride; windows every stride pixels, 13 x 13 =
  169 at 32/16 on 224 px for both libraries): masked_ops ``explain_occlusion(window=, stride=)`` (grey,
  layer); Captum's ``Occlusion`` (same window and stride over all channels; grey, and layer masking
  through the adapter).
- ``removal/``: the removal curves of the experiments (masked_ops.experiments.removal_curves: --repeats-removal
  random orders of the 16 x 16 patches, 11 fractions, nested masks, the 0% and 100% masks predicted once:
  2 + 9 R images), grey fill and layer masking, at --batch-size. There is no outside tool for these;
  the output checked is the curve of p(clean class) over the fractions (finite, not constant).
- ``rise/``: masked_ops ``explain_rise`` with the grey fill (soft masks blend grey in), with soft layer
  masking (what ``masked-ops explain --method rise --masking layer`` runs) and with hard layer masking on
  thresholded masks (``binary=True``); TorchRay's ``torchray.attribution.rise.rise`` on the normalised
  image (it multiplies the normalised input by the mask: a blend towards 0 = the ImageNet mean, so grey
  too), same number of masks, 7 x 7 cells, p 0.5, same batch size.

Every Captum call passes ``perturbations_per_eval`` = --batch-size, so Captum batches its forwards as
ours do. Every explainer explains the softmax probability of the target (Captum's forwards return
probabilities; TorchRay applies a sigmoid to the logits, its fixed choice). Captum's own defaults
otherwise (Lime: Lasso alpha 0.01 on an exponential kernel of the input-space distance; KernelShap:
linear regression).

Before the timed rounds every contender runs once untimed (the warm-up: compiles under --compile at
every batch size it sees, converts the layer-masked models) and its output is checked: the shape it
must have, finite, not constant (a run that silently does nothing fails here, before any timing). The
model calls are counted in that run (``images``, ``forwards``, ``max_batch``). Recorded per
contender: wall and process CPU seconds (median, p25, p75), the median of per-round ratios to its
explainer's floor (wall and CPU), the counts, batch size, format, compile flag, the warm-up time and
the Pearson correlation of its map with masked_ops' grey-fill map of the same explainer (a check that
the contenders compute comparable things); the file has H.environment(). Results go to
bench/results/<device>-explainers-<date>.json (with --compile: explainers-compiled).
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

GROUPS = ("lime", "kernel_shap", "ablation", "occlusion", "rise", "removal")

# ----------------------------------------------------------------------------- counting model calls
# Every model call of every contender goes through a Counter (outside any compiled module): the
# warm-up call of each contender reads how many images and forwards it ran.
TALLY = {"images": 0, "forwards": 0, "max_batch": 0}


def reset_tally() -> None:
    TALLY.update(images=0, forwards=0, max_batch=0)


class Counter(nn.Module):
    """``inner(*args)``, counting the images (args[0]'s first dimension) and the calls in TALLY."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, *args):
        n = int(x.shape[0])
        TALLY["images"] += n
        TALLY["forwards"] += 1
        TALLY["max_batch"] = max(TALLY["max_batch"], n)
        return self.inner(x, *args)


class PlainForward(nn.Module):
    """The plain model on normalised images, fed in the benchmark's memory format (as the strategies
    feed it), returning logits or probabilities: the forward_func given to Captum and TorchRay."""

    def __init__(self, model: nn.Module, fmt, softmax: bool):
        super().__init__()
        self.model, self.fmt, self.softmax = model, fmt, softmax

    def forward(self, x):
        out = self.model(x.contiguous(memory_format=self.fmt))
        return out.softmax(1) if self.softmax else out


# ----------------------------------------------------------------------------- checks
def check_map(name: str, heat: torch.Tensor, size, strict: bool) -> dict:
    """The contender's H x W map: right shape, finite, not constant (else RuntimeError; a constant map
    only warns with ``strict`` False, the smoke run's tiny sample counts can give one)."""
    heat = torch.as_tensor(heat).detach().double().cpu()
    if tuple(heat.shape) != tuple(size):
        raise RuntimeError(f"{name}: map of shape {tuple(heat.shape)}, expected {tuple(size)}")
    if not bool(torch.isfinite(heat).all()):
        raise RuntimeError(f"{name}: map holds NaN or inf")
    std = float(heat.std())
    if std == 0:
        msg = f"{name}: constant map ({float(heat[0, 0]):.3g} everywhere): the explainer did nothing"
        if strict:
            raise RuntimeError(msg)
        print(f"WARNING: {msg}", flush=True)
    return {"shape": list(heat.shape), "finite": True, "std": std, "constant": std == 0}


def correlation(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return round(float(a @ b) / den, 4) if den > 0 else None


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet-lite0", help="masked_ops.models.load_model name")
    p.add_argument("--samples", type=int, default=1000, help="LIME and KernelSHAP samples, every contender")
    p.add_argument("--masks", type=int, default=1000, help="RISE masks, every contender")
    p.add_argument("--n-segments", type=int, default=50, help="SLIC segments asked for (LIME, KernelSHAP, ablation)")
    p.add_argument("--repeats-removal", type=int, default=20, help="removal curves: random patch orders")
    p.add_argument("--window", type=int, default=32, help="sliding-window occlusion: window (pixels)")
    p.add_argument("--stride", type=int, default=16, help="sliding-window occlusion: stride (pixels)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward for every contender (Captum: perturbations_per_eval; default: the "
                        "library's constant for short runs, 4 on CPU, 64 on GPU)")
    p.add_argument("--lime-batch-size", type=int, default=None,
                   help="the lime package's batch_size (default: --batch-size; the package's own default is 10)")
    p.add_argument("--format", choices=("contiguous", "channels_last"), default=None,
                   help="memory format of the model for every contender (default: channels_last on CPU, as the "
                        "CLI; contiguous on GPU)")
    p.add_argument("--compile", action="store_true",
                   help="every contender on torch.compile'd models (the plain model; the layer-masked models), "
                        "warmed up by the untimed first call")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="contenders to run: names or glob patterns ('lime/captum_*'), or explainers ('rise'); "
                        "the floors they need are added")
    p.add_argument("--list", action="store_true", help="print the contenders' names and exit")
    args = H.script_args(p, argv, device="cpu", repeats=3,
                         smoke=dict(samples=4, masks=4, n_segments=4, window=112, stride=112, batch_size=4,
                                    repeats_removal=1, repeats=1))
    device = torch.device(args.device)
    from masked_ops.explain.batching import check_batch_size, default_batch_size

    # one fixed batch for the floor and every contender (a fair floor): the library's constant unless given
    args.batch_size = check_batch_size(args.batch_size) or default_batch_size(device)
    args.lime_batch_size = args.lime_batch_size or args.batch_size
    args.format = args.format or ("channels_last" if device.type == "cpu" else "contiguous")
    fmt = torch.channels_last if args.format == "channels_last" else torch.contiguous_format

    # ------------------------------------------------------------------ the contenders' names, by explainer
    names = {
        "lime": ["ours_grey", "ours_layer", "lime_package_grey", "captum_grey", "captum_layer"],
        "kernel_shap": ["ours_grey", "ours_layer", "captum_grey", "captum_layer"],
        "ablation": ["ours_grey", "ours_layer", "captum_grey", "captum_layer"],
        "occlusion": ["ours_grey", "ours_layer", "captum_grey", "captum_layer"],
        "rise": ["ours_grey", "ours_layer", "ours_layer_binary", "torchray"],
        "removal": ["ours_grey", "ours_layer"],
    }
    all_names = [f"{g}/{c}" for g in GROUPS for c in names[g]]
    if args.list:
        print("\n".join(all_names))
        return 0
    selected = all_names
    if args.only:
        selected = []
        for pat in args.only:
            hits = [n for n in all_names if fnmatch.fnmatchcase(n, pat) or n.split("/")[0] == pat]
            if not hits:
                p.error(f"--only {pat!r} matches no contender; they are: {', '.join(all_names)}")
            selected += [n for n in hits if n not in selected]
    selected = [n for n in all_names if n in selected]  # the canonical order

    # ------------------------------------------------------------------ model, photo, segments, target
    from masked_ops.explain import (explain_kernel_shap, explain_lime, explain_occlusion, explain_rise,
                                    get_strategy, segment)
    from masked_ops.explain.occlusion import window_cells
    from masked_ops.images import load_image
    from masked_ops.models import load_model

    model, info = load_model(args.model)
    model = model.to(device).eval().to(memory_format=fmt)
    image = info.prepare(load_image("chelsea"))[0].to(device)  # 3 x 224 x 224 pixels
    size = tuple(image.shape[1:])
    seg = segment(image.cpu(), "slic", n_segments=args.n_segments).to(device)
    k = int(seg.max()) + 1
    windows = window_cells(size[0], size[1], args.window, args.stride)[1].shape[0]
    mean = torch.tensor(info.mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    x_norm = (image[None] - mean) / std  # 1 x 3 x H x W, the model's input space (grey = 0)
    with torch.inference_mode():
        target = int(model(x_norm.contiguous(memory_format=fmt)).argmax())
    from masked_ops.experiments.removal import FRACTIONS
    floor_images = {"lime": args.samples, "kernel_shap": args.samples, "ablation": k, "occlusion": windows,
                    "rise": args.masks, "removal": 2 + (len(FRACTIONS) - 2) * args.repeats_removal}

    # models: eager or compiled, every call counted (the Counter sits outside the compiled module)
    run_model = torch.compile(model) if args.compile else model
    plain = Counter(run_model)

    def masked(strategy):
        """The strategy with its converted (layer-masked) model counted, and compiled under --compile."""
        m = H.measure(lambda: strategy.masked_model, device)  # the conversion, once, untimed
        conversion_s[strategy.name + ("_soft" if strategy.soft else "")] = round(m.wall_s, 3)
        strategy._masked = Counter(torch.compile(m.result) if args.compile else m.result)
        return strategy

    conversion_s: Dict[str, float] = {}
    lazy: Dict[str, object] = {}

    def get(key: str, build: Callable):
        if key not in lazy:
            lazy[key] = build()
        return lazy[key]

    grey = lambda: get("grey", lambda: get_strategy("grey", plain, mean=info.mean, std=info.std))  # noqa: E731
    layer = lambda: get("layer", lambda: masked(get_strategy("layer", model, mean=info.mean, std=info.std)))  # noqa: E731
    soft_layer = lambda: get("soft_layer", lambda: masked(  # noqa: E731
        get_strategy("layer", model, mean=info.mean, std=info.std, soft=True)))

    def captum_plain():
        return get("captum_plain", lambda: PlainForward(plain, fmt, softmax=True))

    def captum_layer():
        from masked_ops.explain.adapters.captum import CaptumForward, captum_inputs

        fwd = get("captum_layer", lambda: CaptumForward(strategy=layer(), softmax=True).eval())
        return fwd, captum_inputs(image[None], seg)

    B = args.batch_size
    feature_mask = seg[None, None].long()  # 1 x 1 x H x W, broadcast over the channels

    # ------------------------------------------------------------------ contender functions
    # Each returns the raw output; to_map turns it into the H x W map of the target (outside the timing).
    def ours(fn, strategy_fn, **kw):
        def run():
            return fn(strategy_fn(), image, targets=target, batch_size=B, progress=False, **kw)
        return run, lambda exp: exp.heatmap(0)

    def captum(cls, layer_masked: bool, **kw):
        def run():
            torch.manual_seed(0)  # Captum's Lime/KernelShap sample from torch's global generator
            with torch.no_grad():
                if layer_masked:
                    fwd, a = captum_layer()
                    if cls.__name__ == "Occlusion":
                        return cls(fwd).attribute(a["inputs"], baselines=a["baselines"], target=target,
                                                  perturbations_per_eval=B, **kw)
                    return cls(fwd).attribute(**a, target=target, perturbations_per_eval=B, **kw)
                fwd = captum_plain()
                if cls.__name__ == "Occlusion":
                    return cls(fwd).attribute(x_norm, baselines=0.0, target=target, perturbations_per_eval=B, **kw)
                return cls(fwd).attribute(x_norm, baselines=0.0, feature_mask=feature_mask, target=target,
                                          perturbations_per_eval=B, **kw)
        return run, lambda attr: attr[0, :3].sum(0)

    def removal(strategy_fn, key: str):
        from masked_ops.experiments.removal import removal_curves

        def run():
            return removal_curves(plain, image[None], {key: strategy_fn()}, repeats=args.repeats_removal,
                                  batch_size=B, progress=False)
        # the curve of p(clean class) over the fractions, as an F x 1 "map" for check_map
        return run, lambda res: torch.tensor(res["strategies"][key]["p_clean"])[:, None]

    def lime_package():
        from lime.lime_image import LimeImageExplainer

        @torch.inference_mode()
        def classifier_fn(images):
            x = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2).to(device)
            return plain(((x - mean) / std).contiguous(memory_format=fmt)).softmax(1).cpu().numpy()

        rgb = image.permute(1, 2, 0).double().cpu().numpy()
        seg_np = seg.cpu().numpy()

        def run():
            return LimeImageExplainer(random_state=0).explain_instance(
                rgb, classifier_fn, labels=(target,), top_labels=None, hide_color=tuple(info.mean),
                num_samples=args.samples, batch_size=args.lime_batch_size, segmentation_fn=lambda img: seg_np,
                random_seed=0)

        def to_map(exp):
            w = torch.zeros(k, dtype=torch.float64)
            for f, v in exp.local_exp[target]:
                w[int(f)] = v
            return w[seg.cpu()]
        return run, to_map

    def torchray_rise():
        from torchray.attribution.rise import rise

        fwd = PlainForward(plain, fmt, softmax=False)  # TorchRay applies its sigmoid to the logits

        def run():
            return rise(fwd, x_norm, seed=0, num_masks=args.masks, num_cells=7, batch_size=B, p=0.5)
        return run, lambda sal: sal[0, target]

    def plain_floor(n: int):
        batch = x_norm.expand(B, -1, -1, -1).contiguous(memory_format=fmt)

        @torch.inference_mode()
        def run():
            done = 0
            out = None
            while done < n:
                b = min(B, n - done)
                out = plain(batch[:b])
                done += b
            return out
        return run, None

    def build(name: str):
        g, c = name.split("/")
        from captum.attr import FeatureAblation, KernelShap, Lime, Occlusion

        if g == "lime":
            if c.startswith("ours"):
                return ours(explain_lime, grey if c == "ours_grey" else layer, segments=seg,
                            num_samples=args.samples)
            if c == "lime_package_grey":
                return lime_package()
            return captum(Lime, c == "captum_layer", n_samples=args.samples)
        if g == "kernel_shap":
            if c.startswith("ours"):
                return ours(explain_kernel_shap, grey if c == "ours_grey" else layer, segments=seg,
                            num_samples=args.samples)
            return captum(KernelShap, c == "captum_layer", n_samples=args.samples)
        if g == "ablation":
            if c.startswith("ours"):
                return ours(explain_occlusion, grey if c == "ours_grey" else layer, segments=seg)
            return captum(FeatureAblation, c == "captum_layer")
        if g == "occlusion":
            if c.startswith("ours"):
                return ours(explain_occlusion, grey if c == "ours_grey" else layer, window=args.window,
                            stride=args.stride)
            ch = 4 if c == "captum_layer" else 3  # the adapter's 4th channel is the mask: cover it too
            return captum(Occlusion, c == "captum_layer", sliding_window_shapes=(ch, args.window, args.window),
                          strides=(ch, args.stride, args.stride))
        if g == "removal":
            return removal(grey if c == "ours_grey" else layer, c.split("_")[1])
        if g == "rise":
            if c == "torchray":
                return torchray_rise()
            strat = {"ours_grey": grey, "ours_layer": soft_layer, "ours_layer_binary": layer}[c]
            return ours(explain_rise, strat, n_masks=args.masks, cells=7, p=0.5, binary=c == "ours_layer_binary")
        raise KeyError(name)

    what = {
        "lime/ours_grey": "masked_ops explain_lime, grey fill (FillStrategy), plain model",
        "lime/ours_layer": "masked_ops explain_lime, layer masking (converted model)",
        "lime/lime_package_grey": "lime.LimeImageExplainer, hide_color = ImageNet mean, classifier_fn = plain model",
        "lime/captum_grey": "captum.attr.Lime, baseline 0 (normalised grey), feature_mask = segments, plain model",
        "lime/captum_layer": "captum.attr.Lime through masked_ops.explain.adapters.captum (layer masking)",
        "kernel_shap/ours_grey": "masked_ops explain_kernel_shap, grey fill",
        "kernel_shap/ours_layer": "masked_ops explain_kernel_shap, layer masking",
        "kernel_shap/captum_grey": "captum.attr.KernelShap, baseline 0 (normalised grey), feature_mask = segments",
        "kernel_shap/captum_layer": "captum.attr.KernelShap through the adapter (layer masking)",
        "ablation/ours_grey": "masked_ops explain_occlusion(segments=SLIC), grey fill",
        "ablation/ours_layer": "masked_ops explain_occlusion(segments=SLIC), layer masking",
        "ablation/captum_grey": "captum.attr.FeatureAblation, feature_mask = segments, baseline 0",
        "ablation/captum_layer": "captum.attr.FeatureAblation through the adapter (layer masking)",
        "occlusion/ours_grey": "masked_ops explain_occlusion(window, stride), grey fill",
        "occlusion/ours_layer": "masked_ops explain_occlusion(window, stride), layer masking",
        "occlusion/captum_grey": "captum.attr.Occlusion, same window and stride over 3 channels, baseline 0",
        "occlusion/captum_layer": "captum.attr.Occlusion through the adapter (window over 4 channels)",
        "rise/ours_grey": "masked_ops explain_rise, grey fill blended by the soft masks",
        "rise/ours_layer": "masked_ops explain_rise, soft layer masking (layer_mask(soft=True))",
        "rise/ours_layer_binary": "masked_ops explain_rise(binary=True), hard layer masking of masks > 0.5",
        "rise/torchray": "torchray.attribution.rise.rise on the normalised image (input * mask: blend to grey)",
        "removal/ours_grey": "masked_ops.experiments.removal_curves, grey fill (random patch orders, 11 fractions)",
        "removal/ours_layer": "masked_ops.experiments.removal_curves, layer masking",
    }

    # ------------------------------------------------------------------ results file
    out = H.results_path(args, "explainers-compiled" if args.compile else "explainers", device.type)
    results: Dict[str, dict] = {}
    summary = dict(benchmark="explainers", model=args.model, image="chelsea", input_shape=[1, *image.shape],
                   dtype="float32", format=args.format, compiled=args.compile, batch_size=B,
                   lime_batch_size=args.lime_batch_size, samples=args.samples, masks=args.masks,
                   n_segments_asked=args.n_segments, segments=k, window=args.window, stride=args.stride,
                   windows=windows, target=target, repeats=args.repeats, conversion_s=conversion_s,
                   **H.environment(device), complete=False, results=results)

    floors_needed = sorted({floor_images[n.split("/")[0]] for n in selected})
    contenders: Dict[str, Callable] = {}
    to_maps: Dict[str, Optional[Callable]] = {}
    for n in floors_needed:
        contenders[f"floor/{n}"], to_maps[f"floor/{n}"] = plain_floor(n)
    for name in selected:
        contenders[name], to_maps[name] = build(name)

    def base_record(name):
        g = name.split("/")[0]
        floor = name if g == "floor" else f"floor/{floor_images[g]}"
        return dict(explainer=g, floor=floor, what=what.get(name, f"plain forward of {name.split('/')[1]} images"),
                    batch_size=args.lime_batch_size if name == "lime/lime_package_grey" else B,
                    format=args.format, compiled=args.compile)

    # ------------------------------------------------------------------ warm-up and checks (untimed)
    print(f"{args.model}, {args.format}{', compiled' if args.compile else ''}, batch {B}, K = {k} segments, "
          f"{windows} windows, target {target}; warm-up and checks:", flush=True)
    def shape_of(name):  # what check_map expects: an H x W map, or the removal curve (F x 1)
        return (len(FRACTIONS), 1) if name.startswith("removal/") else size

    maps: Dict[str, torch.Tensor] = {}
    for name, fn in contenders.items():
        reset_tally()
        s = H.measure(fn, device)
        rec = results.setdefault(name, base_record(name))
        rec.update(warmup_s=round(s.wall_s, 3), **TALLY)
        if to_maps[name] is not None:
            maps[name] = to_maps[name](s.result).detach().cpu()
            rec["check"] = check_map(name, maps[name], shape_of(name), strict=not args.smoke)
        elif TALLY["images"] != int(name.split("/")[1]):
            raise RuntimeError(f"{name}: ran {TALLY['images']} images")
        print(f"  {name:<28} {s.wall_s:8.3f} s  {TALLY['images']:6d} images in {TALLY['forwards']:4d} forwards "
              f"(max batch {TALLY['max_batch']})", flush=True)
    for name, m in maps.items():
        ref = maps.get(f"{name.split('/')[0]}/ours_grey")
        if ref is not None and not name.endswith("/ours_grey"):
            results[name]["corr_with_ours_grey"] = correlation(m, ref)
    H.write_json(out, summary)

    # ------------------------------------------------------------------ timed rounds, interleaved
    samples: Dict[str, list] = {n: [] for n in contenders}

    def summarise():
        n_min = min((len(v) for v in samples.values() if v), default=0)
        walls = {n: [s.wall_s for s in v[:n_min]] for n, v in samples.items() if v}
        cpus = {n: [s.cpu_s for s in v[:n_min]] for n, v in samples.items() if v}
        for name, v in samples.items():
            if not v:
                continue
            rec = results[name]
            rec.update(H.seconds(v))
            floor = rec["floor"]
            if floor in walls and name in walls and n_min:
                rec["ratio_to_floor"] = H.paired_ratio(walls[name], walls[floor])
                rec["cpu_ratio_to_floor"] = H.paired_ratio(cpus[name], cpus[floor])
        H.write_json(out, summary)  # after every call: a cut-short run keeps its figures

    def after(name, so_far):
        samples[name] = so_far
        summarise()

    print(f"timed: {args.repeats} interleaved round(s) of {len(contenders)} contenders", flush=True)
    H.interleaved_samples(contenders, args.repeats, device, after=after)
    for name, v in samples.items():  # the last timed call's output, checked like the warm-up's
        if to_maps[name] is not None and v and v[-1].result is not None:
            check_map(name, to_maps[name](v[-1].result), shape_of(name), strict=not args.smoke)
    summary["complete"] = True
    summarise()

    # ------------------------------------------------------------------ table
    print()
    print(f"{'contender':<28} {'wall s (p25-p75)':>26} {'cpu s':>9} {'/floor':>7} {'cpu/fl':>7} {'images':>7} "
          f"{'batch':>5} {'corr':>6}")
    for name, r in results.items():
        if "median_s" not in r:
            continue
        iqr = f"{r['median_s']:.3f} ({r['p25_s']:.3f}-{r['p75_s']:.3f})"
        corr = r.get("corr_with_ours_grey")
        print(f"{name:<28} {iqr:>26} {r['median_cpu_s']:9.3f} {r.get('ratio_to_floor', float('nan')):7.3f} "
              f"{r.get('cpu_ratio_to_floor', float('nan')):7.3f} {r['images']:7d} {r['max_batch']:5d} "
              f"{'' if corr is None else f'{corr:.2f}':>6}")
    print(f"({args.format}, {'compiled' if args.compile else 'eager'}, {torch.get_num_threads()} threads; /floor: "
          f"median of per-round ratios to floor/N of the same explainer; corr: with ours_grey's map)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
