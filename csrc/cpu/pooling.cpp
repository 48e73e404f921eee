// Masked max and average pooling on CPU, one pass over x.
//
// Removed pixels count as 0 (selected, never multiplied, so NaN/inf there are never read).
// Window geometry, tie-breaking (first strict maximum in scan order, NaN wins) and the
// returned indices (flat h*W+w per plane) follow ATen's CPU max_pool2d_with_indices, and
// the avg-pool divisor rules follow ATen's avg_pool2d, so the reference (which calls them
// on the masked input) and its autograd are reproduced exactly. The output mask (any
// visible pixel in the window) depends on the mask alone and is computed once per sample.
#include "common.h"

#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

namespace masked_ops {
namespace cpu {
namespace {

struct Geometry {
  int64_t N, C, H, W, Ho, Wo;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// Max-pool window rows [h0, h1) stepping by dh (ATen: start moved into the input by whole dilations).
inline void max_window(int64_t o, int64_t s, int64_t p, int64_t k, int64_t d, int64_t size, int64_t& a,
                       int64_t& b) {
  a = o * s - p;
  b = std::min(a + (k - 1) * d + 1, size);
  while (a < 0) a += d;
}

// Output mask: 1 where the (dilated) window holds a visible pixel, per sample, shared by all channels.
template <typename scalar_t>
void window_any_visible(const uint8_t* vis, scalar_t* m2, const Geometry& g, bool dilated_max_window,
                        bool ceil_avg) {
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.Ho, oh = r % g.Ho;
      const uint8_t* v = vis + n * g.H * g.W;
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        int64_t h0, h1, w0, w1, dh = g.dh, dw = g.dw;
        if (dilated_max_window) {
          max_window(oh, g.sh, g.ph, g.kh, g.dh, g.H, h0, h1);
          max_window(ow, g.sw, g.pw, g.kw, g.dw, g.W, w0, w1);
        } else {
          (void)ceil_avg;
          h0 = std::max<int64_t>(oh * g.sh - g.ph, 0);
          w0 = std::max<int64_t>(ow * g.sw - g.pw, 0);
          h1 = std::min(oh * g.sh - g.ph + g.kh, g.H);
          w1 = std::min(ow * g.sw - g.pw + g.kw, g.W);
          dh = dw = 1;
        }
        bool any = false;
        for (int64_t h = h0; h < h1 && !any; h += dh)
          for (int64_t w = w0; w < w1; w += dw)
            if (v[h * g.W + w]) { any = true; break; }
        m2[r * g.Wo + ow] = any ? scalar_t(1) : scalar_t(0);
      }
    }
  });
}

template <typename scalar_t>
void max_pool_kernel(const scalar_t* x, const uint8_t* vis, const scalar_t* m2, scalar_t* y, int64_t* idx,
                     const Geometry& g, bool channels_last) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t HW = g.H * g.W, HWo = g.Ho * g.Wo;
  if (!channels_last) {
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / g.C;
        const scalar_t* xp = x + plane * HW;
        const uint8_t* v = vis + n * HW;
        const scalar_t* mp = m2 + n * HWo;
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          int64_t h0, h1;
          max_window(oh, g.sh, g.ph, g.kh, g.dh, g.H, h0, h1);
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            int64_t w0, w1;
            max_window(ow, g.sw, g.pw, g.kw, g.dw, g.W, w0, w1);
            int64_t best_i = h0 * g.W + w0;
            opmath_t best = -std::numeric_limits<opmath_t>::infinity();
            for (int64_t h = h0; h < h1; h += g.dh) {
              for (int64_t w = w0; w < w1; w += g.dw) {
                const int64_t i = h * g.W + w;
                const opmath_t val = v[i] ? static_cast<opmath_t>(xp[i]) : opmath_t(0);
                if (val > best || std::isnan(val)) {
                  best = val;
                  best_i = i;
                }
              }
            }
            const int64_t o = plane * HWo + oh * g.Wo + ow;
            const bool kept = static_cast<opmath_t>(mp[oh * g.Wo + ow]) > opmath_t(0);
            y[o] = kept ? static_cast<scalar_t>(best) : scalar_t(0);
            idx[o] = best_i;
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> best(g.C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.Ho, oh = r % g.Ho;
      const scalar_t* xs = x + n * HW * g.C;
      const uint8_t* v = vis + n * HW;
      int64_t h0, h1;
      max_window(oh, g.sh, g.ph, g.kh, g.dh, g.H, h0, h1);
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        int64_t w0, w1;
        max_window(ow, g.sw, g.pw, g.kw, g.dw, g.W, w0, w1);
        const int64_t o = (r * g.Wo + ow) * g.C;
        std::fill(best.begin(), best.end(), -std::numeric_limits<opmath_t>::infinity());
        std::fill(idx + o, idx + o + g.C, h0 * g.W + w0);
        for (int64_t h = h0; h < h1; h += g.dh) {
          for (int64_t w = w0; w < w1; w += g.dw) {
            const int64_t i = h * g.W + w;
            const scalar_t* xp = xs + i * g.C;
            const bool visible = v[i] != 0;
            for (int64_t c = 0; c < g.C; ++c) {
              const opmath_t val = visible ? static_cast<opmath_t>(xp[c]) : opmath_t(0);
              if (val > best[c] || std::isnan(val)) {
                best[c] = val;
                idx[o + c] = i;
              }
            }
          }
        }
        const bool kept = static_cast<opmath_t>(m2[r * g.Wo + ow]) > opmath_t(0);
        for (int64_t c = 0; c < g.C; ++c) y[o + c] = kept ? static_cast<scalar_t>(best[c]) : scalar_t(0);
      }
    }
  });
}

template <typename scalar_t>
void avg_pool_kernel(const scalar_t* x, const uint8_t* vis, const scalar_t* m2, scalar_t* y, const Geometry& g,
                     bool count_include_pad, bool channels_last) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t HW = g.H * g.W, HWo = g.Ho * g.Wo;
  // ATen's avg_pool2d window: the divisor counts the padding (but not the ceil_mode overhang)
  // when count_include_pad, else only the in-bounds pixels.
  auto window = [&](int64_t oh, int64_t ow, int64_t& h0, int64_t& h1, int64_t& w0, int64_t& w1) -> int64_t {
    h0 = oh * g.sh - g.ph;
    w0 = ow * g.sw - g.pw;
    h1 = std::min(h0 + g.kh, g.H + g.ph);
    w1 = std::min(w0 + g.kw, g.W + g.pw);
    const int64_t pool_size = (h1 - h0) * (w1 - w0);
    h0 = std::max<int64_t>(h0, 0);
    w0 = std::max<int64_t>(w0, 0);
    h1 = std::min(h1, g.H);
    w1 = std::min(w1, g.W);
    return count_include_pad ? pool_size : (h1 - h0) * (w1 - w0);
  };
  if (!channels_last) {
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / g.C;
        const scalar_t* xp = x + plane * HW;
        const uint8_t* v = vis + n * HW;
        const scalar_t* mp = m2 + n * HWo;
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            int64_t h0, h1, w0, w1;
            const int64_t divisor = window(oh, ow, h0, h1, w0, w1);
            const int64_t o = plane * HWo + oh * g.Wo + ow;
            if (!(static_cast<opmath_t>(mp[oh * g.Wo + ow]) > opmath_t(0)) || h0 >= h1 || w0 >= w1) {
              y[o] = scalar_t(0);
              continue;
            }
            opmath_t sum = 0;
            for (int64_t h = h0; h < h1; ++h)
              for (int64_t w = w0; w < w1; ++w) {
                const int64_t i = h * g.W + w;
                sum += v[i] ? static_cast<opmath_t>(xp[i]) : opmath_t(0);
              }
            y[o] = static_cast<scalar_t>(sum / static_cast<opmath_t>(divisor));
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> sum(g.C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.Ho, oh = r % g.Ho;
      const scalar_t* xs = x + n * HW * g.C;
      const uint8_t* v = vis + n * HW;
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        int64_t h0, h1, w0, w1;
        const int64_t divisor = window(oh, ow, h0, h1, w0, w1);
        scalar_t* yo = y + (r * g.Wo + ow) * g.C;
        if (!(static_cast<opmath_t>(m2[r * g.Wo + ow]) > opmath_t(0)) || h0 >= h1 || w0 >= w1) {
          std::fill(yo, yo + g.C, scalar_t(0));
          continue;
        }
        std::fill(sum.begin(), sum.end(), opmath_t(0));
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t w = w0; w < w1; ++w) {
            const int64_t i = h * g.W + w;
            if (!v[i]) continue;  // adds 0
            const scalar_t* xp = xs + i * g.C;
            for (int64_t c = 0; c < g.C; ++c) sum[c] += static_cast<opmath_t>(xp[c]);
          }
        const opmath_t div = static_cast<opmath_t>(divisor);
        for (int64_t c = 0; c < g.C; ++c) yo[c] = static_cast<scalar_t>(sum[c] / div);
      }
    }
  });
}

Geometry make_geometry(const at::Tensor& x, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                       at::IntArrayRef d, bool ceil_mode, const char* op) {
  TORCH_CHECK(k.size() == 2 && s.size() == 2 && p.size() == 2 && d.size() == 2, op,
              ": kernel_size, stride, padding and dilation must have 2 elements");
  TORCH_CHECK(k[0] > 0 && k[1] > 0, op, ": kernel_size must be positive, got ", k);
  TORCH_CHECK(s[0] > 0 && s[1] > 0, op, ": stride must be positive, got ", s);
  TORCH_CHECK(d[0] > 0 && d[1] > 0, op, ": dilation must be positive, got ", d);
  TORCH_CHECK(p[0] >= 0 && p[1] >= 0 && p[0] <= k[0] / 2 && p[1] <= k[1] / 2, op,
              ": padding must be non-negative and at most half the kernel size, got ", p);
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1]};
  g.Ho = pooled_size(g.H, g.kh, g.ph, g.sh, g.dh, ceil_mode);
  g.Wo = pooled_size(g.W, g.kw, g.pw, g.sw, g.dw, ceil_mode);
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, op, ": output size would be ", g.Ho, " x ", g.Wo, " for input ", x.sizes());
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_max_pool2d_cpu(const at::Tensor& x_in,
                                                                     const at::Tensor& mask,
                                                                     at::IntArrayRef kernel_size,
                                                                     at::IntArrayRef stride,
                                                                     at::IntArrayRef padding,
                                                                     at::IntArrayRef dilation, bool ceil_mode) {
  check_image(x_in, "masked_max_pool2d: x");
  check_mask_like(mask, x_in, x_in.size(2), x_in.size(3), "masked_max_pool2d: mask");
  const Geometry g = make_geometry(x_in, kernel_size, stride, padding, dilation, ceil_mode, "masked_max_pool2d");
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor y = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options().memory_format(fmt));
  at::Tensor idx = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options().dtype(at::kLong).memory_format(fmt));
  at::Tensor m2 = at::empty({g.N, 1, g.Ho, g.Wo}, mask.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return {y, m2, idx};
  const at::Tensor vis = visible_map(mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_max_pool2d_cpu", [&] {
    window_any_visible<scalar_t>(vis.const_data_ptr<uint8_t>(), m2.data_ptr<scalar_t>(), g, true, false);
    max_pool_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), vis.const_data_ptr<uint8_t>(),
                              m2.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), g,
                              fmt == at::MemoryFormat::ChannelsLast);
  });
  return {y, m2, idx};
}

std::tuple<at::Tensor, at::Tensor> masked_avg_pool2d_cpu(const at::Tensor& x_in, const at::Tensor& mask,
                                                         at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                         at::IntArrayRef padding, bool ceil_mode,
                                                         bool count_include_pad) {
  check_image(x_in, "masked_avg_pool2d: x");
  check_mask_like(mask, x_in, x_in.size(2), x_in.size(3), "masked_avg_pool2d: mask");
  const int64_t one[2] = {1, 1};
  const Geometry g = make_geometry(x_in, kernel_size, stride, padding, at::IntArrayRef(one, 2), ceil_mode,
                                   "masked_avg_pool2d");
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor y = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options().memory_format(fmt));
  at::Tensor m2 = at::empty({g.N, 1, g.Ho, g.Wo}, mask.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return {y, m2};
  const at::Tensor vis = visible_map(mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_avg_pool2d_cpu", [&] {
    window_any_visible<scalar_t>(vis.const_data_ptr<uint8_t>(), m2.data_ptr<scalar_t>(), g, false, ceil_mode);
    avg_pool_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), vis.const_data_ptr<uint8_t>(),
                              m2.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g, count_include_pad,
                              fmt == at::MemoryFormat::ChannelsLast);
  });
  return {y, m2};
}

}  // namespace

TORCH_LIBRARY_IMPL(masked_ops, CPU, m) {
  m.impl("masked_max_pool2d", &masked_max_pool2d_cpu);
  m.impl("masked_avg_pool2d", &masked_avg_pool2d_cpu);
}

}  // namespace cpu
}  // namespace masked_ops
