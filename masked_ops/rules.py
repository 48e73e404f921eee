"""The rules of layer_mask: which masked layer each fx node lowers to (docs/design.md).

This module is the converter's rule table: every rule below is registered by the ``@rule(...)``
decorator above it, naming the module types, functions and method names it handles, so the
file reads as the table. ``RuleContext`` (what a rule may ask about the graph) sits beside them.

A rule is a function ``rule(node, ctx)`` called for an fx node that receives at least one
masked input. It returns what the node lowers to:

- a :class:`masked_ops.nn.MaskedLayer`, which reads ``node.args[0]``; or
  :class:`Lowered` ``(layer, inputs=..., layout=...)`` when it reads other values (fx nodes or
  constants) or changes the activations' layout;
- ``PLAIN``: run the node unchanged (metadata queries such as ``x.size()``);
- a :class:`Padded`: explicit zero padding, consumed by the conv/pool that reads it.

Rules are looked up by module type (for ``call_module`` nodes; a subclass that does not
override ``forward`` inherits its base's rule), by function (``call_function``) or by
method name (``call_method``). Register your own with :func:`register_rule`::

    import masked_ops as mo
    from masked_ops.nn import MaskedPointwise

    # A custom per-pixel module: apply it, keep the mask, zero the removed pixels.
    mo.register_rule(MyChannelMixer, lambda node, ctx: MaskedPointwise(ctx.module(node), "MyChannelMixer"))

A module type with a rule is a leaf of the trace (its forward is not traced into), so a
rule is also the way out when a module cannot be traced (data-dependent control flow).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import nn as mnn
from .ops import bn_affine

PLAIN = object()


@dataclass(frozen=True)
class Padded:
    """Explicit constant padding (left, right, top, bottom) of ``source``; "same" = TF SAME."""

    source: object
    pads: Union[Tuple[int, int, int, int], str]
    value: float = 0.0


@dataclass
class Lowered:
    """A node lowered to ``layer``, reading ``inputs`` (fx nodes or constants, in the order of the
    layer's forward); ``layout`` names the output's layout when the layer changes it."""

    layer: mnn.MaskedLayer
    inputs: Sequence = field(default_factory=list)
    layout: Optional[str] = None


Rule = Callable[..., object]
_module_rules: Dict[type, Rule] = {}
_function_rules: Dict[object, Rule] = {}
_method_rules: Dict[str, Rule] = {}


def register_rule(target, rule: Rule) -> Rule:
    """Register ``rule(node, ctx)`` for a module type, a function, or a method name (str).

    Later registrations win, so a user rule can replace a built-in one.
    """
    if isinstance(target, type) and issubclass(target, nn.Module):
        _module_rules[target] = rule
    elif isinstance(target, str):
        _method_rules[target] = rule
    elif callable(target):
        _function_rules[target] = rule
    else:
        raise TypeError(f"register_rule: target must be an nn.Module subclass, a function or a method name, "
                        f"got {target!r}")
    return rule


def rule(*targets):
    """Decorator: register the decorated function as the rule of every target."""
    def decorate(fn: Rule) -> Rule:
        for t in targets:
            register_rule(t, fn)
        return fn
    return decorate


def module_rule(module: nn.Module) -> Optional[Rule]:
    cls = type(module)
    for base in cls.__mro__:
        if base in _module_rules:
            if base is cls or cls.forward is base.forward:
                return _module_rules[base]
            return None  # a subclass with its own forward: trace into it
    return None


def node_rule(node, root) -> Optional[Rule]:
    if node.op == "call_module":
        return module_rule(root.get_submodule(node.target))
    if node.op == "call_function":
        return _function_rules.get(node.target)
    if node.op == "call_method":
        return _method_rules.get(node.target)
    return None


# ----------------------------------------------------------------------------- the context
class Sym:
    """What the converter knows about a value: masked (mask, layout), plain, or padded."""

    __slots__ = ("kind", "mask", "layout", "padded")

    def __init__(self, kind, mask=None, layout=None, padded=None):
        self.kind, self.mask, self.layout, self.padded = kind, mask, layout, padded


PLAIN_SYM = Sym("plain")


class RuleContext:
    """What a rule may ask about the graph being converted."""

    def __init__(self, root, mode, concat, fold_bn, padding_visible, training):
        self.root, self.mode, self.concat = root, mode, concat
        self.fold_bn, self.padding_visible, self.training = fold_bn, padding_visible, training
        self.syms: Dict[fx.Node, Sym] = {}
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

    def sym(self, arg) -> Sym:
        return self.syms.get(arg, PLAIN_SYM) if isinstance(arg, fx.Node) else PLAIN_SYM

    def is_masked(self, arg) -> bool:
        return self.sym(arg).kind == "masked"

    def layout(self, arg) -> Optional[str]:
        return self.sym(arg).layout

    def padded(self, arg) -> Optional[Padded]:
        return self.sym(arg).padded

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
        if module_rule(m) is not batch_norm or m.training or not getattr(m, "track_running_stats", True) \
                or getattr(m, "running_mean", None) is None:
            return None
        act = None
        if hasattr(m, "act"):  # timm BatchNormAct2d
            if not isinstance(getattr(m, "drop", nn.Identity()), nn.Identity):
                return None
            act = activation_module_name(m.act)
            if act is None:
                return None
        return m, act

    @staticmethod
    def bn_affine(bn):
        return bn_affine(bn)


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _reject(node, why):
    raise ValueError(f"layer_mask: node {node.name!r} ({node.format_node()}) {why}")


# ----------------------------------------------------------------------------- activations
ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
               nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu", F.relu6: "relu6",
                 F.silu: "silu", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", torch.sigmoid: "sigmoid",
                 F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh"}
ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh"}


def activation_module_name(m: nn.Module) -> Optional[str]:
    """The fused-epilogue name of an activation *module* (None if it has no fused form)."""
    if type(m) in ACT_MODULES:
        return ACT_MODULES[type(m)]
    if type(m) is nn.Identity:
        return "none"
    if type(m) is nn.GELU and m.approximate == "none":
        return "gelu"
    if type(m) is nn.LeakyReLU and m.negative_slope == 0.01:
        return "leaky_relu"
    return None


def activation_name(node, root) -> Optional[str]:
    """The fused-epilogue name of an activation node (None if it is not a plain activation)."""
    if node.op == "call_module":
        return activation_module_name(root.get_submodule(node.target))
    if node.op == "call_function":
        if node.target in ACT_FUNCTIONS:
            return ACT_FUNCTIONS[node.target]
        if node.target is F.gelu and node.kwargs.get("approximate", "none") == "none" and len(node.args) == 1:
            return "gelu"
        if node.target is F.leaky_relu and _arg(node, 1, "negative_slope", 0.01) == 0.01:
            return "leaky_relu"
    if node.op == "call_method" and node.target in ACT_METHODS:
        return ACT_METHODS[node.target]
    return None


@rule(*ACT_MODULES, nn.LeakyReLU, nn.GELU, *ACT_FUNCTIONS, F.gelu, F.leaky_relu, *ACT_METHODS)
def activation(node, ctx):
    name = activation_name(node, ctx.root)
    layout = ctx.layout(node.args[0])
    if name is None:  # e.g. GELU(approximate="tanh"): still per pixel
        if node.op == "call_module":
            return mnn.MaskedPointwise(ctx.module(node), str(node.target), layout=layout)
        extra_args, kwargs = tuple(ctx.value(a) for a in node.args[1:]), ctx.value(dict(node.kwargs))
        fn = node.target if node.op == "call_function" else getattr(torch.Tensor, node.target)
        return mnn.MaskedPointwise(mnn.Bound(fn, extra_args, kwargs), str(node.target), layout=layout)
    return mnn.MaskedActivation(name, layout=layout)


# ----------------------------------------------------------------------------- conv, BN fusion
def _absorb_bn_act(node, ctx, conv: mnn.MaskedConv2d, x) -> Lowered:
    """Fold a following eval BatchNorm and fuse a following activation into ``conv``."""
    tail = node
    if ctx.fold_bn and not ctx.training:
        user = ctx.sole_user(tail)
        bn = ctx.eval_bn(user) if user is not None else None
        if bn is not None:
            bn_module, act = bn
            conv.fold_bn(*ctx.bn_affine(bn_module))
            ctx.absorb(user)
            tail = user
            if act is not None:  # timm BatchNormAct2d carries its own activation
                conv.activation = act
                return Lowered(conv, [x])
    user = ctx.sole_user(tail)
    if user is not None:
        act = activation_name(user, ctx.root)
        if act is not None:
            conv.activation = act
            ctx.absorb(user)
    return Lowered(conv, [x])


def _conv_input(node, ctx, x_node):
    """(input node, prepad) of a conv: explicit padding before it becomes its prepad."""
    padded = ctx.padded(x_node)
    if padded is None:
        return x_node, None
    if padded.value != 0:
        _reject(node, f"reads a {padded.value}-padded input; only zero padding can precede a masked conv")
    return padded.source, padded.pads


@rule(nn.Conv2d)
def conv_module(node, ctx):
    conv = ctx.module(node)
    x, prepad = _conv_input(node, ctx, node.args[0])
    if ctx.layout(x) != "nchw":
        _reject(node, "applies a conv to a channels-last (permuted) tensor")
    if prepad is not None and isinstance(conv.padding, str):
        _reject(node, "combines explicit padding with padding='same'")
    layer = mnn.MaskedConv2d.from_conv(conv, ctx.mode, prepad=prepad, padding_visible=ctx.padding_visible)
    return _absorb_bn_act(node, ctx, layer, x)


def conv_same(node, ctx):
    """timm Conv2dSame / efficientnet_pytorch Conv2dDynamicSamePadding: TF SAME from the input size."""
    conv = ctx.module(node)
    layer = mnn.MaskedConv2d(conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups, ctx.mode,
                             prepad="same", padding_visible=ctx.padding_visible, source=type(conv).__name__)
    return _absorb_bn_act(node, ctx, layer, node.args[0])


def std_conv(node, ctx):
    """timm's weight-standardised convs (StdConv2d, ScaledStdConv2d and their Same variants: NF-Nets, BiT).

    The standardised weight depends on parameters only, so it is computed once here, with the module's
    own formula, and the conv is an ordinary masked conv (like a folded BatchNorm, it is a copy: later
    changes to the module's weights do not reach it).
    """
    conv = ctx.module(node)
    with torch.no_grad():
        gain = (conv.gain * conv.scale).view(-1) if hasattr(conv, "gain") else None
        w = F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None, weight=gain, training=True,
                         momentum=0.0, eps=conv.eps).reshape_as(conv.weight)
    same = bool(getattr(conv, "same_pad", False))
    layer = mnn.MaskedConv2d(nn.Parameter(w, requires_grad=False), conv.bias, conv.stride,
                             0 if same else conv.padding, conv.dilation, conv.groups, ctx.mode,
                             prepad="same" if same else None, padding_visible=ctx.padding_visible,
                             source=type(conv).__name__ + " (standardised weight)")
    return _absorb_bn_act(node, ctx, layer, node.args[0])


def blur_pool(node, ctx):
    """timm's BlurPool2d (reflect padding, then its fixed binomial filter, depthwise, strided): a masked
    conv on the reflect-padded map and mask (nn.MaskedReflectPadConv2d)."""
    m = ctx.module(node)
    if m.channels is None:
        _reject(node, "is a BlurPool2d built without its channel count (its filter is expanded at run time)")
    if m.pad_mode not in ("reflect", "constant", "zeros"):
        _reject(node, f"pads with mode {m.pad_mode!r}; reflect and zero padding are supported")
    if m.pad_mode == "reflect":
        layer = mnn.MaskedReflectPadConv2d(m.filt, None, m.stride, m.padding, m.channels, ctx.mode)
    else:
        layer = mnn.MaskedConv2d(m.filt, None, m.stride, 0, 1, m.channels, ctx.mode, prepad=tuple(m.padding),
                                 padding_visible=ctx.padding_visible, source="BlurPool2d")
    return _absorb_bn_act(node, ctx, layer, node.args[0])


def space_to_depth(node, ctx):
    """timm's SpaceToDepth (TResNet's stem): the module itself; an output pixel is visible where its whole
    block of input pixels is (nn.MaskedSpaceToDepth)."""
    if ctx.layout(node.args[0]) != "nchw":
        _reject(node, "rearranges a masked map that is not N x C x H x W")
    m = ctx.module(node)
    return mnn.MaskedSpaceToDepth(m, m.bs)


def conv_mlp(node, ctx):
    """timm's VGG head (ConvMlp): its size-dependent branch runs inside nn.MaskedConvMlp."""
    m = ctx.module(node)
    if ctx.layout(node.args[0]) != "nchw":
        _reject(node, "is a VGG head on a map that is not N x C x H x W")
    acts = []
    for act in (m.act1, m.act2):
        name = ACT_MODULES.get(type(act))
        if name is None:
            _reject(node, f"is a VGG head with activation {type(act).__name__}, which the fused convs lack")
        acts.append(name)
    if m.drop.training and m.drop.p > 0:
        _reject(node, "is a VGG head with dropout in training mode")
    for conv in (m.fc1, m.fc2):
        if type(conv) is not nn.Conv2d:
            _reject(node, f"is a VGG head with a {type(conv).__name__} (nn.Conv2d is supported)")
    fc1 = mnn.MaskedConv2d.from_conv(m.fc1, ctx.mode, activation=acts[0], padding_visible=ctx.padding_visible)
    fc2 = mnn.MaskedConv2d.from_conv(m.fc2, ctx.mode, activation=acts[1], padding_visible=ctx.padding_visible)
    return mnn.MaskedConvMlp(fc1, fc2, m.input_kernel_size)


def global_context(node, ctx):
    """timm's GlobalContext (GCNet): nn.MaskedGlobalContext pools over visible pixels only."""
    if ctx.layout(node.args[0]) != "nchw":
        _reject(node, "is a GlobalContext block on a map that is not N x C x H x W")
    return mnn.MaskedGlobalContext(ctx.module(node))


@rule(F.conv2d, torch.conv2d)
def conv_function(node, ctx):
    x, prepad = _conv_input(node, ctx, node.args[0])
    weight = ctx.value(_arg(node, 1, "weight"))
    bias = ctx.value(_arg(node, 2, "bias"))
    stride, padding = ctx.value(_arg(node, 3, "stride", 1)), ctx.value(_arg(node, 4, "padding", 0))
    dilation, groups = ctx.value(_arg(node, 5, "dilation", 1)), ctx.value(_arg(node, 6, "groups", 1))
    if isinstance(padding, str):
        if padding != "valid":
            _reject(node, "uses F.conv2d(padding='same'); use an nn.Conv2d or explicit padding")
        padding = 0
    layer = mnn.MaskedConv2d(weight, bias, stride, padding, dilation, groups, ctx.mode, prepad=prepad,
                             padding_visible=ctx.padding_visible, source="F.conv2d")
    return _absorb_bn_act(node, ctx, layer, x)


@rule(nn.BatchNorm2d)
def batch_norm(node, ctx):
    bn = ctx.eval_bn(node)
    module = ctx.module(node)
    if bn is None and not module.training and getattr(module, "track_running_stats", True) \
            and getattr(module, "running_mean", None) is not None:
        # An eval BatchNorm with an activation the fused kernels lack (timm's BatchNormAct2d with GELU):
        # still a per-pixel function, so the module itself runs and removed pixels are selected away.
        act = type(getattr(module, "act", None)).__name__
        return mnn.MaskedPointwise(module, f"{type(module).__name__} (eval, {act})", layout=ctx.layout(node.args[0]))
    if bn is None:  # train mode
        act = getattr(module, "act", None)
        act = activation_module_name(act) if act is not None else "none"
        if act is None:
            _reject(node, f"has an activation {type(module.act).__name__} that cannot be fused")
        return mnn.MaskedBatchNormTrain(module, act)
    module, act = bn
    if act is None:
        user = ctx.sole_user(node)
        act = activation_name(user, ctx.root) if user is not None else None
        if act is not None:
            ctx.absorb(user)
    return mnn.MaskedAffine(module, act or "none")


@dataclass
class _BatchNormConstants:
    """The attributes ops.bn_affine reads, from an F.batch_norm call's constant arguments."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float

    @property
    def num_features(self):
        return self.running_mean.shape[0]


@rule(F.batch_norm)
def batch_norm_function(node, ctx):
    if _arg(node, 5, "training", False):
        _reject(node, "calls F.batch_norm in training mode; use an nn.BatchNorm2d module")
    bn = _BatchNormConstants(*(ctx.value(_arg(node, i, n, d)) for i, n, d in
                               ((1, "running_mean", None), (2, "running_var", None), (3, "weight", None),
                                (4, "bias", None), (7, "eps", 1e-5))))
    return mnn.MaskedAffine(bn, "none")


@rule(nn.GroupNorm)
def group_norm(node, ctx):
    gn = ctx.module(node)
    return mnn.MaskedGroupNorm(gn.num_groups, gn.weight, gn.bias, gn.eps)


@rule(F.group_norm)
def group_norm_function(node, ctx):
    return mnn.MaskedGroupNorm(ctx.value(_arg(node, 1, "num_groups")), ctx.value(_arg(node, 2, "weight")),
                               ctx.value(_arg(node, 3, "bias")), ctx.value(_arg(node, 4, "eps", 1e-5)))


def _channel_last_only(node, ctx, what):
    if ctx.layout(node.args[0]) != "nhwc":
        _reject(node, f"applies {what} to an N x C x H x W masked map: it would mix spatial positions "
                      f"(permute to channels-last first, as ConvNeXt does, or register a rule)")


@rule(nn.LayerNorm, F.layer_norm)
def layer_norm(node, ctx):
    _channel_last_only(node, ctx, "LayerNorm over the last dim(s)")
    if node.op == "call_module":
        fn = ctx.module(node)
        shape = fn.normalized_shape
    else:
        args = [ctx.value(a) for a in node.args[1:]]
        kwargs = {k: ctx.value(v) for k, v in node.kwargs.items()}
        shape = ctx.value(_arg(node, 1, "normalized_shape"))
        fn = mnn.Bound(F.layer_norm, args, kwargs)
    if len(tuple(shape)) != 1:
        _reject(node, "normalises over more than the channel dim")
    return mnn.MaskedPointwise(fn, "layer_norm over channels", layout="nhwc")


@rule(nn.Linear, F.linear)
def linear(node, ctx):
    _channel_last_only(node, ctx, "a Linear layer")
    if node.op == "call_module":
        return mnn.MaskedPointwise(ctx.module(node), "per-pixel Linear", layout="nhwc")
    w, b = ctx.value(_arg(node, 1, "weight")), ctx.value(_arg(node, 2, "bias"))
    return mnn.MaskedPointwise(mnn.Bound(F.linear, (w, b)), "per-pixel F.linear", layout="nhwc")


# ----------------------------------------------------------------------------- pooling
@rule(nn.MaxPool2d, F.max_pool2d, torch.max_pool2d)
def max_pool(node, ctx):
    if node.op == "call_module":
        p = ctx.module(node)
        if p.return_indices:
            _reject(node, "uses MaxPool2d(return_indices=True)")
        args = (p.kernel_size, p.stride, p.padding, p.dilation, p.ceil_mode)
    else:
        if ctx.value(_arg(node, 6, "return_indices", False)):
            _reject(node, "uses max_pool2d(return_indices=True)")
        args = tuple(ctx.value(_arg(node, i, n, d)) for i, n, d in
                     ((1, "kernel_size", None), (2, "stride", None), (3, "padding", 0), (4, "dilation", 1),
                      (5, "ceil_mode", False)))
    padded = ctx.padded(node.args[0])
    x, prepad, value = (node.args[0], None, float("-inf")) if padded is None else \
        (padded.source, padded.pads, padded.value)
    return Lowered(mnn.MaskedMaxPool2d(*args, prepad=prepad, pad_value=value), [x])


@rule(nn.AvgPool2d, F.avg_pool2d)
def avg_pool(node, ctx):
    if ctx.padded(node.args[0]) is not None:
        _reject(node, "average-pools an explicitly padded input (not supported)")
    if node.op == "call_module":
        p = ctx.module(node)
        return mnn.MaskedAvgPool2d(p.kernel_size, p.stride, p.padding, p.ceil_mode, p.count_include_pad,
                                   p.divisor_override)
    vals = [ctx.value(_arg(node, i, n, d)) for i, n, d in
            ((1, "kernel_size", None), (2, "stride", None), (3, "padding", 0), (4, "ceil_mode", False),
             (5, "count_include_pad", True), (6, "divisor_override", None))]
    return mnn.MaskedAvgPool2d(*vals)


@rule(nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d)
def adaptive_avg_pool(node, ctx):
    size = ctx.module(node).output_size if node.op == "call_module" else ctx.value(_arg(node, 1, "output_size"))
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if None in size:
        _reject(node, "uses an adaptive pool with a None output size")
    return mnn.MaskedAdaptiveAvgPool2d(size, name=str(node.target))


@rule(torch.mean, "mean")
def spatial_mean(node, ctx):
    dims = ctx.value(_arg(node, 1, "dim"))
    keepdim = bool(ctx.value(_arg(node, 2, "keepdim", False)))
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    layout = ctx.layout(node.args[0])
    spatial = {2, 3, -2, -1} if layout == "nchw" else {1, 2, -3, -2}
    norm = {d % 4 for d in dims}
    if not dims or not set(dims) <= spatial or len(norm) != 2:
        _reject(node, f"takes a mean over dims {dims} of a masked map; only the spatial mean (masked mean) is supported")
    return mnn.MaskedSpatialMean(keepdim, layout)


# ----------------------------------------------------------------------------- shape ops
@rule(nn.Flatten, torch.flatten, "flatten")
def flatten(node, ctx):
    if node.op == "call_module":
        m = ctx.module(node)
        start, end = m.start_dim, m.end_dim
    else:
        start, end = ctx.value(_arg(node, 1, "start_dim", 0)), ctx.value(_arg(node, 2, "end_dim", -1))
    if start != 1 or end not in (-1, 3) or ctx.layout(node.args[0]) != "nchw":
        _reject(node, "flattens a masked map other than N x (C*H*W) (a flatten head)")
    return mnn.FlattenHead("flatten(1)")


def _spatial_size(arg, ctx, mask, dim: int) -> bool:
    """Whether ``arg`` is, by construction, size ``dim`` (2: H, 3: W) of a masked NCHW map with ``mask``:
    ``t.size()[dim]``, ``t.size(dim)`` or ``t.shape[dim]`` (sizes computed at run time, read as shape
    arithmetic rather than constants)."""
    if not isinstance(arg, fx.Node):
        return False
    t, index = None, None
    if arg.op == "call_function" and arg.target is operator.getitem and isinstance(arg.args[0], fx.Node):
        src, index = arg.args[0], arg.args[1]
        if src.op == "call_method" and src.target == "size" and len(src.args) == 1:
            t = src.args[0]
        elif src.op == "call_function" and src.target is getattr and src.args[1] == "shape":
            t = src.args[0]
    elif arg.op == "call_method" and arg.target == "size" and len(arg.args) == 2:
        t, index = arg.args[0], arg.args[1]
    if not isinstance(t, fx.Node) or not isinstance(index, int) or not ctx.is_masked(t):
        return False
    s = ctx.sym(t)
    return s.mask is mask and s.layout == "nchw" and index % 4 == dim


def _channel_groups(node, ctx, shape):
    """The ChannelGroups layer for a reshape that only splits or merges channels, else None."""
    src = ctx.sym(node.args[0])
    if len(shape) == 5 and src.layout == "nchw" and _spatial_size(shape[3], ctx, src.mask, 2) \
            and _spatial_size(shape[4], ctx, src.mask, 3):
        constant = [(i, v) for i, v in ((1, shape[1]), (2, shape[2])) if isinstance(v, int) and v > 0]
        if constant:
            position, groups = constant[0]
            return Lowered(mnn.ChannelGroups("split", groups, position), [node.args[0]], layout="ngchw")
    if len(shape) == 4 and src.layout == "ngchw":
        h_ok = _spatial_size(shape[2], ctx, src.mask, 2)
        w_ok = _spatial_size(shape[3], ctx, src.mask, 3)
        if h_ok and w_ok:
            return Lowered(mnn.ChannelGroups("merge"), [node.args[0]], layout="nchw")
    return None


@rule("view", "reshape", torch.reshape)
def view(node, ctx):
    args = list(node.args[1:]) or [node.kwargs.get("shape")]
    if len(args) == 1 and isinstance(args[0], (tuple, list)):  # x.reshape((B, G, C, H, W))
        args = list(args[0])
    shape = [ctx.value(a) if not hasattr(a, "op") else a for a in args]
    if len(shape) == 2 and shape[1] == -1 and ctx.layout(node.args[0]) == "nchw":
        return mnn.FlattenHead(f"{node.target}(N, -1)")
    grouped = _channel_groups(node, ctx, shape)
    if grouped is not None:
        return grouped
    _reject(node, f"reshapes a masked map to {shape}; only the flatten head view(N, -1) and channel groups "
                  f"(N, G, C/G, H, W) with H and W read from the map itself are supported (spatial reshapes "
                  f"would move the mask)")


@rule("transpose", torch.transpose)
def transpose(node, ctx):
    dims = sorted(d % 5 for d in (ctx.value(_arg(node, 1, "dim0")), ctx.value(_arg(node, 2, "dim1"))))
    if ctx.layout(node.args[0]) == "ngchw" and dims == [1, 2]:
        return Lowered(mnn.ChannelGroups("swap"), [node.args[0]], layout="ngchw")
    _reject(node, f"transposes dims {dims} of a {ctx.layout(node.args[0])} masked map; only the two channel "
                  f"group dims of a channel shuffle (N, G, C/G, H, W) are supported")


@rule(torch.permute, "permute")
def permute(node, ctx):
    dims = [ctx.value(a) for a in node.args[1:]]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = list(dims[0])
    if not dims:
        dims = list(ctx.value(node.kwargs.get("dims")))
    dims = tuple(d % 4 for d in dims)
    layout = ctx.layout(node.args[0])
    if layout == "nchw" and dims == (0, 2, 3, 1):
        out = "nhwc"
    elif layout == "nhwc" and dims == (0, 3, 1, 2):
        out = "nchw"
    else:
        _reject(node, f"permutes a {layout} masked map with dims {dims}; only NCHW <-> NHWC is supported")
    return Lowered(mnn.Relayout(dims), [node.args[0]], layout=out)


@rule("contiguous", nn.Identity)
def identity(node, ctx):
    return mnn.Identity(str(node.target))


@rule("size", "dim", getattr)
def metadata(node, ctx):
    return PLAIN


@rule("expand_as")
def expand_as(node, ctx):
    """gate.expand_as(x): a per-channel gate (SE, ECA) broadcast to a masked map's shape reads only its
    size, so the result is plain; the product with the map is a masked multiply."""
    if ctx.is_masked(node.args[0]):
        _reject(node, "expands a masked map")
    return PLAIN


@rule(nn.Dropout, nn.Dropout2d, nn.AlphaDropout, F.dropout, F.dropout2d)
def dropout(node, ctx):
    layout = ctx.layout(node.args[0])
    if node.op == "call_module":
        m = ctx.module(node)
        p = getattr(m, "p", getattr(m, "drop_prob", 0.0))  # timm's DropPath calls it drop_prob
        if not m.training or p == 0:
            return mnn.Identity(type(m).__name__ + " (eval)")
        return mnn.MaskedPointwise(m, type(m).__name__ + " (train)", zero_preserving=True, layout=layout)
    if not ctx.value(_arg(node, 2, "training", True)):
        return mnn.Identity(f"{node.target} (eval)")
    p, fn = ctx.value(_arg(node, 1, "p", 0.5)), node.target
    return mnn.MaskedPointwise(mnn.Bound(fn, (p, True)), f"{getattr(fn, '__name__', fn)} (train)",
                               zero_preserving=True, layout=layout)


@rule(nn.ZeroPad2d, nn.ConstantPad2d, F.pad)
def pad(node, ctx):
    if node.op == "call_module":
        m = ctx.module(node)
        pads, value = tuple(m.padding), float(getattr(m, "value", 0.0))
    else:
        pads = tuple(ctx.value(_arg(node, 1, "pad")))
        if ctx.value(_arg(node, 2, "mode", "constant")) != "constant":
            _reject(node, "pads with a non-constant mode (reflect/replicate would copy removed pixels)")
        value = ctx.value(_arg(node, 3, "value", 0.0))
        value = 0.0 if value is None else float(value)
    if len(pads) != 4:
        _reject(node, f"pads {len(pads) // 2} dims; only the two spatial dims (left, right, top, bottom) are supported")
    return Padded(node.args[0], pads, value)


# ----------------------------------------------------------------------------- resampling
@rule(nn.Upsample, F.interpolate, F.upsample, F.upsample_nearest)
def upsample(node, ctx):
    """Nearest and bilinear upsampling by integer factors (given as scale_factor): exact, see
    MaskedUpsampleNearest and MaskedUpsampleBilinear. Other modes (bicubic, area, ...) are refused until
    they have a rule."""
    if node.op == "call_module":
        m = ctx.module(node)
        size, scale, mode, align = m.size, m.scale_factor, m.mode, m.align_corners
    else:
        size = ctx.value(_arg(node, 1, "size"))
        scale = ctx.value(_arg(node, 2, "scale_factor"))
        mode = "nearest" if node.target is F.upsample_nearest else ctx.value(_arg(node, 3, "mode", "nearest"))
        align = ctx.value(_arg(node, 4, "align_corners"))
    if ctx.layout(node.args[0]) != "nchw":
        _reject(node, "resamples a channels-last (permuted) masked map")
    if mode not in ("nearest", "bilinear"):
        _reject(node, f"upsamples with mode={mode!r}; only 'nearest' and 'bilinear' (by integer factors) are "
                      f"supported so far")
    if scale is None:
        _reject(node, f"upsamples to a size ({size}); give scale_factor (integers) instead, so that the mask "
                      f"path does not depend on the input size")
    scale = tuple(scale) if isinstance(scale, (tuple, list)) else (scale, scale)
    if len(scale) != 2 or any(float(s) != int(s) or int(s) < 1 for s in scale):
        _reject(node, f"upsamples by {scale}; only integer factors >= 1 are supported")
    if mode == "bilinear":
        return mnn.MaskedUpsampleBilinear(scale, bool(align))
    return mnn.MaskedUpsampleNearest(scale)


def _rearrange_factor(node, ctx, attribute: str, keyword: str) -> int:
    """The factor of a pixel (un)shuffle, from the module or the call; refused off N x C x H x W maps."""
    if ctx.layout(node.args[0]) != "nchw":
        _reject(node, "rearranges a masked map that is not N x C x H x W")
    if node.op == "call_module":
        return int(getattr(ctx.module(node), attribute))
    return int(ctx.value(_arg(node, 1, keyword)))


@rule(nn.PixelShuffle, F.pixel_shuffle)
def pixel_shuffle(node, ctx):
    """Depth-to-space: an output pixel copies one channel of one input pixel (nn.MaskedPixelShuffle)."""
    return mnn.MaskedPixelShuffle(_rearrange_factor(node, ctx, "upscale_factor", "upscale_factor"))


@rule(nn.PixelUnshuffle, F.pixel_unshuffle)
def pixel_unshuffle(node, ctx):
    """Space-to-depth: an output pixel stacks an r x r block, visible where all of it is (as SpaceToDepth)."""
    factor = _rearrange_factor(node, ctx, "downscale_factor", "downscale_factor")
    return mnn.MaskedSpaceToDepth(mnn.Bound(F.pixel_unshuffle, (factor,)), factor)


@rule(nn.ChannelShuffle, F.channel_shuffle)
def channel_shuffle(node, ctx):
    """A permutation of channels (nn.ChannelShuffle): per pixel, the mask is unchanged."""
    if ctx.layout(node.args[0]) != "nchw":
        _reject(node, "shuffles the channels of a masked map that is not N x C x H x W")
    fn = ctx.module(node) if node.op == "call_module" else \
        mnn.Bound(F.channel_shuffle, (ctx.value(_arg(node, 1, "groups")),))
    return mnn.MaskedPointwise(fn, "channel shuffle", zero_preserving=True)


# ----------------------------------------------------------------------------- channel selections
# Splitting, chunking, narrowing or slicing a masked map along its channels keeps every pixel where it
# is: each piece carries the input's mask unchanged, and removed pixels stay 0 (no re-zeroing needed).
# Any other dimension would cut the mask apart and is refused. (Res2Net, CSPNet, SKNet, GhostNet, DPN...)
_SPLITS = {torch.split: "split", torch.chunk: "chunk", torch.tensor_split: "tensor_split",
           "split": "split", "chunk": "chunk", "tensor_split": "tensor_split"}


def _channel_dim(node, ctx, dim, what) -> None:
    layout = ctx.layout(node.args[0])
    channels = {"nchw": 1, "nhwc": 3}.get(layout)
    if channels is None or not isinstance(dim, int) or dim % 4 != channels:
        _reject(node, f"{what} a {layout} masked map along dim {dim}; only its channel dim ({channels}) is "
                      f"supported (any other would cut the mask apart)")


def _selection(fn, args, kwargs, name, layout) -> mnn.MaskedPointwise:
    return mnn.MaskedPointwise(mnn.Bound(fn, args, kwargs), name, zero_preserving=True, layout=layout)


@rule(*_SPLITS)
def channel_split(node, ctx):
    """torch.split / chunk / tensor_split along channels: a tuple of pieces, each with the input's mask."""
    name = _SPLITS[node.target]
    args = [ctx.value(a) for a in node.args[1:]]
    kwargs = {k: ctx.value(v) for k, v in node.kwargs.items()}
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    _channel_dim(node, ctx, dim, f"{name}s")
    return _selection(getattr(torch, name), args, kwargs, f"{name} of channels", ctx.layout(node.args[0]))


@rule(torch.narrow, "narrow")
def channel_narrow(node, ctx):
    args = [ctx.value(a) for a in node.args[1:]]
    kwargs = {k: ctx.value(v) for k, v in node.kwargs.items()}
    _channel_dim(node, ctx, kwargs.get("dim", args[0] if args else None), "narrows")
    return _selection(torch.narrow, args, kwargs, "narrow of channels", ctx.layout(node.args[0]))


@rule(operator.getitem)
def getitem(node, ctx):
    """A piece of a channel split (``pieces[i]``), or a channel slice of a map (``x[:, a:b]``)."""
    src, index = node.args
    index = ctx.value(index)
    layout = ctx.layout(src)
    if isinstance(src, fx.Node) and src.op in ("call_function", "call_method") and src.target in _SPLITS:
        if not isinstance(index, int):
            _reject(node, f"indexes a channel split with {index!r}; only single pieces (an int) are supported")
        return _selection(operator.getitem, (index,), {}, f"piece {index} of a channel split", layout)
    channels = {"nchw": 1, "nhwc": 3}.get(layout)
    items = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in items:  # x[..., a:b] (NHWC channels) or x[:, a:b, ...]
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (4 - len(items) + 1) + items[at + 1:]
    items += [slice(None)] * (4 - len(items))
    full = slice(None)
    ok = channels is not None and len(items) == 4 and all(
        it == full for d, it in enumerate(items) if d != channels) and isinstance(items[channels], slice)
    if not ok:
        _reject(node, f"indexes a masked map with {index!r}; only a slice of its channels is supported "
                      f"(x[:, a:b] in NCHW, x[..., a:b] in NHWC)")
    return _selection(operator.getitem, (index,), {}, f"channels {items[channels]}", layout)


# ----------------------------------------------------------------------------- joins
_BINARY = {operator.add: ("+", "add"), operator.iadd: ("+=", "add"), torch.add: ("add", "add"),
           operator.sub: ("-", "sub"), operator.isub: ("-=", "sub"), torch.sub: ("sub", "sub"),
           operator.mul: ("*", "mul"), operator.imul: ("*=", "mul"), torch.mul: ("mul", "mul"),
           operator.truediv: ("/", "div"), torch.div: ("div", "div")}
_BINARY_METHODS = {"add": "add", "add_": "add", "mul": "mul", "mul_": "mul", "sub": "sub", "sub_": "sub",
                   "div": "div", "div_": "div"}


@rule(*_BINARY, *_BINARY_METHODS)
def binary(node, ctx):
    if node.op == "call_method":
        kind, name = _BINARY_METHODS[node.target], f".{node.target}()"
    else:
        name, kind = _BINARY[node.target]
    if len(node.args) != 2 or node.kwargs:
        _reject(node, "is a binary op with extra arguments (alpha=, out=)")
    a, b = node.args
    if ctx.layout(a) is not None and ctx.layout(b) is not None and ctx.layout(a) != ctx.layout(b):
        _reject(node, "combines an NCHW and an NHWC masked map")
    if kind == "div" and ctx.is_masked(b):
        _reject(node, "divides by a masked map")
    layer = mnn.MaskedBinary(kind, name, layout=ctx.layout(a) or ctx.layout(b))
    user = ctx.sole_user(node)
    act = activation_name(user, ctx.root) if user is not None and kind in ("add", "sub") else None
    if act is not None:  # ResNet's relu(x + shortcut): one pass, in place
        layer.activation = act
        ctx.absorb(user)
    return Lowered(layer, [a, b])


@rule(torch.cat, torch.concat)
def cat(node, ctx):
    tensors = list(node.args[0])
    dim = ctx.value(_arg(node, 1, "dim", 0))
    layouts = {ctx.layout(t) for t in tensors}
    if layouts != {"nchw"} or dim % 4 != 1:
        _reject(node, f"concatenates masked maps along dim {dim}; only the channel dim of NCHW maps is supported")
    return Lowered(mnn.MaskedConcat(ctx.concat, len(tensors)), tensors)


@rule(torch.stack)
def stack(node, ctx):
    tensors = list(node.args[0])
    dim = ctx.value(_arg(node, 1, "dim", 0))
    if {ctx.layout(t) for t in tensors} != {"nchw"} or dim % 5 != 1:
        _reject(node, f"stacks masked maps along dim {dim}; only N x C x H x W maps along dim 1 are supported")
    return Lowered(mnn.MaskedStack(len(tensors)), tensors, layout="ngchw")


@rule(torch.sum, "sum")
def group_sum(node, ctx):
    dims = ctx.value(_arg(node, 1, "dim"))
    keepdim = bool(ctx.value(_arg(node, 2, "keepdim", False)))
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    if ctx.layout(node.args[0]) == "ngchw" and len(dims) == 1 and dims[0] % 5 == 1:
        return Lowered(mnn.GroupSum(keepdim), [node.args[0]], layout="ngchw" if keepdim else "nchw")
    if ctx.layout(node.args[0]) == "nchw" and len(dims) == 1 and dims[0] % 4 == 1 and keepdim:
        return Lowered(mnn.GroupSum(True), [node.args[0]], layout="nchw")  # a per-pixel sum of channels
    _reject(node, f"sums a {ctx.layout(node.args[0])} masked map over dims {dims}; only the sum over the branch "
                  f"dim of a stack (N x P x C x H x W) and of channels with keepdim=True are supported (a spatial "
                  f"sum would count removed pixels)")


# ----------------------------------------------------------------------------- optional packages
def stochastic_depth(node, ctx):
    layout = ctx.layout(node.args[0])
    if node.op == "call_module":
        m = ctx.module(node)
        if not m.training or m.p == 0:
            return mnn.Identity("StochasticDepth (eval)")
        return mnn.MaskedPointwise(m, "StochasticDepth (train)", zero_preserving=True, layout=layout)
    training = ctx.value(_arg(node, 3, "training", True))
    p = ctx.value(_arg(node, 1, "p"))
    if not training or p == 0:
        return mnn.Identity("stochastic_depth (eval)")
    mode, fn = ctx.value(_arg(node, 2, "mode")), node.target
    return mnn.MaskedPointwise(mnn.Bound(fn, (p, mode, True)), "stochastic_depth (train)",
                               zero_preserving=True, layout=layout)


def global_response_norm(node, ctx):
    """ConvNeXt-V2's GRN: x + bias + weight * x * N(x), N from the L2 norm of each channel over space.

    A sum of squares over space is the same whether removed pixels are left out or counted as the 0 they
    hold, so the module itself computes the statistic over visible pixels only; what it adds at removed
    pixels (the bias) is selected away. Exact for hard and soft masks (pixels with m > 0 as they are)."""
    m = ctx.module(node)
    expected = (1, 2) if ctx.layout(node.args[0]) == "nhwc" else (2, 3)
    if tuple(m.spatial_dim) != expected:
        _reject(node, f"normalises over dims {m.spatial_dim} of a {ctx.layout(node.args[0])} masked map")
    return mnn.MaskedPointwise(m, "GlobalResponseNorm (L2 over visible pixels)", layout=ctx.layout(node.args[0]))


# (module, attribute, rule): types of optional packages, registered once the user has imported
# the package (their models are the only ones that can contain them).
OPTIONAL_RULES = (
    ("torchvision.ops.misc", "FrozenBatchNorm2d", batch_norm),
    # torchvision.ops re-exports the function under the submodule's name: import the module itself.
    ("torchvision.ops.stochastic_depth", "stochastic_depth", stochastic_depth),
    ("torchvision.ops.stochastic_depth", "StochasticDepth", stochastic_depth),
    ("timm.layers.norm_act", "BatchNormAct2d", batch_norm),
    ("timm.layers.norm_act", "FrozenBatchNormAct2d", batch_norm),
    ("timm.layers.conv2d_same", "Conv2dSame", conv_same),
    ("timm.layers.grn", "GlobalResponseNorm", global_response_norm),
    ("timm.layers.std_conv", "StdConv2d", std_conv),
    ("timm.layers.std_conv", "StdConv2dSame", std_conv),
    ("timm.layers.std_conv", "ScaledStdConv2d", std_conv),
    ("timm.layers.std_conv", "ScaledStdConv2dSame", std_conv),
    ("timm.layers.drop", "DropPath", dropout),
    ("timm.layers.blur_pool", "BlurPool2d", blur_pool),
    ("timm.layers.space_to_depth", "SpaceToDepth", space_to_depth),
    ("timm.models.vgg", "ConvMlp", conv_mlp),
    ("timm.layers.global_context", "GlobalContext", global_context),
    ("efficientnet_lite_pytorch.utils", "Conv2dDynamicSamePadding", conv_same),
)
_optional_done: set = set()


def register_optional_rules() -> None:
    """Register OPTIONAL_RULES for the packages imported so far (called at every conversion)."""
    import importlib
    import sys

    for module_name, attr, fn in OPTIONAL_RULES:
        key = (module_name, attr)
        if key in _optional_done or module_name.split(".")[0] not in sys.modules:
            continue
        _optional_done.add(key)
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except Exception:  # not installed, fails to import here, or a version without that name
            continue
        register_rule(target, fn)
