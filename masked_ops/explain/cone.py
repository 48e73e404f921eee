"""Where a local change travels through a CNN: the rectangle of changed positions at every node.

One source of truth for exact incremental inference (masked_ops.explain.incremental, which recomputes
only these rectangles) and for its measurement (bench/incremental_flops.py, which counts their FLOPs and
checks them against real forwards). The model is traced with torch.fx, every node's shape recorded
(ShapeProp) and every node classified; for a changed input rectangle the changed rectangle of every node
follows one axis at a time (every op here is separable):

- conv / max or average pool (kernel k, stride s, padding p, dilation d): output o changes when its
  input window {o*s - p + j*d : 0 <= j < k} meets the changed input interval [a, b): o from
  ceil((a + p - (k-1)*d) / s) to floor((b - 1 + p) / s), clipped to the output. Exact (the changed set
  itself) for d = 1, the bounding interval of it for d > 1. Possibly empty: a 1x1 stride-2 shortcut
  does not read an odd row;
- explicit constant padding (nn.ZeroPad2d, nn.ConstantPad2d, F.pad; the TF "same" padding of
  EfficientNet-Lite): a shift;
- elementwise ops (BN, activations, dropout), residual adds, products and channel concatenation: the
  bounding rectangle of their inputs' rectangles (a superset of the union);
- anything non-local (global pooling, flatten, linear, a broadcast of a changed 1 x 1 tensor, any op
  this module does not know, any non-tensor value but a size) changes its output entirely, and
  everything downstream.

Layer-masked graphs (masked_ops.layer_mask) follow the same rules: their masked convs and pools, the mask
path's pools (conv_keep, pool_mask) and joins are classified here. A fill-mode conv fills each removed
pixel from visible pixels up to d*(k-1) rings away (its ``halo``), so a change reaches that much further
before its window rule when the clean mask has removed pixels of its own next to the change.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["Rect", "FULL", "Region", "conv_axis", "shift_axis", "area", "hull", "Op", "Plan", "plan_model",
           "propagate"]

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
    halo: int = 0  # rings it reads beyond its window (a layer-masked conv's fill)
    masked: bool = False  # a node of a layer-masked graph (masked_ops.nn layer or masks function)

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
    graph_module: Optional[fx.GraphModule] = None  # the traced model the ops are the nodes of

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


def _masked_layer(op: Op, m: nn.Module) -> bool:
    """Classify a layer of a layer-masked graph (masked_ops.nn); False for one without a rule here (it then
    counts as unknown: everything downstream changes). A masked conv in fill mode reads removed pixels'
    fills from up to ``iters`` rings outside its window: its changed set follows the window rule (an
    output whose window holds no removed pixel reads no fill), its computation needs that halo."""
    from .. import nn as mnn

    if type(m) is mnn.MaskedConv2d and m.prepad is None:
        op.kind, op.masked, op.halo = "conv", True, int(m.iters)
        op.geom = tuple((m.kernel[i], m.stride[i], m.padding[i], m.dilation[i]) for i in range(2))
        c_out, c_in_g = m.weight.shape[0], m.weight.shape[1]
        op.flops = float(op.shape[2] * op.shape[3] * c_out * c_in_g * m.kernel[0] * m.kernel[1] * 2)
        op.label = f"masked conv {m.kernel[0]}x{m.kernel[1]}/{m.stride[0]} {c_in_g * m.groups}->{c_out}"
        return True
    if type(m) in (mnn.MaskedMaxPool2d, mnn.MaskedAvgPool2d) and getattr(m, "prepad", None) is None \
            and not m.ceil_mode:
        dilation = getattr(m, "dilation", (1, 1))
        op.kind, op.masked, op.label = "pool", True, f"masked pool {m.kernel[0]}x{m.kernel[1]}/{m.stride[0]}"
        op.geom = tuple((m.kernel[i], m.stride[i], m.padding[i], dilation[i]) for i in range(2))
        return True
    if isinstance(m, (mnn.MaskedBinary, mnn.MaskedAffine, mnn.MaskedPointwise)) and op.spatial:
        op.kind, op.masked, op.label = "pointwise", True, type(m).__name__
        return True
    if isinstance(m, mnn.MaskedAdaptiveAvgPool2d):
        op.kind, op.masked, op.label = "global", True, type(m).__name__
        return True
    return False


def _mask_function(op: Op, n: fx.Node) -> bool:
    """Classify a mask-path function of a layer-masked graph (masked_ops.masks)."""
    from .. import masks as M

    f = n.target
    if f in (M.input_mask, M.select_visible, M.join):
        op.kind, op.masked, op.label = "pointwise", True, f.__name__
        return True
    if f is M.conv_keep and _arg(n, 5, "prepad") is None:
        op.kind, op.masked, op.label = "pool", True, "conv_keep"
        k, s, p, d = (_pair(_arg(n, i, name)) for i, name in
                      ((1, "kernel"), (2, "stride"), (3, "padding"), (4, "dilation")))
        op.geom = tuple((k[i], s[i], p[i], d[i]) for i in range(2))
        return True
    if f is M.pool_mask and _arg(n, 6, "prepad") is None and not _arg(n, 5, "ceil_mode", False):
        op.kind, op.masked, op.label = "pool", True, "pool_mask"
        k, s, p, d = (_pair(_arg(n, i, name, dflt)) for i, name, dflt in
                      ((1, "kernel", None), (2, "stride", None), (3, "padding", 0), (4, "dilation", 1)))
        op.geom = tuple((k[i], s[i], p[i], d[i]) for i in range(2))
        return True
    return False


def plan_model(model: nn.Module, size: Tuple[int, int] = (224, 224), tracer: Optional[fx.Tracer] = None,
               channels: int = 3) -> Plan:
    """Trace ``model`` (eval) with torch.fx, record every node's shape at a 1 x channels x H x W input
    (zeros in the dtype and on the device of the model's first parameter), and classify every node for
    the propagation and the FLOPs count."""
    model = model.eval()
    if isinstance(model, fx.GraphModule) and tracer is None:
        gm = model  # already a graph (a layer-masked model, whose layers a plain Tracer would trace into)
    else:
        gm = fx.GraphModule(model, (tracer or fx.Tracer()).trace(model))
    p = next(model.parameters(), None)
    like = dict(dtype=p.dtype, device=p.device) if p is not None and p.is_floating_point() else {}
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, channels, *size, **like))
    modules = dict(gm.named_modules())
    shapes = {n.name: _shape(n) for n in gm.graph.nodes}
    ops: List[Op] = []
    unknown: List[str] = []
    meta_nodes = set()
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        op = Op(n.name, "other", _tensor_inputs(n), shapes[n.name], module=str(n.target) if n.op == "call_module" else "")
        if op.shape is None and n.op != "placeholder":
            # x.size(0) and the like (and items of them): no tensor, and nothing changes; any other
            # non-tensor value (a tuple of masks, say) is "other": it, and what reads it, changes entirely
            meta = (n.op == "call_method" and n.target in _META_METHODS) or (n.op == "call_function" and (
                n.target is getattr or (n.target is operator.getitem and isinstance(n.args[0], fx.Node)
                                        and n.args[0].name in meta_nodes)))
            op.kind = "meta" if meta or n.op == "get_attr" else "other"
            if meta:
                meta_nodes.add(n.name)
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
            elif _masked_layer(op, m):
                pass
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
            elif _mask_function(op, n):
                pass
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
    return Plan(ops, tuple(size), unknown, gm)


# ----------------------------------------------------------------------------- propagation
def propagate(plan: Plan, rect: Rect, no_spread: Sequence[str] = ()) -> Dict[str, Region]:
    """The changed region of every node when input rows [y0, y1) x columns [x0, x1) change.
    ``no_spread``: fill nodes whose clean input mask is all ones (their fills cannot carry a change past
    the window rule: the only removed pixels are the changed ones)."""
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
            if op.halo and op.name not in no_spread:
                # a removed pixel up to ``halo`` rings from a change is filled from it: the change reaches
                # that far before the window rule (no such pixel where the clean mask is all ones)
                h = op.halo
                x = (max(0, x[0] - h), min(src.hw[0], x[1] + h), max(0, x[2] - h), min(src.hw[1], x[3] + h))
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
