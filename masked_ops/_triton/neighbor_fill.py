"""The whole neighbour fill (all iterations) in one Triton kernel over tiles with a halo.

Reference: masked_ops.backends.reference.neighbor_fill. The known region grows by one 3x3
dilation per iteration and depends on the mask alone, so the iteration that fills a pixel is
its Chebyshev distance d to the nearest visible pixel (0 = visible, > iters = never). A pixel
with d = t is the mean of its neighbours with d = t - 1.

Kernel 1 (mask only, N x H x W): d per pixel.
Kernel 2, one program per (sample, channel block, tile): a RB x RB block covers the tile plus a
halo of T = iters pixels (channel blocks of up to 32 for channels_last, single planes for NCHW). Ring t is computed in place in the output on the tile grown by T - t pixels, reading ring
t - 1 (ring 0 straight from x), with a block barrier between rings. Neighbouring programs
recompute the same halo pixels with the same arithmetic, so their overlapping writes store
identical values and the result is deterministic; a program only ever reads ring pixels it wrote
itself.
"""
import torch
import triton
import triton.language as tl

from masked_ops.modes import saturated_rings

from .layout import dense, identity


@triton.jit
def fill_distance_kernel(mask_ptr, dist_ptr, H, W, T: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    n = tl.program_id(0)
    rows = tl.program_id(1) * BH + tl.arange(0, BH)[:, None]
    cols = tl.program_id(2) * BW + tl.arange(0, BW)[None, :]
    inside = (rows < H) & (cols < W)
    base = n.to(tl.int64) * H * W
    d = tl.full((BH, BW), T + 1, tl.int32)
    for dy in tl.static_range(-T, T + 1):
        for dx in tl.static_range(-T, T + 1):
            r = rows + dy
            c = cols + dx
            ok = inside & (r >= 0) & (r < H) & (c >= 0) & (c < W)
            m = tl.load(mask_ptr + base + r * W + c, mask=ok, other=0.0)
            # Chebyshev radius of (dy, dx), on constexprs (no abs/max builtins in compiled kernels)
            ady = dy if dy >= 0 else -dy
            adx = dx if dx >= 0 else -dx
            ring = ady if ady >= adx else adx
            d = tl.where((m > 0) & (d > ring), ring, d)
    tl.store(dist_ptr + base + rows * W + cols, d, mask=inside)


@triton.jit
def neighbor_fill_kernel(x_ptr, out_ptr, dist_ptr, C, H, W, s_n, s_c, s_h, s_w,
                         T: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr, ACC64: tl.constexpr,
                         INPLACE: tl.constexpr = False):
    # Block: RB x RB pixels (flattened) x BC channels. BC = 1 for contiguous (NCHW) tensors, where
    # a plane is contiguous; a channel vector for channels_last, where channels are.
    TILE: tl.constexpr = RB - 2 * T
    n_cblocks = tl.cdiv(C, BC)
    n = tl.program_id(0) // n_cblocks
    cs = (tl.program_id(0) % n_cblocks) * BC + tl.arange(0, BC)[None, :]
    h0 = tl.program_id(1) * TILE
    w0 = tl.program_id(2) * TILE
    pix = tl.arange(0, RB * RB)[:, None]
    rows = h0 - T + pix // RB
    cols = w0 - T + pix % RB
    c_ok = cs < C
    in_img = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
    dbase = n.to(tl.int64) * H * W
    offs = n.to(tl.int64) * s_n + cs.to(tl.int64) * s_c + rows.to(tl.int64) * s_h + cols.to(tl.int64) * s_w
    d = tl.load(dist_ptr + dbase + rows * W + cols, mask=in_img, other=-1)
    in_tile = in_img & c_ok & (rows >= h0) & (rows < h0 + TILE) & (cols >= w0) & (cols < w0 + TILE)
    # Ring 0 and never-reached pixels of the tile itself; ring pixels are written below. In place
    # (out_ptr is x_ptr) they already hold what they keep.
    if not INPLACE:
        x0 = tl.load(x_ptr + offs, mask=in_tile & (d == 0), other=0.0)
        tl.store(out_ptr + offs, x0, mask=in_tile & ((d == 0) | (d > T)))
    for t in tl.static_range(1, T + 1):
        grow = T - t
        region = in_img & (rows >= h0 - grow) & (rows < h0 + TILE + grow) & \
            (cols >= w0 - grow) & (cols < w0 + TILE + grow)
        active = region & (d == t)
        if ACC64:
            acc = tl.zeros((RB * RB, BC), tl.float64)
        else:
            acc = tl.zeros((RB * RB, BC), tl.float32)
        cnt = tl.zeros((RB * RB, 1), tl.float32)
        for dy in tl.static_range(-1, 2):
            for dx in tl.static_range(-1, 2):
                r = rows + dy
                cc = cols + dx
                ok = active & (r >= 0) & (r < H) & (cc >= 0) & (cc < W)
                dn = tl.load(dist_ptr + dbase + r * W + cc, mask=ok, other=-1)
                use = ok & (dn == t - 1)
                noffs = offs + dy * s_h + dx * s_w
                if t == 1:
                    v = tl.load(x_ptr + noffs, mask=use & c_ok, other=0.0)
                else:
                    v = tl.load(out_ptr + noffs, mask=use & c_ok, other=0.0)
                acc += tl.where(use & c_ok, v.to(acc.dtype), 0.0)
                cnt += tl.where(use, 1.0, 0.0)
        val = acc / tl.maximum(cnt, 1.0).to(acc.dtype)
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=active & c_ok)
        tl.debug_barrier()  # ring t is read by ring t + 1 from other threads of this block


def _block(iters: int) -> int:
    rb = 16
    while rb - 2 * iters < max(8, rb // 2):
        rb *= 2
    return rb


def distance(mask: torch.Tensor, iters: int, wrap=identity) -> torch.Tensor:
    """int32 N x H x W: Chebyshev distance to the nearest visible pixel, iters + 1 beyond iters."""
    n, _, h, w = mask.shape
    dist = torch.empty((n, h, w), dtype=torch.int32, device=mask.device)
    bh, bw = 16, 32
    wrap(fill_distance_kernel)[(n, triton.cdiv(h, bh), triton.cdiv(w, bw))](
        mask, dist, h, w, T=iters, BH=bh, BW=bw)
    return dist


def _launch(x, out, mask, iters, channels_inner, wrap, inplace):
    n, c, h, w = x.shape
    iters = saturated_rings(iters, h, w)
    dist = distance(mask, iters, wrap)
    rb = _block(iters)
    tile = rb - 2 * iters
    # Channels innermost: a vector of channels per pixel keeps the loads contiguous; else one plane.
    bc = min(32, triton.next_power_of_2(c)) if channels_inner else 1
    if bc > 1 and rb > 16:
        bc = min(bc, 8)  # keep the block (rb * rb * bc values) within registers
    s_n, s_c, s_h, s_w = x.stride()
    wrap(neighbor_fill_kernel)[(n * triton.cdiv(c, bc), triton.cdiv(h, tile), triton.cdiv(w, tile))](
        x, out, dist, c, h, w, s_n, s_c, s_h, s_w, T=iters, RB=rb, BC=bc, ACC64=x.dtype == torch.float64,
        INPLACE=inplace)


def neighbor_fill(x: torch.Tensor, mask: torch.Tensor, iters: int, wrap=identity) -> torch.Tensor:
    x, fmt, _ = dense(x)
    mask = mask.to(x.dtype).contiguous()
    if iters <= 0:
        return torch.where(mask > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
    out = torch.empty_like(x, memory_format=fmt)
    _launch(x, out, mask, iters, fmt is torch.channels_last, wrap, inplace=False)
    return out


def neighbor_fill_(x: torch.Tensor, mask: torch.Tensor, iters: int, wrap=identity) -> None:
    """In place, where the fill reaches (reference: neighbor_fill_); x may be any strided view."""
    if iters <= 0 or x.numel() == 0:
        return
    _launch(x, x, mask.to(x.dtype).contiguous(), iters, x.stride(1) == 1, wrap, inplace=True)
