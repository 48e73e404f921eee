// Shared helpers of the CPU kernels: memory formats, argument checks, pooling geometry
// and the fused activations (by the names of masked_ops/activations.py).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

namespace masked_ops {
namespace cpu {

// Kernels write their outputs in the input's suggested memory format; inputs that are not
// contiguous in that format are copied into it first (the loops assume dense NCHW or NHWC).
inline at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous;
}

// Hot loops are compiled twice: for the x86-64 baseline the wheel targets, and for AVX2, chosen at
// run time (ATen's own kernels dispatch the same way). A loop body is an always-inline template called
// from a MASKED_OPS_TARGET_AVX2 wrapper and from the plain code; no FMA, so results do not depend on
// the path. MASKED_OPS_NO_AVX2=1 in the environment forces the baseline (tests run both).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MASKED_OPS_TARGET_AVX2 __attribute__((target("avx2")))
#define MASKED_OPS_ALWAYS_INLINE __attribute__((always_inline))
inline bool cpu_has_avx2() {
  static const bool has = [] {
    const char* off = std::getenv("MASKED_OPS_NO_AVX2");
    return __builtin_cpu_supports("avx2") && !(off && off[0] == '1');
  }();
  return has;
}
#else
#define MASKED_OPS_TARGET_AVX2
#define MASKED_OPS_ALWAYS_INLINE
inline bool cpu_has_avx2() { return false; }
#endif

// The sum of eight partial sums, in a fixed tree order.
template <typename T>
inline T lanes8(const T* s) {
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// Sum of n values in eight independent partial sums: one running sum is a chain of dependent
// additions that the compiler may not reorder (no -ffast-math), so it would not vectorise.
template <typename T>
inline T sum8(const T* d, int64_t n) {
  T s[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) s[l] += d[j + l];
  T r = lanes8(s);
  for (; j < n; ++j) r += d[j];
  return r;
}

// Pixel chunks for pointwise passes that also reduce over channels: chunk k covers pixels [p0, p1)
// of sample n, about `grain` elements (pixels x channels), so batch 1 keeps every thread busy.
// Chunks never share a pixel (per-pixel sums need no locks); k (0..count-1) indexes per-chunk
// partial sums of per-channel reductions.
struct PixelChunks {
  int64_t per_sample, size, count;
};

inline PixelChunks pixel_chunks(int64_t N, int64_t C, int64_t HW, int64_t grain = 16384) {
  const int64_t size = std::max<int64_t>(1, std::min<int64_t>(HW, grain / std::max<int64_t>(C, 1)));
  const int64_t per = HW == 0 ? 0 : (HW + size - 1) / size;
  return {per, size, N * per};
}

// Calls f(n, p0, p1, k) for every chunk, in parallel.
template <typename F>
inline void for_pixel_chunks(const PixelChunks& pc, int64_t HW, F&& f) {
  at::parallel_for(0, pc.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n = k / pc.per_sample, p0 = (k % pc.per_sample) * pc.size;
      f(n, p0, std::min(HW, p0 + pc.size), k);
    }
  });
}

inline void check_image(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, name, " must have shape N x C x H x W, got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, " must be floating, got ", x.scalar_type());
}

// Rings beyond max(H, W) - 1 reach nothing new (each grows the known region by one pixel), so the
// fill caps its ring count there: any larger count gives the same result at no extra cost
// (masked_ops/modes.py saturated_rings is the same rule in Python).
inline int64_t saturated_rings(int64_t iters, int64_t H, int64_t W) {
  return std::min<int64_t>(iters, std::max<int64_t>(std::max<int64_t>(H, W) - 1, 0));
}

// mask/keep: N x 1 x H x W in x's dtype (the primitives' convention, see reference.py).
inline void check_mask_like(const at::Tensor& m, const at::Tensor& x, int64_t h, int64_t w, const char* name) {
  TORCH_CHECK(m.device().is_cpu(), name, " must be a CPU tensor, got ", m.device());
  TORCH_CHECK(m.dim() == 4 && m.size(0) == x.size(0) && m.size(1) == 1 && m.size(2) == h && m.size(3) == w,
              name, " must have shape (", x.size(0), ", 1, ", h, ", ", w, "), got ", m.sizes());
  TORCH_CHECK(m.scalar_type() == x.scalar_type(), name, " must have dtype ", x.scalar_type(), ", got ",
              m.scalar_type());
}

// Visibility of every pixel as bytes (N x H x W): computed once, shared by all channels.
inline at::Tensor visible_map(const at::Tensor& mask) {
  return mask.reshape({mask.size(0), mask.size(2), mask.size(3)}).gt(0).to(at::kByte).contiguous();
}

// An in-place op's output argument: writing a tensor whose elements share memory (an expanded
// tensor) in place would be ambiguous.
inline void check_writable(const at::Tensor& x, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes, name,
              " has overlapping memory (an expanded tensor?); writing it in place is ambiguous");
}

// Unsigned integer of a scalar's width, for selects done as bitwise ands (neighbor_fill.cpp).
template <typename scalar_t>
using bits_of = std::conditional_t<sizeof(scalar_t) == 2, uint16_t,
                                   std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;

// ATen's pooling_output_shape (aten/src/ATen/native/Pool.h), including the ceil_mode rule
// that the last window must start inside the input or the left padding.
inline int64_t pooled_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dil, bool ceil_mode) {
  const int64_t num = in + 2 * pad - dil * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = (num >= 0 ? num / stride : -((-num + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

// ---------------------------------------------------------------- activations
// Codes follow the order of ACTIVATIONS in masked_ops/activations.py.
enum class Act { None, Relu, Relu6, LeakyRelu, Silu, Hardswish, Hardsigmoid, Sigmoid, Gelu, Tanh };

inline Act activation_from_name(const std::string& name) {
  if (name == "none") return Act::None;
  if (name == "relu") return Act::Relu;
  if (name == "relu6") return Act::Relu6;
  if (name == "leaky_relu") return Act::LeakyRelu;
  if (name == "silu") return Act::Silu;
  if (name == "hardswish") return Act::Hardswish;
  if (name == "hardsigmoid") return Act::Hardsigmoid;
  if (name == "sigmoid") return Act::Sigmoid;
  if (name == "gelu") return Act::Gelu;
  if (name == "tanh") return Act::Tanh;
  TORCH_CHECK(false, "activation must be one of none, relu, relu6, leaky_relu, silu, hardswish, hardsigmoid, "
              "sigmoid, gelu, tanh; got '", name, "'");
}

// NaN propagates as in the ATen ops (comparisons with NaN are false, so NaN falls through).
template <Act A, typename T>
inline T activate(T z) {
  if constexpr (A == Act::None) {
    return z;
  } else if constexpr (A == Act::Relu) {
    return z < T(0) ? T(0) : z;
  } else if constexpr (A == Act::Relu6) {
    return z < T(0) ? T(0) : (z > T(6) ? T(6) : z);
  } else if constexpr (A == Act::LeakyRelu) {
    return z > T(0) ? z : z * T(0.01);
  } else if constexpr (A == Act::Silu) {
    return z / (T(1) + std::exp(-z));
  } else if constexpr (A == Act::Hardswish) {
    T r = z + T(3);
    r = r < T(0) ? T(0) : (r > T(6) ? T(6) : r);
    return z * r / T(6);
  } else if constexpr (A == Act::Hardsigmoid) {
    T r = z + T(3);
    r = r < T(0) ? T(0) : (r > T(6) ? T(6) : r);
    return r / T(6);
  } else if constexpr (A == Act::Sigmoid) {
    return T(1) / (T(1) + std::exp(-z));
  } else if constexpr (A == Act::Gelu) {
    // Exact (erf) form, F.gelu's default.
    return z * T(0.5) * (T(1) + std::erf(z * T(M_SQRT1_2)));
  } else {
    return std::tanh(z);
  }
}

// g * d act(z) / dz, with the formulas of ATen's backward ops (threshold_backward, hardtanh_backward,
// leaky_relu_backward, silu_backward, hardswish_backward, hardsigmoid_backward, sigmoid_backward,
// gelu_backward, tanh_backward), so the fused backward agrees with autograd on the reference.
template <Act A, typename T>
inline T activation_grad(T z, T g) {
  if constexpr (A == Act::None) {
    return g;
  } else if constexpr (A == Act::Relu) {
    return z <= T(0) ? T(0) : g;
  } else if constexpr (A == Act::Relu6) {
    // Bitwise | (both compares, no short circuit): the select vectorises; with || it did not (5 ns
    // per element against relu's 2). NaN z passes g, as ATen's hardtanh_backward.
    const bool off = (z <= T(0)) | (z >= T(6));
    return off ? T(0) : g;
  } else if constexpr (A == Act::LeakyRelu) {
    return z > T(0) ? g : g * T(0.01);
  } else if constexpr (A == Act::Silu) {
    const T s = T(1) / (T(1) + std::exp(-z));
    return g * s * (T(1) + z * (T(1) - s));
  } else if constexpr (A == Act::Hardswish) {
    return z < T(-3) ? T(0) : (z <= T(3) ? g * (z / T(3) + T(0.5)) : g);
  } else if constexpr (A == Act::Hardsigmoid) {
    // ATen multiplies by the float 1/6 in every dtype; the same constant keeps fp64 equal to the oracle.
    return (z > T(-3) && z < T(3)) ? g * T(1.0f / 6.0f) : T(0);
  } else if constexpr (A == Act::Sigmoid) {
    const T s = T(1) / (T(1) + std::exp(-z));
    return g * (T(1) - s) * s;
  } else if constexpr (A == Act::Gelu) {
    const T cdf = T(0.5) * (T(1) + std::erf(z * T(M_SQRT1_2)));
    const T pdf = std::exp(T(-0.5) * z * z) * T(0.3989422804014327);  // 1 / sqrt(2 pi)
    return g * (cdf + z * pdf);
  } else {
    const T t = std::tanh(z);
    return g * (T(1) - t * t);
  }
}

// Calls f(std::integral_constant<Act, A>{}) so each activation gets its own specialised loop.
template <typename F>
inline void dispatch_activation(Act act, F&& f) {
  switch (act) {
    case Act::None: f(std::integral_constant<Act, Act::None>{}); break;
    case Act::Relu: f(std::integral_constant<Act, Act::Relu>{}); break;
    case Act::Relu6: f(std::integral_constant<Act, Act::Relu6>{}); break;
    case Act::LeakyRelu: f(std::integral_constant<Act, Act::LeakyRelu>{}); break;
    case Act::Silu: f(std::integral_constant<Act, Act::Silu>{}); break;
    case Act::Hardswish: f(std::integral_constant<Act, Act::Hardswish>{}); break;
    case Act::Hardsigmoid: f(std::integral_constant<Act, Act::Hardsigmoid>{}); break;
    case Act::Sigmoid: f(std::integral_constant<Act, Act::Sigmoid>{}); break;
    case Act::Gelu: f(std::integral_constant<Act, Act::Gelu>{}); break;
    case Act::Tanh: f(std::integral_constant<Act, Act::Tanh>{}); break;
  }
}

}  // namespace cpu
}  // namespace masked_ops
