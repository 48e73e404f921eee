"""Exact incremental inference: the outputs of inputs that differ from one clean input in a small region.

Occlusion with a fill (grey, black, blur, ...) runs the model on many copies of one image, each changed
only inside one window. A conv output changes only where its window meets a change, so the changes grow
as a cone through the network (masked_ops.explain.cone); Krypton (Nakandala et al., SIGMOD 2019)
recomputes only that cone on top of one clean forward. This module does the same, exactly:

    engine = IncrementalModel(model, clean)          # clean: 1 x C x H x W, the model's input
    logits = engine(inputs, rects)                   # inputs: N x C x H x W, each equal to clean outside
                                                     # its rect (y0, y1, x0, x1); None: no change

How. The model is traced with torch.fx and its in-place calls rewritten out of place (later readers of
a written tensor read the call's result). One clean forward caches every node's output. Per call, the changed rectangle of every node is
known from the rects alone; every window's rectangle at a node is grown to the largest one there (moved
inward at the border), so that all windows run as one batch (Krypton's batching; a grown rectangle's
extra positions recompute clean values from clean inputs, so nothing changes). A node then runs in one
of three states:

- clean: nothing it reads changed: its cached output stands for every input;
- rect: a conv or pool computes its rectangle only, from a crop of its input over the rectangle's
  footprint (the cached clean values with the changed ones pasted over them; zeros, or -inf for a max
  pool, where the footprint leaves the map: the op's own padding) with padding 0; an elementwise op or
  an add reads its inputs' crops of its rectangle; a constant pad shifts it. A layer-masked conv or pool
  and the mask path's pools run *themselves* on a crop that holds everything their outputs read, their
  fill's halo included (ending at the map's border where it reaches it, starting on the stride), and
  the outputs near the crop's inner edges are cut away;
- full: once a rectangle covers more than ``threshold`` of its map, or at an op without a local rule
  (global pooling, flatten, linear, anything unknown), the changed values are pasted into clean maps and
  the node, and everything downstream, runs on whole maps.

Equal to full forwards: float64 within 1e-10 (tests/test_incremental.py, on ResNets, EfficientNet-Lite0
and a net with dilation, groups, odd sizes, concatenation and padding, plain and layer-masked, clean
masks with removed pixels of their own included); fp32 within the model's own rounding across batch sizes,
layouts and torch.compile. Two choices made for speed (bench/README.md, run 6): every eval-mode
BatchNorm after a plain conv is folded into it, and the clean forward, crops and whole maps are
channels_last (oneDNN reorders NCHW inputs on every conv). ResNet-50, 224 px, 2 CPU threads, grey fill:
169 windows of 32 px 1.7x-2.0x faster than eager NCHW full forwards, 1.1x-1.3x than compiled ones; 729 windows of
16 px 2.4x / 1.7x; under layer masking 1.05x-1.26x the compiled layer-masked model. It pays where the early,
high-resolution layers hold the time and windows are small; the cone covers the deepest maps entirely,
so those run in full.

Per model, the traced copy and its plan are cached (while the model's tensors stay as they are: an
in-place update or a replaced parameter makes a new one), so a second image costs one clean forward, not
a trace (ResNet-50: 0.06 s instead of 0.17-0.31 s). The cache holds one copy of the model per model
object, for as long as that object lives; non-tensor attributes changed in place (a conv's stride, say)
are not seen: build a new model for that.

Layer masking: ``IncrementalModel(layer_mask(model), (image, ones))`` with inputs (images, masks); only
the masks change. Covered: fill, zero modes' convs without explicit padding, max/average pools, the
residual joins and the mask path (masked_ops.explain.cone). Layers without a rule run on whole maps from
there on (equal, not faster): renorm mode's (keep, scale) pairs, convs with explicit asymmetric padding
(EfficientNet-Lite's TF "same": all of Lite0 under layer masking runs in full).

Not covered: models fx cannot trace (a clear ValueError), soft masks, vision transformers, and outputs
other than one tensor.
"""
from __future__ import annotations

import copy
import inspect
import operator
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .cone import Plan, Rect, _pair, plan_model, propagate

__all__ = ["IncrementalModel", "changed_rects", "incremental_outputs", "incremental_strategies", "DEFAULT_THRESHOLD",
           "DEFAULT_BATCH"]

# A rectangle larger than this share of its map runs in full: measured on ResNet-50 (224 px, 32 px
# windows), 0.5 and 0.8 within 5% of each other, 0.3 slower (bench/README.md).
DEFAULT_THRESHOLD = 0.5
# The engine's batch on CPU: ResNet-50 at 224 px ran fastest at 8 of 4, 8 and 16 (full forwards too;
# bench/README.md): every window's cone is batched, and larger batches fault in more memory per layer.
DEFAULT_BATCH = 8


_IN_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                       operator.itruediv: operator.truediv}


def _out_of_place_call(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Rewrite one in-place call to its out-of-place form; whether it was one (it then writes its first
    argument): a module with ``inplace=True``, a function called with inplace=True, torch.relu_ and the
    like, ``x += y`` (operator.iadd), a Tensor method such as x.relu_() or x.add_(y)."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            return True
        if getattr(m, "fill_in_place", False) is True:  # a layer-masked conv filling its input in place
            m.fill_in_place = False  # it is that input's only reader (the converter's rule): nobody to redirect
            return False
        if getattr(m, "add_into", None) is not None:  # a layer-masked add writing into one of its inputs
            written = n.args[m.add_into] if len(n.args) > m.add_into else None
            m.add_into = None
            _redirect(n, written)
            return False  # redirected here (it may have written its second input)
        return False
    if n.op == "call_method":
        if n.target.endswith("_") and not n.target.endswith("__") and hasattr(torch.Tensor, n.target[:-1]):
            n.target = n.target[:-1]
            return True
        return False
    if n.op != "call_function":
        return False
    if n.target in _IN_PLACE_OPERATORS:
        n.target = _IN_PLACE_OPERATORS[n.target]
        return True
    name = getattr(n.target, "__name__", "")
    if name.endswith("_") and not name.endswith("__") and hasattr(torch, name[:-1]):
        n.target = getattr(torch, name[:-1])
        return True
    try:
        bound = inspect.signature(n.target).bind(*n.args, **n.kwargs)
    except (TypeError, ValueError):  # builtins without a signature, or a call it cannot bind
        return False
    if bound.arguments.get("inplace") is True:
        bound.arguments["inplace"] = False
        n.args, n.kwargs = tuple(bound.args), dict(bound.kwargs)
        return True
    return False


def _redirect(n: fx.Node, written) -> None:
    """Point the readers of ``written`` that come after ``n`` at ``n`` (n wrote its result into it)."""
    if not isinstance(written, fx.Node):
        return
    order = {x: i for i, x in enumerate(n.graph.nodes)}
    for user in list(written.users):
        if user is not n and order[user] > order[n]:
            user.replace_input_with(written, n)


def _functionalize(gm: fx.GraphModule) -> fx.GraphModule:
    """The traced model without in-place calls, same values: each in-place call becomes out of place and
    every later reader of the tensor it wrote reads its result instead (``w.add_(z); f(w)`` becomes
    ``w2 = w.add(z); f(w2)``). The engine keeps every node's clean output and reuses changed values across
    nodes, which in-place writes would overwrite. (Writes through a view into its base tensor are not
    followed; CNN forwards do not make them.)"""
    for n in list(gm.graph.nodes):
        if _out_of_place_call(gm, n) and n.args:
            _redirect(n, n.args[0])
    gm.recompile()
    return gm


def _fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Each eval-mode BatchNorm2d that reads a plain nn.Conv2d's output (its only reader) folded into that
    conv's weights and bias (torch.nn.utils.fusion.fuse_conv_bn_eval): one op fewer per conv, on crops and
    whole maps alike. Equal in exact arithmetic; rounding moves by about one ulp per layer (float64 ~1e-15,
    fp32 within the batch-to-batch noise, bench/README.md). Only exact types: a layer-masked conv (whose
    removed outputs the BN would see) and BN subclasses stay as they are."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    modules = dict(gm.named_modules())
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or type(modules.get(n.target)) is not nn.BatchNorm2d or len(n.args) != 1:
            continue
        bn, src = modules[n.target], n.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and type(modules.get(src.target)) is nn.Conv2d
                and len(src.users) == 1 and not bn.training and bn.track_running_stats
                and bn.running_mean is not None):
            continue
        fused = fuse_conv_bn_eval(modules[src.target], bn)
        parent, _, leaf = src.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, fused)
        modules[src.target] = fused
        n.replace_all_uses_with(src)
        gm.graph.erase_node(n)
    gm.recompile()
    return gm


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)}"
    if isinstance(t, (tuple, list)):
        return "(" + ", ".join(_describe(x) for x in t) + ")"
    return type(t).__name__


def changed_rects(inputs, clean) -> List[Optional[Rect]]:
    """Per input, the bounding rectangle (y0, y1, x0, x1) of the positions where it differs from
    ``clean`` in any channel (None where it equals clean everywhere; NaN counts as a difference).
    Tuples of tensors (a model's several inputs, e.g. an image and its mask): where any of them differs."""
    if isinstance(inputs, (tuple, list)):
        diff = torch.stack([(i != c).any(dim=1) for i, c in zip(inputs, clean)]).any(0)
    else:
        diff = (inputs != clean).any(dim=1)  # N x H x W
    rows, cols = diff.any(dim=2), diff.any(dim=1)
    out: List[Optional[Rect]] = []
    for r, c in zip(rows.cpu(), cols.cpu()):
        ys, xs = torch.nonzero(r).flatten(), torch.nonzero(c).flatten()
        out.append(None if ys.numel() == 0 else (int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1))
    return out


# model -> (key, plan): the traced, functionalised, BatchNorm-folded, channels_last copy of the model and
# its plan, reused while the key holds (one entry per model, so a model holds at most one copy alive).
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _plan_key(model: nn.Module, cleans: Sequence[torch.Tensor]) -> tuple:
    """What a prepared plan depends on: the input shapes, dtype and device, and the model's tensors as they
    are now (each parameter's and buffer's storage and version counter: an in-place update such as an
    optimiser step or load_state_dict bumps the version, a replaced tensor changes the storage, a replaced
    submodule changes the list, so a stale copy is never reused)."""
    state = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in (*model.parameters(), *model.buffers()))
    return (tuple(tuple(c.shape[1:]) for c in cleans), cleans[0].dtype, str(cleans[0].device), model.training,
            state)


def _prepared_plan(model: nn.Module, cleans: Sequence[torch.Tensor], tracer: Optional[fx.Tracer], clean) -> Plan:
    """The model traced (a copy: the caller's model is never changed), its in-place calls rewritten, its
    BatchNorms folded, moved to channels_last, and planned for ``cleans``' size; cached per model (without
    a custom tracer) while _plan_key holds: tracing and planning cost 0.06-0.3 s per explanation otherwise
    (ResNet-50, Lite0), a quarter of a folder run's incremental occlusion over segments."""
    key = _plan_key(model, cleans) if tracer is None else None
    try:
        hit = _PLANS.get(model)
    except TypeError:  # not weak-referenceable: no cache
        hit, key = None, None
    if key is not None and hit is not None and hit[0] == key:
        return hit[1]
    try:
        copied = copy.deepcopy(model).eval()
        # a GraphModule (a layer-masked model) is taken as it is: a plain Tracer would trace into its layers
        traced = copied if isinstance(copied, fx.GraphModule) and tracer is None \
            else fx.GraphModule(copied, (tracer or fx.Tracer()).trace(copied))
        plan = plan_model(_fold_batchnorm(_functionalize(traced)), tuple(cleans[0].shape[-2:]),
                          channels=cleans[0].shape[1])
    except Exception as e:  # fx's own errors name the line; say what we needed it for
        raise ValueError(f"incremental inference needs a model torch.fx can trace and run on a "
                         f"{_describe(clean)} input: {type(e).__name__}: {e}") from e
    # channels_last: oneDNN's convs run 10-40% faster on it than on NCHW at the crops' sizes here (NCHW
    # inputs are reordered on every call), and the engine makes every crop itself (bench/README.md)
    plan.graph_module.to(memory_format=torch.channels_last)
    if key is not None:
        _PLANS[model] = (key, plan)
    return plan


class IncrementalModel:
    """``model(inputs)`` for inputs equal to ``clean`` outside one rectangle each, computing only what changes.

    ``clean``: the model's input, 1 x C x H x W (already normalised: what the model itself reads).
    ``threshold``: the share of a map above which a node runs on whole maps (see the module docstring).
    ``tracer``: a torch.fx Tracer for models whose leaf modules need one.
    """

    def __init__(self, model: nn.Module, clean, *, threshold: float = DEFAULT_THRESHOLD,
                 tracer: Optional[fx.Tracer] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        cleans = (clean,) if isinstance(clean, torch.Tensor) else tuple(clean) if isinstance(clean, (tuple, list)) \
            else ()
        if not cleans or any(not isinstance(c, torch.Tensor) or c.dim() != 4 or c.shape[0] != 1
                             or c.shape[-2:] != cleans[0].shape[-2:] for c in cleans):
            raise ValueError(f"clean must be a 1 x C x H x W tensor (or a tuple of them, one per model input, of "
                             f"one height and width), got {_describe(clean)}")
        if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
            raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
        self.plan: Plan = _prepared_plan(model, cleans, tracer, clean)
        self.gm = self.plan.graph_module
        self.modules = dict(self.gm.named_modules())
        self.ops = {o.name: o for o in self.plan.ops}
        self.nodes = [n for n in self.gm.graph.nodes]
        out = [n for n in self.nodes if n.op == "output"][0].args[0]
        if not isinstance(out, fx.Node):
            raise ValueError("incremental inference needs a model that returns one tensor")
        self.output = out.name
        # nodes that depend on the input (the rest: parameters, constants, shapes of them)
        self.varying = set()
        for n in self.nodes:
            if n.op == "placeholder" or (n.name in self.ops and any(i in self.varying for i in self.ops[n.name].inputs)):
                self.varying.add(n.name)
        self.placeholders = [n.name for n in self.nodes if n.op == "placeholder"]
        if len(cleans) != len(self.placeholders):
            raise ValueError(f"clean holds {len(cleans)} input(s); the model takes {len(self.placeholders)} "
                             f"({', '.join(self.placeholders)}): give a clean value for each")
        self.threshold = float(threshold)
        self.local: Dict[str, Callable] = {n.name: f for n in self.nodes if (f := self._local_rule(n)) is not None}
        self.clean_inputs = cleans
        self.memory_format = torch.channels_last  # the plan's graph module is in it already (_prepared_plan)
        self.clean = self._clean_forward(tuple(c.contiguous(memory_format=self.memory_format) for c in cleans))
        # fill nodes whose clean mask (their second input) is all ones: no removed pixel outside a change
        self.no_spread = set()
        for n in self.nodes:
            op = self.ops.get(n.name)
            if op is not None and op.halo and len(n.args) > 1 and isinstance(n.args[1], fx.Node):
                m = self.clean.get(n.args[1].name)
                if isinstance(m, torch.Tensor) and bool((m > 0).all()):
                    self.no_spread.add(n.name)

    # -- construction ---------------------------------------------------------------------
    def _clean_forward(self, inputs: Tuple[torch.Tensor, ...]) -> Dict[str, torch.Tensor]:
        cache: Dict[str, torch.Tensor] = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                cache[n.name] = out
                return out

        with torch.no_grad():
            Recorder(self.gm).run(*inputs)
        return cache

    def _local_rule(self, node: fx.Node) -> Optional[Callable]:
        """For a conv or pool node, how its rectangle is computed: f(crops) -> outputs with padding 0 (its
        padding is written into the crops) for a plain conv or pool, the crop-and-cut rule for a layer-masked
        one; None when it has no exact rule (it then runs in full)."""
        op = self.ops.get(node.name)
        if op is None or op.kind not in ("conv", "pool"):
            return None
        if op.masked:
            return self._run_masked_window
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros":
                return lambda x, m=m: F.conv2d(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
            if isinstance(m, nn.MaxPool2d) and not m.ceil_mode and not m.return_indices:
                return lambda x, m=m: F.max_pool2d(x, m.kernel_size, m.stride, 0, m.dilation)
            if isinstance(m, nn.AvgPool2d) and not m.ceil_mode and m.divisor_override is None and (
                    m.count_include_pad or _pair(m.padding) == (0, 0)):
                return lambda x, m=m: F.avg_pool2d(x, m.kernel_size, m.stride, 0)
            return None
        if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
            (_, sh, _, dh), (_, sw, _, dw) = op.geom
            w, b = node.args[1], (node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
            g = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
            return lambda x, env, w=w, b=b: F.conv2d(x, env(w), env(b), (sh, sw), 0, (dh, dw), g)
        return None

    # -- planning -------------------------------------------------------------------------
    def plan_batch(self, rects: Sequence[Optional[Rect]]) -> Dict[str, Tuple[str, List[Rect]]]:
        """Per node: ("clean" | "rect" | "full", each input's rectangle there in the rect state, all of one size)."""
        rects = [r if r is not None else (0, 1, 0, 1) for r in rects]  # unchanged: recompute one clean pixel
        regs = [propagate(self.plan, r, self.no_spread) for r in rects]
        out: Dict[str, Tuple[str, List[Rect]]] = {}
        for op in self.plan.ops:
            rs = list(rects) if op.kind == "input" else [reg[op.name] for reg in regs]
            ins = [out[i][0] for i in op.inputs if i in out]
            if op.kind == "meta" and op.name in self.varying:
                out[op.name] = ("full", [])  # x.size(0) and the like: of the batch, not of the clean input
                continue
            if op.kind in ("const", "meta") or all(r is None for r in rs):
                out[op.name] = ("clean", [])
                continue
            local = op.kind == "pointwise" or op.kind == "pad" or op.name in self.local
            if op.kind != "input" and (not local or "full" in ins or not op.spatial):
                out[op.name] = ("full", [])
                continue
            mh, mw = op.hw
            h = max(r[1] - r[0] for r in rs if r is not None)
            w = max(r[3] - r[2] for r in rs if r is not None)
            if op.kind != "input" and h * w > self.threshold * mh * mw:
                out[op.name] = ("full", [])
                continue
            grown = []
            for r in rs:
                y0, x0 = (0, 0) if r is None else (min(r[0], mh - h), min(r[2], mw - w))
                grown.append((y0, y0 + h, x0, x0 + w))
            out[op.name] = ("rect", grown)
        return out

    def saves(self, rects: Sequence[Optional[Rect]]) -> bool:
        """Whether a batch with these changed rectangles computes any conv or pool on its rectangle only.
        When none does (the first layer has no rule, as EfficientNet-Lite's padded convs under layer
        masking), the engine would run the whole model on whole maps, slower than the model itself."""
        return any(kind == "rect" and self.ops[name].kind in ("conv", "pool")
                   for name, (kind, _) in self.plan_batch(rects).items())

    # -- running --------------------------------------------------------------------------
    def _empty(self, like: torch.Tensor, shape) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` in the engine's layout (channels_last for 4-d maps)."""
        fmt = self.memory_format if len(shape) == 4 else torch.contiguous_format
        return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)

    def _crop_into(self, out: torch.Tensor, name: str, state, b: int, box: Rect, pad_value: float = 0.0) -> None:
        """Write node ``name``'s values for input b over ``box`` (which may leave the map: ``pad_value``
        there) into ``out`` (C x h x w)."""
        clean = self.clean[name][0]
        C, H, W = clean.shape
        y0, y1, x0, x1 = box
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
        if (cy0, cy1, cx0, cx1) != (y0, y1, x0, x1):
            out.fill_(pad_value)
        if cy0 < cy1 and cx0 < cx1:
            out[:, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = clean[:, cy0:cy1, cx0:cx1]
        kind, payload = state
        if kind == "rect":
            vals, rects = payload
            ry0, ry1, rx0, rx1 = rects[b]
            iy0, iy1, ix0, ix1 = max(ry0, cy0), min(ry1, cy1), max(rx0, cx0), min(rx1, cx1)
            if iy0 < iy1 and ix0 < ix1:
                out[:, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = vals[b, :, iy0 - ry0:iy1 - ry0, ix0 - rx0:ix1 - rx0]

    def _crops(self, name: str, env, boxes: Sequence[Rect], pad_value: float = 0.0,
               members: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Node ``name``'s values over ``boxes`` (all of one size), one box per input (inputs ``members``,
        default 0..), as one batch."""
        state = env[name]
        if state[0] == "rect" and members is None and list(state[1][1]) == list(boxes):
            return state[1][0]
        clean = self.clean[name]
        y0, y1, x0, x1 = boxes[0]
        out = self._empty(clean, (len(boxes), clean.shape[1], y1 - y0, x1 - x0))
        for i, box in enumerate(boxes):
            self._crop_into(out[i], name, state, i if members is None else members[i], box, pad_value)
        return out

    def _whole(self, name: str, env, n: int):
        """Node ``name``'s whole output for the n inputs (clean values, with the changed ones pasted in)."""
        kind, payload = env[name]
        if kind == "full":
            return payload
        clean = self.clean[name]
        if name not in self.varying or not isinstance(clean, torch.Tensor):
            return clean  # a parameter, a constant: the same for every input
        out = self._empty(clean, (n, *clean.shape[1:]))
        out.copy_(clean.expand(n, *clean.shape[1:]))
        if kind == "rect":
            vals, rects = payload
            for b, (y0, y1, x0, x1) in enumerate(rects):
                out[b, :, y0:y1, x0:x1] = vals[b]
        return out

    def _run_full(self, node: fx.Node, env, n: int):
        args = fx.node.map_arg(node.args, lambda a: self._whole(a.name, env, n))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: self._whole(a.name, env, n))
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return self.clean[node.name]

    def _run_rect(self, node: fx.Node, env, rects: List[Rect]) -> torch.Tensor:
        op = self.ops[node.name]
        if op.kind in ("conv", "pool") and op.masked:
            return self._run_masked_window(node, op, env, rects)
        if op.kind in ("conv", "pool"):
            (kh, sh, ph, dh), (kw, sw, pw, dw) = op.geom
            is_max = node.op == "call_module" and isinstance(self.modules[node.target], nn.MaxPool2d)
            boxes = [(y0 * sh - ph, (y1 - 1) * sh - ph + (kh - 1) * dh + 1,
                      x0 * sw - pw, (x1 - 1) * sw - pw + (kw - 1) * dw + 1) for y0, y1, x0, x1 in rects]
            crops = self._crops(op.inputs[0], env, boxes, float("-inf") if is_max else 0.0)
            f = self.local[node.name]
            if node.op == "call_function":
                return f(crops, lambda a: None if a is None else self._whole(a.name, env, 1))
            return f(crops)
        if op.kind == "pad":
            top, left = op.geom
            boxes = [(y0 - top, y1 - top, x0 - left, x1 - left) for y0, y1, x0, x1 in rects]
            value = float(getattr(self.modules.get(node.target), "value", 0.0) or 0.0) if node.op == "call_module" \
                else float((node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0.0)) or 0.0)
            return self._crops(op.inputs[0], env, boxes, value)
        # elementwise: the op on its inputs' crops of this rectangle (a broadcast operand of another size,
        # a per-channel scale, say, is unchanged and passes as it is)

        def arg(a: fx.Node):
            src = self.ops.get(a.name)
            if src is not None and src.spatial and src.hw == op.hw:
                return self._crops(a.name, env, rects)
            return self._whole(a.name, env, 1)

        args = fx.node.map_arg(node.args, arg)
        kwargs = fx.node.map_arg(node.kwargs, arg)
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)

    def _run_masked_window(self, node: fx.Node, op, env, rects: List[Rect]) -> torch.Tensor:
        """A layer-masked conv or pool, or a mask-path pool, on each rectangle: the node itself (its own
        padding, fill and masks) run on a crop of its inputs that holds every input its outputs read, fill
        halo included. The crop ends at the map's border where it reaches it (so the node's own border
        rule applies) and starts on its stride, so that output j of the crop is output start/stride + j of
        the map; outputs near an inner edge of the crop would read missing pixels and are cut away.
        Crops of different sizes (at the borders) run as separate batches."""
        (kh, sh, ph, dh), (kw, sw, pw, dw) = op.geom
        H, W = self.ops[op.inputs[0]].hw
        OH, OW = op.hw
        # The fill halo: none needed at stride 1 when the clean mask is all ones (the only removed pixels
        # are changed ones, and the window rule's footprint already holds them and their d*(k-1) rings).
        halo = 0 if op.name in self.no_spread and sh == sw == 1 else op.halo
        qy, qx = -(-(ph + halo) // sh), -(-(pw + halo) // sw)
        spans = []
        for y0, y1, x0, x1 in rects:
            a, c = max(0, (y0 - qy) * sh), max(0, (x0 - qx) * sw)
            e = min(H, (y1 - 1) * sh - ph + (kh - 1) * dh + 1 + halo)
            f = min(W, (x1 - 1) * sw - pw + (kw - 1) * dw + 1 + halo)
            spans.append((a, e, c, f))
        groups: Dict[Tuple[int, int, int, int], List[int]] = {}
        for b, ((y0, _, x0, _), (a, e, c, f)) in enumerate(zip(rects, spans)):
            groups.setdefault((e - a, f - c, y0 - a // sh, x0 - c // sw), []).append(b)
        h, w = rects[0][1] - rects[0][0], rects[0][3] - rects[0][2]
        out = None
        for (ch, cw, oy, ox), members in groups.items():
            # each input in its own grid: the node's input maps (H x W) or its output grid (the keep mask)
            ol_h = (ch + 2 * ph - (kh - 1) * dh - 1) // sh + 1
            ol_w = (cw + 2 * pw - (kw - 1) * dw - 1) // sw + 1

            def arg(a_node: fx.Node):
                src = self.ops.get(a_node.name)
                if src is None or not src.spatial:
                    return self._whole(a_node.name, env, 1)
                if src.hw == (H, W):
                    boxes = [(spans[b][0], spans[b][1], spans[b][2], spans[b][3]) for b in members]
                elif src.hw == (OH, OW):
                    boxes = [(spans[b][0] // sh, spans[b][0] // sh + ol_h, spans[b][2] // sw, spans[b][2] // sw + ol_w)
                             for b in members]
                else:
                    return self._whole(a_node.name, env, 1)
                return self._crops(a_node.name, env, boxes, members=members)

            args = fx.node.map_arg(node.args, arg)
            kwargs = fx.node.map_arg(node.kwargs, arg)
            y = self.modules[node.target](*args, **kwargs) if node.op == "call_module" else node.target(*args, **kwargs)
            y = y[:, :, oy:oy + h, ox:ox + w]
            if out is None:
                out = y.new_empty((len(rects), *y.shape[1:]))
            out[members] = y
        return out

    @torch.no_grad()
    def __call__(self, inputs, rects: Optional[Sequence[Optional[Rect]]] = None) -> torch.Tensor:
        """The model's outputs for ``inputs`` (N x C x H x W, or a tuple like ``clean``), each equal to the
        clean input outside its rect (default: found by comparison, changed_rects). All N run as one batch."""
        batch = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs) if isinstance(inputs, (tuple, list)) \
            else ()
        want = " and ".join(f"N x {tuple(c.shape[1:])}" for c in self.clean_inputs)
        if len(batch) != len(self.clean_inputs) or any(
                not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1:] != c.shape[1:] or t.shape[0] != batch[0].shape[0]
                for t, c in zip(batch, self.clean_inputs)):
            raise ValueError(f"inputs must have shape {want}, got {_describe(inputs)}")
        if rects is None:
            rects = changed_rects(batch, self.clean_inputs)
        H, W = self.plan.input_hw
        n = batch[0].shape[0]
        if len(rects) != n:
            raise ValueError(f"rects must hold one rectangle per input ({n}), got {len(rects)}")
        for r in rects:
            if r is not None and not (0 <= r[0] < r[1] <= H and 0 <= r[2] < r[3] <= W):
                raise ValueError(f"rect {r} is not a non-empty (y0, y1, x0, x1) inside the {H} x {W} input")
        plan = self.plan_batch(rects)
        env: Dict[str, tuple] = {}
        for node in self.nodes:
            if node.op == "output":
                break
            kind, boxes = plan[node.name]
            if kind == "clean":
                env[node.name] = ("clean", None)
            elif self.ops[node.name].kind == "input":
                src = batch[self.placeholders.index(node.name)]
                y0, y1, x0, x1 = boxes[0]
                vals = self._empty(src, (n, src.shape[1], y1 - y0, x1 - x0))
                for b, (y0, y1, x0, x1) in enumerate(boxes):
                    vals[b] = src[b, :, y0:y1, x0:x1]
                env[node.name] = ("rect", (vals, boxes))
            elif kind == "full":
                env[node.name] = ("full", self._run_full(node, env, n))
            else:
                env[node.name] = ("rect", (self._run_rect(node, env, boxes), boxes))
        return self._whole(self.output, env, n)


def incremental_outputs(strategy, image: torch.Tensor, segments: torch.Tensor, samples: torch.Tensor,
                        targets: Sequence[int], *, batch_size=None, output: str = "prob",
                        progress: Optional[bool] = None, desc: str = "explain",
                        threshold: float = DEFAULT_THRESHOLD) -> Optional[torch.Tensor]:
    """perturb.forward_samples through IncrementalModel: S x T outputs of ``image`` with each sample's
    segments kept, equal to full forwards (see the module docstring), for a strategy that paints the
    removed pixels and runs the plain model (a FillStrategy: grey, black, blur, ...) or for (hard) layer
    masking of a CNN, whose converted model is the graph the engine runs. Each sample's changed rectangle
    is where its model inputs (image, and mask under layer masking) differ from the clean ones.
    None when the engine would save nothing (IncrementalModel.saves on the first batch: e.g.
    EfficientNet-Lite under layer masking, 1.6x-1.75x slower through the engine, measured): the caller
    then runs full forwards."""
    from .._util.progress import progress_bar
    model = incremental_model_of(strategy)
    if batch_size is None or batch_size == "auto":
        batch_size = DEFAULT_BATCH
    seg = segments.to(image.device)
    idx = torch.as_tensor(list(targets), device=image.device)
    ones = torch.ones(1, 1, *image.shape[1:], dtype=torch.bool, device=image.device)
    with torch.no_grad():
        clean = strategy.model_inputs(image[None], ones)
    engine = IncrementalModel(model, clean, threshold=threshold)

    def inputs_of(start):
        masks = samples[start:start + batch_size].to(image.device, torch.bool)[:, seg].unsqueeze(1)
        with torch.no_grad():
            return strategy.model_inputs(image[None], masks)

    first = inputs_of(0)
    if not engine.saves(changed_rects(first, clean)):
        return None
    out = []
    with progress_bar(samples.shape[0], desc, "sample", enabled=progress, auto_min=256) as bar, torch.no_grad():
        for start in range(0, samples.shape[0], batch_size):
            z = samples[start:start + batch_size]
            logits = engine(first if start == 0 else inputs_of(start)).float()
            vals = logits.softmax(1) if output == "prob" else logits
            out.append(vals[:, idx].cpu())
            bar.update(z.shape[0])
    return torch.cat(out).double()


def incremental_model_of(strategy) -> nn.Module:
    """The model incremental inference runs for ``strategy``: the plain model of a strategy that paints
    (FillStrategy), the converted model of hard layer masking on a CNN; ValueError for the others."""
    from .strategies import FillStrategy, LayerStrategy

    if isinstance(strategy, FillStrategy):
        return strategy.model
    if isinstance(strategy, LayerStrategy):
        from ..vit import is_vision_transformer

        if is_vision_transformer(strategy.model):
            raise ValueError(f"incremental inference runs CNNs: strategy {strategy.name!r} drops tokens of a vision "
                             f"transformer, whose attention reads every token (use incremental=False)")
        if strategy.soft:
            raise ValueError(f"incremental inference takes hard layer masking; strategy {strategy.name!r} is soft "
                             f"(use incremental=False)")
        return strategy.masked_model
    raise ValueError(f"incremental inference needs a strategy that paints the removed pixels (grey, black, blur, "
                     f"...) or layer masking, got {strategy.name!r} (use incremental=False)")


def incremental_strategies(strategies) -> List[str]:
    """The names of ``strategies`` that incremental inference runs (incremental_model_of); the others run
    full forwards. ValueError when none of them does."""
    names = []
    for s in strategies:
        try:
            incremental_model_of(s)
        except ValueError:
            continue
        names.append(s.name)
    if not names:
        raise ValueError(f"incremental inference needs a strategy that paints the removed pixels (grey, black, "
                         f"blur, ...) or layer masking; got {', '.join(s.name for s in strategies)}")
    return names
