// soft_fill on CPU, the forward: the input a soft-masked conv reads, in fused passes.
//
// Reference (the exact math): masked_ops/backends/reference.py soft_fill. Per sample, with the
// knownness k_0 = m and c_t = box3(k_t), k_{t+1} = maxpool3(k_t) (one channel, shared by all
// channels), each channel plane runs `iters` rings
//     v_t = k v + (1 - k) box3(k v) / c    where c > 0 (else v),  k = k_{t-1}, c = c_{t-1}, v = v_{t-1}
// from v_0 = x selected to 0 where m == 0; iters == 0 gives m * x. Sums run over the 3x3
// neighbourhood in row-major order in opmath and each ring is rounded to the storage dtype, as
// the hard fill does (neighbor_fill.cpp), so at a 0/1 mask the result is the hard fill bit for bit.
//
// pads (TF "same") write the result into a padded buffer. Why the loops are shaped as they are:
// docs/design.md, section 5. The backward: soft_fill_backward.cpp; what both use: soft_fill.h.
#include "soft_fill.h"
#include "../pads.h"

#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace masked_ops {
namespace cpu {
namespace {

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

// Zero the border that pads adds around one sample's H x W interior (NHWC, Wp = W + left + right).
template <typename scalar_t>
void zero_border(scalar_t* out, int64_t H, int64_t W, int64_t C, at::IntArrayRef pads) {
  const int64_t left = pads[0], right = pads[1], top = pads[2], bottom = pads[3];
  const int64_t row = (W + left + right) * C;
  std::fill(out, out + top * row, scalar_t(0));
  std::fill(out + (top + H) * row, out + (top + H + bottom) * row, scalar_t(0));
  for (int64_t h = top; h < top + H; ++h) {
    std::fill(out + h * row, out + h * row + left * C, scalar_t(0));
    std::fill(out + h * row + (left + W) * C, out + (h + 1) * row, scalar_t(0));
  }
}

// The NHWC forward. With pads the last ring writes straight into the padded result's interior: no
// padded copy of the fill (in a TF-"same" model that copy and its zeroing cost as much as the fill).
at::Tensor soft_fill_nhwc(const at::Tensor& x_in, const at::Tensor& mask_in, int64_t iters, at::IntArrayRef pads) {
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor mask = mask_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t left = pads[0], top = pads[2], Hp = H + top + pads[3], Wp = W + left + pads[1];
  iters = saturated_rings(iters, H, W);
  at::Tensor out = at::empty({N, C, Hp, Wp}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (x.numel() == 0) return out.zero_();
  // Rings ping-pong between two scratch samples (the last writes the output); the first reads x.
  at::Tensor scratch = at::empty({iters > 1 ? std::min<int64_t>(iters - 1, 2) : 0, HW * C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_fill_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    std::vector<T> k((iters + 1) * HW), c(iters * HW);
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* m = mask.const_data_ptr<scalar_t>() + n * HW;
      knownness(m, H, W, iters, k.data(), c.data());
      const scalar_t* src = x.const_data_ptr<scalar_t>() + n * HW * C;
      scalar_t* out_n = out.data_ptr<scalar_t>() + n * Hp * Wp * C;
      zero_border(out_n, H, W, C, pads);
      for (int64_t t = 1; t <= iters; ++t) {
        const bool last = t == iters;
        scalar_t* dst = last ? out_n + (top * Wp + left) * C : scratch.data_ptr<scalar_t>() + ((t - 1) % 2) * HW * C;
        ring_nhwc(k.data() + (t - 1) * HW, c.data() + (t - 1) * HW, src, dst, H, W, C, t == 1, (last ? Wp : W) * C);
        src = dst;
      }
    }
  });
  return out;
}

// The plane (NCHW inside) forward.
at::Tensor soft_fill_planes(const at::Tensor& x_in, const at::Tensor& mask_in, int64_t iters) {
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

at::Tensor soft_fill_cpu(const at::Tensor& x_in, const at::Tensor& mask_in, int64_t iters, bool /*fill_grad*/,
                         at::IntArrayRef pads) {
  check_soft_fill(x_in, mask_in, iters, "soft_fill");
  const bool padded = check_pads(pads, "soft_fill");
  if (saturated_rings(iters, x_in.size(2), x_in.size(3)) == 0) {
    const at::Tensor out = scale_by_mask(x_in, mask_in);
    return padded ? pad_result(out, pads) : out;
  }
  if (channels_innermost(x_in)) return soft_fill_nhwc(x_in, mask_in, iters, pads);
  const at::Tensor out = soft_fill_planes(x_in, mask_in, iters);
  return padded ? pad_result(out, pads) : out;
}

}  // namespace

TORCH_LIBRARY_IMPL(masked_ops, CPU, m) { m.impl("soft_fill", &soft_fill_cpu); }

}  // namespace cpu
}  // namespace masked_ops
