"""Global masked mean in Triton (reference: masked_ops.backends.reference.masked_mean).

One program per (n, block of channels) sweeps the pixels in chunks, summing m * x and m:
sum(m * x) / sum(m), 0 where sum(m) == 0 (the mean over visible pixels for a 0/1 mask, the
mask-weighted mean for a soft one). Pixels with m == 0 are selected away.
"""
import torch
import triton
import triton.language as tl

from .layout import dense, identity


@triton.jit
def masked_mean_kernel(x_ptr, mask_ptr, out_ptr, C, HW, s_n, s_c, s_p,
                       ACC64: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    cok = cs < C
    if ACC64:
        acc = tl.zeros((BC,), tl.float64)
    else:
        acc = tl.zeros((BC,), tl.float32)
    if ACC64:
        cnt = tl.zeros((BP,), tl.float64)
    else:
        cnt = tl.zeros((BP,), tl.float32)
    for p0 in range(0, HW, BP):
        ps = p0 + tl.arange(0, BP)
        pok = ps < HW
        wgt = tl.load(mask_ptr + n * HW + ps, mask=pok, other=0.0).to(acc.dtype)
        vis = pok & (wgt > 0)
        ok = vis[:, None] & cok[None, :]
        v = tl.load(x_ptr + n * s_n + ps[:, None].to(tl.int64) * s_p + cs[None, :] * s_c, mask=ok, other=0.0)
        acc += tl.sum(tl.where(ok, wgt[:, None] * v.to(acc.dtype), 0.0), axis=0)
        cnt += tl.where(vis, wgt, 0.0)
    total = tl.sum(cnt, axis=0)
    mean = tl.where(total > 0, acc / tl.where(total > 0, total, 1.0).to(acc.dtype), 0.0)
    tl.store(out_ptr + n * C + cs, mean.to(out_ptr.dtype.element_ty), mask=cok)


def masked_mean(x, mask, wrap=identity):
    x, _, _ = dense(x)
    mask = mask.to(x.dtype).contiguous()
    n, c, h, w = x.shape
    out = torch.empty((n, c), dtype=x.dtype, device=x.device)
    bc = min(64, triton.next_power_of_2(c))
    bp = 64
    # Dense in its own format, so pixel (h, w) sits at (h * W + w) * stride_w.
    wrap(masked_mean_kernel)[(n, triton.cdiv(c, bc))](
        x, mask, out, c, h * w, x.stride(0), x.stride(1), x.stride(3), ACC64=x.dtype == torch.float64,
        BP=bp, BC=bc)
    return out
