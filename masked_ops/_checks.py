"""Argument checks of the public ops, in one place.

Every error names the argument and what was expected, so that bad input fails here with a
ValueError/TypeError instead of deep inside a kernel or, worse, silently.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

IntPair = Union[int, Sequence[int]]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def is_compiling() -> bool:
    """True while torch.compile (dynamo) or torch.export traces: no data-dependent Python there."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


def pair(value: IntPair, name: str, *, minimum: int) -> Tuple[int, int]:
    """Normalise an int or a pair of ints; each must be >= minimum."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        out = (value, value)
    else:
        try:
            out = tuple(int(v) for v in value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(out) == 1:
            out = (out[0], out[0])
        if len(out) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def check_input(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape N x C x H x W, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float64, float16 or bfloat16), "
                        f"got {x.dtype}; convert integer images with x.float() / 255")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape N x C x H x W (4 dims), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)}); need N >= 1")
    if x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name} must have C, H, W >= 1, got shape {tuple(x.shape)}")


def check_mask(mask, x: torch.Tensor, name: str = "mask", *, check_values: bool = True,
               soft: bool = False) -> None:
    """mask: N x 1 x H x W on x's device; bool or floating 0/1, or (soft) floating in [0, 1]."""
    n, _, h, w = x.shape
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {(n, 1, h, w)}, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
        if soft:
            raise TypeError(f"{name} must be floating (values in [0, 1]) with soft=True, got {mask.dtype}; "
                            f"a soft mask is a degree of visibility, e.g. mask.float()")
        raise TypeError(f"{name} must be bool or floating (1 = visible, 0 = removed), got {mask.dtype}")
    if mask.dim() != 4:
        raise ValueError(f"{name} must have shape N x 1 x H x W = {(n, 1, h, w)} (4 dims), "
                         f"got shape {tuple(mask.shape)}")
    if tuple(mask.shape) != (n, 1, h, w):
        what = "batch size" if mask.shape[0] != n else "shape"
        raise ValueError(f"{name} has the wrong {what}: expected {(n, 1, h, w)} to match x of shape "
                         f"{tuple(x.shape)}, got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"{name} is on {mask.device} but x is on {x.device}; both must be on the same device")
    if not check_values or mask.dtype == torch.bool:
        return
    if soft:
        bad = ~((mask >= 0) & (mask <= 1))  # NaN fails both comparisons
        rule = f"{name} must hold values in [0, 1] (0 = removed, 1 = visible) and no NaN"
    else:
        bad = (mask != 0) & (mask != 1)
        rule = f"{name} must hold only 0 (removed) and 1 (visible)"
    if is_compiling():
        # Traced (torch.compile / export): a tensor assert raises at run time without a graph break.
        torch._assert_async(~bad.any(), rule)
    elif bool(bad.any()):
        example = mask.detach()[bad].flatten()[0].item()
        hint = "" if soft else ("; for a soft mask pass soft=True (layer_mask(..., soft=True)), or threshold it, "
                                "e.g. mask > 0.5")
        raise ValueError(f"{rule}; got other values (e.g. {example!r}){hint}")


def as_float_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The canonical internal mask: x's dtype, contiguous (differentiable for a soft mask)."""
    return mask.to(dtype=x.dtype).contiguous()


def restore_mask_dtype(mask_out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Output masks come back in the dtype of the mask the user passed (bool stays bool)."""
    if like.dtype == torch.bool:
        return mask_out > 0
    return mask_out.to(like.dtype)


def check_conv_args(x: torch.Tensor, weight, bias, stride, padding, dilation, groups, mode: str):
    from .modes import check_mode

    check_mode(mode)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor of shape C_out x C_in/groups x kH x kW, "
                        f"got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"weight must have shape C_out x C_in/groups x kH x kW (4 dims), "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; they must match")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    c = x.shape[1]
    c_out = weight.shape[0]
    if c % groups != 0:
        raise ValueError(f"groups={groups} must divide the input channels C={c}")
    if c_out % groups != 0:
        raise ValueError(f"groups={groups} must divide the output channels weight.shape[0]={c_out}")
    if weight.shape[1] * groups != c:
        raise ValueError(f"weight.shape[1] * groups must equal the input channels: expected weight of shape "
                         f"({c_out}, {c // groups}, kH, kW) for C={c}, groups={groups}, got {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor of shape ({c_out},) or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (c_out,):
            raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    stride = pair(stride, "stride", minimum=1)
    padding = pair(padding, "padding", minimum=0)
    dilation = pair(dilation, "dilation", minimum=1)
    kernel = (weight.shape[2], weight.shape[3])
    check_window_fits(x, kernel, padding, dilation, "weight")
    out_hw = [(size + 2 * p - d * (k - 1) - 1) // s + 1
              for size, p, d, k, s in zip(x.shape[2:], padding, dilation, kernel, stride)]
    check_output_size(x, (x.shape[0], c_out, *out_hw), f"masked_conv2d with padding={padding}")
    return kernel, stride, padding, dilation


def check_window_fits(x: torch.Tensor, kernel, padding, dilation, name: str) -> None:
    h, w = x.shape[2], x.shape[3]
    for dim, size, k, p, d in (("height", h, kernel[0], padding[0], dilation[0]),
                               ("width", w, kernel[1], padding[1], dilation[1])):
        extent = d * (k - 1) + 1
        if extent > size + 2 * p:
            raise ValueError(f"{name}: the kernel (extent {extent} in {dim}, kernel {k}, dilation {d}) is larger "
                             f"than the padded input ({size} + 2*{p} = {size + 2 * p}) in {dim}")


def check_pool_args(x: torch.Tensor, kernel_size, stride, padding, dilation):
    kernel = pair(kernel_size, "kernel_size", minimum=1)
    stride = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) \
        else pair(stride, "stride", minimum=1)
    padding = pair(padding, "padding", minimum=0)
    dilation = pair(dilation, "dilation", minimum=1)
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"padding must be at most half the kernel size, got padding={padding} "
                         f"for kernel_size={kernel}")
    check_window_fits(x, kernel, padding, dilation, "kernel_size")
    return kernel, stride, padding, dilation


def check_channel_vector(t, name: str, x: torch.Tensor) -> None:
    c = x.shape[1]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({c},), got {type(t).__name__}")
    if tuple(t.shape) != (c,):
        raise ValueError(f"{name} must have shape ({c},) to match x's {c} channels, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def check_iters(iters, x: torch.Tensor) -> int:
    """iters >= 0, capped where more rings change nothing (modes.saturated_rings)."""
    if isinstance(iters, bool) or not isinstance(iters, int):
        raise TypeError(f"iters must be an int >= 0, got {iters!r}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    from .modes import saturated_rings

    return saturated_rings(iters, x.shape[2], x.shape[3])


# An output this many times larger than the input it comes from is a mistyped argument, not a
# model: refuse it with a message instead of letting the allocation exhaust memory.
MAX_GROWTH = 64


def check_output_size(x: torch.Tensor, out_shape, what: str) -> None:
    """Refuse an output that would dwarf its input (e.g. padding=10**6): a clear error, not an OOM kill."""
    numel = 1
    for s in out_shape:
        numel *= int(s)
    if numel > MAX_GROWTH * max(x.numel(), 1) and numel * x.element_size() > 2 ** 30:
        raise ValueError(f"{what}: the output would have shape {tuple(int(s) for s in out_shape)} "
                         f"({numel * x.element_size() / 2 ** 30:.1f} GiB) from an input of shape {tuple(x.shape)}; "
                         f"check the padding/kernel arguments")
