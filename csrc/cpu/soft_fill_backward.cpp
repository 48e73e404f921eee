// soft_fill on CPU: the backward, in fused passes (the math and the forward: soft_fill.cpp; what
// both use: soft_fill.h).
//
// The backward recomputes the rings (cheaper than saving them) and runs them in reverse with U,
// the gradient of the value (it reaches the mask through every use); without fill_grad, fill values
// pass no gradient to x (as in the paper), so x's gradient is grad times the product of each ring's
// per-pixel keep factor. The mask's gradient of each ring is summed over channels (channels_last:
// per pixel inside one sweep per ring; planes: per-thread buffers), then carried back through the
// maxpool3 chain of k (first maximum, as ATen). Why the loops are shaped as they are:
// docs/design.md, section 5.
#include "soft_fill.h"

#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace masked_ops {
namespace cpu {
namespace {

// The backward of scale_by_mask (iters == 0, soft_fill.cpp): gx = g * m (0 where m == 0),
// gm = sum_c g * x over the visible pixels.
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

// Scratch of one thread's ring sweep over NHWC rows: horizontal 3x3 sums of a v and of om U for three
// rolling rows (W x C each), one zero-padded row of products before its sum, and a zero row for the
// image's edges.
template <typename T>
struct RowScratch {
  std::vector<T> hav, hou, pad, zero;
  RowScratch(int64_t W, int64_t C) : hav(3 * W * C), hou(3 * W * C), pad((W + 2) * C), zero(W * C, T(0)) {}
};

// h = the horizontal 3-sums (zero beyond the row's ends) of s[w] * src[w], C channels per pixel;
// pixels with s <= 0 read as 0, so a removed pixel's x (NaN, inf) never enters. pad: (W + 2) x C.
template <typename src_t, typename T>
void weighted_row_sum3(const src_t* __restrict src, const T* __restrict s, int64_t W, int64_t C,
                       T* __restrict pad, T* __restrict h) {
  std::fill(pad, pad + C, T(0));
  std::fill(pad + (W + 1) * C, pad + (W + 2) * C, T(0));
  for (int64_t w = 0; w < W; ++w) {
    T* d = pad + (w + 1) * C;
    if (s[w] > T(0))
      scale_block(src + w * C, s[w], d, C);
    else
      std::fill(d, d + C, T(0));
  }
  for (int64_t i = 0, L = W * C; i < L; ++i) h[i] = pad[i] + pad[i + C] + pad[i + 2 * C];
}

// One ring of one sample in the NHWC backward (see ring_grads_nhwc): its inputs and what it writes.
template <typename scalar_t, typename T, typename u_t>
struct RingSweep {
  const scalar_t* v;  // v_{t-1}, HW x C; the first ring reads x itself, as 0 where a == 0 (select)
  bool select;
  const u_t* U;                  // the value's adjoint after ring t, H rows of W x C, urow apart
  int64_t urow;
  const T *a, *inv, *om, *keep;  // per pixel: k_{t-1}, 1 / c, (1 - a) / c, the keep factor
  T* dk;                         // ring t's mask gradient, added to (HW)
  T* P;                          // om inv sum_c U box3(a v), written (HW); the caller boxes it
  T* next;                       // NEXT: the value's adjoint before ring t, HW x C
  scalar_t* gx;                  // GX: the gradient to x (first ring), HW x C
  int64_t H, W, C;
};

// One visible pixel's C channels: from the rows' horizontal sums above, at and below (a*: of a v,
// o*: of om U), the channel sums sum U box3(a v), sum U v and sum v box3(om U) into sums; NEXT writes
// U keep + a box3(om U), GX writes U keep (+ a box3(om U) with FILL). Eight partial sums per channel
// sum (lanes8): the loop vectorises without reordering what the compiler may not reorder.
template <bool NEXT, bool GX, bool FILL, typename scalar_t, typename T, typename u_t>
inline void ring_pixel(const T* __restrict au, const T* __restrict am, const T* __restrict ad,
                       const T* __restrict ou, const T* __restrict omid, const T* __restrict od,
                       const scalar_t* __restrict v, const u_t* __restrict U, T a, T keep, T* __restrict next,
                       scalar_t* __restrict gx, int64_t C, T* sums) {
  T s2[8] = {}, d1[8] = {}, e[8] = {};
  auto step = [&](int64_t q, T& s2l, T& d1l, T& el) {
    const T bav = au[q] + am[q] + ad[q];
    const T bou = ou[q] + omid[q] + od[q];
    const T u = static_cast<T>(U[q]), vv = static_cast<T>(v[q]);
    s2l += u * bav;
    d1l += u * vv;
    el += vv * bou;
    if (NEXT) next[q] = u * keep + a * bou;
    if (GX) gx[q] = static_cast<scalar_t>(FILL ? u * keep + a * bou : u * keep);
  };
  int64_t j = 0;
  for (; j + 8 <= C; j += 8)
    for (int l = 0; l < 8; ++l) step(j + l, s2[l], d1[l], e[l]);
  T t2 = T(0), t1 = T(0), te = T(0);
  for (; j < C; ++j) step(j, t2, t1, te);
  sums[0] = lanes8(s2) + t2;
  sums[1] = lanes8(d1) + t1;
  sums[2] = lanes8(e) + te;
}

// A removed pixel of the first ring (v reads 0): only sum U box3(a v) is not 0.
template <typename T, typename u_t>
inline T removed_pixel(const T* __restrict au, const T* __restrict am, const T* __restrict ad,
                       const u_t* __restrict U, int64_t C) {
  T s2[8] = {}, t2 = T(0);
  int64_t j = 0;
  for (; j + 8 <= C; j += 8)
    for (int l = 0; l < 8; ++l) s2[l] += static_cast<T>(U[j + l]) * (au[j + l] + am[j + l] + ad[j + l]);
  for (; j < C; ++j) t2 += static_cast<T>(U[j]) * (au[j] + am[j] + ad[j]);
  return lanes8(s2) + t2;
}

// Rows [lo, hi) of one ring's sweep: one pass down the rows, each row's horizontal sums computed once
// (a chunk recomputes the row above and below it), the mask gradient's per-pixel terms into dk, P.
template <bool NEXT, bool GX, bool FILL, typename scalar_t, typename T, typename u_t>
void sweep_rows(const RingSweep<scalar_t, T, u_t>& r, int64_t lo, int64_t hi, RowScratch<T>& s) {
  const int64_t H = r.H, W = r.W, C = r.C, L = W * C;
  auto slot = [L](std::vector<T>& b, int64_t row) { return b.data() + (row % 3) * L; };
  auto load_row = [&](int64_t row) {
    weighted_row_sum3(r.v + row * L, r.a + row * W, W, C, s.pad.data(), slot(s.hav, row));
    weighted_row_sum3(r.U + row * r.urow, r.om + row * W, W, C, s.pad.data(), slot(s.hou, row));
  };
  const T* zero = s.zero.data();
  if (lo > 0) load_row(lo - 1);
  load_row(lo);
  for (int64_t row = lo; row < hi; ++row) {
    if (row + 1 < H) load_row(row + 1);
    const T* au = row > 0 ? slot(s.hav, row - 1) : zero;
    const T* am = slot(s.hav, row);
    const T* ad = row + 1 < H ? slot(s.hav, row + 1) : zero;
    const T* ou = row > 0 ? slot(s.hou, row - 1) : zero;
    const T* om = slot(s.hou, row);
    const T* od = row + 1 < H ? slot(s.hou, row + 1) : zero;
    for (int64_t w = 0; w < W; ++w) {
      const int64_t p = row * W + w, i = w * C, at = p * C;
      const u_t* U = r.U + row * r.urow + i;
      T sums[3] = {T(0), T(0), T(0)};
      if (r.select && !(r.a[p] > T(0))) {
        sums[0] = removed_pixel(au + i, am + i, ad + i, U, C);
        if (GX) std::fill(r.gx + at, r.gx + at + C, scalar_t(0));
      } else {
        ring_pixel<NEXT, GX, FILL>(au + i, am + i, ad + i, ou + i, om + i, od + i, r.v + at, U, r.a[p],
                                   r.keep[p], NEXT ? r.next + at : nullptr, GX ? r.gx + at : nullptr, C, sums);
      }
      const T d2 = r.inv[p] * sums[0];  // sum_c U f
      r.dk[p] += (r.inv[p] > T(0) ? sums[1] - d2 : T(0)) + sums[2];
      r.P[p] = r.om[p] * d2;
    }
  }
}

// A thread's buffers for one sample: the forward rings v_1 .. v_{iters-1}, the value's adjoint of
// two rings (iters > 1), P, its 3x3 sum and the box's scratch, and the row sweep's scratch (used when
// one thread sweeps the whole sample; row chunks on several threads each allocate their own).
template <typename scalar_t, typename T>
struct SampleScratch {
  std::vector<scalar_t> vs;
  std::vector<T> ua, ub, P, boxP, tmp;
  RowScratch<T> rows;
  SampleScratch(int64_t iters, int64_t HW, int64_t W, int64_t C)
      : vs((iters - 1) * HW * C), ua(iters > 1 ? HW * C : 0), ub(iters > 2 ? HW * C : 0), P(HW), boxP(HW),
        tmp(HW), rows(W, C) {}
};

// The rings' backward for NHWC input (the plane version below keeps channels apart): gx and
// dk[n][ring][pixel], each ring's mask gradient summed over channels. With f = box3(a v) / c and
// H = U (1 - a) / c, ring t's mask gradient is
//     [known] sum_c U (v - f)  +  sum_c v box3(H)  -  box3(sum_c H f),
// and since the last term's channel sum commutes with the box, a ring needs two per-channel 3x3 sums
// (of a v and of om U, as horizontal sums of three rolling rows) and three channel sums per pixel;
// the value's adjoint before the ring is U keep + a box3(om U). One sweep down the rows per ring, all
// channels of a pixel together (contiguous in NHWC: no gathers). Work goes in parallel over samples,
// or, for fewer samples than twice the threads, over row chunks of each sample. Without fill_grad
// the gradient to x is grad times the product of the rings' keeps (with one ring: the first sweep's U keep).
template <typename scalar_t, typename T>
void ring_grads_nhwc(const scalar_t* xp, const scalar_t* gp, int64_t g_sample, int64_t g_row, const scalar_t* mp,
                     scalar_t* gxp, const T* k,
                     const T* c, const RingFactors<T>& f, T* dk, int64_t N, int64_t C, int64_t H, int64_t W,
                     int64_t iters, bool fill_grad) {
  const int64_t HW = H * W, S = HW * C, KS = (iters + 1) * HW, CS = iters * HW;
  const bool split_rows = N < 2 * at::get_num_threads();
  // rows(lo, hi, scratch) over the whole image, in row chunks over the threads when split_rows.
  auto over_rows = [&](SampleScratch<scalar_t, T>& ss, auto&& rows) {
    if (split_rows) {
      const int64_t grain = (H + at::get_num_threads() - 1) / at::get_num_threads();
      at::parallel_for(0, H, grain, [&](int64_t lo, int64_t hi) {
        RowScratch<T> s(W, C);
        rows(lo, hi, s);
      });
    } else {
      rows(0, H, ss.rows);
    }
  };
  auto sample = [&](int64_t n, SampleScratch<scalar_t, T>& ss) {
    const scalar_t* x = xp + n * S;
    const scalar_t* g = gp + n * g_sample;  // rows g_row apart
    const scalar_t* m = mp + n * HW;
    scalar_t* gx = gxp + n * S;
    const T* kn = k + n * KS;
    const T* cn = c + n * CS;
    // v_1 .. v_{iters-1}, as the forward computes them (ring_nhwc runs over rows when not nested).
    for (int64_t t = 1; t < iters; ++t)
      ring_nhwc(kn + (t - 1) * HW, cn + (t - 1) * HW, t == 1 ? x : ss.vs.data() + (t - 2) * S,
                ss.vs.data() + (t - 1) * S, H, W, C, t == 1, W * C);
    const bool gx_in_sweep = iters == 1 || fill_grad;
    const T* after = nullptr;      // the value's adjoint after ring t, for t < iters (after the last: grad)
    T* before = ss.ua.data();      // ... and before it, written for t > 1
    for (int64_t t = iters; t >= 1; --t) {
      const int64_t fr = (n * iters + t - 1) * HW;  // this ring's factors
      auto run = [&](const auto* U) {
        using u_t = std::remove_cv_t<std::remove_pointer_t<decltype(U)>>;
        const RingSweep<scalar_t, T, u_t> r{t == 1 ? x : ss.vs.data() + (t - 2) * S, t == 1, U,
                                            t == iters ? g_row : W * C, kn + (t - 1) * HW, f.inv.data() + fr, f.om.data() + fr,
                                            f.keep.data() + fr, dk + n * CS + (t - 1) * HW, ss.P.data(),
                                            t > 1 ? before : nullptr, gx, H, W, C};
        over_rows(ss, [&](int64_t lo, int64_t hi, RowScratch<T>& s) {
          if (t > 1)
            sweep_rows<true, false, false>(r, lo, hi, s);
          else if (!gx_in_sweep)
            sweep_rows<false, false, false>(r, lo, hi, s);
          else if (fill_grad)
            sweep_rows<false, true, true>(r, lo, hi, s);
          else
            sweep_rows<false, true, false>(r, lo, hi, s);
        });
      };
      if (t == iters)
        run(g);
      else
        run(after);
      if (t > 1) {
        after = before;
        before = before == ss.ua.data() ? ss.ub.data() : ss.ua.data();
      }
      // The last term, - box3(sum_c H f), as a plane.
      box3(ss.P.data(), ss.boxP.data(), H, W, ss.tmp.data());
      T* dkt = dk + n * CS + (t - 1) * HW;
      for (int64_t p = 0; p < HW; ++p) dkt[p] -= ss.boxP[p];
    }
    if (!gx_in_sweep) {
      const T* kp = f.keep_prod.data() + n * HW;
      over_rows(ss, [&](int64_t lo, int64_t hi, RowScratch<T>&) {
        for (int64_t p = lo * W; p < hi * W; ++p) {
          if (m[p] > scalar_t(0))
            scale_block(g + (p / W) * g_row + (p % W) * C, kp[p], gx + p * C, C);
          else
            std::fill(gx + p * C, gx + (p + 1) * C, scalar_t(0));
        }
      });
    }
  };
  if (split_rows) {
    SampleScratch<scalar_t, T> ss(iters, HW, W, C);
    for (int64_t n = 0; n < N; ++n) sample(n, ss);
  } else {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      SampleScratch<scalar_t, T> ss(iters, HW, W, C);
      for (int64_t n = begin; n < end; ++n) sample(n, ss);
    });
  }
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

// Whether g (of x's dtype) is NHWC rows: each pixel's channels packed, a row's pixels packed, rows
// and samples at any stride.
bool nhwc_rows(const at::Tensor& g, at::ScalarType dtype) {
  return g.scalar_type() == dtype && g.stride(1) == 1 && (g.size(3) == 1 || g.stride(3) == g.size(1));
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
  // NHWC reads grad's rows at their own stride: the gradient of a padded result, narrowed to the
  // interior, needs no copy.
  const at::Tensor grad = nhwc && nhwc_rows(grad_in, x.scalar_type()) ? grad_in
                                                                     : grad_in.to(x.scalar_type()).contiguous(inner);
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
      ring_grads_nhwc<scalar_t, T>(xp, gp, grad.stride(0), grad.stride(2), mp, gxp, k.data(), c.data(), factors, dk.data(), N, C, H, W, iters, fill_grad);
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

TORCH_LIBRARY_IMPL(masked_ops, CPU, m) { m.impl("soft_fill_backward", &soft_fill_backward_cpu); }

}  // namespace cpu
}  // namespace masked_ops
