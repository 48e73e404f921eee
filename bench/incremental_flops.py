"""What exact incremental inference (Krypton) would save for occlusion and removal curves: FLOPs inside
the changed cone, layer by layer (issue 29, "Beyond the floor"). A measurement, not an engine.

    python bench/incremental_flops.py             # ResNet-50 and EfficientNet-Lite0, 224 px, every window
    python bench/incremental_flops.py --smoke     # Lite0, one coarse window, no check: tests the script

Method. The model is traced with torch.fx and its shapes recorded (ShapeProp). For a changed input
rectangle (one sliding-occlusion window, one removed patch) the rectangle of changed positions is
propagated exactly through every node, one axis at a time (every op here is separable):

- conv / max or average pool (kernel k, stride s, padding p, dilation d): output o changes when its
  input window {o*s - p + j*d : 0 <= j < k} meets the changed input interval [a, b): o from
  ceil((a + p - (k-1)*d) / s) to floor((b - 1 + p) / s), clipped to the output. Exact (the changed set
  itself) for d = 1, the bounding box of it for d > 1. Possibly empty: a 1x1 stride-2 shortcut does not
  read an odd row;
- explicit zero padding (nn.ZeroPad2d, F.pad; the TF "same" padding of EfficientNet-Lite): a shift;
- elementwise ops (BN, activations, dropout) keep the rectangle; residual adds, products and channel
  concatenation take the bounding rectangle of their inputs' rectangles (a superset of the union);
- anything non-local (global pooling, flatten, linear, a broadcast of a changed 1 x 1 tensor, any op
  this script does not know) makes its output and everything downstream change entirely: those
  layers are counted at full cost (they are cheap: the head is < 0.1 % of the FLOPs).

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
import operator
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

Rect = Tuple[int, int, int, int]  # y0, y1, x0, x1: rows [y0, y1) and columns [x0, x1) of a spatial map
FULL = "full"  # a non-spatial tensor (or one of unknown geometry) that changed entirely
Region = Union[None, Rect, str]  # None: unchanged

# ----------------------------------------------------------------------------- the rules, one axis
def conv_axis(a: int, b: int, k: int, s: int, p: int, d: int, out: int) -> Optional[Tuple[int, int]]:
    """Outputs [lo, hi) of a conv/pool axis whose input window meets the changed input interval [a, b)
    (None: none does). Exact for d == 1, the bounding interval for d > 1."""
    lo = max(0, -((-(a + p - (k - 1) * d)) // s))  # ceil((a + p - (k-1) d) / s)
    hi = min(out, (b - 1 + p) // s + 1)
    return (lo, hi) if lo < hi else None


def shift_axis(a: int, b: int, before: int, out: int) -> Optional[Tuple[int, int]]:
    """Padding ``before`` positions (negative: cropping) in front of the interval, clipped to the output."""
    lo, hi = max(0, a + before), min(out, b + before)
    return (lo, hi) if lo < hi else None


def area(r: Region, hw: Tuple[int, int]) -> int:
    if r is None:
        return 0
    if r == FULL:
        return hw[0] * hw[1]
    return (r[1] - r[0]) * (r[3] - r[2])


def hull(regions: Sequence[Region]) -> Region:
    """Bounding rectangle of the changed regions (FULL if any is FULL, None if none changed)."""
    rs = [r for r in regions if r is not None]
    if not rs:
        return None
    if any(r == FULL for r in rs):
        return FULL
    return (min(r[0] for r in rs), max(r[1] for r in rs), min(r[2] for r in rs), max(r[3] for r in rs))


# ----------------------------------------------------------------------------- the plan of a model
@dataclass
class Op:
    """One fx node: how it maps changed regions (``kind``), its geometry and its full-forward cost."""
    name: str
    kind: str  # input, const, meta, conv, pool, pad, pointwise, global, dense, other
    inputs: List[str]
    shape: Optional[Tuple[int, ...]]  # output shape (None: not a tensor)
    geom: tuple = ()  # conv/pool: ((k, s, p, d) rows, (k, s, p, d) cols); pad: (top, left)
    flops: float = 0.0  # conv/linear FLOPs of the full forward (one image)
    elem: float = 0.0  # elementwise FLOPs of the full forward (one image)
    module: str = ""  # the module it belongs to (conv: the module holding the weight)
    label: str = ""  # what it is, for the tables

    @property
    def spatial(self) -> bool:
        return self.shape is not None and len(self.shape) == 4

    @property
    def hw(self) -> Tuple[int, int]:
        return (self.shape[2], self.shape[3]) if self.spatial else (1, 1)


@dataclass
class Plan:
    ops: List[Op]
    input_hw: Tuple[int, int]
    unknown: List[str] = field(default_factory=list)

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def elem(self) -> float:
        return sum(o.elem for o in self.ops)

    def final_map(self) -> Op:
        """The last spatial map larger than 1 x 1: the final feature map before global pooling."""
        return [o for o in self.ops if o.spatial and o.hw != (1, 1) and o.kind not in ("input", "const")][-1]


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_padding(padding, k, d) -> Tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":  # stride 1 only (torch's rule): total d*(k-1), the smaller half in front
        return tuple(d[i] * (k[i] - 1) // 2 for i in range(2))
    return _pair(padding)


_POINTWISE_MODULES = {"BatchNorm2d": 2, "ReLU": 1, "ReLU6": 1, "SiLU": 1, "Hardswish": 1, "Hardsigmoid": 1,
                      "Sigmoid": 1, "Tanh": 1, "GELU": 1, "LeakyReLU": 1, "ELU": 1, "Mish": 1, "Identity": 0,
                      "Dropout": 0, "Dropout2d": 0, "DropPath": 0, "Softplus": 1}
_POINTWISE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
                        torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.relu_, torch.sigmoid,
                        torch.tanh, torch.clamp, F.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.gelu,
                        F.leaky_relu, F.dropout, F.sigmoid, F.tanh}
_POINTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "add", "add_", "mul", "mul_", "sub", "div",
                      "clamp", "clamp_", "contiguous", "clone", "float", "double", "to", "type_as"}
_META_METHODS = {"size", "dim", "numel"}
_GLOBAL = {"AdaptiveAvgPool2d", "AdaptiveMaxPool2d"}


def _shape(node: fx.Node) -> Optional[Tuple[int, ...]]:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if hasattr(tm, "shape") else None


def _tensor_inputs(node: fx.Node) -> List[str]:
    found: List[str] = []

    def visit(a):
        if isinstance(a, fx.Node):
            if a.name not in found:
                found.append(a.name)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)
    visit(node.args)
    visit(node.kwargs)
    return found


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _conv_op(op: Op, in_shape, w_shape, stride, padding, dilation, groups) -> Op:
    k = (w_shape[2], w_shape[3])
    s, d = _pair(stride), _pair(dilation)
    p = _conv_padding(padding, k, d)
    op.kind = "conv"
    op.geom = tuple((k[i], s[i], p[i], d[i]) for i in range(2))
    c_out, c_in_g = w_shape[0], w_shape[1]
    op.flops = float(op.shape[2] * op.shape[3] * c_out * c_in_g * k[0] * k[1] * 2)
    op.label = f"conv {k[0]}x{k[1]}/{s[0]} {in_shape[1]}->{c_out}" + (f" g{groups}" if groups != 1 else "")
    return op


def _pool_op(op: Op, kernel, stride, padding, dilation=1) -> Op:
    k, p, d = _pair(kernel), _pair(padding), _pair(dilation)
    s = k if stride is None or (isinstance(stride, (list, tuple)) and not stride) else _pair(stride)
    op.kind = "pool"
    op.geom = tuple((k[i], s[i], p[i], d[i]) for i in range(2))
    op.elem = float(math.prod(op.shape[1:]) * k[0] * k[1])
    op.label = f"pool {k[0]}x{k[1]}/{s[0]}"
    return op


def _pad_op(op: Op, pads) -> Op:
    pads = list(pads)
    left, top = pads[0], (pads[2] if len(pads) >= 4 else 0)
    op.kind, op.geom, op.label = "pad", (top, left), f"pad {tuple(pads)}"
    return op


def plan_model(model: nn.Module, size: Tuple[int, int] = (224, 224), tracer: Optional[fx.Tracer] = None,
               channels: int = 3) -> Plan:
    """Trace ``model`` (eval) with torch.fx, record every node's shape at a 1 x channels x H x W input,
    and classify every node for the propagation and the FLOPs count."""
    model = model.eval()
    graph = (tracer or fx.Tracer()).trace(model)
    gm = fx.GraphModule(model, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, channels, *size))
    modules = dict(gm.named_modules())
    shapes = {n.name: _shape(n) for n in gm.graph.nodes}
    ops: List[Op] = []
    unknown: List[str] = []
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        op = Op(n.name, "other", _tensor_inputs(n), shapes[n.name], module=str(n.target) if n.op == "call_module" else "")
        if op.shape is None and n.op != "placeholder":
            op.kind = "meta"  # x.size(0) and the like: no tensor, nothing changes
        elif n.op == "placeholder":
            op.kind, op.shape = "input", (1, channels, *size)
        elif n.op == "get_attr":
            op.kind = "const"
        elif n.op == "call_module":
            m = modules[n.target]
            t = type(m).__name__
            if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros":
                _conv_op(op, shapes[op.inputs[0]], m.weight.shape, m.stride, m.padding, m.dilation, m.groups)
            elif isinstance(m, nn.MaxPool2d):
                _pool_op(op, m.kernel_size, m.stride, m.padding, m.dilation)
            elif isinstance(m, nn.AvgPool2d):
                _pool_op(op, m.kernel_size, m.stride, m.padding)
            elif isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
                _pad_op(op, _pair(m.padding) * 2 if isinstance(m.padding, int) else m.padding)
            elif t in _POINTWISE_MODULES:
                op.kind, op.label = "pointwise", t
                op.elem = float(_POINTWISE_MODULES[t] * math.prod(op.shape[1:]))
            elif t in _GLOBAL:
                op.kind, op.label = "global", t
                op.elem = float(math.prod(shapes[op.inputs[0]][1:]))
            elif isinstance(m, nn.Linear):
                op.kind, op.label = "dense", f"linear {m.in_features}->{m.out_features}"
                op.flops = float(2 * m.in_features * m.out_features * math.prod(op.shape[1:-1]))
            elif isinstance(m, nn.Flatten):
                op.kind, op.label = "global", "flatten"
            else:
                unknown.append(f"{n.name} ({t})")
                op.label = t
        elif n.op == "call_function":
            f = n.target
            if f in (F.conv2d, torch.conv2d):
                w = shapes[n.args[1].name] if isinstance(_arg(n, 1, "weight"), fx.Node) else None
                _conv_op(op, shapes[op.inputs[0]], w, _arg(n, 3, "stride", 1), _arg(n, 4, "padding", 0),
                         _arg(n, 5, "dilation", 1), _arg(n, 6, "groups", 1))
                wnode = _arg(n, 1, "weight")
                if wnode.op == "get_attr":
                    op.module = str(wnode.target).rsplit(".", 1)[0]
            elif f in (F.max_pool2d, torch.max_pool2d, F.avg_pool2d, torch._C._nn.avg_pool2d):
                is_max = f in (F.max_pool2d, torch.max_pool2d)
                _pool_op(op, _arg(n, 1, "kernel_size"), _arg(n, 2, "stride"), _arg(n, 3, "padding", 0),
                         _arg(n, 4, "dilation", 1) if is_max else 1)
            elif f is F.pad and _arg(n, 2, "mode", "constant") == "constant":
                _pad_op(op, _arg(n, 1, "pad"))
            elif f in _POINTWISE_FUNCTIONS:
                op.kind, op.label = "pointwise", getattr(f, "__name__", str(f))
                op.elem = float(math.prod(op.shape[1:])) if op.shape else 0.0
            elif f is torch.cat and _arg(n, 1, "dim", 0) in (1, -3):
                op.kind, op.label = "pointwise", "cat"
            elif f in (torch.flatten, F.adaptive_avg_pool2d, torch.mean):
                op.kind, op.label = "global", getattr(f, "__name__", str(f))
                op.elem = float(math.prod(shapes[op.inputs[0]][1:]))
            elif f is F.linear:
                w = shapes[_arg(n, 1, "weight").name]
                op.kind, op.label = "dense", f"linear {w[1]}->{w[0]}"
                op.flops = float(2 * w[0] * w[1] * math.prod(op.shape[1:-1]))
            else:
                unknown.append(f"{n.name} ({getattr(f, '__name__', f)})")
                op.label = getattr(f, "__name__", str(f))
        elif n.op == "call_method":
            if n.target in _META_METHODS:
                op.kind = "meta"
            elif n.target in _POINTWISE_METHODS:
                op.kind, op.label = "pointwise", n.target
                op.elem = float(math.prod(op.shape[1:]))
            elif n.target in ("view", "reshape", "flatten", "mean"):
                op.kind, op.label = "global", n.target
            else:
                unknown.append(f"{n.name} (.{n.target})")
                op.label = n.target
        ops.append(op)
    return Plan(ops, tuple(size), unknown)


# ----------------------------------------------------------------------------- propagation
def propagate(plan: Plan, rect: Rect) -> Dict[str, Region]:
    """The changed region of every node when input rows [y0, y1) x columns [x0, x1) change."""
    reg: Dict[str, Region] = {}
    byname = {o.name: o for o in plan.ops}
    for op in plan.ops:
        ins = [reg.get(i) for i in op.inputs]
        if op.kind == "input":
            r: Region = rect
        elif op.kind in ("const", "meta"):
            r = None
        elif all(x is None for x in ins):
            r = None
        elif op.kind in ("conv", "pool", "pad"):
            x = ins[0]
            src = byname[op.inputs[0]]
            if x == FULL:
                x = (0, src.hw[0], 0, src.hw[1])
            if op.kind == "pad":
                ay = shift_axis(x[0], x[1], op.geom[0], op.hw[0])
                ax = shift_axis(x[2], x[3], op.geom[1], op.hw[1])
            else:
                ay = conv_axis(x[0], x[1], *op.geom[0], op.hw[0])
                ax = conv_axis(x[2], x[3], *op.geom[1], op.hw[1])
            r = None if ay is None or ax is None else (ay[0], ay[1], ax[0], ax[1])
        elif op.kind == "pointwise" and op.spatial:
            # bounding rectangle of the same-sized spatial inputs; a changed input of another size (a
            # broadcast 1 x 1 scale, say) changes everything
            same = []
            r = None
            for name, x in zip(op.inputs, ins):
                if x is None:
                    continue
                if x == FULL or byname[name].hw != op.hw:
                    r = FULL
                    break
                same.append(x)
            if r is None:
                r = hull(same)
        else:  # global, dense, other, pointwise on a non-spatial tensor: everything changes
            r = FULL
        if r == FULL and op.spatial:
            r = (0, op.hw[0], 0, op.hw[1])
        reg[op.name] = r
    return reg


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
