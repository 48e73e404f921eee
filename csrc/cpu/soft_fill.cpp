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
// as in the paper). The mask's gradient of each ring is summed over channels (per-thread
// buffers), then carried back through the maxpool3 chain of k (first maximum, as ATen).
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

void check_soft_fill(const at::Tensor& x, const at::Tensor& mask, int64_t iters, const char* op) {
  check_image(x, op);
  check_mask_like(mask, x, x.size(2), x.size(3), op);
  TORCH_CHECK(iters >= 0, op, ": iters must be >= 0, got ", iters);
}

// Channels-last (NHWC) versions of the rings: one sample at a time, every pass parallel over rows,
// channels innermost, so a channels_last activation is never transposed to planes and back. The
// sums run in the same order as the plane versions (row-major over the 3x3 neighbourhood; box3:
// rows left + centre + right, then centre + up + down), so both layouts give the same values.
template <typename scalar_t, typename T>
void ring_nhwc(const T* k, const T* c, const scalar_t* v, scalar_t* out, int64_t H, int64_t W, int64_t C) {
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<T> acc(C);
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = 0; w < W; ++w) {
        const int64_t p = h * W + w;
        const T a = k[p], cnt = c[p];
        const scalar_t* vp = v + p * C;
        scalar_t* o = out + p * C;
        if (!(cnt > T(0)) || a == T(1)) {  // no known neighbour, or fully known: unchanged
          std::copy(vp, vp + C, o);
          continue;
        }
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t hh = h - 1; hh <= h + 1; ++hh) {
          if (hh < 0 || hh >= H) continue;
          for (int64_t ww = w - 1; ww <= w + 1; ++ww) {
            if (ww < 0 || ww >= W) continue;
            const T kk = k[hh * W + ww];
            const scalar_t* vn = v + (hh * W + ww) * C;
            for (int64_t ch = 0; ch < C; ++ch) acc[ch] += kk * static_cast<T>(vn[ch]);
          }
        }
        for (int64_t ch = 0; ch < C; ++ch)
          o[ch] = static_cast<scalar_t>(a * static_cast<T>(vp[ch]) + (T(1) - a) * (acc[ch] / cnt));
      }
    }
  });
}

template <typename T>
void box3_nhwc(const T* in, T* out, int64_t H, int64_t W, int64_t C, T* tmp) {
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const T* r = in + (h * W + w) * C;
        T* t = tmp + (h * W + w) * C;
        const bool left = w > 0, right = w + 1 < W;
        for (int64_t ch = 0; ch < C; ++ch) {
          T s = left ? r[ch - C] + r[ch] : r[ch];
          t[ch] = right ? s + r[ch + C] : s;
        }
      }
  });
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const T* mid = tmp + h * W * C;
      const T* up = h > 0 ? mid - W * C : nullptr;
      const T* down = h + 1 < H ? mid + W * C : nullptr;
      T* o = out + h * W * C;
      for (int64_t i = 0; i < W * C; ++i) {
        T s = mid[i];
        if (up) s += up[i];
        if (down) s += down[i];
        o[i] = s;
      }
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_fill_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    std::vector<T> k((iters + 1) * HW), c(iters * HW);
    std::vector<scalar_t> a(HW * C), b(iters > 1 ? HW * C : 0);
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* m = mask.const_data_ptr<scalar_t>() + n * HW;
      const scalar_t* xs = x.const_data_ptr<scalar_t>() + n * HW * C;
      knownness(m, H, W, iters, k.data(), c.data());
      at::parallel_for(0, HW, 256, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          for (int64_t ch = 0; ch < C; ++ch) a[p * C + ch] = m[p] > scalar_t(0) ? xs[p * C + ch] : scalar_t(0);
      });
      scalar_t* dst_n = out.data_ptr<scalar_t>() + n * HW * C;
      for (int64_t t = 1; t <= iters; ++t) {
        scalar_t* dst = t == iters ? dst_n : b.data();
        ring_nhwc(k.data() + (t - 1) * HW, c.data() + (t - 1) * HW, a.data(), dst, H, W, C);
        if (t < iters) std::swap(a, b);
      }
    }
  });
  return out;
}

at::Tensor soft_fill_cpu(const at::Tensor& x_in, const at::Tensor& mask_in, int64_t iters, bool /*fill_grad*/) {
  check_soft_fill(x_in, mask_in, iters, "soft_fill");
  if (saturated_rings(iters, x_in.size(2), x_in.size(3)) == 0) return scale_by_mask(x_in, mask_in);
  if (layout_of(x_in) == at::MemoryFormat::ChannelsLast && x_in.size(1) > 1) return soft_fill_nhwc(x_in, mask_in, iters);
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

// The rings' backward for NHWC input (the plane version below, with channels innermost): gx
// (NHWC) and dk[n][ring][pixel], the mask gradient of each ring summed over channels. Work goes
// in parallel over (sample, block of CB channels), gathered into compact H x W x CB buffers that
// stay in cache (whole-tensor passes were memory-bound); per-thread dk sums, added at the end.
template <typename scalar_t, typename T>
void ring_grads_nhwc(const scalar_t* xp, const scalar_t* gp, const scalar_t* mp, scalar_t* gxp, const T* k,
                     const T* c, T* dk, int64_t N, int64_t C, int64_t H, int64_t W, int64_t iters, bool fill_grad) {
  const int64_t HW = H * W, KS = (iters + 1) * HW, CS = iters * HW;
  const int64_t CB = std::min<int64_t>(C, 16), blocks = (C + CB - 1) / CB;
  std::vector<std::vector<T>> partial(at::get_num_threads());
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T>& dkp = partial[at::get_thread_num()];
    if (dkp.empty()) dkp.assign(N * CS, T(0));
    const int64_t S = HW * CB;
    std::vector<scalar_t> vs(iters * S);  // v_0 .. v_{iters-1} of the block
    std::vector<T> U(S), Gv(S), kvp(S), f(S), Hs(S), HF(S), tmp(S);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t n = job / blocks, c0 = (job % blocks) * CB, cb = std::min(CB, C - c0);
      const T* kn = k + n * KS;
      const T* cn = c + n * CS;
      const scalar_t* m = mp + n * HW;
      for (int64_t p = 0; p < HW; ++p) {
        const int64_t src = (n * HW + p) * C + c0;
        for (int64_t j = 0; j < cb; ++j) {
          vs[p * cb + j] = m[p] > scalar_t(0) ? xp[src + j] : scalar_t(0);
          U[p * cb + j] = Gv[p * cb + j] = static_cast<T>(gp[src + j]);
        }
      }
      for (int64_t t = 1; t < iters; ++t)
        ring_nhwc(kn + (t - 1) * HW, cn + (t - 1) * HW, vs.data() + (t - 1) * S, vs.data() + t * S, H, W, cb);
      for (int64_t t = iters; t >= 1; --t) {
        const T* a = kn + (t - 1) * HW;
        const T* cnt = cn + (t - 1) * HW;
        const scalar_t* v = vs.data() + (t - 1) * S;
        T* dkt = dkp.data() + n * CS + (t - 1) * HW;
        for (int64_t p = 0; p < HW; ++p)
          for (int64_t i = p * cb; i < (p + 1) * cb; ++i) kvp[i] = a[p] * static_cast<T>(v[i]);
        box3_nhwc(kvp.data(), f.data(), H, W, cb, tmp.data());
        for (int64_t p = 0; p < HW; ++p) {
          const bool known = cnt[p] > T(0);
          const T inv = known ? T(1) / cnt[p] : T(0);
          T acc = T(0);
          for (int64_t i = p * cb; i < (p + 1) * cb; ++i) {
            const T fv = f[i] * inv;
            const T hv = U[i] * (T(1) - a[p]) * inv;
            Hs[i] = hv;
            HF[i] = hv * fv;
            acc += known ? U[i] * (static_cast<T>(v[i]) - fv) : T(0);
          }
          dkt[p] += acc;
        }
        T* bH = kvp.data();  // (kvp and f are free again: bH = box3(H), bHF = box3(H f))
        T* bHF = f.data();
        box3_nhwc(Hs.data(), bH, H, W, cb, tmp.data());
        box3_nhwc(HF.data(), bHF, H, W, cb, tmp.data());
        for (int64_t p = 0; p < HW; ++p) {
          const T keep = cnt[p] > T(0) ? a[p] : T(1);
          T acc = T(0);
          for (int64_t i = p * cb; i < (p + 1) * cb; ++i) {
            acc += static_cast<T>(v[i]) * bH[i] - bHF[i];
            U[i] = U[i] * keep + a[p] * bH[i];
            Gv[i] = fill_grad ? U[i] : Gv[i] * keep;
          }
          dkt[p] += acc;
        }
      }
      const T* G = fill_grad ? U.data() : Gv.data();
      for (int64_t p = 0; p < HW; ++p) {
        const int64_t dst = (n * HW + p) * C + c0;
        for (int64_t j = 0; j < cb; ++j)
          gxp[dst + j] = m[p] > scalar_t(0) ? static_cast<scalar_t>(G[p * cb + j]) : scalar_t(0);
      }
    }
  });
  for (const auto& part : partial)
    if (!part.empty())
      for (int64_t i = 0; i < N * CS; ++i) dk[i] += part[i];
}

std::tuple<at::Tensor, at::Tensor> soft_fill_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                         const at::Tensor& mask_in, int64_t iters, bool fill_grad) {
  check_soft_fill(x_in, mask_in, iters, "soft_fill_backward");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "soft_fill_backward: grad must have x's shape ", x_in.sizes(),
              ", got ", grad_in.sizes());
  if (saturated_rings(iters, x_in.size(2), x_in.size(3)) == 0) return scale_by_mask_backward(grad_in, x_in, mask_in);
  const auto fmt = layout_of(x_in);
  const bool nhwc = fmt == at::MemoryFormat::ChannelsLast && x_in.size(1) > 1;  // else planes (NCHW inside)
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
    if (nhwc) {
      ring_grads_nhwc<scalar_t, T>(xp, gp, mp, gxp, k.data(), c.data(), dk.data(), N, C, H, W, iters, fill_grad);
    } else {
      // Per-thread sums over channels of each ring's mask gradient: [thread][n][ring][pixel].
      const int threads = at::get_num_threads();
      std::vector<std::vector<T>> partial(threads);
      at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
        std::vector<T>& dk = partial[at::get_thread_num()];
        if (dk.empty()) dk.assign(N * CS, T(0));
        std::vector<scalar_t> vs(iters * HW);  // v_0 .. v_{iters-1}
        std::vector<T> U(HW), Gv(HW), kvp(HW), f(HW), Hs(HW), HF(HW), bH(HW), bHF(HW), tmp(HW);
        std::vector<T> kv((H + 2) * (W + 2));
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n = plane / C;
          const T* kn = k.data() + n * KS;
          const T* cn = c.data() + n * CS;
          select_plane(xp + plane * HW, mp + n * HW, vs.data(), HW);
          for (int64_t t = 1; t < iters; ++t)
            ring(kn + (t - 1) * HW, cn + (t - 1) * HW, vs.data() + (t - 1) * HW, vs.data() + t * HW, H, W, kv.data());
          for (int64_t p = 0; p < HW; ++p) U[p] = Gv[p] = static_cast<T>(gp[plane * HW + p]);
          for (int64_t t = iters; t >= 1; --t) {
            const T* a = kn + (t - 1) * HW;
            const T* cnt = cn + (t - 1) * HW;
            const scalar_t* v = vs.data() + (t - 1) * HW;
            T* dkt = dk.data() + n * CS + (t - 1) * HW;
            // f = box3(a v) / c where c > 0; H = U (1 - a) / c; the direct mask gradient U (v - f).
            for (int64_t p = 0; p < HW; ++p) kvp[p] = a[p] * static_cast<T>(v[p]);
            box3(kvp.data(), f.data(), H, W, tmp.data());
            for (int64_t p = 0; p < HW; ++p) {
              const bool known = cnt[p] > T(0);
              const T inv = known ? T(1) / cnt[p] : T(0);
              const T fv = f[p] * inv;
              const T hv = U[p] * (T(1) - a[p]) * inv;
              Hs[p] = hv;
              HF[p] = hv * fv;
              dkt[p] += known ? U[p] * (static_cast<T>(v[p]) - fv) : T(0);  // d/da of a v + (1 - a) f
            }
            box3(Hs.data(), bH.data(), H, W, tmp.data());
            box3(HF.data(), bHF.data(), H, W, tmp.data());
            for (int64_t p = 0; p < HW; ++p) {
              // Through s = box3(a v) and c = box3(a): d a_q += v_q sum H - sum H f; the value's adjoint
              // gets a_q sum H (the fill reads v; without fill_grad only the mask-side adjoint U does).
              dkt[p] += static_cast<T>(v[p]) * bH[p] - bHF[p];
              const T keep = cnt[p] > T(0) ? a[p] : T(1);
              U[p] = U[p] * keep + a[p] * bH[p];
              Gv[p] = fill_grad ? U[p] : Gv[p] * keep;
            }
          }
          const scalar_t* m = mp + n * HW;
          scalar_t* g = gxp + plane * HW;
          const T* G = fill_grad ? U.data() : Gv.data();
          for (int64_t p = 0; p < HW; ++p) g[p] = m[p] > scalar_t(0) ? static_cast<scalar_t>(G[p]) : scalar_t(0);
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
