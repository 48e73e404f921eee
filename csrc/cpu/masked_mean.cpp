// Global masked mean on CPU: sum(m * x) / sum(m) -> N x C, 0 where sum(m) == 0. For a 0/1 mask
// that is the mean over visible pixels; for a soft mask the mask-weighted mean (the same kernel
// serves both, so a soft model at a 0/1 mask gives the hard one's bits). Pixels with m == 0 are
// skipped (a select: NaN there never enters). Sums accumulate in at::acc_type (double for float
// inputs) so long sums over large images stay as accurate as ATen's pairwise reduction.
#include "common.h"

#include <ATen/AccumulateType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace masked_ops {
namespace cpu {
namespace {

at::Tensor masked_mean_cpu(const at::Tensor& x_in, const at::Tensor& mask_in) {
  check_image(x_in, "masked_mean: x");
  check_mask_like(mask_in, x_in, x_in.size(2), x_in.size(3), "masked_mean: mask");
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor mask = mask_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor out = at::empty({N, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_mean_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* mp = mask.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    std::vector<acc_t> den(N, acc_t(0));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t p = 0; p < HW; ++p) den[n] += static_cast<acc_t>(mp[n * HW + p]);
    if (fmt != at::MemoryFormat::ChannelsLast) {
      at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n = plane / C;
          const scalar_t* p = xp + plane * HW;
          const scalar_t* mn = mp + n * HW;
          acc_t sum = 0;
          for (int64_t i = 0; i < HW; ++i) {
            const acc_t w = static_cast<acc_t>(mn[i]);
            sum += w > acc_t(0) ? w * static_cast<acc_t>(p[i]) : acc_t(0);
          }
          op[plane] = den[n] > acc_t(0) ? static_cast<scalar_t>(sum / den[n]) : scalar_t(0);
        }
      });
      return;
    }
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(C);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        const scalar_t* mn = mp + n * HW;
        for (int64_t i = 0; i < HW; ++i) {
          const acc_t w = static_cast<acc_t>(mn[i]);
          if (!(w > acc_t(0))) continue;  // adds 0
          const scalar_t* p = xp + (n * HW + i) * C;
          for (int64_t c = 0; c < C; ++c) sum[c] += w * static_cast<acc_t>(p[c]);
        }
        for (int64_t c = 0; c < C; ++c)
          op[n * C + c] = den[n] > acc_t(0) ? static_cast<scalar_t>(sum[c] / den[n]) : scalar_t(0);
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
