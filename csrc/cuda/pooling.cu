// masked_ops::masked_max_pool2d and masked_ops::masked_avg_pool2d on CUDA
// (reference: backends/reference.py). One thread per output element; the thread of channel 0
// also writes the output mask of its (n, ho, wo), so the mask path costs no extra pass.
//
// Max pool: removed pixels count as 0 (the paper's rule), padding as -inf; the index is ATen's
// (flat h * W + w of the first maximum, NaN wins) so ATen's max_pool2d backward can use it.
// Avg pool: ATen's window and divisor rules; mask_out = 1 where the window holds a visible pixel.
#include "common.cuh"

namespace masked_ops {
namespace cuda {
namespace {

struct PoolGeometry {
  int H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
};

template <typename index_t>
__device__ __forceinline__ index_t input_offset(index_t n, index_t c, int h, int w, index_t C, const PoolGeometry& g,
                                                bool channels_last) {
  return channels_last ? ((n * g.H + h) * g.W + w) * C + c : ((n * C + c) * g.H + h) * g.W + w;
}

template <typename scalar_t, typename index_t>
__global__ void max_pool_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ mask,
                                scalar_t* __restrict__ y, scalar_t* __restrict__ mask_out,
                                int64_t* __restrict__ indices, index_t total, index_t C, PoolGeometry g,
                                bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const index_t HWo = static_cast<index_t>(g.Ho) * g.Wo;
  index_t n, c, p;
  decompose(i, C, HWo, channels_last, n, c, p);
  const int ho = static_cast<int>(p / g.Wo), wo = static_cast<int>(p % g.Wo);
  int hstart = ho * g.sh - g.ph, wstart = wo * g.sw - g.pw;
  while (hstart < 0) hstart += g.dh;
  while (wstart < 0) wstart += g.dw;
  const int hend = min(ho * g.sh - g.ph + (g.kh - 1) * g.dh + 1, g.H);
  const int wend = min(wo * g.sw - g.pw + (g.kw - 1) * g.dw + 1, g.W);
  const scalar_t* m = mask + n * static_cast<index_t>(g.H) * g.W;
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  int64_t best_index = static_cast<int64_t>(hstart) * g.W + wstart;
  bool any_visible = false;
  for (int h = hstart; h < hend; h += g.dh) {
    for (int w = wstart; w < wend; w += g.dw) {
      const bool visible = m[static_cast<index_t>(h) * g.W + w] > scalar_t(0);
      any_visible |= visible;
      const acc_t v = visible ? static_cast<acc_t>(x[input_offset<index_t>(n, c, h, w, C, g, channels_last)])
                              : acc_t(0);
      if (v > best || ::isnan(v)) {
        best = v;
        best_index = static_cast<int64_t>(h) * g.W + w;
      }
    }
  }
  y[i] = any_visible ? static_cast<scalar_t>(best) : scalar_t(0);
  indices[i] = best_index;
  if (c == 0) mask_out[n * HWo + p] = any_visible ? scalar_t(1) : scalar_t(0);
}

template <typename scalar_t, typename index_t>
__global__ void avg_pool_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ mask,
                                scalar_t* __restrict__ y, scalar_t* __restrict__ mask_out, index_t total,
                                index_t C, PoolGeometry g, bool channels_last, bool count_include_pad) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const index_t HWo = static_cast<index_t>(g.Ho) * g.Wo;
  index_t n, c, p;
  decompose(i, C, HWo, channels_last, n, c, p);
  const int ho = static_cast<int>(p / g.Wo), wo = static_cast<int>(p % g.Wo);
  int hstart = ho * g.sh - g.ph, wstart = wo * g.sw - g.pw;
  int hend = min(hstart + g.kh, g.H + g.ph), wend = min(wstart + g.kw, g.W + g.pw);
  const int pool_size = (hend - hstart) * (wend - wstart);
  hstart = max(hstart, 0);
  wstart = max(wstart, 0);
  hend = min(hend, g.H);
  wend = min(wend, g.W);
  const int divisor = count_include_pad ? pool_size : (hend - hstart) * (wend - wstart);
  const scalar_t* m = mask + n * static_cast<index_t>(g.H) * g.W;
  acc_t sum = acc_t(0);
  bool any_visible = false;
  for (int h = hstart; h < hend; ++h) {
    for (int w = wstart; w < wend; ++w) {
      if (m[static_cast<index_t>(h) * g.W + w] > scalar_t(0)) {
        any_visible = true;
        sum += static_cast<acc_t>(x[input_offset<index_t>(n, c, h, w, C, g, channels_last)]);
      }
    }
  }
  y[i] = any_visible && divisor > 0 ? static_cast<scalar_t>(sum / static_cast<acc_t>(divisor)) : scalar_t(0);
  if (c == 0) mask_out[n * HWo + p] = any_visible ? scalar_t(1) : scalar_t(0);
}

PoolGeometry geometry(const at::Tensor& x, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                      at::IntArrayRef d, bool ceil_mode, const char* op) {
  TORCH_CHECK(k.size() == 2 && s.size() == 2 && p.size() == 2 && d.size() == 2, op,
              ": kernel_size, stride, padding and dilation must have 2 values each");
  PoolGeometry g;
  g.H = static_cast<int>(x.size(2));
  g.W = static_cast<int>(x.size(3));
  g.kh = static_cast<int>(k[0]); g.kw = static_cast<int>(k[1]);
  g.sh = static_cast<int>(s[0]); g.sw = static_cast<int>(s[1]);
  g.ph = static_cast<int>(p[0]); g.pw = static_cast<int>(p[1]);
  g.dh = static_cast<int>(d[0]); g.dw = static_cast<int>(d[1]);
  TORCH_CHECK(g.kh > 0 && g.kw > 0 && g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0, op,
              ": kernel_size, stride and dilation must be positive");
  g.Ho = static_cast<int>(pooled_size(g.H, g.kh, g.sh, g.ph, g.dh, ceil_mode));
  g.Wo = static_cast<int>(pooled_size(g.W, g.kw, g.sw, g.pw, g.dw, ceil_mode));
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, op, ": output size is empty for input ", x.sizes());
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_max_pool2d_cuda(
    const at::Tensor& x_in, const at::Tensor& mask_in, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  check_cuda_args(x_in, mask_in, "masked_max_pool2d");
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = format_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor mask = mask_in.to(x.scalar_type()).contiguous();
  const PoolGeometry g = geometry(x, kernel_size, stride, padding, dilation, ceil_mode, "masked_max_pool2d");
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor y = at::empty({N, C, g.Ho, g.Wo}, x.options().memory_format(fmt));
  at::Tensor idx = at::empty({N, C, g.Ho, g.Wo}, x.options().dtype(at::kLong).memory_format(fmt));
  at::Tensor mask_out = at::empty({N, 1, g.Ho, g.Wo}, mask.options());
  const int64_t total = y.numel();
  if (total == 0) return {y, mask_out, idx};
  auto stream = c10::cuda::getCurrentCUDAStream();
  MASKED_OPS_DISPATCH_FLOATS(x.scalar_type(), "masked_max_pool2d_cuda", [&] {
    MASKED_OPS_DISPATCH_INDEX(std::max(total, x.numel()), [&] {
      max_pool_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), mask.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
          mask_out.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), static_cast<index_t>(total),
          static_cast<index_t>(C), g, fmt == at::MemoryFormat::ChannelsLast);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, mask_out, idx};
}

std::tuple<at::Tensor, at::Tensor> masked_avg_pool2d_cuda(const at::Tensor& x_in, const at::Tensor& mask_in,
                                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, bool ceil_mode,
                                                          bool count_include_pad) {
  check_cuda_args(x_in, mask_in, "masked_avg_pool2d");
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = format_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor mask = mask_in.to(x.scalar_type()).contiguous();
  const int64_t one[2] = {1, 1};
  const PoolGeometry g = geometry(x, kernel_size, stride, padding, at::IntArrayRef(one, 2), ceil_mode,
                                  "masked_avg_pool2d");
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor y = at::empty({N, C, g.Ho, g.Wo}, x.options().memory_format(fmt));
  at::Tensor mask_out = at::empty({N, 1, g.Ho, g.Wo}, mask.options());
  const int64_t total = y.numel();
  if (total == 0) return {y, mask_out};
  auto stream = c10::cuda::getCurrentCUDAStream();
  MASKED_OPS_DISPATCH_FLOATS(x.scalar_type(), "masked_avg_pool2d_cuda", [&] {
    MASKED_OPS_DISPATCH_INDEX(std::max(total, x.numel()), [&] {
      avg_pool_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), mask.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
          mask_out.data_ptr<scalar_t>(), static_cast<index_t>(total), static_cast<index_t>(C), g,
          fmt == at::MemoryFormat::ChannelsLast, count_include_pad);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, mask_out};
}

}  // namespace
}  // namespace cuda
}  // namespace masked_ops

TORCH_LIBRARY_IMPL(masked_ops, CUDA, m) {
  m.impl("masked_max_pool2d", &masked_ops::cuda::masked_max_pool2d_cuda);
  m.impl("masked_avg_pool2d", &masked_ops::cuda::masked_avg_pool2d_cuda);
}
