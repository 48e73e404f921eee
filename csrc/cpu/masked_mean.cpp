// Global masked mean on CPU: sum over visible pixels / their count -> N x C, 0 where none.
// Sums accumulate in at::acc_type (double for float inputs) so long sums over large images
// stay as accurate as ATen's pairwise reduction in the reference.
#include "common.h"

#include <ATen/AccumulateType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace masked_ops {
namespace cpu {
namespace {

at::Tensor masked_mean_cpu(const at::Tensor& x_in, const at::Tensor& mask) {
  check_image(x_in, "masked_mean: x");
  check_mask_like(mask, x_in, x_in.size(2), x_in.size(3), "masked_mean: mask");
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor out = at::empty({N, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor vis = visible_map(mask);
  const uint8_t* v = vis.const_data_ptr<uint8_t>();
  std::vector<int64_t> count(N, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = 0; p < HW; ++p) count[n] += v[n * HW + p];

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_mean_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (fmt != at::MemoryFormat::ChannelsLast) {
      at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n = plane / C;
          const scalar_t* p = xp + plane * HW;
          const uint8_t* vn = v + n * HW;
          acc_t sum = 0;
          for (int64_t i = 0; i < HW; ++i) sum += vn[i] ? static_cast<acc_t>(p[i]) : acc_t(0);
          op[plane] = count[n] > 0 ? static_cast<scalar_t>(sum / static_cast<acc_t>(count[n])) : scalar_t(0);
        }
      });
      return;
    }
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(C);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        const uint8_t* vn = v + n * HW;
        for (int64_t i = 0; i < HW; ++i) {
          if (!vn[i]) continue;  // adds 0
          const scalar_t* p = xp + (n * HW + i) * C;
          for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<acc_t>(p[c]);
        }
        for (int64_t c = 0; c < C; ++c)
          op[n * C + c] = count[n] > 0 ? static_cast<scalar_t>(sum[c] / static_cast<acc_t>(count[n])) : scalar_t(0);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(masked_ops, CPU, m) {
  m.impl("masked_mean", &masked_mean_cpu);
}

}  // namespace cpu
}  // namespace masked_ops
