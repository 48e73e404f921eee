// Shared helpers of the CUDA kernels (csrc/cuda/*.cu): layout, index type, activations.
//
// Every kernel is the CUDA transcription of masked_ops/backends/reference.py (the oracle).
// Deliberately no ATen/cuda/CUDAContext.h: it pulls in cuBLAS/cuSPARSE headers that the
// CI toolkit lacks; the c10/cuda headers give us streams, guards and launch checks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace masked_ops {
namespace cuda {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(b < 1 ? 1 : b);
}

// The memory format a kernel iterates in: the input's own (channels_last stays channels_last).
inline at::MemoryFormat format_of(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous;
}

// 32-bit offsets where every tensor of the call fits, 64-bit beyond 2^31 elements.
#define MASKED_OPS_DISPATCH_INDEX(NUMEL, ...)                              \
  [&] {                                                                    \
    if ((NUMEL) < static_cast<int64_t>(std::numeric_limits<int32_t>::max())) { \
      using index_t = int32_t;                                             \
      return __VA_ARGS__();                                                \
    } else {                                                               \
      using index_t = int64_t;                                             \
      return __VA_ARGS__();                                                \
    }                                                                      \
  }()

#define MASKED_OPS_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// (n, c, pixel) of element i of a dense N x C x H x W tensor stored contiguous (NCHW) or
// channels_last (NHWC); pixel = h * W + w.
template <typename index_t>
__device__ __forceinline__ void decompose(index_t i, index_t C, index_t HW, bool channels_last,
                                          index_t& n, index_t& c, index_t& p) {
  if (channels_last) {
    c = i % C;
    const index_t np = i / C;
    p = np % HW;
    n = np / HW;
  } else {
    p = i % HW;
    const index_t nc = i / HW;
    c = nc % C;
    n = nc / C;
  }
}

// Activation codes: the index of the name in masked_ops/activations.py ACTIVATIONS.
template <typename T>
__device__ __forceinline__ T activate(T z, int code) {
  switch (code) {
    case 0: return z;                                                    // none
    case 1: return z < T(0) ? T(0) : z;                                  // relu (NaN stays NaN)
    case 2: return z < T(0) ? T(0) : (z > T(6) ? T(6) : z);              // relu6
    case 3: return z > T(0) ? z : z * T(0.01);                           // leaky_relu(0.01)
    case 4: return z / (T(1) + ::exp(-z));                               // silu
    case 5: { T r = z + T(3); r = r < T(0) ? T(0) : (r > T(6) ? T(6) : r); return z * r / T(6); }
    case 6: { T r = z + T(3); r = r < T(0) ? T(0) : (r > T(6) ? T(6) : r); return r / T(6); }
    case 7: return T(1) / (T(1) + ::exp(-z));                            // sigmoid
    case 8: return T(0.5) * z * (T(1) + ::erf(z * T(0.70710678118654752440)));  // gelu (erf)
    case 9: return ::tanh(z);
    default: return z;
  }
}

// ATen's pooling output size (ceil_mode: the last window must start inside the input or left padding).
inline int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  int64_t out = (in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0)) / s + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

// An in-place op's output argument: writing a tensor whose elements share memory (an expanded
// tensor) in place would be ambiguous.
inline void check_writable(const at::Tensor& x, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes, name,
              " has overlapping memory (an expanded tensor?); writing it in place is ambiguous");
}

inline void check_cuda_args(const at::Tensor& x, const at::Tensor& mask, const char* op) {
  TORCH_CHECK(x.is_cuda() && mask.is_cuda(), op, ": x and mask must be CUDA tensors");
  TORCH_CHECK(x.dim() == 4, op, ": x must be N x C x H x W, got ", x.sizes());
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == x.size(0) && mask.size(1) == 1 &&
                  mask.size(2) == x.size(2) && mask.size(3) == x.size(3),
              op, ": mask must be N x 1 x H x W matching x ", x.sizes(), ", got ", mask.sizes());
}

}  // namespace cuda
}  // namespace masked_ops
