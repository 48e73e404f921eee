"""layer_mask(model): turn a CNN into a layer-masked one by a torch.fx graph rewrite.

    import masked_ops as mo, torchvision
    lm = mo.layer_mask(torchvision.models.resnet50().eval(), mode="fill")
    logits = lm(x, mask)          # mask N x 1 x H x W, 1 = visible; or lm(x_with_nans)

How it works:
1. The model is traced symbolically (torch.fx). Module types with a rule are leaves.
2. Every node that receives a masked value is handed to its rule (masked_ops.rules), which
   returns a masked layer (masked_ops.nn). Nodes that only see unmasked values (the SE
   branch after its global pool, the classifier after the head pool) run unchanged.
   A conv absorbs the eval-mode BatchNorm (folded, exact) and the activation that follow
   it into its epilogue; anything that would move spatial positions without a rule
   raises, naming the node.
3. Each layer registers the masks it needs in one MaskGraph (the mask pyramid). A
   forward first evaluates the whole pyramid from the input mask (shared by layers of
   the same geometry), then runs the activation path.

The original model is never modified: parameters are shared (folded convs own folded
copies). The trace is a snapshot of the model's mode at conversion: convert again after
switching between train() and eval().

Train mode (documented choice): converting a model in train mode warns; BatchNorm then
normalises with batch statistics over the visible pixels only and does not update the
original model's running statistics; nothing is folded.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from . import _checks as C
from . import nn as mnn
from . import rules as R
from .modes import check_mode
from .ops import bn_affine
from .rules import register_rule  # noqa: F401  (re-exported: masked_ops.convert.register_rule)

__all__ = ["layer_mask", "LayerMasked", "register_rule", "TraceError"]


class TraceError(RuntimeError):
    """The model could not be traced symbolically; names the module being traced."""


class _Tracer(fx.Tracer):
    """fx tracer where every module type with a layer rule is a leaf; remembers where it is."""

    def __init__(self):
        super().__init__()
        self.where: List[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if R.module_rule(m) is not None:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.where.append(f"{self.path_of_module(m) or '<root>'} ({type(m).__name__})")
        out = super().call_module(m, forward, args, kwargs)
        self.where.pop()
        return out


def _trace(model: nn.Module) -> fx.Graph:
    tracer = _Tracer()
    try:
        return tracer.trace(model)
    except Exception as exc:
        where = tracer.where[-1] if tracer.where else f"<root> ({type(model).__name__})"
        raise TraceError(
            f"layer_mask: cannot trace {type(model).__name__} symbolically: in module {where}: "
            f"{type(exc).__name__}: {exc}. Register a rule for that module type "
            f"(masked_ops.register_rule(ModuleType, rule)) so it becomes a leaf of the trace.") from exc


class _Sym:
    """What the converter knows about a value: masked (mask key, layout), plain, or padded."""

    __slots__ = ("kind", "key", "layout", "padded")

    def __init__(self, kind, key=None, layout=None, padded=None):
        self.kind, self.key, self.layout, self.padded = kind, key, layout, padded


PLAIN_SYM = _Sym("plain")


class RuleContext:
    """What a rule may ask about the graph (see masked_ops.rules)."""

    def __init__(self, root, mode, concat, fold_bn, padding_visible, training):
        self.root, self.mode, self.concat = root, mode, concat
        self.fold_bn, self.padding_visible, self.training = fold_bn, padding_visible, training
        self.syms: Dict[fx.Node, _Sym] = {}
        self.absorbed: Dict[fx.Node, fx.Node] = {}
        self.current: Optional[fx.Node] = None

    def module(self, node) -> nn.Module:
        return self.root.get_submodule(node.target)

    def value(self, arg):
        """The constant behind an argument: literals, or parameters/buffers (get_attr)."""
        if isinstance(arg, fx.Node):
            if arg.op == "get_attr":
                obj = self.root
                for part in arg.target.split("."):
                    obj = getattr(obj, part)
                return obj
            raise ValueError(f"layer_mask: node {self.current.name!r} needs {arg.name!r} to be a constant "
                             f"(parameter, buffer or literal), but it is computed at run time")
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        return arg

    def _sym(self, arg) -> _Sym:
        return self.syms.get(arg, PLAIN_SYM) if isinstance(arg, fx.Node) else PLAIN_SYM

    def is_masked(self, arg) -> bool:
        return self._sym(arg).kind == "masked"

    def layout(self, arg) -> Optional[str]:
        return self._sym(arg).layout

    def padded(self, arg) -> Optional[R.Padded]:
        return self._sym(arg).padded

    def sole_user(self, node) -> Optional[fx.Node]:
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def absorb(self, node) -> None:
        """Mark ``node`` as computed by the current node's layer (fused BN / activation)."""
        self.absorbed[node] = self.current

    def eval_bn(self, node):
        """(bn module, fused activation or None) if ``node`` is an eval-mode BatchNorm module."""
        if node is None or node.op != "call_module":
            return None
        m = self.module(node)
        rule = R.module_rule(m)
        if rule is not R._bn_rule or m.training or not getattr(m, "track_running_stats", True) \
                or getattr(m, "running_mean", None) is None:
            return None
        act = None
        if hasattr(m, "act"):  # timm BatchNormAct2d
            if not isinstance(getattr(m, "drop", nn.Identity()), nn.Identity):
                return None
            act = R.activation_module_name(m.act)
            if act is None:
                return None
        return m, act

    @staticmethod
    def bn_affine(bn):
        return bn_affine(bn)


class _Step:
    __slots__ = ("name", "kind", "layer", "node", "inputs", "free")

    def __init__(self, name, kind, layer=None, node=None, inputs=()):
        self.name, self.kind, self.layer, self.node, self.inputs = name, kind, layer, node, list(inputs)
        self.free: List[str] = []


class LayerMasked(nn.Module):
    """A layer-masked model: ``forward(x, mask=None)``; see :func:`layer_mask`."""

    def __init__(self, model: nn.Module, graph: fx.Graph, steps: List[_Step], mask_graph: mnn.MaskGraph,
                 output, rows, mode: str):
        super().__init__()
        self.model = model  # shared parameters; never modified
        self.layers = nn.ModuleDict()
        for s in steps:
            if s.layer is not None:
                self.layers[s.name] = s.layer
        self._graph, self._steps, self.mask_graph, self._output = graph, steps, mask_graph, output
        self._rows, self.mode = rows, mode

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        C.check_input(x)
        if mask is None:
            visible = ~torch.isnan(x).any(dim=1, keepdim=True)
            m = visible.to(x.dtype)
        else:
            C.check_mask(mask, x)
            m = C.as_float_mask(mask, x)
        # The one zeroing of the raw input: NaN/inf/anything at removed pixels is selected away here,
        # so every later layer sees exactly 0 there (the activation-path invariant).
        x = torch.where(m > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
        masks = self.mask_graph.evaluate(m)
        env = {}
        for step in self._steps:
            kind = step.kind
            if kind == "input":
                env[step.name] = x
            elif kind == "masked":
                env[step.name] = step.layer.run([env[i.name] if isinstance(i, fx.Node) else i for i in step.inputs],
                                                masks)
            elif kind == "alias":
                env[step.name] = env[step.inputs[0].name]
            else:
                env[step.name] = self._run_plain(step.node, env)
            for name in step.free:
                del env[name]
        return fx.node.map_arg(self._output, lambda n: env[n.name])

    def _run_plain(self, node: fx.Node, env):
        args = fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        if node.op == "call_module":
            return self.model.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            obj = self.model
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise RuntimeError(f"unexpected node {node.format_node()}")

    def summary(self) -> str:
        """One line per node: its name, what the original model does there, and the rule used."""
        w = max([len(r[0]) for r in self._rows] + [4])
        lines = [f"LayerMasked({type(self.model).__name__}, mode={self.mode!r}): {len(self._rows)} nodes, "
                 f"{len(self.mask_graph)} mask-path ops (computed once per forward)",
                 f"{'node':<{w}}  rule"]
        lines += [f"{n:<{w}}  {rule}    [{what}]" for n, what, rule in self._rows]
        return "\n".join(lines)

    def rules_used(self) -> Dict[str, str]:
        """node name -> rule description (for tests and tooling)."""
        return {n: rule for n, _, rule in self._rows}

    def __repr__(self):
        return self.summary()


def _describe_target(node, root) -> str:
    if node.op == "call_module":
        return f"{node.target}: {type(root.get_submodule(node.target)).__name__}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f".{node.target}()" if node.op == "call_method" else node.op


# Modules whose behaviour depends on train/eval mode (the train-mode warning names them).
_TRAIN_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def layer_mask(model: nn.Module, mode: str = "fill", *, concat: str = "majority", fold_bn: bool = True,
               padding_visible: bool = False) -> LayerMasked:
    """Return a layer-masked version of ``model`` (an ``nn.Module`` taking one image batch).

    mode: "fill" (the paper's layer masking: removed pixels filled from visible neighbours
    before each conv), "renorm" (partial convolution) or "zero".
    concat: output mask of a channel concat: "majority" (a pixel is visible if it is in at
    least half the inputs: DenseNet's majority vote, and the union for a two-way Fire
    concat), "union" or "intersection".
    fold_bn: fold eval-mode BatchNorm into the preceding conv (exact; copies those weights).
    padding_visible: renorm only; count zero padding as visible in the denominator, so an
    all-ones mask reproduces the model exactly (default False, as in partial convolution:
    the border is renormalised).

    The returned module's ``forward(x, mask=None)`` takes x N x C x H x W and mask
    N x 1 x H x W (bool or 0/1 float, 1 = visible); with ``mask=None`` a pixel with NaN in
    any channel is removed. It returns what the model returns (spatial outputs come back
    zeroed at removed positions). ``print(lm)`` / ``lm.summary()`` shows the rule of each node.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_mode(mode)
    if concat not in ("majority", "union", "intersection"):
        raise ValueError(f"concat must be 'majority', 'union' or 'intersection', got {concat!r}")
    R.register_optional_rules()
    if R.module_rule(model) is not None:
        # A lone layer (an nn.Conv2d, ...): fx never treats the root as a leaf, so wrap it.
        model = nn.Sequential(model)
    training = model.training
    if training and any(m.training and isinstance(m, _TRAIN_SENSITIVE) for m in model.modules()):
        warnings.warn("layer_mask: the model is in train mode; BatchNorm will use batch statistics over the "
                      "visible pixels (running statistics are not updated) and nothing is folded. "
                      "Call model.eval() before layer_mask for inference.", UserWarning, stacklevel=2)
    graph = _trace(model)
    ctx = RuleContext(model, mode, concat, fold_bn, padding_visible, training)
    mg = mnn.MaskGraph()
    steps: List[_Step] = []
    rows = []
    output = None
    seen_input = False
    for node in graph.nodes:
        ctx.current = node
        if node.op == "placeholder":
            if seen_input:
                raise ValueError(f"layer_mask: the model takes a second input {node.target!r}; only "
                                 f"single-input models are supported")
            seen_input = True
            ctx.syms[node] = _Sym("masked", mnn.INPUT, "nchw")
            steps.append(_Step(node.name, "input"))
            rows.append((node.name, "input", "masked input (N x C x H x W, mask N x 1 x H x W)"))
            continue
        if node.op == "output":
            output = node.args[0]
            for n in node.all_input_nodes:
                if ctx._sym(n).kind == "padded":
                    raise ValueError(f"layer_mask: the model returns an explicitly padded map ({n.name})")
            continue
        if node in ctx.absorbed:
            owner = ctx.absorbed[node]
            ctx.syms[node] = ctx.syms[owner]
            steps.append(_Step(node.name, "alias", inputs=[owner]))
            rows.append((node.name, _describe_target(node, model), f"fused into {owner.name}"))
            continue
        inputs = node.all_input_nodes
        if not any(ctx._sym(n).kind != "plain" for n in inputs):
            steps.append(_Step(node.name, "plain", node=node))
            if node.op in ("call_module", "call_function", "call_method"):
                rows.append((node.name, _describe_target(node, model), "plain (no masked input)"))
            continue
        rule = R.node_rule(node, model)
        if rule is None:
            what = _describe_target(node, model)
            raise ValueError(
                f"layer_mask: no layer-masking rule for node {node.name!r} ({what}) which reads a masked "
                f"spatial map; it could leak the mask. Register one with "
                f"masked_ops.register_rule({'its module type' if node.op == 'call_module' else repr(node.target)}, "
                f"rule) (see masked_ops.rules).")
        result = rule(node, ctx)
        if result is R.PLAIN:
            steps.append(_Step(node.name, "plain", node=node))
            ctx.syms[node] = PLAIN_SYM
            continue
        if isinstance(result, R.Padded):
            src = ctx._sym(result.source)
            if src.kind != "masked" or src.layout != "nchw":
                raise ValueError(f"layer_mask: node {node.name!r} pads a value that is not a masked NCHW map")
            ctx.syms[node] = _Sym("padded", src.key, src.layout, result)
            rows.append((node.name, _describe_target(node, model), f"padding {result.pads} (merged into its consumer)"))
            continue
        layer = result
        layer_inputs = getattr(layer, "inputs", None)
        if layer_inputs is None:
            layer_inputs = [node.args[0]]
            layer.inputs = layer_inputs
        for i in layer_inputs:
            if ctx._sym(i).kind == "padded":
                raise ValueError(f"layer_mask: node {node.name!r} ({_describe_target(node, model)}) reads the "
                                 f"explicitly padded map {i.name!r}; explicit padding is supported only "
                                 f"directly before a conv or a max pool")
        in_keys = [ctx._sym(i).key if ctx._sym(i).kind == "masked" else None for i in layer_inputs]
        out_key = layer.plan(mg, in_keys)
        layout = getattr(layer, "out_layout", None) or next(
            (ctx._sym(i).layout for i in layer_inputs if ctx._sym(i).kind == "masked"), "nchw")
        ctx.syms[node] = PLAIN_SYM if out_key is None else _Sym("masked", out_key, layout)
        del layer.inputs  # kept on the step instead (fx nodes are not module state)
        steps.append(_Step(node.name, "masked", layer=layer, inputs=layer_inputs))
        rows.append((node.name, _describe_target(node, model), layer.describe()))
    _schedule_frees(steps, output)
    in_place = _mark_in_place_fills(steps, output)
    rows = [(n, what, in_place[n].describe() if n in in_place else rule) for n, what, rule in rows]
    return LayerMasked(model, graph, steps, mg, output, rows, mode)


def _mark_in_place_fills(steps: List[_Step], output) -> Dict[str, mnn.MaskedLayer]:
    """Let a conv fill its input in place when nothing else can see that input.

    The input must be a fresh tensor made by a masked layer (not the model's input, not a view)
    whose value, under every alias of it (fused BatchNorm/activation nodes are aliases of their
    conv), is read by that conv alone and is not returned. Returns the layers marked, by step name.
    """
    root: Dict[str, str] = {}  # value name -> name of the step that computed the tensor
    by_name = {s.name: s for s in steps}
    readers: Dict[str, List[int]] = {}
    for i, s in enumerate(steps):
        if s.kind == "alias":
            root[s.name] = root[s.inputs[0].name]
            continue
        root[s.name] = s.name
        nodes = s.node.all_input_nodes if s.kind == "plain" else [n for n in s.inputs if isinstance(n, fx.Node)]
        for n in nodes:
            readers.setdefault(root.get(n.name, n.name), []).append(i)
    returned = set()
    fx.node.map_arg(output, lambda n: returned.add(root.get(n.name, n.name)))
    marked = {}
    for i, s in enumerate(steps):
        layer = s.layer
        if s.kind != "masked" or not getattr(layer, "can_fill_in_place", False) or not isinstance(s.inputs[0], fx.Node):
            continue
        src = root[s.inputs[0].name]
        producer = by_name[src]
        if producer.kind == "masked" and getattr(producer.layer, "fresh_output", False) \
                and readers.get(src) == [i] and src not in returned:
            layer.fill_in_place = True
            marked[s.name] = layer
    return marked


def _schedule_frees(steps: List[_Step], output) -> None:
    """Drop each intermediate value right after its last reader (as eager PyTorch would)."""
    last: Dict[str, int] = {}
    for i, s in enumerate(steps):
        readers = s.node.all_input_nodes if s.kind == "plain" else [n for n in s.inputs if isinstance(n, fx.Node)]
        for n in readers:
            last[n.name] = i
    keep = set()
    fx.node.map_arg(output, lambda n: keep.add(n.name))
    for name, i in last.items():
        if name not in keep:
            steps[i].free.append(name)
