// masked_ops::conv_epilogue and masked_ops::masked_affine_act on CUDA: one elementwise pass
// each (reference: backends/reference.py conv_epilogue / masked_affine_act).
//
// Both compute act(v * a + b) on kept/visible positions and select 0 elsewhere (never multiply
// by the mask: removed values may be NaN/inf). Half and bfloat16 are computed in float.
#include "common.cuh"

namespace masked_ops {
namespace cuda {
namespace {

// conv_epilogue: a = scale[n, pixel] (optional), b = bias[c] (optional), keep per (n, pixel).
template <typename scalar_t, typename index_t>
// y and out may be the same buffer (conv_epilogue_): each thread reads and writes one index.
__global__ void conv_epilogue_kernel(const scalar_t* y, const scalar_t* __restrict__ keep,
                                     const scalar_t* __restrict__ scale, const scalar_t* __restrict__ bias,
                                     scalar_t* out, index_t total, index_t C, index_t HW,
                                     bool channels_last, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  index_t n, c, p;
  decompose(i, C, HW, channels_last, n, c, p);
  const index_t q = n * HW + p;
  if (!(keep[q] > scalar_t(0))) {
    out[i] = scalar_t(0);
    return;
  }
  acc_t z = static_cast<acc_t>(y[i]);
  if (scale != nullptr) z *= static_cast<acc_t>(scale[q]);
  if (bias != nullptr) z += static_cast<acc_t>(bias[c]);
  out[i] = static_cast<scalar_t>(activate<acc_t>(z, act));
}

// masked_affine_act: a = scale[c], b = shift[c] (eval-mode BatchNorm folded), mask per (n, pixel).
template <typename scalar_t, typename index_t>
__global__ void affine_act_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ mask,
                                  const scalar_t* __restrict__ scale, const scalar_t* __restrict__ shift,
                                  scalar_t* __restrict__ out, index_t total, index_t C, index_t HW,
                                  bool channels_last, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  index_t n, c, p;
  decompose(i, C, HW, channels_last, n, c, p);
  if (!(mask[n * HW + p] > scalar_t(0))) {
    out[i] = scalar_t(0);
    return;
  }
  const acc_t z = static_cast<acc_t>(x[i]) * static_cast<acc_t>(scale[c]) + static_cast<acc_t>(shift[c]);
  out[i] = static_cast<scalar_t>(activate<acc_t>(z, act));
}

int activation_code(c10::string_view name) {
  // Order of masked_ops/activations.py ACTIVATIONS (the codes every compiled backend uses).
  static const char* names[] = {"none", "relu", "relu6", "leaky_relu", "silu",
                                "hardswish", "hardsigmoid", "sigmoid", "gelu", "tanh"};
  for (int k = 0; k < 10; ++k)
    if (name == names[k]) return k;
  TORCH_CHECK(false, "unknown activation '", std::string(name), "'");
}

at::Tensor run_conv_epilogue(const at::Tensor& y_in, const at::Tensor& keep_in,
                             const c10::optional<at::Tensor>& scale_in, const c10::optional<at::Tensor>& bias_in,
                             c10::string_view activation, bool in_place) {
  check_cuda_args(y_in, keep_in, "conv_epilogue");
  const int act = activation_code(activation);
  c10::cuda::CUDAGuard guard(y_in.device());
  const auto fmt = format_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt);
  const auto dtype = y.scalar_type();
  const at::Tensor keep = keep_in.to(dtype).contiguous();
  at::Tensor scale, bias;
  if (scale_in.has_value() && scale_in->defined()) {
    TORCH_CHECK(scale_in->numel() == keep.numel(), "conv_epilogue: scale must be N x 1 x Ho x Wo like keep, got ",
                scale_in->sizes());
    scale = scale_in->to(dtype).contiguous();
  }
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->numel() == y.size(1), "conv_epilogue: bias must have C = ", y.size(1),
                " elements, got ", bias_in->sizes());
    bias = bias_in->to(dtype).contiguous();
  }
  // In place on a dense y: out is y itself; a strided y is computed densely and copied back.
  at::Tensor out = in_place && y.is_same(y_in) ? y : at::empty(y.sizes(), y.options().memory_format(fmt));
  const int64_t total = y.numel();
  if (total == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  MASKED_OPS_DISPATCH_FLOATS(dtype, "conv_epilogue_cuda", [&] {
    MASKED_OPS_DISPATCH_INDEX(total, [&] {
      conv_epilogue_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          y.data_ptr<scalar_t>(), keep.data_ptr<scalar_t>(),
          scale.defined() ? scale.data_ptr<scalar_t>() : nullptr,
          bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
          static_cast<index_t>(total), static_cast<index_t>(y.size(1)),
          static_cast<index_t>(y.size(2) * y.size(3)), fmt == at::MemoryFormat::ChannelsLast, act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (in_place && !out.is_same(y_in)) y_in.copy_(out);
  return out;
}

at::Tensor conv_epilogue_cuda(const at::Tensor& y, const at::Tensor& keep, const c10::optional<at::Tensor>& scale,
                              const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  return run_conv_epilogue(y, keep, scale, bias, activation, /*in_place=*/false);
}

void conv_epilogue_inplace_cuda(at::Tensor& y, const at::Tensor& keep, const c10::optional<at::Tensor>& scale,
                                const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  check_writable(y, "conv_epilogue_: y");
  run_conv_epilogue(y, keep, scale, bias, activation, /*in_place=*/true);
}

at::Tensor masked_affine_act_cuda(const at::Tensor& x_in, const at::Tensor& mask_in, const at::Tensor& scale_in,
                                  const at::Tensor& shift_in, c10::string_view activation) {
  check_cuda_args(x_in, mask_in, "masked_affine_act");
  const int act = activation_code(activation);
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = format_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(scale_in.numel() == x.size(1) && shift_in.numel() == x.size(1),
              "masked_affine_act: scale and shift must have C = ", x.size(1), " elements");
  // Rounded to x's dtype first, as the reference does, then computed in float.
  const at::Tensor mask = mask_in.to(dtype).contiguous();
  const at::Tensor scale = scale_in.to(dtype).contiguous();
  const at::Tensor shift = shift_in.to(dtype).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  const int64_t total = x.numel();
  if (total == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  MASKED_OPS_DISPATCH_FLOATS(dtype, "masked_affine_act_cuda", [&] {
    MASKED_OPS_DISPATCH_INDEX(total, [&] {
      affine_act_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), mask.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
          shift.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), static_cast<index_t>(total),
          static_cast<index_t>(x.size(1)), static_cast<index_t>(x.size(2) * x.size(3)),
          fmt == at::MemoryFormat::ChannelsLast, act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace masked_ops

TORCH_LIBRARY_IMPL(masked_ops, CUDA, m) {
  m.impl("conv_epilogue", &masked_ops::cuda::conv_epilogue_cuda);
  m.impl("conv_epilogue_", &masked_ops::cuda::conv_epilogue_inplace_cuda);
  m.impl("masked_affine_act", &masked_ops::cuda::masked_affine_act_cuda);
}
