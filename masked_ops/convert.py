"""layer_mask(model): turn a CNN into a layer-masked one by a torch.fx graph rewrite.

    import masked_ops as mo, torchvision
    lm = mo.layer_mask(torchvision.models.resnet50().eval(), mode="fill")
    logits = lm(x, mask)          # mask N x 1 x H x W, 1 = visible; or lm(x_with_nans)
    print(lm.code)                # the generated forward: mask path, then the masked layers

How it works:
1. The model is traced symbolically (torch.fx). Module types with a rule are leaves.
2. Every node that receives a masked value is handed to its rule (masked_ops.rules), which
   says what the node lowers to: a masked layer (masked_ops.nn), the node unchanged, or
   explicit padding for the conv/pool that reads it. Nodes that only see unmasked values (the
   SE branch after its global pool, the classifier after the head pool) are copied unchanged.
   A conv absorbs the eval-mode BatchNorm (folded, exact) and the activation that follow
   it into its epilogue; anything that would move spatial positions without a rule
   raises, naming the node.
3. The result is a new fx graph, compiled to Python by fx: ``forward(x, mask=None)`` first
   checks the input and computes every mask the layers need (masked_ops.masks; one node per
   distinct geometry, shared by every layer that needs it), then runs the activation path,
   passing each layer its masks as arguments. The product is a ``torch.fx.GraphModule``, so
   torch.compile and torch.export take it whole, with no Python loop at run time.

The original model is never modified: parameters are shared (folded convs own folded
copies). The trace is a snapshot of the model's mode at conversion: convert again after
switching between train() and eval().

Train mode (documented choice): converting a model in train mode warns; BatchNorm then
normalises with batch statistics over the visible pixels only and does not update the
original model's running statistics; nothing is folded.
"""
from __future__ import annotations

import copy
import operator
import warnings
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn

from . import masks as M
from . import nn as mnn
from . import rules as R
from .backends import preload
from .modes import check_mode
from .rules import register_rule  # noqa: F401  (re-exported: masked_ops.convert.register_rule)

if TYPE_CHECKING:
    from .vit import TokenMasked

__all__ = ["layer_mask", "LayerMasked", "register_rule", "TraceError"]


class TraceError(ValueError):
    """The model could not be traced symbolically; names the module being traced. A ValueError like
    every other refusal of layer_mask (the CLI reports it as bad input, exit status 2)."""


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
        graph = tracer.trace(model)
    except Exception as exc:
        where = tracer.where[-1] if tracer.where else f"<root> ({type(model).__name__})"
        raise TraceError(
            f"layer_mask: cannot trace {type(model).__name__} symbolically: in module {where}: "
            f"{type(exc).__name__}: {exc}. Register a rule for that module type "
            f"(masked_ops.register_rule(ModuleType, rule)) so it becomes a leaf of the trace.") from exc
    _functionalize_in_place_methods(graph, model)
    return graph


# Ops whose result may share memory with their first argument (a view, or the argument itself): an
# in-place change of one is seen through the others.
_ALIAS_METHODS = frozenset({"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose",
                            "permute", "unsqueeze", "squeeze", "expand", "expand_as", "narrow", "select", "t",
                            "contiguous", "detach", "chunk", "split", "unbind", "as_strided", "type_as", "to",
                            "float", "movedim", "__getitem__"})
_ALIAS_FUNCTIONS = frozenset({operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute,
                              torch.squeeze, torch.unsqueeze, torch.narrow, torch.chunk, torch.split, torch.unbind,
                              torch.movedim, torch.t})
# modules that return their input itself (in eval), by class name: torch's and timm's
_ALIAS_MODULES = frozenset({"Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
                            "FeatureAlphaDropout", "DropPath", "DropBlock2d", "Flatten", "Unflatten"})


def _in_place_method(node: fx.Node) -> bool:
    name = str(node.target)
    return node.op == "call_method" and name.endswith("_") and not name.startswith("__") and bool(node.args) \
        and isinstance(node.args[0], fx.Node)


def _aliases_its_input(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_method":
        return str(node.target) in _ALIAS_METHODS or _in_place_method(node)
    if node.op == "call_function":
        return node.target in _ALIAS_FUNCTIONS
    if node.op == "call_module":
        try:
            return type(model.get_submodule(str(node.target))).__name__ in _ALIAS_MODULES
        except AttributeError:
            return False
    return False


def _functionalize_in_place_methods(graph: fx.Graph, model: nn.Module) -> None:
    """Rewrite ``x.mul_(g)`` as ``y = x.mul(g)`` and let every later reader of ``x`` read ``y``.

    The masked layers compute out of place; eager PyTorch changed the tensor itself, so later reads
    must see the new value (timm's NFNets: ``out.mul_(skipinit_gain)``, then ``out * alpha``). Safe only
    when nothing else can see the change: no other alias of ``x`` (a view, an Identity or DropPath
    module's output, the tensor it is a view of) is read after the call. Otherwise the node stays and
    the converter refuses it with a message (``Converter._check_in_place``).
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if not _in_place_method(node) or not hasattr(torch.Tensor, str(node.target)[:-1]):
            continue
        src = node.args[0]
        aliases, todo = {src}, [src]
        while todo:  # the alias class of src: bases it views, views of it, through alias-keeping ops
            n = todo.pop()
            linked = [u for u in n.users if u is not node and _aliases_its_input(u, model)]
            if _aliases_its_input(n, model) and n.args and isinstance(n.args[0], fx.Node):
                linked.append(n.args[0])
            for m in linked:
                if m not in aliases:
                    aliases.add(m)
                    todo.append(m)
        shared = [m for m in aliases if m is not src and any(order[u] > order[node] for u in m.users)]
        if shared:
            node.meta["aliases_read_after"] = sorted(m.name for m in shared)
            continue
        for user in [u for u in src.users if u is not node and order[u] > order[node]]:
            user.replace_input_with(src, node)
        node.target = str(node.target)[:-1]


# ----------------------------------------------------------------------------- the mask path
class MaskBuilder:
    """Emits the mask path into the new graph: one node per distinct (function, arguments).

    Mask nodes go right after the input mask, before any activation, in the order they are first
    asked for; a second request for the same structure returns the existing node. Every function
    called is in masked_ops.masks.
    """

    def __init__(self, graph: fx.Graph, input_mask: fx.Node, soft: Optional[str] = None):
        self.graph, self.cursor, self.soft = graph, input_mask, soft
        self.nodes: Dict[tuple, fx.Node] = {}

    def _emit(self, fn, args: tuple, kwargs: Optional[dict] = None, name: Optional[str] = None) -> fx.Node:
        key = (fn, args, tuple(sorted((kwargs or {}).items())))
        node = self.nodes.get(key)
        if node is None:
            with self.graph.inserting_after(self.cursor):
                node = self.graph.create_node("call_function", fn, args, kwargs or {}, name=name)
            self.nodes[key] = self.cursor = node
        return node

    def __len__(self):
        return sum(1 for (fn, _, _) in self.nodes if fn is not operator.getitem)

    def conv(self, m, kernel, stride, padding, dilation, mode, padding_visible, prepad) -> Tuple[fx.Node, Optional[fx.Node]]:
        """(keep, scale or None) of a conv reading mask ``m`` (masks.conv_masks)."""
        if M.conv_keeps_input_mask(kernel, stride, padding, prepad, mode):
            return m, None
        geometry = (m, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation))
        extra = {} if prepad is None else {"prepad": prepad}
        if self.soft is not None:
            extra["soft"] = self.soft
        if mode != "renorm":
            return self._emit(M.conv_keep, geometry, extra, name="keep"), None
        both = self._emit(M.renorm_masks, geometry + (bool(padding_visible),), extra, name="renorm_masks")
        return self._emit(operator.getitem, (both, 0), name="keep"), \
            self._emit(operator.getitem, (both, 1), name="renorm_scale")

    def pool(self, m, kernel, stride, padding, dilation, ceil_mode, prepad) -> fx.Node:
        extra = {} if prepad is None else {"prepad": prepad}
        if self.soft is not None:
            extra["soft"] = self.soft
        return self._emit(M.pool_mask, (m, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation),
                                        bool(ceil_mode)), extra, name="pool_mask")

    def adaptive(self, m, output_size) -> Tuple[fx.Node, fx.Node]:
        frac = self._emit(M.adaptive_fraction, (m, tuple(output_size)), name="bin_fraction")
        if self.soft is None:
            return frac, self._emit(M.indicator, (frac,), name="bin_mask")
        return frac, self._emit(M.adaptive_keep, (m, tuple(output_size), self.soft), name="bin_mask")

    def upsample(self, m, scale) -> fx.Node:
        return self._emit(M.upsample_nearest, (m, tuple(scale)), name="upsampled_mask")

    def join(self, masks: List[fx.Node], how: str) -> fx.Node:
        uniq = list(dict.fromkeys(masks))
        if len(uniq) == 1:
            return uniq[0]
        # Intersection and union do not depend on order or repeats; the vote counts every input.
        srcs = tuple(sorted(uniq, key=lambda n: n.name)) if how != "majority" else tuple(masks)
        return self._emit(M.join, (srcs, how), name=f"{how}_mask")


# ----------------------------------------------------------------------------- the module
class LayerMasked(fx.GraphModule):
    """A layer-masked model: ``forward(x, mask=None)``, generated code in ``self.code``.

    ``print(lm)`` / ``lm.summary()`` lists the rule used at every node of the original model;
    ``print(lm.code)`` shows the generated forward.
    """

    def __init__(self, root, graph: fx.Graph, rows=None, mode: Optional[str] = None, source: Optional[str] = None,
                 n_masks: Optional[int] = None):
        super().__init__(root, graph, class_name="LayerMasked")
        self._rows, self.mode, self.source, self._n_masks = rows or [], mode, source or "model", n_masks or 0
        self.soft = next((m.soft for m in self.modules() if isinstance(m, mnn.MaskedLayer)), None)
        # The soft semantics (masks.SOFT_SEMANTICS): a straight-through model has its node in the graph.
        self.soft_semantics = next((n.args[1] for n in graph.nodes if n.target is M.straight_through),
                                   "blend" if self.soft else None)

    def recompile(self):
        result = super().recompile()
        # fx wraps the class's __call__ in a handler that prints the generated line of an error. Under
        # torch.compile that handler is traced when the compiled forward raises (a bad mask), and fails
        # with an unrelated dynamo error; the plain module call keeps the original error.
        type(self).__call__ = nn.Module.__call__
        return result

    def __reduce__(self):
        # fx pickles a GraphModule as its code and re-traces it on load, which our checked mask
        # functions refuse (they do not take Proxies); pickle the graph's nodes themselves instead.
        targets = {n.target for n in self.graph.nodes if n.op in ("call_module", "get_attr")}
        owned = {t: (self.get_submodule(t) if _is_module_path(self, t) else _get_attr(self, t)) for t in targets}
        return (_rebuild_layer_masked, (owned, _graph_nodes(self.graph), self._rows, self.mode, self.source,
                                        self._n_masks))

    def __deepcopy__(self, memo):
        rebuild, args = self.__reduce__()
        return rebuild(*copy.deepcopy(args, memo))

    def summary(self) -> str:
        """One line per node: its name, what the original model does there, and the rule used."""
        w = max([len(r[0]) for r in self._rows] + [4])
        soft = f", soft={self.soft_semantics!r}" if self.soft_semantics else ""
        lines = [f"LayerMasked({self.source}, mode={self.mode!r}{soft}): {len(self._rows)} nodes, "
                 f"{self._n_masks} mask-path ops (computed once per forward; print(model.code) shows them)",
                 f"{'node':<{w}}  rule"]
        lines += [f"{n:<{w}}  {rule}    [{what}]" for n, what, rule in self._rows]
        return "\n".join(lines)

    @property
    def layers(self) -> Dict[str, mnn.MaskedLayer]:
        """The masked layers by name (the fx node name of what each replaces)."""
        return {name: mod for name, mod in self.named_children() if isinstance(mod, mnn.MaskedLayer)}

    def rules_used(self) -> Dict[str, str]:
        """node name -> rule description (for tests and tooling)."""
        return {n: rule for n, _, rule in self._rows}

    def __repr__(self):
        return self.summary()

    def __str__(self):
        return self.summary()


class _Ref:
    """A reference to an earlier node, by name, in a pickled graph."""

    def __init__(self, name):
        self.name = name


def _graph_nodes(graph: fx.Graph) -> list:
    """The graph as plain data: (op, name, target, args, kwargs), node arguments as _Ref."""
    to_ref = lambda n: _Ref(n.name)  # noqa: E731
    return [(n.op, n.name, n.target, fx.node.map_arg(n.args, to_ref), fx.node.map_arg(n.kwargs, to_ref))
            for n in graph.nodes]


def _graph_from_nodes(nodes: list) -> fx.Graph:
    graph, env = fx.Graph(), {}

    def resolve(a):
        if isinstance(a, _Ref):
            return env[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(resolve(v) for v in a)
        if isinstance(a, dict):
            return {k: resolve(v) for k, v in a.items()}
        return a

    for op, name, target, args, kwargs in nodes:
        env[name] = graph.create_node(op, target, resolve(args), resolve(kwargs), name=name)
    return graph


def _is_module_path(root: nn.Module, target: str) -> bool:
    try:
        root.get_submodule(target)
        return True
    except AttributeError:
        return False


def _get_attr(root, target: str):
    for part in target.split("."):
        root = getattr(root, part)
    return root


def _rebuild_layer_masked(owned, nodes, rows, mode, source, n_masks):
    return LayerMasked(owned, _graph_from_nodes(nodes), rows, mode, source, n_masks)


def _describe_target(node, root) -> str:
    if node.op == "call_module":
        return f"{node.target}: {type(root.get_submodule(node.target)).__name__}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f".{node.target}()" if node.op == "call_method" else node.op


# Modules whose behaviour depends on train/eval mode (the train-mode warning names them).
_TRAIN_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def layer_mask(model: nn.Module, mode: str = "fill", *, concat: str = "majority", fold_bn: bool = True,
               padding_visible: bool = False, soft: Union[bool, str] = False, fill_grad: bool = False,
               soft_keep: str = "max") -> Union[LayerMasked, "TokenMasked"]:
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
    soft: the model takes float masks in [0, 1] (a degree of visibility) and is differentiable in
    them: ``lm(x, mask)`` with ``mask.requires_grad`` gives ``mask.grad`` (docs/design.md, "Soft
    masks"). ``True`` takes the default semantics (masks.DEFAULT_SOFT, chosen by measured
    faithfulness); a name picks one of masks.SOFT_SEMANTICS: "blend" (every conv reads each pixel
    blended with its fill by its mask value), "threshold" (the hard model at m >= 1/2, with the
    blend's gradient at that 0/1 mask: straight-through) or "sample" (the hard model at a 0/1 mask
    drawn with P(visible) = m, a new draw per forward; straight-through). At a 0/1 mask each gives
    the hard model's outputs bit for bit. soft_keep: the rule of soft output masks, "max"
    (maxpool(m), the hard rule itself). fill_grad: whether fill values pass gradient to x (default
    False, as in the paper).

    The returned ``torch.fx.GraphModule``'s ``forward(x, mask=None)`` takes x N x C x H x W and
    mask N x 1 x H x W (bool or 0/1 float, 1 = visible); with ``mask=None`` a pixel with NaN in
    any channel is removed. It returns what the model returns (spatial outputs come back
    zeroed at removed positions). ``print(lm)`` / ``lm.summary()`` shows the rule of each node,
    ``print(lm.code)`` the generated forward.

    Vision transformers (timm's and torchvision's ``VisionTransformer``) are masked by token dropping
    instead: the result is a ``masked_ops.vit.TokenMasked`` with the same ``forward(x, mask=None)``
    (patch_keep="all", drop="gather"; ``masked_ops.vit.token_mask`` takes the ViT-only options). The
    CNN options (mode, concat, fold_bn, padding_visible, fill_grad, soft_keep) do not apply to it and
    must keep their defaults.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from . import vit as V

    if V.is_vision_transformer(model):  # before tracing: token dropping, not the fx rewrite
        cnn_only = dict(mode=(mode, "fill"), concat=(concat, "majority"), fold_bn=(fold_bn, True),
                        padding_visible=(padding_visible, False), fill_grad=(fill_grad, False),
                        soft_keep=(soft_keep, "max"))
        changed = [f"{k}={v!r}" for k, (v, default) in cnn_only.items() if v != default]
        V.refuse_cnn_options(model, "layer_mask", changed)
        return V.token_mask(model, soft=soft)
    check_mode(mode)
    semantics = M.check_soft(soft)
    keep_rule = M.check_keep_rule(soft_keep) if semantics else None
    if concat not in M.JOINS:
        raise ValueError(f"concat must be one of {M.JOINS}, got {concat!r}")
    R.register_optional_rules()
    preload()
    source = type(model).__name__
    if R.module_rule(model) is not None:
        # A lone layer (an nn.Conv2d, ...): fx never treats the root as a leaf, so wrap it.
        model = nn.Sequential(model)
    training = model.training
    if training and any(m.training and isinstance(m, _TRAIN_SENSITIVE) for m in model.modules()):
        warnings.warn("layer_mask: the model is in train mode; BatchNorm will use batch statistics over the "
                      "visible pixels (running statistics are not updated) and nothing is folded. "
                      "Call model.eval() before layer_mask for inference.", UserWarning, stacklevel=2)
    traced = _trace(model)
    ctx = R.RuleContext(model, mode, concat, fold_bn, padding_visible, training)
    return _Converter(model, ctx, keep_rule, fill_grad, semantics).run(traced, source)


class _Converter:
    """Walks the traced graph once, emitting the layer-masked graph."""

    def __init__(self, model: nn.Module, ctx: R.RuleContext, soft: Optional[str] = None, fill_grad: bool = False,
                 semantics: Optional[str] = None):
        self.model, self.ctx, self.soft, self.fill_grad = model, ctx, soft, fill_grad
        self.semantics = semantics
        self.graph = fx.Graph()
        self.env: Dict[fx.Node, object] = {}  # original node -> value in the new graph
        self.root: Dict[str, object] = {}     # qualified name -> module / tensor of the new module
        self.layers: Dict[fx.Node, mnn.MaskedLayer] = {}  # new call_module node -> its layer
        self.rows = []

    # -- helpers
    def _arg(self, a):
        return fx.node.map_arg(a, lambda n: self.env[n])

    def _copy_plain(self, node: fx.Node) -> fx.Node:
        """The node unchanged, reading the new graph's values (its module/attribute shared)."""
        if node.op in ("call_module", "get_attr"):
            obj = self.model
            for part in node.target.split("."):
                obj = getattr(obj, part)
            self.root[node.target] = obj
        return self.graph.node_copy(node, lambda n: self.env[n])

    def _layer_name(self, node: fx.Node) -> str:
        name = node.name
        taken = set(self.root) | {t.split(".")[0] for t in self.root}
        while name in taken or hasattr(fx.GraphModule, name):
            name = name + "_masked"
        return name

    # -- the walk
    def run(self, traced: fx.Graph, source: str) -> LayerMasked:
        ctx, g = self.ctx, self.graph
        output = None
        for node in traced.nodes:
            ctx.current = node
            if node.op == "placeholder":
                if self.env:
                    raise ValueError(f"layer_mask: the model takes a second input {node.target!r}; only "
                                     f"single-input models are supported")
                x = g.placeholder("x")
                mask = g.placeholder("mask", default_value=None)
                m = g.create_node("call_function", M.input_mask, (x, mask) + ((True,) if self.soft else ()),
                                  name="input_mask")
                if self.semantics in M.STRAIGHT_THROUGH:  # every layer then runs at a 0/1 mask
                    m = g.create_node("call_function", M.straight_through, (m, self.semantics),
                                      name="straight_through_mask")
                self.masks = MaskBuilder(g, m, self.soft)
                # The one selection of the raw input: NaN/inf/anything at removed pixels is selected
                # away here, so every later layer sees exactly 0 there (the activation-path invariant).
                self.env[node] = g.call_function(M.select_visible, (x, m))
                ctx.syms[node] = R.Sym("masked", m, "nchw")
                self.rows.append((node.name, "input", "masked input (N x C x H x W, mask N x 1 x H x W)"))
                continue
            if node.op == "output":
                for n in node.all_input_nodes:
                    if ctx.sym(n).kind == "padded":
                        raise ValueError(f"layer_mask: the model returns an explicitly padded map ({n.name})")
                output = g.output(self._arg(node.args[0]))
                continue
            if node in ctx.absorbed:
                owner = ctx.absorbed[node]
                self.env[node], ctx.syms[node] = self.env[owner], ctx.syms[owner]
                self.rows.append((node.name, _describe_target(node, self.model), f"fused into {owner.name}"))
                continue
            if not any(ctx.sym(n).kind != "plain" for n in node.all_input_nodes):
                self.env[node] = self._copy_plain(node)
                if node.op in ("call_module", "call_function", "call_method"):
                    self.rows.append((node.name, _describe_target(node, self.model), "plain (no masked input)"))
                continue
            self._lower(node)
        assert output is not None
        self._mark_in_place_fills(output)
        g.lint()
        for node, layer in self.layers.items():
            self.root[node.target] = layer
        rows = [(n, what, self._describe.get(n, rule)) for n, what, rule in self.rows]
        return LayerMasked(self.root, g, rows, ctx.mode, source, len(self.masks))

    def _lower(self, node: fx.Node) -> None:
        ctx = self.ctx
        rule = R.node_rule(node, self.model)
        what = _describe_target(node, self.model)
        if rule is None:
            raise ValueError(
                f"layer_mask: no layer-masking rule for node {node.name!r} ({what}) which reads a masked "
                f"spatial map; it could leak the mask. Register one with "
                f"masked_ops.register_rule({'its module type' if node.op == 'call_module' else repr(node.target)}, "
                f"rule) (see masked_ops.rules).")
        self._check_in_place(node, what)
        result = rule(node, ctx)
        if result is R.PLAIN:
            self.env[node] = self._copy_plain(node)
            ctx.syms[node] = R.PLAIN_SYM
            return
        if isinstance(result, R.Padded):
            src = ctx.sym(result.source)
            if src.kind != "masked" or src.layout != "nchw":
                raise ValueError(f"layer_mask: node {node.name!r} pads a value that is not a masked NCHW map")
            ctx.syms[node] = R.Sym("padded", src.mask, src.layout, result)
            self.rows.append((node.name, what, f"padding {result.pads} (merged into its consumer)"))
            return
        lowered = result if isinstance(result, R.Lowered) else R.Lowered(result, [node.args[0]])
        layer = lowered.layer
        if not isinstance(layer, mnn.MaskedLayer):
            raise TypeError(f"layer_mask: the rule for node {node.name!r} ({what}) returned {type(layer).__name__}; "
                            f"a rule returns a masked_ops.nn.MaskedLayer, rules.Lowered, rules.Padded or rules.PLAIN")
        if self.soft is not None:
            layer.set_soft(self.soft, self.fill_grad)
        for i in lowered.inputs:
            if ctx.sym(i).kind == "padded":
                raise ValueError(f"layer_mask: node {node.name!r} ({what}) reads the explicitly padded map "
                                 f"{i.name!r}; explicit padding is supported only directly before a conv or a "
                                 f"max pool")
        in_masks = [ctx.sym(i).mask if ctx.sym(i).kind == "masked" else None for i in lowered.inputs]
        mask_args, out_mask = layer.masks(self.masks, in_masks)
        name = self._layer_name(node)
        self.root[name] = layer  # reserve the name; the final root is filled after the walk
        new = self.graph.call_module(name, tuple(self._arg(i) for i in lowered.inputs) + tuple(mask_args))
        self.layers[new] = layer
        self.env[node] = new
        layout = lowered.layout or next((ctx.layout(i) for i in lowered.inputs if ctx.is_masked(i)), "nchw")
        ctx.syms[node] = R.PLAIN_SYM if out_mask is None else R.Sym("masked", out_mask, layout)
        self.rows.append((node.name, what, layer.describe()))

    def _check_in_place(self, node: fx.Node, what: str) -> None:
        """Refuse an in-place method (``x.mul_(g)``) on a masked value that is read again afterwards.

        fx records the call, but later nodes still read ``x``, the value from before the call; eager
        PyTorch changed that very tensor. The masked layers compute out of place, so the converted model
        would silently skip the mutation (timm's NFNet: ``out.mul_(skipinit_gain)``, off by 50%).
        ``_functionalize_in_place_methods`` rewrites the calls it can prove safe before the walk; what
        reaches this check is an in-place call whose change another alias (a view) would have seen.
        """
        if node.op != "call_method" or not str(node.target).endswith("_") or not node.args:
            return
        src = node.args[0]
        if not isinstance(src, fx.Node):
            return
        order = {n: i for i, n in enumerate(node.graph.nodes)}
        later = [u.name for u in src.users if u is not node and order[u] > order[node]]
        later += node.meta.get("aliases_read_after", [])  # views or aliases of it, read afterwards
        if later:
            raise ValueError(
                f"layer_mask: node {node.name!r} ({what}) changes {src.name!r} in place, and "
                f"{', '.join(repr(n) for n in later)} read(s) it afterwards; the converted model computes "
                f"out of place and would miss the change. Write it out of place in the model "
                f"(x = x.{str(node.target)[:-1]}(...)) or register a rule for the module that does it.")

    def _mark_in_place_fills(self, output: fx.Node) -> None:
        """Let a conv fill its input in place, and an add write into one of its inputs, when nothing
        else can see that input.

        The input must be a fresh tensor made by a masked layer (not the model's input, not a view),
        read by that layer alone (fused BatchNorm/activation nodes are the conv's own value, so they
        are no extra readers) and not returned.
        """
        self._describe = {}
        returned = set(output.all_input_nodes)
        by_new = {}
        for old, new in self.env.items():
            if isinstance(new, fx.Node) and new in self.layers:
                by_new.setdefault(new, old.name)
        def owned(src) -> bool:
            producer = self.layers.get(src) if isinstance(src, fx.Node) else None
            return producer is not None and producer.fresh_output and len(src.users) == 1 and src not in returned

        for node, layer in self.layers.items():
            if isinstance(layer, mnn.MaskedBinary) and layer.kind == "add":
                a, b = node.args[0], node.args[1]
                layer.add_into = 0 if owned(a) and a is not b else 1 if owned(b) and b is not a else None
            if not isinstance(layer, mnn.MaskedConv2d) or not layer.can_fill_in_place:
                continue
            if owned(node.args[0]):
                layer.fill_in_place = True
                self._describe[by_new[node]] = layer.describe()
