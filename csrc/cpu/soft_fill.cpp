// soft_fill on CPU: the input a soft-masked conv reads, forward and backward in fused passes.
//
// Reference (the exact math): masked_ops/backends/reference.py soft_fill. Per sample, with the
// knownness k_0 = m and c_t = box3(k_t), k_{t+1} = maxpool3(k_t) (one channel, shared by all
// channels), each channel plane runs `iters` rings
//     v_t = k v + (1 - k) box3(k v) / c    where c > 0 (else v),  k = k_{t-1}, c = c_{t-1}, v = v_{t-1}
// from v_0 = x selected to 0 where m == 0; iters == 0 gives m * x. Sums run over the 3x3
// neighbourhood in row-major order in opmath and each ring is rounded to the storage dtype, as
// the hard fill does (neighbor_fill.cpp), so at a 0/1 mask the result is the hard fill bit for bit.
//
// The backward recomputes the rings of a plane (cheaper than saving them) and runs them in
// reverse with two adjoints: U, the gradient of the value (it reaches the mask through every
// use), and Gv, the part that reaches x (without fill_grad, fill values pass no gradient to x,
// as in the paper, so Gv is grad times the product of each ring's per-pixel keep factor; the
// channels_last kernel keeps just that product). The mask's gradient of each ring is summed over
// channels (per-thread buffers), then carried back through the maxpool3 chain of k (first maximum,
// as ATen). Why the loops are shaped as they are: docs/design.md, section 5.
#include "common.h"

#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace masked_ops {
namespace cpu {
namespace {

// k_0..k_iters (k_0 = m) and c_0..c_{iters-1} of one sample, each an H x W plane in opmath.
template <typename scalar_t, typename T>
void knownness(const scalar_t* m, int64_t H, int64_t W, int64_t iters, T* k, T* c) {
  const int64_t HW = H * W;
  for (int64_t p = 0; p < HW; ++p) k[p] = static_cast<T>(m[p]);
  for (int64_t t = 0; t < iters; ++t) {
    const T* kt = k + t * HW;
    T* ct = c + t * HW;
    T* kn = k + (t + 1) * HW;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t w = 0; w < W; ++w) {
        T s = T(0), mx = -std::numeric_limits<T>::infinity();
        for (int64_t dy = -1; dy <= 1; ++dy) {
          const int64_t hh = h + dy;
          if (hh < 0 || hh >= H) continue;
          for (int64_t dx = -1; dx <= 1; ++dx) {
            const int64_t ww = w + dx;
            if (ww < 0 || ww >= W) continue;
            const T v = kt[hh * W + ww];
            s += v;
            mx = v > mx ? v : mx;
          }
        }
        ct[h * W + w] = s;
        kn[h * W + w] = mx;
      }
    }
  }
}

// One ring of one plane: v_out from v_in with knownness k and count c. kv is scratch of
// (H + 2) x (W + 2): k * v with a zero border, so every pixel sums its 3x3 neighbourhood in
// row-major order without bounds checks (the zero terms leave the sums exact).
template <typename scalar_t, typename T>
void ring(const T* k, const T* c, const scalar_t* v, scalar_t* out, int64_t H, int64_t W, T* kv) {
  const int64_t Wp = W + 2;
  std::fill(kv, kv + (H + 2) * Wp, T(0));
  for (int64_t h = 0; h < H; ++h) {
    T* row = kv + (h + 1) * Wp + 1;
    const T* kr = k + h * W;
    const scalar_t* vr = v + h * W;
    for (int64_t w = 0; w < W; ++w) row[w] = kr[w] * static_cast<T>(vr[w]);
  }
  for (int64_t h = 0; h < H; ++h) {
    const T* r0 = kv + h * Wp;
    const T* r1 = r0 + Wp;
    const T* r2 = r1 + Wp;
    const T* kr = k + h * W;
    const T* cr = c + h * W;
    const scalar_t* vr = v + h * W;
    scalar_t* orow = out + h * W;
    for (int64_t w = 0; w < W; ++w) {
      const T a = kr[w], cnt = cr[w];
      const T sum = r0[w] + r0[w + 1] + r0[w + 2] + r1[w] + r1[w + 1] + r1[w + 2] + r2[w] + r2[w + 1] + r2[w + 2];
      const T blend = a * static_cast<T>(vr[w]) + (T(1) - a) * (sum / (cnt > T(0) ? cnt : T(1)));
      // No known neighbour, or fully known: unchanged.
      orow[w] = (cnt > T(0) && a != T(1)) ? static_cast<scalar_t>(blend) : vr[w];
    }
  }
}

// v_0 of a plane: x where m > 0, else 0 (a select: NaN there never enters).
template <typename scalar_t>
void select_plane(const scalar_t* x, const scalar_t* m, scalar_t* out, int64_t HW) {
  for (int64_t p = 0; p < HW; ++p) out[p] = m[p] > scalar_t(0) ? x[p] : scalar_t(0);
}

// channels_last input with at least 8 channels runs with channels innermost; fewer channels (an RGB
// image) run as planes, whose loops along a row are longer than a pixel's loop over its channels
// (3 channels at 224 px: 2.4x faster as planes, the transposes included).
bool channels_innermost(const at::Tensor& x) {
  return layout_of(x) == at::MemoryFormat::ChannelsLast && x.size(1) >= 8;
}

void check_soft_fill(const at::Tensor& x, const at::Tensor& mask, int64_t iters, const char* op) {
  check_image(x, op);
  check_mask_like(mask, x, x.size(2), x.size(3), op);
  TORCH_CHECK(iters >= 0, op, ": iters must be >= 0, got ", iters);
}

// Channels-last (NHWC) versions of the rings: channels innermost, so a channels_last activation is
// never transposed to planes and back. The forward sums run in the same order as the plane version
// (row-major over the 3x3 neighbourhood), so both layouts give the same values.

// A block's start: v_0 = x where visible (else 0) and U = grad, from NHWC rows into compact ones.
template <typename scalar_t, typename T>
inline void gather_block(const scalar_t* __restrict x, const scalar_t* __restrict g, bool visible,
                         scalar_t* __restrict v, T* __restrict u, int64_t cb) {
  for (int64_t j = 0; j < cb; ++j) {  // a loop, not std::copy: a call per pixel costs more than the copy
    v[j] = visible ? x[j] : scalar_t(0);
    u[j] = static_cast<T>(g[j]);
  }
}

// out = in * s, rounded to the storage type.
template <typename in_t, typename T, typename out_t>
inline void scale_block(const in_t* __restrict in, T s, out_t* __restrict out, int64_t cb) {
  for (int64_t j = 0; j < cb; ++j) out[j] = static_cast<out_t>(static_cast<T>(in[j]) * s);
}

// One pixel's C channels of a ring, from the k v rows above (r0), at (r1) and below (r2), each
// starting at the pixel to the left: the nine terms in row-major order, as the plane version adds them.
// removed: the pixel's own value reads as 0 (the first ring reads x itself, selected by the mask).
template <typename scalar_t, typename T>
inline void blend_pixel(const T* __restrict r0, const T* __restrict r1, const T* __restrict r2,
                        const scalar_t* __restrict v, scalar_t* __restrict out, T a, T cnt, bool removed,
                        int64_t C) {
  for (int64_t j = 0; j < C; ++j) {
    const T sum = r0[j] + r0[j + C] + r0[j + 2 * C] + r1[j] + r1[j + C] + r1[j + 2 * C] + r2[j] + r2[j + C] +
                  r2[j + 2 * C];
    const T own = removed ? T(0) : static_cast<T>(v[j]);
    out[j] = static_cast<scalar_t>(a * own + (T(1) - a) * (sum / cnt));
  }
}

// k v of row r (W pixels x C channels) into dst with a zero pixel at each end; zeros outside the image
// and, with select (the first ring, v = x), where k == 0.
template <typename scalar_t, typename T>
inline void kv_row_nhwc(const T* k, const scalar_t* v, int64_t r, int64_t H, int64_t W, int64_t C, bool select,
                        T* dst) {
  const int64_t Lp = (W + 2) * C;
  if (r < 0 || r >= H) {
    std::fill(dst, dst + Lp, T(0));
    return;
  }
  std::fill(dst, dst + C, T(0));
  std::fill(dst + (W + 1) * C, dst + Lp, T(0));
  for (int64_t w = 0; w < W; ++w) {
    T* d = dst + (w + 1) * C;
    if (select && !(k[r * W + w] > T(0)))
      std::fill(d, d + C, T(0));
    else
      scale_block(v + (r * W + w) * C, k[r * W + w], d, C);
  }
}

// One ring over NHWC input, parallel over rows; each thread keeps k v of three rows (zero-padded),
// so every pixel's nine-term sum is one vectorised loop over its channels. With select, v is the
// input x and reads as 0 where k (the mask) is 0: the first ring needs no selected copy of x.
template <typename scalar_t, typename T>
void ring_nhwc(const T* k, const T* c, const scalar_t* v, scalar_t* out, int64_t H, int64_t W, int64_t C,
               bool select = false) {
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    const int64_t Lp = (W + 2) * C;
    std::vector<T> rows(3 * Lp);
    T* r0 = rows.data();
    T* r1 = r0 + Lp;
    T* r2 = r1 + Lp;
    kv_row_nhwc(k, v, h0 - 1, H, W, C, select, r0);
    kv_row_nhwc(k, v, h0, H, W, C, select, r1);
    for (int64_t h = h0; h < h1; ++h) {
      kv_row_nhwc(k, v, h + 1, H, W, C, select, r2);
      for (int64_t w = 0; w < W; ++w) {
        const int64_t p = h * W + w;
        const T a = k[p], cnt = c[p];
        const scalar_t* vp = v + p * C;
        scalar_t* o = out + p * C;
        const bool removed = select && !(a > T(0));
        if (!(cnt > T(0)) || a == T(1)) {  // no known neighbour, or fully known: unchanged
          for (int64_t j = 0; j < C; ++j) o[j] = removed ? scalar_t(0) : vp[j];
        } else {
          blend_pixel(r0 + w * C, r1 + w * C, r2 + w * C, vp, o, a, cnt, removed, C);
        }
      }
      std::swap(r0, r1);  // rotate: the row below becomes the current one
      std::swap(r1, r2);
    }
  });
}

// iters == 0 (1x1 convs, zero and renorm modes): out = m * x, selected; a pointwise pass in the
// input's own layout (no NCHW round trip), in pixel chunks so that batch 1 uses every thread.
at::Tensor scale_by_mask(const at::Tensor& x_in, const at::Tensor& mask_in) {
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor mask = mask_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor out = at::empty_like(x, x.options().memory_format(fmt));
  if (x.numel() == 0) return out;
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_fill_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* mp = mask.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    auto value = [](scalar_t m, scalar_t v) {
      return m > scalar_t(0) ? static_cast<scalar_t>(static_cast<T>(m) * static_cast<T>(v)) : scalar_t(0);
    };
    for_pixel_chunks(pixel_chunks(N, C, HW), HW, [&](int64_t n, int64_t p0, int64_t p1, int64_t) {
      const scalar_t* m = mp + n * HW;
      if (cl) {
        for (int64_t p = p0; p < p1; ++p)
          for (int64_t c = 0, at = (n * HW + p) * C; c < C; ++c, ++at) op[at] = value(m[p], xp[at]);
      } else {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t p = p0, at = (n * C + c) * HW + p0; p < p1; ++p, ++at) op[at] = value(m[p], xp[at]);
      }
    });
  });
  return out;
}

// Its backward: gx = g * m (0 where m == 0), gm = sum_c g * x over the visible pixels.
std::tuple<at::Tensor, at::Tensor> scale_by_mask_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                         const at::Tensor& mask_in) {
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous(fmt);
  const at::Tensor mask = mask_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor gx = at::empty_like(x, x.options().memory_format(fmt));
  at::Tensor gm = at::zeros_like(mask);
  if (x.numel() == 0) return {gx, gm};
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_fill_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* mp = mask.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* gmp = gm.data_ptr<scalar_t>();
    for_pixel_chunks(pixel_chunks(N, C, HW), HW, [&](int64_t n, int64_t p0, int64_t p1, int64_t) {
      const scalar_t* m = mp + n * HW;
      if (cl) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t base = (n * HW + p) * C;
          if (!(m[p] > scalar_t(0))) {
            std::fill(gxp + base, gxp + base + C, scalar_t(0));
            continue;
          }
          const T mv = static_cast<T>(m[p]);
          T acc = T(0);
          for (int64_t c = 0; c < C; ++c) {
            const T g = static_cast<T>(gp[base + c]);
            gxp[base + c] = static_cast<scalar_t>(g * mv);
            acc += g * static_cast<T>(xp[base + c]);
          }
          gmp[n * HW + p] = static_cast<scalar_t>(acc);
        }
      } else {
        std::vector<T> acc(p1 - p0, T(0));
        for (int64_t c = 0; c < C; ++c) {
          const int64_t off = (n * C + c) * HW;
          for (int64_t p = p0; p < p1; ++p) {
            const bool vis = m[p] > scalar_t(0);
            const T g = static_cast<T>(gp[off + p]);
            gxp[off + p] = vis ? static_cast<scalar_t>(g * static_cast<T>(m[p])) : scalar_t(0);
            acc[p - p0] += vis ? g * static_cast<T>(xp[off + p]) : T(0);
          }
        }
        for (int64_t p = p0; p < p1; ++p) gmp[n * HW + p] = static_cast<scalar_t>(acc[p - p0]);
      }
    });
  });
  return {gx, gm};
}

at::Tensor soft_fill_nhwc(const at::Tensor& x_in, const at::Tensor& mask_in, int64_t iters) {
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor mask = mask_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  iters = saturated_rings(iters, H, W);
  at::Tensor out = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (x.numel() == 0) return out;
  // Rings ping-pong between two scratch samples (the last writes the output); the first reads x.
  at::Tensor scratch = at::empty({iters > 1 ? std::min<int64_t>(iters - 1, 2) : 0, HW * C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_fill_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    std::vector<T> k((iters + 1) * HW), c(iters * HW);
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* m = mask.const_data_ptr<scalar_t>() + n * HW;
      knownness(m, H, W, iters, k.data(), c.data());
      const scalar_t* src = x.const_data_ptr<scalar_t>() + n * HW * C;
      scalar_t* dst_n = out.data_ptr<scalar_t>() + n * HW * C;
      for (int64_t t = 1; t <= iters; ++t) {
        scalar_t* dst = t == iters ? dst_n : scratch.data_ptr<scalar_t>() + ((t - 1) % 2) * HW * C;
        ring_nhwc(k.data() + (t - 1) * HW, c.data() + (t - 1) * HW, src, dst, H, W, C, t == 1);
        src = dst;
      }
    }
  });
  return out;
}

at::Tensor soft_fill_cpu(const at::Tensor& x_in, const at::Tensor& mask_in, int64_t iters, bool /*fill_grad*/) {
  check_soft_fill(x_in, mask_in, iters, "soft_fill");
  if (saturated_rings(iters, x_in.size(2), x_in.size(3)) == 0) return scale_by_mask(x_in, mask_in);
  if (channels_innermost(x_in)) return soft_fill_nhwc(x_in, mask_in, iters);
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous();  // planes: NCHW inside, the input's format outside
  const at::Tensor mask = mask_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  iters = saturated_rings(iters, H, W);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_fill_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* mp = mask.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    std::vector<T> k(N * (iters + 1) * HW), c(N * iters * HW);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        knownness(mp + n * HW, H, W, iters, k.data() + n * (iters + 1) * HW, c.data() + n * iters * HW);
    });
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> a(HW), b(HW);
      std::vector<T> kv((H + 2) * (W + 2));
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C;
        const T* kn = k.data() + n * (iters + 1) * HW;
        const T* cn = c.data() + n * iters * HW;
        select_plane(xp + plane * HW, mp + n * HW, a.data(), HW);
        for (int64_t t = 1; t <= iters; ++t) {
          scalar_t* dst = t == iters ? op + plane * HW : b.data();
          ring(kn + (t - 1) * HW, cn + (t - 1) * HW, a.data(), dst, H, W, kv.data());
          if (t < iters) std::swap(a, b);
        }
      }
    });
  });
  return out.contiguous(fmt);
}

// 3x3 sum (zero padding) of a plane into out, separably: rows into tmp (W), then columns.
template <typename T>
void box3(const T* in, T* out, int64_t H, int64_t W, T* tmp) {
  for (int64_t h = 0; h < H; ++h) {
    const T* r = in + h * W;
    T* t = tmp + h * W;
    if (W == 1) {
      t[0] = r[0];
      continue;
    }
    t[0] = r[0] + r[1];
    for (int64_t w = 1; w + 1 < W; ++w) t[w] = r[w - 1] + r[w] + r[w + 1];
    t[W - 1] = r[W - 2] + r[W - 1];
  }
  for (int64_t h = 0; h < H; ++h) {
    const T* up = h > 0 ? tmp + (h - 1) * W : nullptr;
    const T* mid = tmp + h * W;
    const T* down = h + 1 < H ? tmp + (h + 1) * W : nullptr;
    T* o = out + h * W;
    for (int64_t w = 0; w < W; ++w) o[w] = mid[w];
    if (up)
      for (int64_t w = 0; w < W; ++w) o[w] += up[w];
    if (down)
      for (int64_t w = 0; w < W; ++w) o[w] += down[w];
  }
}

// Horizontal 3-sum (zero beyond the edges) of one row of W pixels x cb channels.
template <typename T>
inline void row_sum3(const T* in, T* out, int64_t W, int64_t cb) {
  const int64_t L = W * cb;
  if (W == 1) {
    std::copy(in, in + L, out);
    return;
  }
  for (int64_t i = 0; i < cb; ++i) out[i] = in[i] + in[i + cb];
  for (int64_t i = cb; i < L - cb; ++i) out[i] = in[i - cb] + in[i] + in[i + cb];
  for (int64_t i = L - cb; i < L; ++i) out[i] = in[i - cb] + in[i];
}

// One pixel's cb channels in the first half of a ring's backward (its row's 3x3 sums of k v are
// up + mid + down): f = box3(k v) / c, H = U (1 - a) / c into h, H f into hf; returns the direct mask
// gradient U (v - f) summed over the channels (d is scratch).
template <typename scalar_t, typename T>
inline T fill_adjoints(const T* __restrict up, const T* __restrict mid, const T* __restrict down,
                       const T* __restrict u, const scalar_t* __restrict v, T inv, T om, bool known,
                       T* __restrict h, T* __restrict hf, T* __restrict d, int64_t cb) {
  for (int64_t j = 0; j < cb; ++j) {
    const T fv = (up[j] + mid[j] + down[j]) * inv;
    const T hv = u[j] * om;
    h[j] = hv;
    hf[j] = hv * fv;
    d[j] = known ? u[j] * (static_cast<T>(v[j]) - fv) : T(0);
  }
  return sum8(d, cb);
}

// The second half, once the 3x3 sums of H (hu + hm + hd) and of H f (fu + fm + fd) are known:
// through s = box3(a v) and c = box3(a), d a += v box3(H) - box3(H f) (returned, summed over the
// channels); the value's adjoint becomes U keep + a box3(H).
template <typename scalar_t, typename T>
inline T sum_adjoints(const T* __restrict hu, const T* __restrict hm, const T* __restrict hd, const T* __restrict fu,
                      const T* __restrict fm, const T* __restrict fd, const scalar_t* __restrict v, T a, T keep,
                      T* __restrict u, T* __restrict d, int64_t cb) {
  for (int64_t j = 0; j < cb; ++j) {
    const T bH = hu[j] + hm[j] + hd[j];
    const T bHF = fu[j] + fm[j] + fd[j];
    d[j] = static_cast<T>(v[j]) * bH - bHF;
    u[j] = u[j] * keep + a * bH;
  }
  return sum8(d, cb);
}

// Per-sample factors of every ring of the backward, shared by all channels (both layouts), as
// [n][ring][pixel]: inv = 1 / c (0 where c == 0, so inv > 0 says "known"), om = (1 - a) inv, keep = a
// where known (else 1); keep_prod[n][pixel], the product of the keeps over the rings, is what reaches
// x without fill_grad.
template <typename T>
struct RingFactors {
  std::vector<T> inv, om, keep, keep_prod;
  RingFactors(const T* k, const T* c, int64_t N, int64_t HW, int64_t iters)
      : inv(N * iters * HW), om(N * iters * HW), keep(N * iters * HW), keep_prod(N * HW, T(1)) {
    const int64_t KS = (iters + 1) * HW, CS = iters * HW;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        for (int64_t t = 0; t < iters; ++t)
          for (int64_t p = 0; p < HW; ++p) {
            const int64_t i = n * CS + t * HW + p;
            const T a = k[n * KS + t * HW + p], cnt = c[i];
            inv[i] = cnt > T(0) ? T(1) / cnt : T(0);
            om[i] = (T(1) - a) * inv[i];
            keep[i] = cnt > T(0) ? a : T(1);
            keep_prod[n * HW + p] *= keep[i];
          }
    });
  }
};

// Scratch of one thread's channel blocks in ring_grads_nhwc (sized for blocks of up to CB channels).
template <typename scalar_t, typename T>
struct BlockScratch {
  std::vector<scalar_t> vs;  // v_0 .. v_{iters-1} of the block, compact H x W x cb
  std::vector<T> U;
  // Rolling rows: horizontal sums of k v, H and H f (three rows each), one row of H, H f and the
  // per-element mask gradients, and a zero row for the image's edges.
  std::vector<T> hkv, hH, hHF, rowH, rowHF, rowD, zero;
  BlockScratch(int64_t iters, int64_t H, int64_t W, int64_t CB)
      : vs(iters * H * W * CB), U(H * W * CB), hkv(3 * W * CB), hH(3 * W * CB),
        hHF(3 * W * CB), rowH(W * CB), rowHF(W * CB), rowD(W * CB), zero(W * CB, T(0)) {}
};

// The rings' backward of one sample's block of channels [c0, c0 + cb) (see ring_grads_nhwc). FIXED > 0
// makes the block width a compile-time constant: the per-pixel loops over a block's channels are
// then fully unrolled vector code; a runtime width pays loop set-up at every pixel, which at 16-24
// channels cost more than the arithmetic.
template <int64_t FIXED, typename scalar_t, typename T>
void block_grads(BlockScratch<scalar_t, T>& b, const RingFactors<T>& f, const scalar_t* xp, const scalar_t* gp,
                 const scalar_t* m, scalar_t* gxp, const T* kn, const T* cn, T* dkn, int64_t n, int64_t c0,
                 int64_t cb_dyn, int64_t C, int64_t H, int64_t W, int64_t iters, bool fill_grad) {
  const int64_t cb = FIXED > 0 ? FIXED : cb_dyn;
  const int64_t HW = H * W, Sb = HW * cb, L = W * cb;
  // The block's channels are one cache line per pixel, C channels apart: a stride that the hardware
  // prefetchers lose at every page, so the reads ahead are asked for explicitly.
  constexpr int64_t ahead = 8;
  for (int64_t p = 0; p < HW; ++p) {
    const int64_t src = (n * HW + p) * C + c0;
    if (p + ahead < HW) {
      __builtin_prefetch(xp + src + ahead * C);
      __builtin_prefetch(gp + src + ahead * C);
    }
    gather_block(xp + src, gp + src, m[p] > scalar_t(0), b.vs.data() + p * cb, b.U.data() + p * cb, cb);
  }
  for (int64_t t = 1; t < iters; ++t)
    ring_nhwc(kn + (t - 1) * HW, cn + (t - 1) * HW, b.vs.data() + (t - 1) * Sb, b.vs.data() + t * Sb, H, W, cb);
  T* U = b.U.data();
  const T* zero = b.zero.data();
  auto slot = [L](std::vector<T>& buf, int64_t r) { return buf.data() + (r % 3) * L; };
  for (int64_t t = iters; t >= 1; --t) {
    const T* a = kn + (t - 1) * HW;
    const int64_t fr = (n * iters + t - 1) * HW;  // this ring's factors
    const T* inv = f.inv.data() + fr;
    const T* om = f.om.data() + fr;
    const T* keep = f.keep.data() + fr;
    const scalar_t* v = b.vs.data() + (t - 1) * Sb;
    T* dkt = dkn + (t - 1) * HW;
    auto kv_row = [&](int64_t r) {  // hkv(r) = horizontal sums of k v on row r
      T* tmp = b.rowD.data();
      for (int64_t w = 0; w < W; ++w) scale_block(v + (r * W + w) * cb, a[r * W + w], tmp + w * cb, cb);
      row_sum3(tmp, slot(b.hkv, r), W, cb);
    };
    kv_row(0);
    for (int64_t s = 0; s <= H; ++s) {
      if (s < H) {
        // Row s: f = box3(k v) / c, H = U (1 - a) / c, the direct mask gradient U (v - f).
        if (s + 1 < H) kv_row(s + 1);
        const T* up = s > 0 ? slot(b.hkv, s - 1) : zero;
        const T* mid = slot(b.hkv, s);
        const T* down = s + 1 < H ? slot(b.hkv, s + 1) : zero;
        for (int64_t w = 0; w < W; ++w) {
          const int64_t p = s * W + w;
          const int64_t i = w * cb;
          dkt[p] += fill_adjoints(up + i, mid + i, down + i, U + p * cb, v + p * cb, inv[p], om[p], inv[p] > T(0),
                                  b.rowH.data() + i, b.rowHF.data() + i, b.rowD.data() + i, cb);
        }
        row_sum3(b.rowH.data(), slot(b.hH, s), W, cb);
        row_sum3(b.rowHF.data(), slot(b.hHF, s), W, cb);
      }
      if (s >= 1) {
        // Row r = s - 1, whose H neighbours are all known now: through s = box3(a v) and
        // c = box3(a), d a_q += v_q box3(H) - box3(H f); the value's adjoint gets a_q box3(H).
        const int64_t r = s - 1;
        const T* hu = r > 0 ? slot(b.hH, r - 1) : zero;
        const T* hm = slot(b.hH, r);
        const T* hd = r + 1 < H ? slot(b.hH, r + 1) : zero;
        const T* fu = r > 0 ? slot(b.hHF, r - 1) : zero;
        const T* fm = slot(b.hHF, r);
        const T* fd = r + 1 < H ? slot(b.hHF, r + 1) : zero;
        for (int64_t w = 0; w < W; ++w) {
          const int64_t p = r * W + w;
          const int64_t i = w * cb;
          dkt[p] += sum_adjoints(hu + i, hm + i, hd + i, fu + i, fm + i, fd + i, v + p * cb, a[p], keep[p],
                                 U + p * cb, b.rowD.data() + i, cb);
        }
      }
    }
  }
  for (int64_t p = 0; p < HW; ++p) {
    const int64_t dst = (n * HW + p) * C + c0;
    if (p + ahead < HW) {
      __builtin_prefetch(gp + dst + ahead * C);
      __builtin_prefetch(gxp + dst + ahead * C, 1);
    }
    if (!(m[p] > scalar_t(0)))
      std::fill(gxp + dst, gxp + dst + cb, scalar_t(0));
    else if (fill_grad)
      scale_block(U + p * cb, T(1), gxp + dst, cb);
    else
      scale_block(gp + dst, f.keep_prod[n * HW + p], gxp + dst, cb);
  }
}

// The rings' backward for NHWC input (the plane version below, with channels innermost): gx
// (NHWC) and dk[n][ring][pixel], the mask gradient of each ring summed over channels. Work goes in
// parallel over (sample, block of 16 channels), gathered into compact H x W x 16 buffers. Each
// ring's backward is one sweep down the rows: the three 3x3 sums it needs (box3(k v) for the fill,
// box3(H) and box3(H f) for the adjoints) are kept as horizontal sums of the last three rows, so the
// intermediates stay in cache and U is read and written once per ring. Without fill_grad the part
// of the gradient that reaches x is grad times the product over rings of each pixel's keep factor
// (a per-pixel scalar, no per-channel adjoint).
template <typename scalar_t, typename T>
void ring_grads_nhwc(const scalar_t* xp, const scalar_t* gp, const scalar_t* mp, scalar_t* gxp, const T* k,
                     const T* c, const RingFactors<T>& f, T* dk, int64_t N, int64_t C, int64_t H, int64_t W, int64_t iters,
                     bool fill_grad) {
  constexpr int64_t CB = 16;  // 16 channels: 4 SSE vectors per pixel, and batch-1 jobs for every thread
  const int64_t HW = H * W, KS = (iters + 1) * HW, CS = iters * HW, blocks = (C + CB - 1) / CB;
  std::vector<std::vector<T>> partial(at::get_num_threads());
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T>& dkp = partial[at::get_thread_num()];
    if (dkp.empty()) dkp.assign(N * CS, T(0));
    BlockScratch<scalar_t, T> scratch(iters, H, W, CB);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t n = job / blocks, c0 = (job % blocks) * CB, cb = std::min(CB, C - c0);
      const auto grads = cb == CB ? &block_grads<CB, scalar_t, T> : &block_grads<0, scalar_t, T>;
      grads(scratch, f, xp, gp, mp + n * HW, gxp, k + n * KS, c + n * CS, dkp.data() + n * CS, n, c0, cb, C, H, W,
            iters, fill_grad);
    }
  });
  for (const auto& part : partial)
    if (!part.empty())
      for (int64_t i = 0; i < N * CS; ++i) dk[i] += part[i];
}

// k v of a plane.
template <typename scalar_t, typename T>
void plane_kv(const T* __restrict k, const scalar_t* __restrict v, T* __restrict out, int64_t HW) {
  for (int64_t p = 0; p < HW; ++p) out[p] = k[p] * static_cast<T>(v[p]);
}

// The plane backward's two pointwise passes of a ring (the per-pixel factors precomputed per sample):
// f = box3(a v) / c, H = U (1 - a) / c into hs, H f into hf, and the direct mask gradient U (v - f)
// where known, added to dk ...
template <typename scalar_t, typename T>
void plane_fill_adjoints(const T* __restrict f, const T* __restrict u, const scalar_t* __restrict v,
                         const T* __restrict inv, const T* __restrict om, T* __restrict hs, T* __restrict hf,
                         T* __restrict dk, int64_t HW) {
  for (int64_t p = 0; p < HW; ++p) {
    const T fv = f[p] * inv[p];
    const T hv = u[p] * om[p];
    hs[p] = hv;
    hf[p] = hv * fv;
    dk[p] += inv[p] > T(0) ? u[p] * (static_cast<T>(v[p]) - fv) : T(0);
  }
}

// ... then, with bh = box3(H) and bhf = box3(H f): through s = box3(a v) and c = box3(a),
// d a += v bh - bhf; the value's adjoint becomes U keep + a bh (when update: the last ring's U is
// unused without fill_grad).
template <typename scalar_t, typename T>
void plane_sum_adjoints(const T* __restrict bh, const T* __restrict bhf, const scalar_t* __restrict v,
                        const T* __restrict a, const T* __restrict keep, T* __restrict u, T* __restrict dk,
                        bool update, int64_t HW) {
  for (int64_t p = 0; p < HW; ++p) dk[p] += static_cast<T>(v[p]) * bh[p] - bhf[p];
  if (update)
    for (int64_t p = 0; p < HW; ++p) u[p] = u[p] * keep[p] + a[p] * bh[p];
}

std::tuple<at::Tensor, at::Tensor> soft_fill_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                         const at::Tensor& mask_in, int64_t iters, bool fill_grad) {
  check_soft_fill(x_in, mask_in, iters, "soft_fill_backward");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "soft_fill_backward: grad must have x's shape ", x_in.sizes(),
              ", got ", grad_in.sizes());
  if (saturated_rings(iters, x_in.size(2), x_in.size(3)) == 0) return scale_by_mask_backward(grad_in, x_in, mask_in);
  const auto fmt = layout_of(x_in);
  const bool nhwc = channels_innermost(x_in);  // else planes (NCHW inside)
  const auto inner = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(inner);
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous(inner);
  const at::Tensor mask = mask_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  iters = saturated_rings(iters, H, W);
  at::Tensor gx = at::empty_like(x, x.options().memory_format(inner));
  at::Tensor gm = at::zeros_like(mask);
  if (x.numel() == 0) return {gx.contiguous(fmt), gm};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_fill_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* mp = mask.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* gmp = gm.data_ptr<scalar_t>();
    const int64_t KS = (iters + 1) * HW, CS = iters * HW;
    std::vector<T> k(N * KS), c(N * CS);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) knownness(mp + n * HW, H, W, iters, k.data() + n * KS, c.data() + n * CS);
    });
    std::vector<T> dk(N * CS, T(0));  // each ring's mask gradient, summed over channels
    const RingFactors<T> factors(k.data(), c.data(), N, HW, iters);
    const T* inv = factors.inv.data();
    const T* om = factors.om.data();
    const T* keep = factors.keep.data();
    const T* keep_prod = factors.keep_prod.data();
    if (nhwc) {
      ring_grads_nhwc<scalar_t, T>(xp, gp, mp, gxp, k.data(), c.data(), factors, dk.data(), N, C, H, W, iters, fill_grad);
    } else {
      // Per-thread sums over channels of each ring's mask gradient: [thread][n][ring][pixel].
      const int threads = at::get_num_threads();
      std::vector<std::vector<T>> partial(threads);
      at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
        std::vector<T>& dk = partial[at::get_thread_num()];
        if (dk.empty()) dk.assign(N * CS, T(0));
        std::vector<scalar_t> vs(iters * HW);  // v_0 .. v_{iters-1}
        std::vector<T> U(HW), kvp(HW), f(HW), Hs(HW), HF(HW), bH(HW), bHF(HW), tmp(HW);
        std::vector<T> kv((H + 2) * (W + 2));
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n = plane / C;
          const T* kn = k.data() + n * KS;
          const T* cn = c.data() + n * CS;
          select_plane(xp + plane * HW, mp + n * HW, vs.data(), HW);
          for (int64_t t = 1; t < iters; ++t)
            ring(kn + (t - 1) * HW, cn + (t - 1) * HW, vs.data() + (t - 1) * HW, vs.data() + t * HW, H, W, kv.data());
          for (int64_t p = 0; p < HW; ++p) U[p] = static_cast<T>(gp[plane * HW + p]);
          // Without fill_grad only the mask's gradient needs U, and the last ring's update of U is unused.
          for (int64_t t = iters; t >= 1; --t) {
            const int64_t r = n * CS + (t - 1) * HW;
            const scalar_t* v = vs.data() + (t - 1) * HW;
            plane_kv(kn + (t - 1) * HW, v, kvp.data(), HW);
            box3(kvp.data(), f.data(), H, W, tmp.data());
            plane_fill_adjoints(f.data(), U.data(), v, inv + r, om + r, Hs.data(), HF.data(),
                                dk.data() + r, HW);
            box3(Hs.data(), bH.data(), H, W, tmp.data());
            box3(HF.data(), bHF.data(), H, W, tmp.data());
            plane_sum_adjoints(bH.data(), bHF.data(), v, kn + (t - 1) * HW, keep + r, U.data(), dk.data() + r,
                               fill_grad || t > 1, HW);
          }
          const scalar_t* m = mp + n * HW;
          scalar_t* g = gxp + plane * HW;
          if (fill_grad) {
            for (int64_t p = 0; p < HW; ++p) g[p] = m[p] > scalar_t(0) ? static_cast<scalar_t>(U[p]) : scalar_t(0);
          } else {
            const scalar_t* gi = gp + plane * HW;
            const T* kp = keep_prod + n * HW;
            for (int64_t p = 0; p < HW; ++p)
              g[p] = m[p] > scalar_t(0) ? static_cast<scalar_t>(static_cast<T>(gi[p]) * kp[p]) : scalar_t(0);
          }
        }
      });
      // Sum the threads' buffers.
      for (const auto& part : partial)
        if (!part.empty())
          for (size_t i = 0; i < dk.size(); ++i) dk[i] += part[i];
    }
    // Carry each ring's gradient back through k_t = maxpool3(k_{t-1}).
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> carry(HW), next(HW);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(carry.begin(), carry.end(), T(0));  // d L / d k_iters: k_iters is not used
        for (int64_t t = iters; t >= 1; --t) {
          const T* kp = k.data() + n * KS + (t - 1) * HW;
          const T* ring_grad = dk.data() + n * CS + (t - 1) * HW;
          for (int64_t p = 0; p < HW; ++p) next[p] = ring_grad[p];
          for (int64_t h = 0; h < H; ++h) {
            for (int64_t w = 0; w < W; ++w) {
              const T g = carry[h * W + w];
              if (g == T(0)) continue;
              int64_t arg = -1;
              T mx = -std::numeric_limits<T>::infinity();
              for (int64_t dy = -1; dy <= 1; ++dy) {
                const int64_t hh = h + dy;
                if (hh < 0 || hh >= H) continue;
                for (int64_t dx = -1; dx <= 1; ++dx) {
                  const int64_t ww = w + dx;
                  if (ww < 0 || ww >= W) continue;
                  if (kp[hh * W + ww] > mx) {
                    mx = kp[hh * W + ww];
                    arg = hh * W + ww;
                  }
                }
              }
              next[arg] += g;
            }
          }
          std::swap(carry, next);
        }
        for (int64_t p = 0; p < HW; ++p) gmp[n * HW + p] = static_cast<scalar_t>(carry[p]);
      }
    });
  });
  return {gx.contiguous(fmt), gm};
}

}  // namespace

TORCH_LIBRARY_IMPL(masked_ops, CPU, m) {
  m.impl("soft_fill", &soft_fill_cpu);
  m.impl("soft_fill_backward", &soft_fill_backward_cpu);
}

}  // namespace cpu
}  // namespace masked_ops
