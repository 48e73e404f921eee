// soft_fill on CPU, what the forward (soft_fill.cpp) and the backward (soft_fill_backward.cpp) share:
// the knownness planes, the argument checks and one ring in each layout (the backward recomputes
// the forward's rings). The math: the comment at the top of soft_fill.cpp.
#pragma once

#include "common.h"

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

namespace masked_ops {
namespace cpu {

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
// (3 channels at 224 px: 2.4x faster as planes, the transposes included). NCHW input runs as planes:
// transposing it to NHWC and back costs more than the NHWC kernels save (measured: 96 x 112 x 112,
// batch 8, forward 64 ms as planes, 116 ms transposed).
inline bool channels_innermost(const at::Tensor& x) {
  return layout_of(x) == at::MemoryFormat::ChannelsLast && x.size(1) >= 8;
}

inline void check_soft_fill(const at::Tensor& x, const at::Tensor& mask, int64_t iters, const char* op) {
  check_image(x, op);
  check_mask_like(mask, x, x.size(2), x.size(3), op);
  TORCH_CHECK(iters >= 0, op, ": iters must be >= 0, got ", iters);
}

// Channels-last (NHWC) versions of the rings: channels innermost, so a channels_last activation is
// never transposed to planes and back. The forward sums run in the same order as the plane version
// (row-major over the 3x3 neighbourhood), so both layouts give the same values.

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
// out_row: elements from one output row to the next (W C, or more when out is a padded buffer's interior).
template <typename scalar_t, typename T>
void ring_nhwc(const T* k, const T* c, const scalar_t* v, scalar_t* out, int64_t H, int64_t W, int64_t C,
               bool select, int64_t out_row) {
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
        scalar_t* o = out + h * out_row + w * C;
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

}  // namespace cpu
}  // namespace masked_ops
