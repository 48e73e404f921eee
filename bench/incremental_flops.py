"""What exact incremental inference (Krypton) would save for occlusion and removal curves: FLOPs inside
the changed cone, layer by layer (issue 29, "Beyond the floor"): the upper bound that decided whether to
build the engine (masked_ops.explain.incremental; its wall-clock measurement: bench/incremental_engine.py).

    python bench/incremental_flops.py             # ResNet-50 and EfficientNet-Lite0, 224 px, every window
    python bench/incremental_flops.py --smoke     # Lite0, one coarse window, no check: tests the script

Method. For a changed input rectangle (one sliding-occlusion window, one removed patch) the rectangle of
changed positions at every node of the model's torch.fx trace comes from masked_ops.explain.cone (its
docstring gives the rules: conv/pool windows, padding shifts, hulls at elementwise joins, everything
downstream of a global op).

Layer masking. Under layer masking (masked_ops.layer_mask) a window is removed by the mask instead of
painted, and the mask path is the same geometry: a masked conv's keep mask is the max-pool of its
input mask with the conv's kernel, stride, padding and dilation, and its fill (or renormalisation)
reads only the input pixels of the output's own kernel window. An output whose window holds no
removed pixel and no changed activation reads the clean values only, and its mask is 1: it equals the
clean forward's. So the changed set under layer masking obeys the very rule above, and the cone is
that of plain occlusion with a fill. (The *values* inside the cone depend on more: a removed pixel's
fill comes from visible neighbours up to d*(k-1) rings away, outside the window, all of them clean
values an incremental engine reads from its cache, so the halo it gathers is wider, not its FLOPs.)
--check verifies both on the real models: one float64 forward, clean and with one window removed,
plain (grey fill, every fx node) and layer-masked (every masked layer's output, by module name);
every changed position must lie in the predicted rectangle.

FLOPs. conv: out_h * out_w * C_out * (C_in / groups) * kh * kw * 2 (multiply-adds x 2; biases
ignored: neither model has conv biases); linear: 2 * in * out. The incremental cost of a layer is the
same per output position times the changed area (the rectangle, clipped to the output). Elementwise
work is counted roughly and apart ("elementwise": 2 per element for BatchNorm, 1 for an activation or
an add, k*k per pooled element, the input size for a global pool): the ratios are given with and
without it (it is 0.5-2 % of the conv FLOPs; a BN folded into its conv costs nothing).

Windows: the project's sliding occlusion (explain_occlusion(window=, stride=): windows start every
stride pixels, ceil((224 - window) / stride) + 1 per axis, the last clipped at the border): 32/16
(13 x 13 = 169) and 16/8 (27 x 27 = 729); the deletion curve removing 16 x 16 patches one after
another (each step changes one patch relative to the previous step: the 14 x 14 grid 16/16); and the
project's removal/deletion curves as they run (experiments: 11 fractions 0, 0.1, ..., 1 of the 196
patches in a random order, each step removing about 20 more patches: incremental relative to the
previous step, the exact union of those patches' cones).

Reported per model and window: full-forward FLOPs; mean, min and max incremental FLOPs over the window
positions; ``ratio`` = full / mean (the exact speed-up bound of one incremental forward, no overheads);
``ratio_end_to_end`` = (P + 1) * full / (full + P * mean) (the clean forward that both approaches need,
which the incremental one must also cache); ``ratio_batched`` with every position's cone grown to the
largest one per layer (what a batch of same-sized gathered cones computes, as Krypton batches them);
``elementwise_only``: the same ratios of the elementwise work alone, a proxy of the activation volume
written (the memory traffic that bounds depthwise and other memory-bound layers, not the FLOPs);
the per-stage breakdown (stages = output resolution) with where the cone covers the whole map; the
per-layer FLOPs inside the cone; and the projective-field view: the fraction of the final feature map
(before global pooling) that a window changes. The decision (issue 29: build it only at >= 1.5x end to
end, results equal to full forwards) takes the batched end-to-end FLOPs ratio as an upper bound of
the wall-clock ratio: gathers, scatters and small convs only lower it.

Results: bench/results/cpu-incremental-flops-<date>.json.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

from masked_ops.explain.cone import FULL, Op, Plan, Rect, Region, area, plan_model, propagate  # noqa: E402


def op_costs(plan: Plan, reg: Dict[str, Region]) -> Tuple[List[float], List[float]]:
    """(conv/linear FLOPs, elementwise FLOPs) of every op when only its changed region is computed."""
    fl, el = [], []
    for op in plan.ops:
        frac = area(reg[op.name], op.hw) / (op.hw[0] * op.hw[1])
        fl.append(op.flops * frac)
        el.append(op.elem * frac)
    return fl, el


def windows(size: int, window: int, stride: int) -> List[Tuple[int, int]]:
    """The [start, end) intervals of explain_occlusion's sliding windows along one axis
    (occlusion.window_cells: ceil((size - window) / stride) + 1 windows, the last clipped)."""
    count = math.ceil((size - window) / stride) + 1
    return [(p * stride, min(p * stride + window, size)) for p in range(count)]


# ----------------------------------------------------------------------------- analysis of one window grid
def _stage_of(op: Op) -> str:
    return f"{op.hw[0]}x{op.hw[1]}" if op.spatial and op.hw != (1, 1) else "head"


def analyse(plan: Plan, window: int, stride: int, name: str = "") -> dict:
    h, w = plan.input_hw
    ys, xs = windows(h, window, stride), windows(w, window, stride)
    rects = [(y0, y1, x0, x1) for y0, y1 in ys for x0, x1 in xs]
    n_ops = len(plan.ops)
    full_fl, full_el = [o.flops for o in plan.ops], [o.elem for o in plan.ops]
    F_, E_ = sum(full_fl), sum(full_el)
    per_pos_fl, per_pos_el = [], []
    fracs = [[0.0] * len(rects) for _ in range(n_ops)]  # changed fraction of every op's output, per window
    max_fl, max_el = [0.0] * n_ops, [0.0] * n_ops
    for j, rect in enumerate(rects):
        reg = propagate(plan, rect)
        fl, el = op_costs(plan, reg)
        per_pos_fl.append(sum(fl))
        per_pos_el.append(sum(el))
        for i, op in enumerate(plan.ops):
            fracs[i][j] = area(reg[op.name], op.hw) / (op.hw[0] * op.hw[1])
            max_fl[i], max_el[i] = max(max_fl[i], fl[i]), max(max_el[i], el[i])
    P = len(rects)
    mean_fl, mean_el = statistics.fmean(per_pos_fl), statistics.fmean(per_pos_el)
    batched_fl, batched_el = sum(max_fl), sum(max_el)

    def ratios(full, mean, batched):
        return dict(ratio=full / mean, ratio_end_to_end=(P + 1) * full / (full + P * mean),
                    ratio_batched=full / batched, ratio_batched_end_to_end=(P + 1) * full / (full + P * batched))

    # stages: consecutive ops at one output resolution (the head: 1 x 1 and non-spatial)
    stages: Dict[str, dict] = {}
    centre = min(range(P), key=lambda j: abs(rects[j][0] + rects[j][1] - h) + abs(rects[j][2] + rects[j][3] - w))
    for i, op in enumerate(plan.ops):
        if op.kind in ("input", "const", "meta", "pad"):  # pads cost nothing and have their own sizes
            continue
        key = _stage_of(op)
        st = stages.setdefault(key, dict(stage=key, ops=0, full_flops=0.0, mean_incremental_flops=0.0,
                                         full_elementwise=0.0, mean_incremental_elementwise=0.0,
                                         first_full_centre=None, last_op=None))
        st["ops"] += 1
        st["full_flops"] += op.flops
        st["mean_incremental_flops"] += statistics.fmean(f * op.flops for f in fracs[i])
        st["full_elementwise"] += op.elem
        st["mean_incremental_elementwise"] += statistics.fmean(f * op.elem for f in fracs[i])
        if st["first_full_centre"] is None and op.kind in ("conv", "pool", "global", "dense") \
                and fracs[i][centre] >= 1.0:
            st["first_full_centre"] = f"{op.name} ({op.label})"
        st["last_op"] = i
    for st in stages.values():
        i = st.pop("last_op")
        fr = fracs[i]
        st["ratio"] = st["full_flops"] / st["mean_incremental_flops"] if st["mean_incremental_flops"] else None
        st["share_of_full"] = st["full_flops"] / F_
        st["share_of_incremental"] = st["mean_incremental_flops"] / mean_fl
        st["output_changed_fraction"] = dict(mean=statistics.fmean(fr), min=min(fr), max=max(fr))
        st["windows_whole_map_changed"] = sum(f >= 1.0 for f in fr) / P
    layers = []
    for i, op in enumerate(plan.ops):
        if op.kind in ("conv", "dense"):
            fr = fracs[i]
            layers.append(dict(name=op.name, module=op.module, label=op.label, out=list(op.shape[1:]),
                               full_flops=op.flops, mean_incremental_flops=statistics.fmean(f * op.flops for f in fr),
                               changed_fraction_mean=round(statistics.fmean(fr), 4),
                               changed_fraction_min=round(min(fr), 4), changed_fraction_max=round(max(fr), 4)))
    fm = plan.final_map()
    fi = next(i for i, o in enumerate(plan.ops) if o.name == fm.name)
    fr = fracs[fi]
    first_full = next((op.name for i, op in enumerate(plan.ops) if op.spatial and op.kind not in ("input", "const")
                       and all(f >= 1.0 for f in fracs[i])), None)
    return dict(
        name=name, window=window, stride=stride, positions=P, grid=[len(ys), len(xs)],
        full_flops=F_, mean_incremental_flops=mean_fl, min_incremental_flops=min(per_pos_fl),
        max_incremental_flops=max(per_pos_fl), batched_incremental_flops=batched_fl,
        **ratios(F_, mean_fl, batched_fl),
        with_elementwise=dict(full=F_ + E_, mean_incremental=mean_fl + mean_el,
                              **ratios(F_ + E_, mean_fl + mean_el, batched_fl + batched_el)),
        # elementwise work alone tracks the activation volume (memory traffic): what memory-bound layers save
        elementwise_only=dict(full=E_, mean_incremental=mean_el, **ratios(E_, mean_el, batched_el)),
        elementwise_share_of_full=E_ / F_,
        projective_field=dict(final_map=f"{fm.name} {list(fm.shape[1:])}", mean=statistics.fmean(fr), min=min(fr),
                              max=max(fr), windows_whole_map=sum(f >= 1.0 for f in fr) / P),
        first_node_changed_entirely_for_every_window=first_full,
        stages=list(stages.values()), layers=layers)


# ----------------------------------------------------------------------------- the project's removal curves
def analyse_removal_curve(plan: Plan, patch: int = 16, fractions: Sequence[float] = tuple(i / 10 for i in range(11)),
                          repeats: int = 5, seed: int = 0) -> dict:
    """The experiments' removal/deletion curves: random orders of the patches, the first round(f * P)
    removed at each fraction; each step is computed incrementally from the previous one (the exact union
    of the cones of the patches it adds: one boolean map per layer)."""
    import numpy as np

    h, w = plan.input_hw
    gh, gw = h // patch, w // patch
    cones = [propagate(plan, (r * patch, (r + 1) * patch, c * patch, (c + 1) * patch))
             for r in range(gh) for c in range(gw)]
    g = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(gh * gw, generator=g).tolist() for _ in range(repeats)]
    F_ = plan.flops
    counts = [int(round(f * gh * gw)) for f in fractions]
    step_costs, per_order = [], []
    for order in orders:
        total = 0.0
        for a, b in zip(counts[:-1], counts[1:]):
            added = order[a:b]
            cost = 0.0
            for op in plan.ops:
                if not op.flops:
                    continue
                regs = [cones[k][op.name] for k in added if cones[k][op.name] is not None]
                if not regs:
                    continue
                if not op.spatial or any(r == FULL for r in regs):
                    cost += op.flops
                    continue
                grid = np.zeros(op.hw, dtype=bool)
                for r in regs:
                    grid[r[0]:r[1], r[2]:r[3]] = True
                cost += op.flops * grid.mean()
            step_costs.append(cost)
            total += cost
        per_order.append(total)
    steps = len(counts) - 1
    mean_step = statistics.fmean(step_costs)
    return dict(name="removal-curve-random-order", patch=patch, fractions=list(fractions), repeats=repeats,
                patches_per_step=[b - a for a, b in zip(counts[:-1], counts[1:])], full_flops=F_,
                mean_incremental_flops=mean_step, ratio=F_ / mean_step,
                ratio_end_to_end=(steps + 1) * F_ / (F_ + statistics.fmean(per_order)),
                step_changed_share=dict(mean=mean_step / F_, min=min(step_costs) / F_, max=max(step_costs) / F_))


# ----------------------------------------------------------------------------- brute-force check
def changed_box(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> Optional[Rect]:
    """Bounding box of the spatial positions where a and b (C x H x W) differ, None where none does."""
    d = (a - b).abs().amax(0)
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300)
    hit = d > tol * scale
    if not hit.any():
        return None
    rows, cols = hit.any(1).nonzero().flatten(), hit.any(0).nonzero().flatten()
    return (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


def contains(outer: Region, inner: Optional[Rect]) -> bool:
    if inner is None:
        return True
    if outer is None:
        return False
    if outer == FULL:
        return True
    return outer[0] <= inner[0] and inner[1] <= outer[1] and outer[2] <= inner[2] and inner[3] <= outer[3]


class _Recorder(fx.Interpreter):
    """Runs a batch of 2 (clean, perturbed) and records, per 4-D node, the box of positions that differ."""

    def __init__(self, gm):
        super().__init__(gm)
        self.boxes: Dict[str, Optional[Rect]] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[0] == 2 and n.op != "get_attr":
            self.boxes[n.name] = changed_box(out[0], out[1])  # now: an in-place op later may overwrite it
        return out


def observed(model: nn.Module, x: torch.Tensor, xp: torch.Tensor,
             tracer: Optional[fx.Tracer] = None) -> Dict[str, Optional[Rect]]:
    """Per fx node of ``model``, the box of positions whose output differs between inputs x and xp
    (1 x C x H x W each; one batch of 2). ``model`` may be traced already (an fx.GraphModule)."""
    gm = model if isinstance(model, fx.GraphModule) else fx.GraphModule(model, (tracer or fx.Tracer()).trace(model))
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(torch.cat([x, xp]))
    return rec.boxes


def observed_plain(model: nn.Module, x: torch.Tensor, rect: Rect, tracer: Optional[fx.Tracer] = None,
                   fill: float = 0.0) -> Dict[str, Optional[Rect]]:
    """Per fx node, the box of changed positions when ``rect`` of x (1 x 3 x H x W) is painted ``fill``."""
    xp = x.clone()
    xp[:, :, rect[0]:rect[1], rect[2]:rect[3]] = fill
    return observed(model, x, xp, tracer)


def observed_layer_masked(model: nn.Module, x: torch.Tensor, rect: Rect,
                          lm: Optional[nn.Module] = None) -> Dict[str, Optional[Rect]]:
    """Per masked layer of masked_ops.layer_mask(model) (by module name: the fx node it replaces), the box of positions whose output
    differs between the clean forward (mask of ones) and the one with ``rect`` removed by the mask.
    ``lm``: the converted model, if converted already (in x's dtype)."""
    if lm is None:
        import masked_ops as mo

        lm = mo.layer_mask(model).to(x.dtype)
    mask = torch.ones(2, 1, *x.shape[2:], dtype=x.dtype)
    mask[1, :, rect[0]:rect[1], rect[2]:rect[3]] = 0
    boxes: Dict[str, Optional[Rect]] = {}
    hooks = []
    for name, m in lm.named_modules():
        if name and not list(m.children()):
            def hook(mod, args, out, name=name):
                if isinstance(out, torch.Tensor) and out.dim() == 4:
                    boxes[name] = changed_box(out[0], out[1])  # before a later fill writes into it
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            lm(x.expand(2, -1, -1, -1).contiguous(), mask)
    finally:
        for hk in hooks:
            hk.remove()
    return boxes


def check(model: nn.Module, plan: Plan, rect: Rect, tracer: Optional[fx.Tracer] = None, seed: int = 0) -> dict:
    """float64: the predicted rectangles against the observed changes, plain occlusion (every fx node,
    the window painted 0) and layer masking (every masked layer's output against the fx node it replaces:
    a masked conv fuses the BN and activation after it, which are pointwise)."""
    torch.manual_seed(seed)
    model = model.double().eval()
    x = torch.randn(1, 3, *plan.input_hw, dtype=torch.float64)
    pred = propagate(plan, rect)
    byname = {o.name: o for o in plan.ops}
    out = {"rect": list(rect)}
    seen = observed_plain(model, x, rect, tracer)
    rows = [(n, pred.get(n), b) for n, b in seen.items() if n in pred]
    out["plain"] = dict(nodes=len(rows), contained=all(contains(p, b) for _, p, b in rows),
                        violations=[n for n, p, b in rows if not contains(p, b)],
                        exact_box=sum(b == p for _, p, b in rows))
    try:
        seen_lm = observed_layer_masked(model, x, rect)
    except Exception as e:  # noqa: BLE001 (a model layer_mask cannot convert: say so, keep the figures)
        out["layer"] = dict(error=f"{type(e).__name__}: {e}")
    else:
        # the converted model names its layers after the fx nodes they replace (the same tracer)
        rows = [(n, pred[n], b) for n, b in seen_lm.items() if n in pred]
        out["layer"] = dict(masked_layers=len(rows), of_them_convs=sum(byname[n].kind == "conv" for n, _, _ in rows), contained=all(contains(p, b) for _, p, b in rows),
                            violations=[n for n, p, b in rows if not contains(p, b)],
                            exact_box=sum(b == p for _, p, b in rows))
    model.float()
    return out


# ----------------------------------------------------------------------------- models, main
def load(name: str) -> nn.Module:
    if name == "resnet50":
        import torchvision
        return torchvision.models.resnet50().eval()  # random weights: the geometry is what counts
    from masked_ops.models import load_model
    return load_model(name, "random" if name != "efficientnet-lite0" else None)[0].eval()


def decide(models: dict, gate: float = 1.5, margin: float = 1.2) -> dict:
    """The issue's gate (>= ``gate`` x end to end) applied to the FLOPs bounds. Per model: every case's
    unbatched and batched end-to-end ratio; the sliding windows ``clear`` the gate when even the batched
    bound of the worst window is ``margin`` x above it (room for gathers, scatters, halos and small convs,
    none of which FLOPs count), ``marginal`` when it is above the gate by less, ``fail`` below it. The
    experiments' removal curves (11 fractions) are judged apart."""
    per_model = {}
    for n, r in models.items():
        cases = {k: dict(end_to_end=round(a["ratio_end_to_end"], 3),
                         batched_end_to_end=round(a["ratio_batched_end_to_end"], 3),
                         activation_volume=round(a["elementwise_only"]["ratio"], 3))
                 for k, a in r["windows"].items()}
        worst = min(c["batched_end_to_end"] for c in cases.values())
        verdict = "clear" if worst >= gate * margin else "marginal" if worst >= gate else "fail"
        d = dict(cases=cases, worst_window_batched_end_to_end=worst, windows=verdict)
        if "removal_curve" in r:
            rc = r["removal_curve"]["ratio_end_to_end"]
            d["removal_curve_end_to_end"] = round(rc, 3)
            d["removal_curve"] = "pass" if rc >= gate else "fail"
        per_model[n] = d
    words = "; ".join(f"{n}: windows {d['windows']} (worst batched {d['worst_window_batched_end_to_end']:.2f}x)"
                      + (f", removal curves {d['removal_curve']} ({d['removal_curve_end_to_end']:.2f}x)"
                         if "removal_curve" in d else "") for n, d in per_model.items())
    verdict = (f"FLOPs bounds against the {gate}x gate: {words}. The bounds ignore gathers, scatters, halos, "
               f"small-tile conv efficiency and batching, so a build is justified only where the windows clear "
               f"the gate, and only if a prototype keeps >= {gate}x in wall-clock time.")
    return dict(gate=gate, margin=margin, per_model=per_model, verdict=verdict)


def _rounded(obj, digits: int = 6):
    """Floats to ``digits`` significant digits, recursively (a smaller results file)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


def _g(v: float) -> str:
    return f"{v / 1e9:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,efficientnet-lite0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--windows", default="32/16,16/8,16/16", help="window/stride pairs, comma separated")
    p.add_argument("--no-removal", action="store_true", help="skip the experiments' removal-curve case")
    p.add_argument("--check", action="store_true",
                   help="also the float64 brute-force check on the real models, plain and layer-masked, a centre "
                        "and a corner window (about a minute on 2 CPU threads)")
    args = H.script_args(p, argv, smoke=dict(models="efficientnet-lite0", windows="112/112", no_removal=True,
                                              check=False))
    out = H.results_path(args, "incremental-flops")
    pairs = [tuple(int(v) for v in s.split("/")) for s in args.windows.split(",")]
    doc = dict(benchmark="incremental_flops", size=args.size, windows=[list(q) for q in pairs],
               flops="2 x multiply-adds of conv and linear layers, one image; elementwise counted apart",
               gate=dict(issue=29, needed_ratio_end_to_end=1.5), **H.environment(H.CPU), models={})
    for name in args.models.split(","):
        model = load(name)
        plan = plan_model(model, (args.size, args.size))
        res = dict(full_flops=plan.flops, full_elementwise=plan.elem, unknown_ops=plan.unknown, windows={})
        doc["models"][name] = res
        print(f"{name}: {_g(plan.flops)} GFLOPs (+{_g(plan.elem)} elementwise), {len(plan.ops)} nodes"
              + (f"; unknown ops (counted as changing everything): {plan.unknown}" if plan.unknown else ""))
        for window, stride in pairs:
            a = analyse(plan, window, stride, f"{window}/{stride}")
            res["windows"][a["name"]] = a
            print(f"  window {window} stride {stride} ({a['positions']} positions): incremental mean "
                  f"{_g(a['mean_incremental_flops'])} (min {_g(a['min_incremental_flops'])}, max "
                  f"{_g(a['max_incremental_flops'])}) GFLOPs; ratio {a['ratio']:.2f}x, end to end "
                  f"{a['ratio_end_to_end']:.2f}x, batched {a['ratio_batched']:.2f}x; activation volume "
                  f"{a['elementwise_only']['ratio']:.2f}x; final map changed {a['projective_field']['mean']:.0%} "
                  f"on average")
            for st in a["stages"]:
                r = f"{st['ratio']:.2f}x" if st["ratio"] else "-"
                print(f"    {st['stage']:>8}: {st['share_of_full']:6.1%} of the full FLOPs, {r:>7} saved, output "
                      f"changed {st['output_changed_fraction']['mean']:6.1%} (whole map for "
                      f"{st['windows_whole_map_changed']:5.1%} of the windows)")
            H.write_json(out, _rounded(doc))
        if not args.no_removal:
            rc = analyse_removal_curve(plan)
            res["removal_curve"] = rc
            print(f"  removal curve (11 fractions, random order, ~20 patches a step): ratio {rc['ratio']:.2f}x, "
                  f"end to end {rc['ratio_end_to_end']:.2f}x")
        if args.check:
            res["check"] = []
            h = args.size
            for rect in ((h // 2 - 16, h // 2 + 16, h // 2 - 16, h // 2 + 16), (0, 16, h - 16, h)):
                c = check(model, plan, rect)
                res["check"].append(c)
                print(f"  check (float64, rows {rect[0]}-{rect[1]}, columns {rect[2]}-{rect[3]}): plain {c['plain']}; "
                      f"layer {c['layer']}")
                H.write_json(out, _rounded(doc))
        H.write_json(out, _rounded(doc))
    doc["decision"] = decide(doc["models"])
    H.write_json(out, _rounded(doc))
    for n, d in doc["decision"]["per_model"].items():
        print(f"decision {n}: {d}")
    print(doc["decision"]["verdict"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
