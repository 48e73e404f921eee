// masked_ops::soft_fill and soft_fill_backward on CUDA (reference: backends/reference.py soft_fill).
//
// The algorithm of csrc/cpu/soft_fill.cpp and masked_ops/_triton/soft_fill.py as elementwise
// kernels over dense NCHW planes (channels_last inputs are made NCHW and the results converted
// back): knownness_step (c_t = box3(k_t), k_{t+1} = maxpool3(k_t)), ring_forward, and for the
// backward the recomputed rings, ring_backward_a / ring_backward_b per ring (the mask gradient of
// all channels meets by atomic adds) and mask_chain through the maxpool3 chain of the knownness
// (to the first maximum, as ATen). Computed in float (double for double), stored in the input dtype.
#include "common.cuh"
#include "../pads.h"

#include <vector>

namespace masked_ops {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void select_scale_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ m,
                                    scalar_t* __restrict__ out, int64_t total, int64_t C, int64_t HW, bool scale) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t q = (i / (HW * C)) * HW + i % HW;
  const acc_t w = static_cast<acc_t>(m[q]);
  out[i] = w > acc_t(0) ? static_cast<scalar_t>(scale ? w * static_cast<acc_t>(x[i]) : static_cast<acc_t>(x[i]))
                        : scalar_t(0);
}

template <typename acc_t>
__global__ void knownness_step_kernel(const acc_t* __restrict__ k, acc_t* __restrict__ k_next,
                                      acc_t* __restrict__ c, int64_t total, int64_t H, int64_t W) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t w = i % W, h = (i / W) % H, base = i - h * W - w;
  acc_t s = acc_t(0), mx = -std::numeric_limits<acc_t>::infinity();
  for (int dy = -1; dy <= 1; ++dy) {
    const int64_t hh = h + dy;
    if (hh < 0 || hh >= H) continue;
    for (int dx = -1; dx <= 1; ++dx) {
      const int64_t ww = w + dx;
      if (ww < 0 || ww >= W) continue;
      const acc_t v = k[base + hh * W + ww];
      s += v;
      mx = v > mx ? v : mx;
    }
  }
  c[i] = s;
  k_next[i] = mx;
}

// box3(k * v) at (plane, h, w), row-major.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t fill_sum(const scalar_t* __restrict__ v, const acc_t* __restrict__ k, int64_t n,
                                          int64_t plane, int64_t h, int64_t w, int64_t H, int64_t W) {
  acc_t s = acc_t(0);
  for (int dy = -1; dy <= 1; ++dy) {
    const int64_t hh = h + dy;
    if (hh < 0 || hh >= H) continue;
    for (int dx = -1; dx <= 1; ++dx) {
      const int64_t ww = w + dx;
      if (ww < 0 || ww >= W) continue;
      s += k[n * H * W + hh * W + ww] * static_cast<acc_t>(v[plane * H * W + hh * W + ww]);
    }
  }
  return s;
}

template <typename scalar_t, typename acc_t>
__global__ void ring_forward_kernel(const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                                    const acc_t* __restrict__ k, const acc_t* __restrict__ c, int64_t total,
                                    int64_t C, int64_t H, int64_t W) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t HW = H * W, w = i % W, h = (i / W) % H, plane = i / HW, n = plane / C;
  const int64_t q = n * HW + h * W + w;
  const acc_t a = k[q], cnt = c[q];
  if (!(cnt > acc_t(0)) || a == acc_t(1)) {
    out[i] = v[i];
    return;
  }
  const acc_t f = fill_sum(v, k, n, plane, h, w, H, W) / cnt;
  out[i] = static_cast<scalar_t>(a * static_cast<acc_t>(v[i]) + (acc_t(1) - a) * f);
}

template <typename scalar_t, typename acc_t>
__global__ void ring_backward_a_kernel(const scalar_t* __restrict__ v, const acc_t* __restrict__ k,
                                       const acc_t* __restrict__ c, const acc_t* __restrict__ u,
                                       acc_t* __restrict__ hs, acc_t* __restrict__ hf, acc_t* __restrict__ dk,
                                       int64_t total, int64_t C, int64_t H, int64_t W) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t HW = H * W, w = i % W, h = (i / W) % H, plane = i / HW, n = plane / C;
  const int64_t q = n * HW + h * W + w;
  const acc_t cnt = c[q];
  if (!(cnt > acc_t(0))) {
    hs[i] = hf[i] = acc_t(0);
    return;
  }
  const acc_t f = fill_sum(v, k, n, plane, h, w, H, W) / cnt;
  const acc_t a = k[q];
  const acc_t hv = u[i] * (acc_t(1) - a) / cnt;
  hs[i] = hv;
  hf[i] = hv * f;
  atomicAdd(dk + q, u[i] * (static_cast<acc_t>(v[i]) - f));
}

template <typename scalar_t, typename acc_t>
__global__ void ring_backward_b_kernel(const scalar_t* __restrict__ v, const acc_t* __restrict__ k,
                                       const acc_t* __restrict__ c, acc_t* __restrict__ u, acc_t* __restrict__ gv,
                                       const acc_t* __restrict__ hs, const acc_t* __restrict__ hf,
                                       acc_t* __restrict__ dk, int64_t total, int64_t C, int64_t H, int64_t W,
                                       bool fill_grad) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t HW = H * W, w = i % W, h = (i / W) % H, plane = i / HW, n = plane / C;
  const int64_t q = n * HW + h * W + w;
  acc_t bh = acc_t(0), bhf = acc_t(0);
  for (int dy = -1; dy <= 1; ++dy) {
    const int64_t hh = h + dy;
    if (hh < 0 || hh >= H) continue;
    for (int dx = -1; dx <= 1; ++dx) {
      const int64_t ww = w + dx;
      if (ww < 0 || ww >= W) continue;
      bh += hs[plane * HW + hh * W + ww];
      bhf += hf[plane * HW + hh * W + ww];
    }
  }
  const acc_t a = k[q];
  atomicAdd(dk + q, static_cast<acc_t>(v[i]) * bh - bhf);
  const acc_t keep = c[q] > acc_t(0) ? a : acc_t(1);
  const acc_t un = u[i] * keep + a * bh;
  u[i] = un;
  gv[i] = fill_grad ? un : gv[i] * keep;
}

template <typename acc_t>
__global__ void mask_chain_kernel(const acc_t* __restrict__ k_prev, const acc_t* __restrict__ carry,
                                  acc_t* __restrict__ next, int64_t total, int64_t H, int64_t W) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const acc_t g = carry[i];
  if (g == acc_t(0)) return;
  const int64_t w = i % W, h = (i / W) % H, base = i - h * W - w;
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  int64_t arg = i;
  for (int dy = -1; dy <= 1; ++dy) {
    const int64_t hh = h + dy;
    if (hh < 0 || hh >= H) continue;
    for (int dx = -1; dx <= 1; ++dx) {
      const int64_t ww = w + dx;
      if (ww < 0 || ww >= W) continue;
      const int64_t at = base + hh * W + ww;
      if (k_prev[at] > best) {
        best = k_prev[at];
        arg = at;
      }
    }
  }
  atomicAdd(next + arg, g);
}

at::ScalarType acc_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// k_0 .. k_iters and c_0 .. c_{iters-1}, N x H x W each, in the accumulation dtype.
void knownness(const at::Tensor& mask, int64_t iters, at::ScalarType acc, std::vector<at::Tensor>& ks,
               std::vector<at::Tensor>& cs, cudaStream_t stream) {
  const int64_t N = mask.size(0), H = mask.size(2), W = mask.size(3);
  ks.push_back(mask.reshape({N, H, W}).to(acc).contiguous());
  AT_DISPATCH_FLOATING_TYPES(acc, "soft_fill_knownness", [&] {
    for (int64_t t = 0; t < iters; ++t) {
      at::Tensor kn = at::empty_like(ks.back()), c = at::empty_like(ks.back());
      const int64_t total = kn.numel();
      knownness_step_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
          ks.back().data_ptr<scalar_t>(), kn.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), total, H, W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      ks.push_back(kn);
      cs.push_back(c);
    }
  });
}

// v_0 (x selected) .. v_upto of dense NCHW x.
std::vector<at::Tensor> rings(const at::Tensor& x, const at::Tensor& m, int64_t upto, const std::vector<at::Tensor>& ks,
                              const std::vector<at::Tensor>& cs, cudaStream_t stream) {
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), total = x.numel();
  std::vector<at::Tensor> vs;
  MASKED_OPS_DISPATCH_FLOATS(x.scalar_type(), "soft_fill_rings", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor v0 = at::empty_like(x);
    select_scale_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), v0.data_ptr<scalar_t>(), total, C, H * W, false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    vs.push_back(v0);
    for (int64_t t = 1; t <= upto; ++t) {
      at::Tensor out = at::empty_like(x);
      ring_forward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
          vs.back().data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), ks[t - 1].data_ptr<acc_t>(),
          cs[t - 1].data_ptr<acc_t>(), total, C, H, W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      vs.push_back(out);
    }
  });
  return vs;
}

at::Tensor soft_fill_unpadded(const at::Tensor& x_in, const at::Tensor& mask_in, int64_t iters) {
  check_cuda_args(x_in, mask_in, "soft_fill");
  TORCH_CHECK(iters >= 0, "soft_fill: iters must be >= 0, got ", iters);
  c10::cuda::CUDAGuard guard(x_in.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto fmt = format_of(x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor m = mask_in.to(x.scalar_type()).contiguous();
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  iters = std::min<int64_t>(iters, std::max<int64_t>(std::max<int64_t>(H, W) - 1, 0));
  if (x.numel() == 0) return at::empty_like(x_in);
  if (iters == 0) {
    at::Tensor out = at::empty_like(x);
    MASKED_OPS_DISPATCH_FLOATS(x.scalar_type(), "soft_fill_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      select_scale_kernel<scalar_t, acc_t><<<blocks_for(x.numel()), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(), C, H * W, true);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out.contiguous(fmt);
  }
  std::vector<at::Tensor> ks, cs;
  knownness(m, iters, acc_type_of(x), ks, cs, stream);
  return rings(x, m, iters, ks, cs, stream).back().contiguous(fmt);
}

// pads: the fill, then zeros around it (no fused padded write on CUDA).
at::Tensor soft_fill_cuda(const at::Tensor& x, const at::Tensor& mask, int64_t iters, bool /*fill_grad*/,
                          at::IntArrayRef pads) {
  const bool padded = check_pads(pads, "soft_fill");
  const at::Tensor out = soft_fill_unpadded(x, mask, iters);
  return padded ? pad_result(out, pads) : out;
}

std::tuple<at::Tensor, at::Tensor> soft_fill_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                          const at::Tensor& mask_in, int64_t iters, bool fill_grad) {
  check_cuda_args(x_in, mask_in, "soft_fill_backward");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "soft_fill_backward: grad must have x's shape");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto fmt = format_of(x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor m = mask_in.to(x.scalar_type()).contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), total = x.numel();
  iters = std::min<int64_t>(iters, std::max<int64_t>(std::max<int64_t>(H, W) - 1, 0));
  const auto acc = acc_type_of(x);
  at::Tensor g = grad_in.to(acc).contiguous();
  const at::Tensor visible = m.gt(0);
  if (iters == 0) {  // out = m * x (selected): gx = g * m, gm = sum_c g * x
    at::Tensor xs = at::where(visible, x, at::zeros({}, x.options())).to(acc);
    at::Tensor gx = at::where(visible, g * m.to(acc), at::zeros({}, g.options()));
    return {gx.to(x.scalar_type()).contiguous(fmt), (g * xs).sum(1, true).to(mask_in.scalar_type())};
  }
  std::vector<at::Tensor> ks, cs;
  knownness(m, iters, acc, ks, cs, stream);
  std::vector<at::Tensor> vs = rings(x, m, iters - 1, ks, cs, stream);
  at::Tensor u = g.clone(), gv = g.clone(), hs = at::empty_like(g), hf = at::empty_like(g);
  std::vector<at::Tensor> dks;
  for (int64_t t = 0; t < iters; ++t) dks.push_back(at::zeros({N, H, W}, g.options()));
  at::Tensor carry = at::zeros({N, H, W}, g.options());
  MASKED_OPS_DISPATCH_FLOATS(x.scalar_type(), "soft_fill_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t t = iters; t >= 1; --t) {
      const scalar_t* v = vs[t - 1].data_ptr<scalar_t>();
      const acc_t* k = ks[t - 1].data_ptr<acc_t>();
      const acc_t* c = cs[t - 1].data_ptr<acc_t>();
      ring_backward_a_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
          v, k, c, u.data_ptr<acc_t>(), hs.data_ptr<acc_t>(), hf.data_ptr<acc_t>(), dks[t - 1].data_ptr<acc_t>(),
          total, C, H, W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      ring_backward_b_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
          v, k, c, u.data_ptr<acc_t>(), gv.data_ptr<acc_t>(), hs.data_ptr<acc_t>(), hf.data_ptr<acc_t>(),
          dks[t - 1].data_ptr<acc_t>(), total, C, H, W, fill_grad);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (int64_t t = iters; t >= 1; --t) {
      at::Tensor next = dks[t - 1].clone();
      mask_chain_kernel<acc_t><<<blocks_for(carry.numel()), kThreads, 0, stream>>>(
          ks[t - 1].data_ptr<acc_t>(), carry.data_ptr<acc_t>(), next.data_ptr<acc_t>(), carry.numel(), H, W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      carry = next;
    }
  });
  at::Tensor gx = at::where(visible, fill_grad ? u : gv, at::zeros({}, g.options()));
  return {gx.to(x.scalar_type()).contiguous(fmt), carry.reshape({N, 1, H, W}).to(mask_in.scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace masked_ops

TORCH_LIBRARY_IMPL(masked_ops, CUDA, m) {
  m.impl("soft_fill", &masked_ops::cuda::soft_fill_cuda);
  m.impl("soft_fill_backward", &masked_ops::cuda::soft_fill_backward_cuda);
}
