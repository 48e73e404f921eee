// masked_ops::neighbor_fill on CUDA (reference: backends/reference.py neighbor_fill).
//
// The known region grows by one 3x3 dilation per iteration and depends on the mask alone, so
// the iteration at which a pixel becomes known is its Chebyshev distance d to the nearest
// visible pixel (0 = visible, > iters = never reached). A pixel with d = t takes the mean of
// its neighbours with d = t - 1 (a neighbour's d differs by at most one), which were final
// after ring t - 1. So the fill is: one distance pass over the mask, one pass writing the
// visible values, then one in-place pass per ring that touches only that ring's pixels.
#include "common.cuh"

namespace masked_ops {
namespace cuda {
namespace {

template <typename scalar_t, typename index_t>
__global__ void fill_distance_kernel(const scalar_t* __restrict__ mask, int32_t* __restrict__ dist,
                                     index_t total, int H, int W, int iters) {
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const index_t HW = static_cast<index_t>(H) * W;
  const index_t n = i / HW;
  const int h = static_cast<int>((i % HW) / W), w = static_cast<int>(i % W);
  const scalar_t* m = mask + n * HW;
  int d = iters + 1;
  if (m[static_cast<index_t>(h) * W + w] > scalar_t(0)) {
    d = 0;
  } else {
    // The nearest visible pixel in the (2*iters+1)^2 window, by Chebyshev distance.
    for (int dy = -iters; dy <= iters && d > 1; ++dy) {
      const int hh = h + dy;
      if (hh < 0 || hh >= H) continue;
      const int ady = dy < 0 ? -dy : dy;
      if (ady >= d) continue;
      for (int dx = -iters; dx <= iters; ++dx) {
        const int ww = w + dx;
        if (ww < 0 || ww >= W) continue;
        const int adx = dx < 0 ? -dx : dx;
        const int r = ady > adx ? ady : adx;
        if (r < d && m[static_cast<index_t>(hh) * W + ww] > scalar_t(0)) d = r;
      }
    }
  }
  dist[i] = d;
}

// out = x where visible, 0 elsewhere (ring pixels are overwritten by their ring pass).
template <typename scalar_t, typename index_t>
__global__ void fill_init_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ dist,
                                 scalar_t* __restrict__ out, index_t total, index_t C, index_t HW,
                                 bool channels_last) {
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  index_t n, c, p;
  decompose(i, C, HW, channels_last, n, c, p);
  out[i] = dist[n * HW + p] == 0 ? x[i] : scalar_t(0);  // select, never multiply: x may be NaN here
}

template <typename scalar_t, typename index_t>
__global__ void fill_ring_kernel(const int32_t* __restrict__ dist, scalar_t* __restrict__ out,
                                 index_t total, index_t C, int H, int W, bool channels_last, int ring) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const index_t HW = static_cast<index_t>(H) * W;
  index_t n, c, p;
  decompose(i, C, HW, channels_last, n, c, p);
  const int32_t* dn = dist + n * HW;
  if (dn[p] != ring) return;
  const int h = static_cast<int>(p / W), w = static_cast<int>(p % W);
  const index_t sw = channels_last ? C : 1, sh = sw * W;
  acc_t sum = acc_t(0);
  int cnt = 0;
  for (int dy = -1; dy <= 1; ++dy) {
    const int hh = h + dy;
    if (hh < 0 || hh >= H) continue;
    for (int dx = -1; dx <= 1; ++dx) {
      const int ww = w + dx;
      if (ww < 0 || ww >= W) continue;
      if (dn[static_cast<index_t>(hh) * W + ww] == ring - 1) {
        sum += static_cast<acc_t>(out[i + dy * sh + dx * sw]);
        ++cnt;
      }
    }
  }
  out[i] = static_cast<scalar_t>(sum / static_cast<acc_t>(cnt));  // cnt >= 1 by definition of the ring
}

// The fill on dense x (contiguous or channels_last, format `fmt`) into dense `out`; out may be x
// itself (in place), and then the init pass is skipped: visible and unreached pixels keep
// their values and only the ring pixels are written.
void run_fill(const at::Tensor& x, const at::Tensor& mask_in, int64_t iters, at::Tensor& out,
              at::MemoryFormat fmt) {
  const int64_t total = x.numel();
  if (total == 0) return;
  const bool in_place = out.is_same(x);
  if (in_place && iters == 0) return;
  const at::Tensor mask = mask_in.to(x.scalar_type()).contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  // Rings beyond max(H, W) - 1 reach nothing new: cap there (masked_ops/modes.py saturated_rings).
  iters = std::min<int64_t>(iters, std::max<int64_t>(std::max<int64_t>(H, W) - 1, 0));
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  at::Tensor dist = at::empty({N, H, W}, x.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  MASKED_OPS_DISPATCH_FLOATS(x.scalar_type(), "neighbor_fill_cuda", [&] {
    MASKED_OPS_DISPATCH_INDEX(total, [&] {
      const int64_t pixels = N * H * W;
      fill_distance_kernel<scalar_t, index_t><<<blocks_for(pixels), kThreads, 0, stream>>>(
          mask.data_ptr<scalar_t>(), dist.data_ptr<int32_t>(), static_cast<index_t>(pixels),
          static_cast<int>(H), static_cast<int>(W), static_cast<int>(iters));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (!in_place) {
        fill_init_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), dist.data_ptr<int32_t>(), out.data_ptr<scalar_t>(),
            static_cast<index_t>(total), static_cast<index_t>(C), static_cast<index_t>(H * W), cl);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      for (int ring = 1; ring <= iters; ++ring) {
        fill_ring_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            dist.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), static_cast<index_t>(total),
            static_cast<index_t>(C), static_cast<int>(H), static_cast<int>(W), cl, ring);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

void check_iters(int64_t iters, const char* op) {
  TORCH_CHECK(iters >= 0, op, ": iters must be >= 0, got ", iters);
}

at::Tensor neighbor_fill_cuda(const at::Tensor& x_in, const at::Tensor& mask_in, int64_t iters) {
  check_cuda_args(x_in, mask_in, "neighbor_fill");
  check_iters(iters, "neighbor_fill");
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = format_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  run_fill(x, mask_in, iters, out, fmt);
  return out;
}

void neighbor_fill_inplace_cuda(at::Tensor& x, const at::Tensor& mask_in, int64_t iters) {
  check_cuda_args(x, mask_in, "neighbor_fill_");
  check_iters(iters, "neighbor_fill_");
  check_writable(x, "neighbor_fill_: x");
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = format_of(x);
  if (x.is_contiguous(fmt)) {
    run_fill(x, mask_in, iters, x, fmt);
    return;
  }
  // A strided view (the interior of a padded buffer): the ring kernels index densely, so fill
  // a dense copy and write it back.
  at::Tensor dense = x.contiguous(fmt);
  run_fill(dense, mask_in, iters, dense, fmt);
  x.copy_(dense);
}

}  // namespace
}  // namespace cuda
}  // namespace masked_ops

TORCH_LIBRARY_IMPL(masked_ops, CUDA, m) {
  m.impl("neighbor_fill", &masked_ops::cuda::neighbor_fill_cuda);
  m.impl("neighbor_fill_", &masked_ops::cuda::neighbor_fill_inplace_cuda);
}
