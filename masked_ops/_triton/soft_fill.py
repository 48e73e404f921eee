"""soft_fill in Triton: forward and backward (reference: masked_ops.backends.reference.soft_fill).

The same algorithm as csrc/cpu/soft_fill.cpp, as elementwise kernels over dense NCHW planes
(inputs in channels_last are made NCHW and the results converted back):
- knownness_step: c_t = box3(k_t), k_{t+1} = maxpool3(k_t) on the N x H x W knownness planes;
- ring_forward: v_t = k v + (1 - k) box3(k v) / c where c > 0 (else v), computed in float32
  (float64 for float64), stored in the input dtype as every ring is;
- the backward recomputes v_0 .. v_{T-1}, then per ring from the last: ring_backward_a (the fill
  value f, H = U (1 - k) / c, H f, and the direct mask gradient U (v - f)), ring_backward_b (the
  box sums of H and H f: the mask gradient through the fill and the value adjoints U, Gv);
  mask gradients of all channels meet by atomic adds; mask_chain carries them back through
  k_t = maxpool3(k_{t-1}) (to the first maximum, as ATen).
"""
import torch
import triton
import triton.language as tl

from masked_ops.modes import saturated_rings

from .layout import identity

BLOCK = 256


@triton.jit
def select_scale_kernel(x_ptr, m_ptr, out_ptr, total, C, HW, SCALE: tl.constexpr, ACC64: tl.constexpr,
                        BLOCK: tl.constexpr):
    """out = x where m > 0, else 0 (times m when SCALE: the 0-ring soft fill m * x)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < total
    q = (offs // (HW * C)) * HW + offs % HW
    m = tl.load(m_ptr + q, mask=inb, other=0.0)
    vis = m > 0
    x = tl.load(x_ptr + offs, mask=inb & vis, other=0.0)
    x = x.to(tl.float64) if ACC64 else x.to(tl.float32)
    if SCALE:
        x = x * m.to(x.dtype)
    tl.store(out_ptr + offs, tl.where(vis, x, 0.0).to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def knownness_step_kernel(k_ptr, k_next_ptr, c_ptr, total, H, W, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < total
    w = offs % W
    h = (offs // W) % H
    base = offs - h * W - w
    s = tl.zeros((BLOCK,), k_ptr.dtype.element_ty)
    mx = tl.full((BLOCK,), float("-inf"), k_ptr.dtype.element_ty)
    for dy in tl.static_range(-1, 2):
        for dx in tl.static_range(-1, 2):
            hh = h + dy
            ww = w + dx
            ok = inb & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            v = tl.load(k_ptr + base + hh * W + ww, mask=ok, other=0.0)
            s += v
            mx = tl.where(ok & (v > mx), v, mx)
    tl.store(c_ptr + offs, s, mask=inb)
    tl.store(k_next_ptr + offs, mx, mask=inb)


@triton.jit
def _fill_value(v_ptr, k_ptr, n, c_plane, h, w, H, W, inb, ACC64: tl.constexpr, BLOCK: tl.constexpr):
    """box3(k * v) at each (n, h, w) of plane c_plane = n * C + c (row-major, like the CPU kernel)."""
    if ACC64:
        s = tl.zeros((BLOCK,), tl.float64)
    else:
        s = tl.zeros((BLOCK,), tl.float32)
    for dy in tl.static_range(-1, 2):
        for dx in tl.static_range(-1, 2):
            hh = h + dy
            ww = w + dx
            ok = inb & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            kk = tl.load(k_ptr + n * H * W + hh * W + ww, mask=ok, other=0.0).to(s.dtype)
            vv = tl.load(v_ptr + c_plane * H * W + hh * W + ww, mask=ok, other=0.0).to(s.dtype)
            s += kk * vv
    return s


@triton.jit
def _coords(offs, C, H, W):
    """(w, h, plane, n, q) of NCHW element offsets: column, row, N*C plane, sample, and the offset of the
    pixel in the N x H x W knownness planes."""
    w = offs % W
    h = (offs // W) % H
    plane = offs // (H * W)
    n = plane // C
    return w, h, plane, n, n * (H * W) + h * W + w


@triton.jit
def ring_forward_kernel(v_ptr, out_ptr, k_ptr, c_ptr, total, C, H, W, ACC64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < total
    w, h, plane, n, q = _coords(offs, C, H, W)
    a = tl.load(k_ptr + q, mask=inb, other=1.0)
    cnt = tl.load(c_ptr + q, mask=inb, other=0.0)
    v = tl.load(v_ptr + offs, mask=inb, other=0.0)
    f = _fill_value(v_ptr, k_ptr, n, plane, h, w, H, W, inb, ACC64, BLOCK) / tl.where(cnt > 0, cnt, 1.0)
    a = a.to(f.dtype)
    blend = a * v.to(f.dtype) + (1.0 - a) * f
    change = (cnt > 0) & (a != 1.0)
    out = tl.where(change, blend.to(out_ptr.dtype.element_ty), v)
    tl.store(out_ptr + offs, out, mask=inb)


@triton.jit
def ring_backward_a_kernel(v_ptr, k_ptr, c_ptr, u_ptr, h_ptr, hf_ptr, dk_ptr, total, C, H, W,
                           ACC64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < total
    w, h, plane, n, q = _coords(offs, C, H, W)
    cnt = tl.load(c_ptr + q, mask=inb, other=0.0)
    known = inb & (cnt > 0)
    f = _fill_value(v_ptr, k_ptr, n, plane, h, w, H, W, inb, ACC64, BLOCK) / tl.where(cnt > 0, cnt, 1.0)
    a = tl.load(k_ptr + q, mask=inb, other=0.0).to(f.dtype)
    u = tl.load(u_ptr + offs, mask=inb, other=0.0).to(f.dtype)
    v = tl.load(v_ptr + offs, mask=inb, other=0.0).to(f.dtype)
    hs = tl.where(known, u * (1.0 - a) / tl.where(cnt > 0, cnt, 1.0).to(f.dtype), 0.0)
    tl.store(h_ptr + offs, hs, mask=inb)
    tl.store(hf_ptr + offs, hs * f, mask=inb)
    tl.atomic_add(dk_ptr + q, tl.where(known, u * (v - f), 0.0).to(dk_ptr.dtype.element_ty), mask=inb)


@triton.jit
def ring_backward_b_kernel(v_ptr, k_ptr, c_ptr, u_ptr, gv_ptr, h_ptr, hf_ptr, dk_ptr, total, C, H, W,
                           FILL_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < total
    w, h, plane, n, q = _coords(offs, C, H, W)
    bh = tl.zeros((BLOCK,), h_ptr.dtype.element_ty)
    bhf = tl.zeros((BLOCK,), h_ptr.dtype.element_ty)
    for dy in tl.static_range(-1, 2):
        for dx in tl.static_range(-1, 2):
            hh = h + dy
            ww = w + dx
            ok = inb & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            at = plane * (H * W) + hh * W + ww
            bh += tl.load(h_ptr + at, mask=ok, other=0.0)
            bhf += tl.load(hf_ptr + at, mask=ok, other=0.0)
    cnt = tl.load(c_ptr + q, mask=inb, other=0.0)
    a = tl.load(k_ptr + q, mask=inb, other=0.0).to(bh.dtype)
    v = tl.load(v_ptr + offs, mask=inb, other=0.0).to(bh.dtype)
    tl.atomic_add(dk_ptr + q, (v * bh - bhf).to(dk_ptr.dtype.element_ty), mask=inb)
    keep = tl.where(cnt > 0, a, 1.0)
    u = tl.load(u_ptr + offs, mask=inb, other=0.0)
    u_new = u * keep + a * bh
    tl.store(u_ptr + offs, u_new, mask=inb)
    if FILL_GRAD:
        tl.store(gv_ptr + offs, u_new, mask=inb)
    else:
        gv = tl.load(gv_ptr + offs, mask=inb, other=0.0)
        tl.store(gv_ptr + offs, gv * keep, mask=inb)


@triton.jit
def mask_chain_kernel(k_prev_ptr, carry_ptr, next_ptr, total, H, W, BLOCK: tl.constexpr):
    """next[argmax of k_prev over the 3x3 window at p] += carry[p] (first maximum, row-major)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < total
    w = offs % W
    h = (offs // W) % H
    base = offs - h * W - w
    g = tl.load(carry_ptr + offs, mask=inb, other=0.0)
    best = tl.full((BLOCK,), float("-inf"), k_prev_ptr.dtype.element_ty)
    arg = offs
    for dy in tl.static_range(-1, 2):
        for dx in tl.static_range(-1, 2):
            hh = h + dy
            ww = w + dx
            ok = inb & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            at = base + hh * W + ww
            v = tl.load(k_prev_ptr + at, mask=ok, other=float("-inf"))
            better = ok & (v > best)
            best = tl.where(better, v, best)
            arg = tl.where(better, at, arg)
    tl.atomic_add(next_ptr + arg, g, mask=inb & (g != 0))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grid(total: int):
    return (triton.cdiv(total, BLOCK),)


def _knownness(mask: torch.Tensor, iters: int, acc: torch.dtype, wrap):
    """[k_0 .. k_iters], [c_0 .. c_{iters-1}] as N x H x W planes."""
    n, _, h, w = mask.shape
    ks = [mask.reshape(n, h, w).to(acc).contiguous()]
    cs = []
    for _ in range(iters):
        k_next, c = torch.empty_like(ks[-1]), torch.empty_like(ks[-1])
        wrap(knownness_step_kernel)[_grid(ks[-1].numel())](ks[-1], k_next, c, ks[-1].numel(), h, w, BLOCK=BLOCK)
        ks.append(k_next)
        cs.append(c)
    return ks, cs


def _rings(x, mask, iters, ks, cs, wrap):
    """[v_0, ..., v_iters] of the dense NCHW x (v_0: x selected)."""
    n, c, h, w = x.shape
    acc64 = x.dtype == torch.float64
    v = torch.empty_like(x)
    wrap(select_scale_kernel)[_grid(x.numel())](x, mask, v, x.numel(), c, h * w, SCALE=False, ACC64=acc64, BLOCK=BLOCK)
    vs = [v]
    for t in range(1, iters + 1):
        out = torch.empty_like(x)
        wrap(ring_forward_kernel)[_grid(x.numel())](vs[-1], out, ks[t - 1], cs[t - 1], x.numel(), c, h, w,
                                                    ACC64=acc64, BLOCK=BLOCK)
        vs.append(out)
    return vs


def soft_fill(x: torch.Tensor, mask: torch.Tensor, iters: int, fill_grad: bool = False, wrap=identity,
              pads=(0, 0, 0, 0)) -> torch.Tensor:
    """The fill, then ``pads`` (left, right, top, bottom) zeros around it (no fused padded write here)."""
    out = _soft_fill(x, mask, iters, wrap)
    return torch.nn.functional.pad(out, tuple(pads)) if any(pads) else out


def _soft_fill(x: torch.Tensor, mask: torch.Tensor, iters: int, wrap) -> torch.Tensor:
    fmt = torch.channels_last if (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)) \
        else torch.contiguous_format
    xd = x.contiguous()
    m = mask.to(x.dtype).contiguous()
    n, c, h, w = xd.shape
    iters = saturated_rings(iters, h, w)
    if iters == 0:
        out = torch.empty_like(xd)
        wrap(select_scale_kernel)[_grid(xd.numel())](xd, m, out, xd.numel(), c, h * w, SCALE=True,
                                                     ACC64=xd.dtype == torch.float64, BLOCK=BLOCK)
        return out.contiguous(memory_format=fmt)
    ks, cs = _knownness(m, iters, _acc_dtype(xd), wrap)
    return _rings(xd, m, iters, ks, cs, wrap)[-1].contiguous(memory_format=fmt)


def soft_fill_backward(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, iters: int, fill_grad: bool,
                       wrap=identity):
    fmt = torch.channels_last if (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)) \
        else torch.contiguous_format
    xd = x.contiguous()
    m = mask.to(x.dtype).contiguous()
    n, c, h, w = xd.shape
    acc = _acc_dtype(xd)
    iters = saturated_rings(iters, h, w)
    g = grad.to(acc).contiguous()
    if iters == 0:  # out = m * x (selected): gx = g * m, gm = sum_c g * x
        xs = torch.where(m > 0, xd, torch.zeros((), dtype=xd.dtype, device=xd.device)).to(acc)
        gx = torch.where(m > 0, g * m.to(acc), torch.zeros((), dtype=acc, device=xd.device))
        gm = (g * xs).sum(dim=1, keepdim=True)
        return gx.to(x.dtype).contiguous(memory_format=fmt), gm.to(mask.dtype)
    ks, cs = _knownness(m, iters, acc, wrap)
    vs = _rings(xd, m, iters - 1, ks, cs, wrap)
    u = g.clone()
    gv = g.clone()
    hbuf, hfbuf = torch.empty_like(u), torch.empty_like(u)
    dks = [torch.zeros((n, h, w), dtype=acc, device=xd.device) for _ in range(iters)]
    total = xd.numel()
    for t in range(iters, 0, -1):
        args = (vs[t - 1], ks[t - 1], cs[t - 1])
        wrap(ring_backward_a_kernel)[_grid(total)](*args, u, hbuf, hfbuf, dks[t - 1], total, c, h, w,
                                                   ACC64=acc == torch.float64, BLOCK=BLOCK)
        wrap(ring_backward_b_kernel)[_grid(total)](*args, u, gv, hbuf, hfbuf, dks[t - 1], total, c, h, w,
                                                   FILL_GRAD=bool(fill_grad), BLOCK=BLOCK)
    carry = torch.zeros((n, h, w), dtype=acc, device=xd.device)
    for t in range(iters, 0, -1):
        nxt = dks[t - 1].clone()
        wrap(mask_chain_kernel)[_grid(carry.numel())](ks[t - 1], carry, nxt, carry.numel(), h, w, BLOCK=BLOCK)
        carry = nxt
    gsrc = u if fill_grad else gv
    gx = torch.where(m > 0, gsrc, torch.zeros((), dtype=acc, device=xd.device))
    return gx.to(x.dtype).contiguous(memory_format=fmt), carry.reshape(n, 1, h, w).to(mask.dtype)
