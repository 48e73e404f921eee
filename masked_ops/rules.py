"""Layer rules of layer_mask: which masked layer handles which fx node (DESIGN.md section 2).

A rule is a function ``rule(node, ctx)`` called for an fx node that receives at least one
masked input. It returns one of:

- a :class:`masked_ops.nn.MaskedLayer` (optionally with ``layer.inputs``, the fx nodes or
  constants it reads; default ``[node.args[0]]``);
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
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import nn as mnn

PLAIN = object()


@dataclass(frozen=True)
class Padded:
    """Explicit constant padding (left, right, top, bottom) of ``source``; "same" = TF SAME."""

    source: object
    pads: Union[Tuple[int, int, int, int], str]
    value: float = 0.0


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


def activation_name(node, root) -> Optional[str]:
    """The fused-epilogue name of an activation node (None if it is not a plain activation)."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        if type(m) in ACT_MODULES:
            return ACT_MODULES[type(m)]
        if type(m) is nn.LeakyReLU and m.negative_slope == 0.01:
            return "leaky_relu"
        if type(m) is nn.GELU and m.approximate == "none":
            return "gelu"
        if type(m) is nn.Identity:
            return "none"
        return None
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


def activation_module_name(m: nn.Module) -> Optional[str]:
    """Activation name of an activation *module* (as held by timm's BatchNormAct2d)."""
    if type(m) in ACT_MODULES:
        return ACT_MODULES[type(m)]
    if type(m) is nn.Identity:
        return "none"
    if type(m) is nn.GELU and m.approximate == "none":
        return "gelu"
    if type(m) is nn.LeakyReLU and m.negative_slope == 0.01:
        return "leaky_relu"
    return None


def _activation_rule(node, ctx):
    name = activation_name(node, ctx.root)
    if name is None:  # e.g. GELU(approximate="tanh"): still per pixel
        target = ctx.module(node) if node.op == "call_module" else node.target
        return mnn.MaskedPointwise(target if callable(target) else None, str(node.target), layout=ctx.layout(node.args[0]))
    return mnn.MaskedActivation(name, layout=ctx.layout(node.args[0]))


for _t in list(ACT_MODULES) + [nn.LeakyReLU, nn.GELU]:
    register_rule(_t, _activation_rule)
for _f in list(ACT_FUNCTIONS) + [F.gelu, F.leaky_relu]:
    register_rule(_f, _activation_rule)
for _m in ACT_METHODS:
    register_rule(_m, _activation_rule)


# ----------------------------------------------------------------------------- conv, BN fusion
def _absorb_bn_act(node, ctx, conv: mnn.MaskedConv2d) -> mnn.MaskedConv2d:
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
                return conv
    user = ctx.sole_user(tail)
    if user is not None:
        act = activation_name(user, ctx.root)
        if act is not None:
            conv.activation = act
            ctx.absorb(user)
    return conv


def _conv_input(node, ctx, x_node):
    """(input node, prepad) of a conv: explicit padding before it becomes its prepad."""
    padded = ctx.padded(x_node)
    if padded is None:
        return x_node, None
    if padded.value != 0:
        _reject(node, f"reads a {padded.value}-padded input; only zero padding can precede a masked conv")
    return padded.source, padded.pads


def _conv_module_rule(node, ctx):
    conv = ctx.module(node)
    x, prepad = _conv_input(node, ctx, node.args[0])
    if ctx.layout(x) != "nchw":
        _reject(node, "applies a conv to a channels-last (permuted) tensor")
    if prepad is not None and isinstance(conv.padding, str):
        _reject(node, "combines explicit padding with padding='same'")
    layer = mnn.MaskedConv2d.from_conv(conv, ctx.mode, prepad=prepad, padding_visible=ctx.padding_visible)
    layer.inputs = [x]
    return _absorb_bn_act(node, ctx, layer)


def _conv_same_rule(node, ctx):
    """timm Conv2dSame / efficientnet_pytorch Conv2dDynamicSamePadding: TF SAME from the input size."""
    conv = ctx.module(node)
    layer = mnn.MaskedConv2d(conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups, ctx.mode,
                             prepad="same", padding_visible=ctx.padding_visible, source=type(conv).__name__)
    layer.inputs = [node.args[0]]
    return _absorb_bn_act(node, ctx, layer)


def _conv_function_rule(node, ctx):
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
    layer.inputs = [x]
    return _absorb_bn_act(node, ctx, layer)


register_rule(nn.Conv2d, _conv_module_rule)
register_rule(F.conv2d, _conv_function_rule)
register_rule(torch.conv2d, _conv_function_rule)


def _bn_rule(node, ctx):
    bn = ctx.eval_bn(node)
    act = None
    if bn is None:  # train mode
        module = ctx.module(node)
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


def _batch_norm_function_rule(node, ctx):
    training = _arg(node, 5, "training", False)
    if training:
        _reject(node, "calls F.batch_norm in training mode; use an nn.BatchNorm2d module")

    class _BN:  # the attributes ops.bn_affine reads
        running_mean = ctx.value(_arg(node, 1, "running_mean"))
        running_var = ctx.value(_arg(node, 2, "running_var"))
        weight = ctx.value(_arg(node, 3, "weight"))
        bias = ctx.value(_arg(node, 4, "bias"))
        eps = ctx.value(_arg(node, 7, "eps", 1e-5))
        num_features = running_mean.shape[0]

    return mnn.MaskedAffine(_BN(), "none")


register_rule(nn.BatchNorm2d, _bn_rule)
register_rule(F.batch_norm, _batch_norm_function_rule)


def _group_norm_rule(node, ctx):
    gn = ctx.module(node)
    return mnn.MaskedGroupNorm(gn.num_groups, gn.weight, gn.bias, gn.eps)


def _group_norm_function_rule(node, ctx):
    return mnn.MaskedGroupNorm(ctx.value(_arg(node, 1, "num_groups")), ctx.value(_arg(node, 2, "weight")),
                               ctx.value(_arg(node, 3, "bias")), ctx.value(_arg(node, 4, "eps", 1e-5)))


register_rule(nn.GroupNorm, _group_norm_rule)
register_rule(F.group_norm, _group_norm_function_rule)


def _channel_last_only(node, ctx, what):
    if ctx.layout(node.args[0]) != "nhwc":
        _reject(node, f"applies {what} to an N x C x H x W masked map: it would mix spatial positions "
                      f"(permute to channels-last first, as ConvNeXt does, or register a rule)")


def _layer_norm_rule(node, ctx):
    _channel_last_only(node, ctx, "LayerNorm over the last dim(s)")
    shape = ctx.module(node).normalized_shape if node.op == "call_module" else ctx.value(_arg(node, 1, "normalized_shape"))
    if len(tuple(shape)) != 1:
        _reject(node, "normalises over more than the channel dim")
    fn = ctx.module(node) if node.op == "call_module" else (
        lambda x, _a=node.args[1:], _k=dict(node.kwargs): F.layer_norm(x, *[ctx.value(a) for a in _a],
                                                                       **{k: ctx.value(v) for k, v in _k.items()}))
    return mnn.MaskedPointwise(fn, "layer_norm over channels", layout="nhwc")


def _linear_rule(node, ctx):
    _channel_last_only(node, ctx, "a Linear layer")
    if node.op == "call_module":
        return mnn.MaskedPointwise(ctx.module(node), "per-pixel Linear", layout="nhwc")
    w, b = ctx.value(_arg(node, 1, "weight")), ctx.value(_arg(node, 2, "bias"))
    return mnn.MaskedPointwise(lambda x: F.linear(x, w, b), "per-pixel F.linear", layout="nhwc")


register_rule(nn.LayerNorm, _layer_norm_rule)
register_rule(F.layer_norm, _layer_norm_rule)
register_rule(nn.Linear, _linear_rule)
register_rule(F.linear, _linear_rule)


# ----------------------------------------------------------------------------- pooling
def _maxpool_rule(node, ctx):
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
    layer = mnn.MaskedMaxPool2d(*args, prepad=prepad, pad_value=value)
    layer.inputs = [x]
    return layer


def _avgpool_rule(node, ctx):
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


def _adaptive_rule(node, ctx):
    size = ctx.module(node).output_size if node.op == "call_module" else ctx.value(_arg(node, 1, "output_size"))
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if None in size:
        _reject(node, "uses an adaptive pool with a None output size")
    return mnn.MaskedAdaptiveAvgPool2d(size, name=str(node.target))


register_rule(nn.MaxPool2d, _maxpool_rule)
register_rule(F.max_pool2d, _maxpool_rule)
register_rule(torch.max_pool2d, _maxpool_rule)
register_rule(nn.AvgPool2d, _avgpool_rule)
register_rule(F.avg_pool2d, _avgpool_rule)
register_rule(nn.AdaptiveAvgPool2d, _adaptive_rule)
register_rule(F.adaptive_avg_pool2d, _adaptive_rule)


def _mean_rule(node, ctx):
    dims = ctx.value(_arg(node, 1, "dim"))
    keepdim = bool(ctx.value(_arg(node, 2, "keepdim", False)))
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    layout = ctx.layout(node.args[0])
    spatial = {2, 3, -2, -1} if layout == "nchw" else {1, 2, -3, -2}
    norm = {d % 4 for d in dims}
    if not dims or not set(dims) <= spatial or len(norm) != 2:
        _reject(node, f"takes a mean over dims {dims} of a masked map; only the spatial mean (masked mean) is supported")
    return mnn.MaskedSpatialMean(keepdim, layout)


register_rule(torch.mean, _mean_rule)
register_rule("mean", _mean_rule)


# ----------------------------------------------------------------------------- shape ops
def _flatten_rule(node, ctx):
    if node.op == "call_module":
        m = ctx.module(node)
        start, end = m.start_dim, m.end_dim
    else:
        start, end = ctx.value(_arg(node, 1, "start_dim", 0)), ctx.value(_arg(node, 2, "end_dim", -1))
    if start != 1 or end not in (-1, 3) or ctx.layout(node.args[0]) != "nchw":
        _reject(node, "flattens a masked map other than N x (C*H*W) (a flatten head)")
    return mnn.FlattenHead(lambda x: torch.flatten(x, 1), "flatten(1)")


def _view_rule(node, ctx):
    shape = [ctx.value(a) if not hasattr(a, "op") else a for a in node.args[1:]]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = list(shape[0])
    if len(shape) == 2 and shape[1] == -1 and ctx.layout(node.args[0]) == "nchw":
        return mnn.FlattenHead(lambda x, *_: torch.flatten(x, 1), f"{node.target}(N, -1)")
    _reject(node, f"reshapes a masked map to {shape}; only the flatten head view(N, -1) is supported "
                  f"(spatial reshapes would move the mask)")


def _permute_rule(node, ctx):
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
    layer = mnn.Relayout(dims)
    layer.out_layout = out
    return layer


def _identity_rule(node, ctx):
    return mnn.Identity(str(node.target))


def _metadata_rule(node, ctx):
    return PLAIN


def _dropout_rule(node, ctx):
    if node.op == "call_module":
        m = ctx.module(node)
        p = getattr(m, "p", getattr(m, "drop_prob", 0.0))  # timm's DropPath calls it drop_prob
        if not m.training or p == 0:
            return mnn.Identity(type(m).__name__ + " (eval)")
        return mnn.MaskedPointwise(m, type(m).__name__ + " (train)", zero_preserving=True,
                                   layout=ctx.layout(node.args[0]))
    training = ctx.value(_arg(node, 2, "training", True))
    if not training:
        return mnn.Identity(f"{node.target} (eval)")
    p = ctx.value(_arg(node, 1, "p", 0.5))
    return mnn.MaskedPointwise(lambda x: F.dropout(x, p, True), "dropout (train)", zero_preserving=True,
                               layout=ctx.layout(node.args[0]))


register_rule(nn.Flatten, _flatten_rule)
register_rule(torch.flatten, _flatten_rule)
register_rule("flatten", _flatten_rule)
register_rule("view", _view_rule)
register_rule("reshape", _view_rule)
register_rule(torch.reshape, _view_rule)
register_rule(torch.permute, _permute_rule)
register_rule("permute", _permute_rule)
register_rule("contiguous", _identity_rule)
register_rule(nn.Identity, _identity_rule)
for _m in ("size", "dim"):
    register_rule(_m, _metadata_rule)
register_rule(getattr, _metadata_rule)
for _t in (nn.Dropout, nn.Dropout2d, nn.AlphaDropout):
    register_rule(_t, _dropout_rule)
register_rule(F.dropout, _dropout_rule)
register_rule(F.dropout2d, _dropout_rule)


def _pad_rule(node, ctx):
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


register_rule(nn.ZeroPad2d, _pad_rule)
register_rule(nn.ConstantPad2d, _pad_rule)
register_rule(F.pad, _pad_rule)


# ----------------------------------------------------------------------------- joins
_BINARY = {operator.add: ("+", "add"), operator.iadd: ("+=", "add"), torch.add: ("add", "add"),
           operator.sub: ("-", "sub"), operator.isub: ("-=", "sub"), torch.sub: ("sub", "sub"),
           operator.mul: ("*", "mul"), operator.imul: ("*=", "mul"), torch.mul: ("mul", "mul"),
           operator.truediv: ("/", "div"), torch.div: ("div", "div")}
_BINARY_FNS = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}
_BINARY_METHODS = {"add": "add", "add_": "add", "mul": "mul", "mul_": "mul", "sub": "sub", "sub_": "sub",
                   "div": "div", "div_": "div"}


def _binary_rule(node, ctx):
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
    fn = _BINARY_FNS[kind]  # out of place: inputs may still be read by other layers
    layer = mnn.MaskedBinary(fn, name, kind, layout=ctx.layout(a) or ctx.layout(b))
    user = ctx.sole_user(node)
    act = activation_name(user, ctx.root) if user is not None and kind in ("add", "sub") else None
    if act is not None:  # ResNet's relu(x + shortcut): one pass, in place
        layer.activation = act
        ctx.absorb(user)
    layer.inputs = [a, b]
    return layer


for _f in _BINARY:
    register_rule(_f, _binary_rule)
for _m in _BINARY_METHODS:
    register_rule(_m, _binary_rule)


def _cat_rule(node, ctx):
    tensors = list(node.args[0])
    dim = ctx.value(_arg(node, 1, "dim", 0))
    layouts = {ctx.layout(t) for t in tensors}
    if layouts != {"nchw"} or dim % 4 != 1:
        _reject(node, f"concatenates masked maps along dim {dim}; only the channel dim of NCHW maps is supported")
    layer = mnn.MaskedConcat(ctx.concat, 1, len(tensors))
    layer.inputs = tensors
    return layer


register_rule(torch.cat, _cat_rule)
register_rule(torch.concat, _cat_rule)


# ----------------------------------------------------------------------------- optional packages
def _stochastic_depth_rule(node, ctx):
    training = ctx.value(_arg(node, 3, "training", True))
    p = ctx.value(_arg(node, 1, "p"))
    if not training or p == 0:
        return mnn.Identity("stochastic_depth (eval)")
    mode = ctx.value(_arg(node, 2, "mode"))
    return mnn.MaskedPointwise(lambda x: node.target(x, p, mode, True), "stochastic_depth (train)",
                               zero_preserving=True, layout=ctx.layout(node.args[0]))


def _stochastic_depth_module_rule(node, ctx):
    m = ctx.module(node)
    if not m.training or m.p == 0:
        return mnn.Identity("StochasticDepth (eval)")
    return mnn.MaskedPointwise(m, "StochasticDepth (train)", zero_preserving=True, layout=ctx.layout(node.args[0]))


_optional_done: set = set()


def _optional(module_name: str, register: Callable) -> None:
    """Register rules for an optional package's types; skipped when it is missing or different."""
    import importlib
    import sys

    # Only packages the user already imported (their models are the only ones that can appear);
    # called again at every conversion, so a package imported later is picked up then.
    if module_name in _optional_done or module_name.split(".")[0] not in sys.modules:
        return
    _optional_done.add(module_name)
    try:
        mod = importlib.import_module(module_name)
    except Exception:  # not installed, or fails to import here: its modules cannot appear
        return
    try:
        register(mod)
    except AttributeError:  # a version without that class
        pass


def register_optional_rules() -> None:
    _optional("torchvision.ops.misc", lambda m: register_rule(m.FrozenBatchNorm2d, _bn_rule))
    # torchvision.ops re-exports the function under the submodule's name: import the module itself.
    _optional("torchvision.ops.stochastic_depth", lambda m: (
        register_rule(m.stochastic_depth, _stochastic_depth_rule),
        register_rule(m.StochasticDepth, _stochastic_depth_module_rule)))
    _optional("timm.layers.norm_act", lambda m: (register_rule(m.BatchNormAct2d, _bn_rule),
                                                  register_rule(m.FrozenBatchNormAct2d, _bn_rule)))
    _optional("timm.layers.conv2d_same", lambda m: register_rule(m.Conv2dSame, _conv_same_rule))
    _optional("timm.layers.drop", lambda m: register_rule(m.DropPath, _dropout_rule))
    _optional("efficientnet_lite_pytorch.utils",
              lambda m: register_rule(m.Conv2dDynamicSamePadding, _conv_same_rule))

