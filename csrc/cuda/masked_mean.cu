// masked_ops::masked_mean on CUDA (reference: backends/reference.py masked_mean): for each
// (n, c), sum(m * x) / sum(m); 0 where sum(m) == 0. For a 0/1 mask the mean over visible pixels,
// for a soft mask the mask-weighted mean. Pixels with m == 0 are skipped (NaN there never enters).
//
// Contiguous (NCHW) input: one block per (n, c) plane, threads stride over pixels.
// channels_last input: one block per (n, 32 channels), threads along channels (coalesced) and
// along pixels; both reduce in float (double for float64) through shared memory.
#include "common.cuh"

namespace masked_ops {
namespace cuda {
namespace {

template <typename scalar_t, typename index_t>
__global__ void mean_planes_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ mask,
                                   scalar_t* __restrict__ out, index_t C, index_t HW) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sums[kThreads];
  __shared__ acc_t counts[kThreads];
  const index_t plane = blockIdx.x;  // n * C + c
  const index_t n = plane / C;
  const scalar_t* xp = x + plane * HW;
  const scalar_t* m = mask + n * HW;
  acc_t s = acc_t(0), k = acc_t(0);
  for (index_t p = threadIdx.x; p < HW; p += blockDim.x) {
    const acc_t w = static_cast<acc_t>(m[p]);
    if (w > acc_t(0)) {
      s += w * static_cast<acc_t>(xp[p]);
      k += w;
    }
  }
  sums[threadIdx.x] = s;
  counts[threadIdx.x] = k;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      sums[threadIdx.x] += sums[threadIdx.x + half];
      counts[threadIdx.x] += counts[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[plane] = counts[0] > acc_t(0) ? static_cast<scalar_t>(sums[0] / counts[0]) : scalar_t(0);
}

constexpr int kChannelsPerBlock = 32, kPixelLanes = 8;

template <typename scalar_t, typename index_t>
__global__ void mean_channels_last_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ mask,
                                          scalar_t* __restrict__ out, index_t C, index_t HW) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sums[kPixelLanes][kChannelsPerBlock];
  __shared__ acc_t counts[kPixelLanes];
  const index_t n = blockIdx.y;
  const index_t c = static_cast<index_t>(blockIdx.x) * kChannelsPerBlock + threadIdx.x;
  const scalar_t* m = mask + n * HW;
  acc_t s = acc_t(0), k = acc_t(0);
  for (index_t p = threadIdx.y; p < HW; p += kPixelLanes) {
    const acc_t w = static_cast<acc_t>(m[p]);
    if (w > acc_t(0)) {
      if (c < C) s += w * static_cast<acc_t>(x[(n * HW + p) * C + c]);
      k += w;
    }
  }
  sums[threadIdx.y][threadIdx.x] = s;
  if (threadIdx.x == 0) counts[threadIdx.y] = k;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t total = acc_t(0), cnt = acc_t(0);
    for (int lane = 0; lane < kPixelLanes; ++lane) {
      total += sums[lane][threadIdx.x];
      cnt += counts[lane];
    }
    out[n * C + c] = cnt > acc_t(0) ? static_cast<scalar_t>(total / cnt) : scalar_t(0);
  }
}

at::Tensor masked_mean_cuda(const at::Tensor& x_in, const at::Tensor& mask_in) {
  check_cuda_args(x_in, mask_in, "masked_mean");
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = format_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor mask = mask_in.to(x.scalar_type()).contiguous();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor out = at::empty({N, C}, x.options());
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  MASKED_OPS_DISPATCH_FLOATS(x.scalar_type(), "masked_mean_cuda", [&] {
    MASKED_OPS_DISPATCH_INDEX(x.numel(), [&] {
      if (fmt == at::MemoryFormat::ChannelsLast) {
        TORCH_CHECK(N <= 65535, "masked_mean: batch above 65535 is not supported for channels_last input");
        dim3 grid(static_cast<unsigned>((C + kChannelsPerBlock - 1) / kChannelsPerBlock), static_cast<unsigned>(N));
        dim3 block(kChannelsPerBlock, kPixelLanes);
        mean_channels_last_kernel<scalar_t, index_t><<<grid, block, 0, stream>>>(
            x.data_ptr<scalar_t>(), mask.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
            static_cast<index_t>(C), static_cast<index_t>(HW));
      } else {
        mean_planes_kernel<scalar_t, index_t><<<static_cast<unsigned>(N * C), kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), mask.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
            static_cast<index_t>(C), static_cast<index_t>(HW));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace masked_ops

TORCH_LIBRARY_IMPL(masked_ops, CUDA, m) {
  m.impl("masked_mean", &masked_ops::cuda::masked_mean_cuda);
}
