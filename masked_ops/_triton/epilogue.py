"""Fused elementwise epilogues: the conv epilogue and the masked affine + activation.

References: masked_ops.backends.reference.conv_epilogue / masked_affine_act. One pass in the
tensor's own memory order (contiguous or channels_last); computed in float32 (float64 for
float64 inputs), removed positions *selected* to 0 so NaN/inf there never leak.
"""
import torch
import triton
import triton.language as tl

from masked_ops.activations import ACTIVATION_CODES

from .activations import activate
from .layout import dense, dense_format, identity

BLOCK = 1024


@triton.jit
def _coords(offs, C, HW, CHANNELS_LAST: tl.constexpr):
    """(channel, n * HW + pixel) of flat element offsets in memory order."""
    if CHANNELS_LAST:
        c = offs % C
        q = offs // C
    else:
        c = (offs // HW) % C
        q = (offs // (HW * C)) * HW + offs % HW
    return c, q


@triton.jit
def conv_epilogue_kernel(y_ptr, keep_ptr, scale_ptr, bias_ptr, out_ptr, total, C, HW,
                         HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                         CHANNELS_LAST: tl.constexpr, ACC64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < total
    c, q = _coords(offs, C, HW, CHANNELS_LAST)
    kept = tl.load(keep_ptr + q, mask=inb, other=0.0) > 0
    z = tl.load(y_ptr + offs, mask=inb & kept, other=0.0)
    z = z.to(tl.float64) if ACC64 else z.to(tl.float32)
    if HAS_SCALE:
        z = z * tl.load(scale_ptr + q, mask=inb & kept, other=0.0).to(z.dtype)
    if HAS_BIAS:
        z = z + tl.load(bias_ptr + c, mask=inb, other=0.0).to(z.dtype)
    z = activate(z, ACT)
    z = tl.where(kept, z, 0.0)
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def affine_act_kernel(x_ptr, mask_ptr, scale_ptr, shift_ptr, out_ptr, total, C, HW,
                      ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < total
    c, q = _coords(offs, C, HW, CHANNELS_LAST)
    visible = tl.load(mask_ptr + q, mask=inb, other=0.0) > 0
    z = tl.load(x_ptr + offs, mask=inb & visible, other=0.0)
    z = z.to(tl.float64) if ACC64 else z.to(tl.float32)
    a = tl.load(scale_ptr + c, mask=inb, other=0.0).to(z.dtype)
    b = tl.load(shift_ptr + c, mask=inb, other=0.0).to(z.dtype)
    z = activate(z * a + b, ACT)
    z = tl.where(visible, z, 0.0)
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=inb)


def conv_epilogue(y, keep, scale, bias, activation="none", wrap=identity, out=None):
    """out=y writes the result over a dense y (each element is read and written by one lane)."""
    y, fmt, cl = dense(y)
    n, c, h, w = y.shape
    keep = keep.to(y.dtype).contiguous()
    # Inputs rounded to y's dtype as in the reference; placeholders keep the signature fixed.
    scale_t = scale.to(y.dtype).contiguous() if scale is not None else keep
    bias_t = bias.to(y.dtype).contiguous() if bias is not None else keep
    out = torch.empty_like(y, memory_format=fmt) if out is None else out
    total = y.numel()
    wrap(conv_epilogue_kernel)[(triton.cdiv(total, BLOCK),)](
        y, keep, scale_t, bias_t, out, total, c, h * w,
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, ACT=ACTIVATION_CODES[activation],
        CHANNELS_LAST=cl, ACC64=y.dtype == torch.float64, BLOCK=BLOCK)
    return out


def conv_epilogue_(y, keep, scale, bias, activation="none", wrap=identity) -> None:
    """conv_epilogue written over y (reference: conv_epilogue_); a strided y goes through a dense copy."""
    if y.numel() == 0:
        return
    if y.is_contiguous(memory_format=dense_format(y)):
        conv_epilogue(y, keep, scale, bias, activation, wrap=wrap, out=y)
    else:
        y.copy_(conv_epilogue(y, keep, scale, bias, activation, wrap=wrap))


def masked_affine_act(x, mask, scale, shift, activation="none", wrap=identity):
    x, fmt, cl = dense(x)
    n, c, h, w = x.shape
    mask = mask.to(x.dtype).contiguous()
    scale = scale.to(x.dtype).contiguous()
    shift = shift.to(x.dtype).contiguous()
    out = torch.empty_like(x, memory_format=fmt)
    total = x.numel()
    wrap(affine_act_kernel)[(triton.cdiv(total, BLOCK),)](
        x, mask, scale, shift, out, total, c, h * w, ACT=ACTIVATION_CODES[activation],
        CHANNELS_LAST=cl, ACC64=x.dtype == torch.float64, BLOCK=BLOCK)
    return out
