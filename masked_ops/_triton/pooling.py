"""Masked max and average pooling in Triton (references: masked_ops.backends.reference).

One program per block of output elements in memory order; the lanes of channel 0 also write
the output mask, so the mask path needs no separate pass.
- max: removed pixels count as 0 (the paper's rule), padding as -inf; also returns ATen-style
  indices (flat h * W + w of the first maximum, NaN wins) for ATen's max_pool2d backward;
- avg: ATen's window and divisor rules; mask_out = 1 where the window holds a visible pixel.
"""
import torch
import triton
import triton.language as tl

from .layout import dense, identity

BLOCK = 256


def pooled_size(size, k, s, p, d, ceil_mode):
    """ATen's pooling output size."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


@triton.jit
def _out_coords(offs, C, Ho, Wo, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        c = offs % C
        q = offs // C
    else:
        c = (offs // (Ho * Wo)) % C
        q = (offs // (Ho * Wo * C)) * (Ho * Wo) + offs % (Ho * Wo)
    n = q // (Ho * Wo)
    p = q % (Ho * Wo)
    return n, c, q, p // Wo, p % Wo


@triton.jit
def max_pool_kernel(x_ptr, mask_ptr, y_ptr, mout_ptr, idx_ptr, total, C, H, W, Ho, Wo,
                    s_n, s_c, s_h, s_w, SH, SW, PH, PW, DH, DW,
                    KH: tl.constexpr, KW: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC64: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < total
    n, c, q, ho, wo = _out_coords(offs, C, Ho, Wo, CHANNELS_LAST)
    base = n * s_n + c * s_c
    if ACC64:
        best = tl.full((BLOCK,), float("-inf"), tl.float64)
    else:
        best = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_idx = tl.full((BLOCK,), -1, tl.int64)
    any_vis = tl.zeros((BLOCK,), tl.int1)
    for i in tl.static_range(KH):
        h = ho * SH - PH + i * DH
        for j in tl.static_range(KW):
            w = wo * SW - PW + j * DW
            ok = inb & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            vis = ok & (tl.load(mask_ptr + n * H * W + h * W + w, mask=ok, other=0.0) > 0)
            v = tl.load(x_ptr + base + h * s_h + w * s_w, mask=vis, other=0.0).to(best.dtype)
            v = tl.where(vis, v, 0.0)
            take = ok & ((v > best) | (v != v) | (best_idx < 0))
            best = tl.where(take, v, best)
            best_idx = tl.where(take, h * W + w, best_idx)
            any_vis = any_vis | vis
    # As ATen: ties go to the first maximum, a NaN always takes over (so the last NaN wins), and
    # the index starts at the first in-image position of the window.
    tl.store(y_ptr + offs, tl.where(any_vis, best, 0.0).to(y_ptr.dtype.element_ty), mask=inb)
    tl.store(idx_ptr + offs, best_idx, mask=inb)
    tl.store(mout_ptr + q, tl.where(any_vis, 1.0, 0.0).to(mout_ptr.dtype.element_ty), mask=inb & (c == 0))


@triton.jit
def avg_pool_kernel(x_ptr, mask_ptr, y_ptr, mout_ptr, total, C, H, W, Ho, Wo,
                    s_n, s_c, s_h, s_w, SH, SW, PH, PW,
                    KH: tl.constexpr, KW: tl.constexpr, COUNT_PAD: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, ACC64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < total
    n, c, q, ho, wo = _out_coords(offs, C, Ho, Wo, CHANNELS_LAST)
    base = n * s_n + c * s_c
    if ACC64:
        acc = tl.zeros((BLOCK,), tl.float64)
    else:
        acc = tl.zeros((BLOCK,), tl.float32)
    any_vis = tl.zeros((BLOCK,), tl.int1)
    hstart = ho * SH - PH
    wstart = wo * SW - PW
    for i in tl.static_range(KH):
        h = hstart + i
        for j in tl.static_range(KW):
            w = wstart + j
            ok = inb & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            vis = ok & (tl.load(mask_ptr + n * H * W + h * W + w, mask=ok, other=0.0) > 0)
            v = tl.load(x_ptr + base + h * s_h + w * s_w, mask=vis, other=0.0)
            acc += tl.where(vis, v.to(acc.dtype), 0.0)
            any_vis = any_vis | vis
    hend = tl.minimum(hstart + KH, H + PH)
    wend = tl.minimum(wstart + KW, W + PW)
    pool_size = (hend - hstart) * (wend - wstart)
    if COUNT_PAD:
        divisor = pool_size
    else:
        divisor = (tl.minimum(hend, H) - tl.maximum(hstart, 0)) * (tl.minimum(wend, W) - tl.maximum(wstart, 0))
    y = acc / tl.maximum(divisor, 1).to(acc.dtype)
    tl.store(y_ptr + offs, tl.where(any_vis, y, 0.0).to(y_ptr.dtype.element_ty), mask=inb)
    tl.store(mout_ptr + q, tl.where(any_vis, 1.0, 0.0).to(mout_ptr.dtype.element_ty), mask=inb & (c == 0))


def masked_max_pool2d(x, mask, kernel_size, stride, padding, dilation, ceil_mode, wrap=identity):
    """(y, mask_out, indices)."""
    x, fmt, cl = dense(x)
    mask = mask.to(x.dtype).contiguous()
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    ho = pooled_size(h, kh, sh, ph, dh, ceil_mode)
    wo = pooled_size(w, kw, sw, pw, dw, ceil_mode)
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    idx = torch.empty((n, c, ho, wo), dtype=torch.int64, device=x.device, memory_format=fmt)
    mout = torch.empty((n, 1, ho, wo), dtype=x.dtype, device=x.device)
    total = y.numel()
    wrap(max_pool_kernel)[(triton.cdiv(total, BLOCK),)](
        x, mask, y, mout, idx, total, c, h, w, ho, wo, *x.stride(), sh, sw, ph, pw, dh, dw,
        KH=kh, KW=kw, CHANNELS_LAST=cl, ACC64=x.dtype == torch.float64, BLOCK=BLOCK)
    return y, mout, idx


def masked_avg_pool2d(x, mask, kernel_size, stride, padding, ceil_mode, count_include_pad=True, wrap=identity):
    """(y, mask_out)."""
    x, fmt, cl = dense(x)
    mask = mask.to(x.dtype).contiguous()
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    ho = pooled_size(h, kh, sh, ph, 1, ceil_mode)
    wo = pooled_size(w, kw, sw, pw, 1, ceil_mode)
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    mout = torch.empty((n, 1, ho, wo), dtype=x.dtype, device=x.device)
    total = y.numel()
    wrap(avg_pool_kernel)[(triton.cdiv(total, BLOCK),)](
        x, mask, y, mout, total, c, h, w, ho, wo, *x.stride(), sh, sw, ph, pw,
        KH=kh, KW=kw, COUNT_PAD=bool(count_include_pad), CHANNELS_LAST=cl,
        ACC64=x.dtype == torch.float64, BLOCK=BLOCK)
    return y, mout
