// The fused one-pass epilogues on CPU:
//   conv_epilogue:     out = act(y * scale[n,ho,wo] + bias[c])  where keep, 0 elsewhere
//   masked_affine_act: out = act(x * scale[c] + shift[c])       where mask, 0 elsewhere
// Both are one kernel: z = (y * pixel_scale) * channel_mul + channel_add, a selected
// activation, and a select (never a multiply) by the per-pixel keep mask, which is read
// once per (n, h, w) in NHWC and once per plane row in NCHW.
#include "common.h"

#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace masked_ops {
namespace cpu {
namespace {

// What one epilogue call reads and writes; y is unused in place (INPLACE: out holds y on entry).
template <typename scalar_t>
struct EpilogueArgs {
  const scalar_t* y;
  scalar_t* out;
  const scalar_t* keep;
  const scalar_t* pix;
  const at::opmath_type<scalar_t>* mul;
  const at::opmath_type<scalar_t>* add;
  int64_t N, C, HW;
};

// NCHW planes (CL false) or NHWC pixels (CL true) [begin, end). In place the loops read and write
// through one restrict pointer: two pointers to the same buffer would make the compiler's alias check
// fail at run time and fall back to its scalar loop.
template <typename scalar_t, Act A, bool PIX, bool INPLACE, bool CL>
MASKED_OPS_ALWAYS_INLINE inline void epilogue_range(const EpilogueArgs<scalar_t>& d, int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = d.C, HW = d.HW;
  if constexpr (!CL) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C, c = plane % C;
      scalar_t* __restrict__ op = d.out + plane * HW;
      const scalar_t* __restrict__ yp = INPLACE ? nullptr : d.y + plane * HW;
      const scalar_t* __restrict__ kp = d.keep + n * HW;
      const scalar_t* __restrict__ sp = PIX ? d.pix + n * HW : nullptr;
      const opmath_t m = d.mul[c], a = d.add[c];
      for (int64_t i = 0; i < HW; ++i) {
        opmath_t z = static_cast<opmath_t>(INPLACE ? op[i] : yp[i]);
        if constexpr (PIX) z = z * static_cast<opmath_t>(sp[i]);
        // A ternary select of floats vectorises as a blend (the bitwise select_if did not).
        const scalar_t v = static_cast<scalar_t>(activate<A>(z * m + a));
        op[i] = static_cast<opmath_t>(kp[i]) > opmath_t(0) ? v : scalar_t(0);
      }
    }
  } else {
    const opmath_t* __restrict__ mv = d.mul;
    const opmath_t* __restrict__ av = d.add;
    for (int64_t p = begin; p < end; ++p) {
      scalar_t* __restrict__ op = d.out + p * C;
      if (!(static_cast<opmath_t>(d.keep[p]) > opmath_t(0))) {
        std::fill(op, op + C, scalar_t(0));
        continue;
      }
      const scalar_t* __restrict__ yp = INPLACE ? nullptr : d.y + p * C;
      const opmath_t s = PIX ? static_cast<opmath_t>(d.pix[p]) : opmath_t(1);
      for (int64_t c = 0; c < C; ++c) {
        opmath_t z = static_cast<opmath_t>(INPLACE ? op[c] : yp[c]);
        if constexpr (PIX) z = z * s;
        op[c] = static_cast<scalar_t>(activate<A>(z * mv[c] + av[c]));
      }
    }
  }
}

// The same loops compiled for AVX2 (chosen at run time: the wheel itself targets every x86-64).
template <typename scalar_t, Act A, bool PIX, bool INPLACE, bool CL>
MASKED_OPS_TARGET_AVX2 void epilogue_range_avx2(const EpilogueArgs<scalar_t>& d, int64_t begin, int64_t end) {
  epilogue_range<scalar_t, A, PIX, INPLACE, CL>(d, begin, end);
}

template <typename scalar_t, Act A, bool PIX, bool INPLACE>
void epilogue_kernel(const EpilogueArgs<scalar_t>& d, bool channels_last) {
  const bool avx2 = cpu_has_avx2();
  auto run = [&](auto cl) {
    constexpr bool CL = decltype(cl)::value;
    // Tasks of about 32K elements: planes in NCHW, pixels in NHWC.
    const int64_t per_task = CL ? d.C : d.HW, units = CL ? d.N * d.HW : d.N * d.C;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(per_task, 1));
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      if (avx2)
        epilogue_range_avx2<scalar_t, A, PIX, INPLACE, CL>(d, begin, end);
      else
        epilogue_range<scalar_t, A, PIX, INPLACE, CL>(d, begin, end);
    });
  };
  if (channels_last)
    run(std::true_type{});
  else
    run(std::false_type{});
}

// Per-channel factors in opmath (1 / 0 where absent). Values are first rounded to the input
// dtype, as the reference does with .to(x.dtype).
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> channel_vector(const std::optional<at::Tensor>& t, int64_t C,
                                                      double absent, const at::ScalarType dtype) {
  using opmath_t = at::opmath_type<scalar_t>;
  std::vector<opmath_t> v(C, static_cast<opmath_t>(absent));
  if (t.has_value() && t->defined()) {
    const at::Tensor tc = t->to(at::kCPU, dtype).contiguous();
    const scalar_t* p = tc.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) v[c] = static_cast<opmath_t>(p[c]);
  }
  return v;
}

at::Tensor epilogue(const at::Tensor& y_in, const at::Tensor& keep_in, const std::optional<at::Tensor>& pix_in,
                    const std::optional<at::Tensor>& mul, const std::optional<at::Tensor>& add,
                    const std::string& activation, bool in_place = false) {
  const Act act = activation_from_name(activation);
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt);
  // In place: the kernels read and write each element at the same index, so out may be y when
  // y is dense; a strided y is computed into a new tensor and copied back.
  at::Tensor out = in_place && y.is_same(y_in) ? y : at::empty_like(y, y.options().memory_format(fmt));
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  if (y.numel() == 0) return out;
  const at::Tensor keep = keep_in.contiguous();
  const bool has_pix = pix_in.has_value() && pix_in->defined();
  const at::Tensor pix = has_pix ? pix_in->to(y.scalar_type()).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "masked_ops_epilogue", [&] {
    const auto mulv = channel_vector<scalar_t>(mul, C, 1.0, y.scalar_type());
    const auto addv = channel_vector<scalar_t>(add, C, 0.0, y.scalar_type());
    const scalar_t* pp = has_pix ? pix.const_data_ptr<scalar_t>() : nullptr;
    const bool cl = fmt == at::MemoryFormat::ChannelsLast;
    const scalar_t* kp = keep.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    dispatch_activation(act, [&](auto a) {
      constexpr Act A = decltype(a)::value;
      const EpilogueArgs<scalar_t> d{yp, op, kp, pp, mulv.data(), addv.data(), N, C, HW};
      const bool same = out.is_same(y);
      if (has_pix && same) {
        epilogue_kernel<scalar_t, A, true, true>(d, cl);
      } else if (has_pix) {
        epilogue_kernel<scalar_t, A, true, false>(d, cl);
      } else if (same) {
        epilogue_kernel<scalar_t, A, false, true>(d, cl);
      } else {
        epilogue_kernel<scalar_t, A, false, false>(d, cl);
      }
    });
  });
  if (in_place && !out.is_same(y_in)) y_in.copy_(out);
  return out;
}

void check_conv_epilogue(const at::Tensor& y, const at::Tensor& keep, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& bias) {
  check_image(y, "conv_epilogue: y");
  check_mask_like(keep, y, y.size(2), y.size(3), "conv_epilogue: keep");
  if (scale.has_value() && scale->defined()) {
    TORCH_CHECK(scale->dim() == 4 && scale->size(0) == y.size(0) && scale->size(1) == 1 &&
                    scale->size(2) == y.size(2) && scale->size(3) == y.size(3),
                "conv_epilogue: scale must have shape (", y.size(0), ", 1, ", y.size(2), ", ", y.size(3), "), got ",
                scale->sizes());
    TORCH_CHECK(scale->device().is_cpu(), "conv_epilogue: scale must be a CPU tensor");
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == y.size(1), "conv_epilogue: bias must have shape (",
                y.size(1), ",), got ", bias->sizes());
    TORCH_CHECK(bias->device().is_cpu(), "conv_epilogue: bias must be a CPU tensor");
  }
}

at::Tensor conv_epilogue_cpu(const at::Tensor& y, const at::Tensor& keep, const std::optional<at::Tensor>& scale,
                             const std::optional<at::Tensor>& bias, c10::string_view activation) {
  check_conv_epilogue(y, keep, scale, bias);
  return epilogue(y, keep, scale, std::nullopt, bias, std::string(activation));
}

void conv_epilogue_inplace_cpu(at::Tensor& y, const at::Tensor& keep, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& bias, c10::string_view activation) {
  check_conv_epilogue(y, keep, scale, bias);
  check_writable(y, "conv_epilogue_: y");
  epilogue(y, keep, scale, std::nullopt, bias, std::string(activation), /*in_place=*/true);
}

at::Tensor masked_affine_act_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& scale,
                                 const at::Tensor& shift, c10::string_view activation) {
  check_image(x, "masked_affine_act: x");
  check_mask_like(mask, x, x.size(2), x.size(3), "masked_affine_act: mask");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{scale, "scale"}, {shift, "shift"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), "masked_affine_act: ", name, " must have shape (",
                x.size(1), ",), got ", t.sizes());
    TORCH_CHECK(t.device().is_cpu(), "masked_affine_act: ", name, " must be a CPU tensor");
  }
  return epilogue(x, mask, std::nullopt, scale, shift, std::string(activation));
}

// One channels_last pixel of the backward, its C channels contiguous: gy = act'(z) grad * s, the bias
// sums += gz (GB), and (GS) the pixel's gscale = sum_c gz * y, returned. The flags are compile-time
// and every pointer restrict, so the channel loop is one vector loop; gz * y goes through pr and is
// summed in eight partial sums (a float reduction inside the loop would keep it scalar).
template <Act A, bool S, bool GS, bool GB, typename scalar_t, typename T>
inline T epilogue_grad_pixel(const scalar_t* __restrict yc, const scalar_t* __restrict gc, scalar_t* __restrict gyc,
                             const T* __restrict bv, T s, T* __restrict bsr, T* __restrict pr, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const T yv = static_cast<T>(yc[c]);
    const T z = (S ? static_cast<T>(static_cast<scalar_t>(yv * s)) : yv) + bv[c];
    const T gz = activation_grad<A>(z, static_cast<T>(gc[c]));
    gyc[c] = static_cast<scalar_t>(S ? gz * s : gz);
    if constexpr (GB) bsr[c] += gz;
    if constexpr (GS) pr[c] = gz * yv;
  }
  if constexpr (!GS) return T(0);
  return sum8(pr, C);
}

// The backward's loops specialised on what is asked for, as compile-time flags f(S, GS, GB): a
// per-pixel scale, its gradient (only with a scale), per-channel bias sums.
template <typename F>
inline void with_backward_flags(bool s, bool gs, bool gb, F&& f) {
  using No = std::false_type;
  using Yes = std::true_type;
  if (s && gs && gb) f(Yes{}, Yes{}, Yes{});
  else if (s && gs) f(Yes{}, Yes{}, No{});
  else if (s && gb) f(Yes{}, No{}, Yes{});
  else if (s) f(Yes{}, No{}, No{});
  else if (gb) f(No{}, No{}, Yes{});
  else f(No{}, No{}, No{});
}

// The backward of conv_epilogue in one pass (reference: backends/autograd.py epilogue_backward):
// z = y * scale + bias, gz = act'(z) * grad where keep > 0 (selected, never multiplied, so nothing
// computed at removed positions leaks), gy = gz * scale, gscale = sum_c gz * y, gbias = sum gz.
// Outputs not asked for come back as empty (0-element) tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_epilogue_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& y_in, const at::Tensor& keep_in,
    const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& bias_in,
    c10::string_view activation, bool need_scale, bool need_bias) {
  check_conv_epilogue(y_in, keep_in, scale_in, bias_in);
  TORCH_CHECK(grad_in.sizes() == y_in.sizes(), "conv_epilogue_backward: grad must have y's shape ", y_in.sizes());
  const Act act = activation_from_name(std::string(activation));
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt);
  const at::Tensor grad = grad_in.to(y.scalar_type()).contiguous(fmt);
  const at::Tensor keep = keep_in.contiguous();
  const bool has_scale = scale_in.has_value() && scale_in->defined();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor scale = has_scale ? scale_in->to(y.scalar_type()).contiguous() : at::Tensor();
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  at::Tensor gy = at::empty_like(y, y.options().memory_format(fmt));
  at::Tensor gscale = has_scale && need_scale ? at::zeros_like(scale) : at::empty({0}, y.options());
  at::Tensor gbias = has_bias && need_bias ? at::zeros_like(*bias_in) : at::empty({0}, y.options());
  if (y.numel() == 0) return {gy, gscale, gbias};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_epilogue_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto biasv = channel_vector<scalar_t>(bias_in, C, 0.0, y.scalar_type());
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* kp = keep.const_data_ptr<scalar_t>();
    const scalar_t* sp = has_scale ? scale.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gyp = gy.data_ptr<scalar_t>();
    scalar_t* gsp = has_scale && need_scale ? gscale.data_ptr<scalar_t>() : nullptr;
    const bool cl = fmt == at::MemoryFormat::ChannelsLast;
    // Pixel chunks in parallel (batch 1 too), in the input's layout; per-chunk channel sums for
    // gbias, added up at the end; gscale is per pixel, so each chunk writes its own. In NCHW a chunk
    // runs over its pixels once per channel: long chunks (a whole sample unless that leaves threads
    // idle) keep those inner loops long and contiguous.
    const int64_t threads = at::get_num_threads();
    const PixelChunks pc = cl ? pixel_chunks(N, C, HW)
                              : pixel_chunks(N, 1, HW, std::max<int64_t>(1024, (N * HW + threads - 1) / threads));
    std::vector<T> bias_sums(has_bias && need_bias ? pc.count * C : 0, T(0));
    dispatch_activation(act, [&](auto a) {
      constexpr Act A = decltype(a)::value;
      for_pixel_chunks(pc, HW, [&](int64_t n, int64_t p0, int64_t p1, int64_t k) {
        const scalar_t* kn = kp + n * HW;
        const scalar_t* sn = sp ? sp + n * HW : nullptr;
        T* bs = bias_sums.empty() ? nullptr : bias_sums.data() + k * C;
        // Per element: z as the forward computed it (y * scale rounded like the reference's, + bias).
        if (cl) {
          std::vector<T> prod(gsp ? C : 0);
          const bool s = sn != nullptr, gs = gsp != nullptr, gb = bs != nullptr;
          auto run = [&](auto has_scale_c, auto need_scale_c, auto need_bias_c) {
            constexpr bool S = decltype(has_scale_c)::value, GS = decltype(need_scale_c)::value,
                           GB = decltype(need_bias_c)::value;
            for (int64_t p = p0; p < p1; ++p) {
              const int64_t base = (n * HW + p) * C;
              if (!(static_cast<T>(kn[p]) > T(0))) {
                std::fill(gyp + base, gyp + base + C, scalar_t(0));
                continue;
              }
              const T sv = S ? static_cast<T>(sn[p]) : T(1);
              const T pix = epilogue_grad_pixel<A, S, GS, GB>(yp + base, gp + base, gyp + base, biasv.data(), sv, bs,
                                                               prod.data(), C);
              if constexpr (GS) gsp[n * HW + p] = static_cast<scalar_t>(pix);
            }
          };
          with_backward_flags(s, gs, gb, run);
        } else {
          // Branch-free inner loops (a select per element), specialised on what is asked for, so
          // that they vectorise: only the bias sum is a reduction over pixels.
          std::vector<T> pix(gsp ? p1 - p0 : 0, T(0));
          auto planes = [&](auto has_scale_c, auto need_scale_c, auto need_bias_c) {
            constexpr bool S = decltype(has_scale_c)::value, GS = decltype(need_scale_c)::value,
                           GB = decltype(need_bias_c)::value;
            T* __restrict__ px = pix.data() - p0;
            const scalar_t* __restrict__ kk = kn;
            const scalar_t* __restrict__ ss = sn;
            for (int64_t c = 0; c < C; ++c) {
              const int64_t base = (n * C + c) * HW;
              const scalar_t* __restrict__ yc = yp + base;
              const scalar_t* __restrict__ gc = gp + base;
              scalar_t* __restrict__ gyc = gyp + base;
              const T b = biasv[c];
              T bsum = T(0);
              for (int64_t p = p0; p < p1; ++p) {
                const T sv = S ? static_cast<T>(ss[p]) : T(1);
                const T yv = static_cast<T>(yc[p]);
                const T z = static_cast<T>(static_cast<scalar_t>(yv * sv)) + b;
                const bool kept = static_cast<T>(kk[p]) > T(0);
                const T ag = activation_grad<A>(z, static_cast<T>(gc[p]));  // unconditional: vectorises
                const T gz = kept ? ag : T(0);
                gyc[p] = static_cast<scalar_t>(kept ? gz * sv : T(0));
                if constexpr (GB) bsum += gz;
                if constexpr (GS) px[p] += kept ? gz * yv : T(0);
              }
              if constexpr (GB) bs[c] += bsum;
            }
          };
          const bool s = sn != nullptr, gs = gsp != nullptr, gb = bs != nullptr;
          with_backward_flags(s, gs, gb, planes);
          if (gsp)
            for (int64_t p = p0; p < p1; ++p) gsp[n * HW + p] = static_cast<scalar_t>(pix[p - p0]);
        }
      });
    });
    if (!bias_sums.empty()) {
      std::vector<T> total(C, T(0));
      for (int64_t k = 0; k < pc.count; ++k)
        for (int64_t c = 0; c < C; ++c) total[c] += bias_sums[k * C + c];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gbias.scalar_type(), "gbias", [&] {
        scalar_t* gb = gbias.data_ptr<scalar_t>();
        for (int64_t c = 0; c < C; ++c) gb[c] = static_cast<scalar_t>(total[c]);
      });
    }
  });
  return {gy, gscale, gbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(masked_ops, CPU, m) {
  m.impl("conv_epilogue_backward", &conv_epilogue_backward_cpu);
  m.impl("conv_epilogue", &conv_epilogue_cpu);
  m.impl("conv_epilogue_", &conv_epilogue_inplace_cpu);
  m.impl("masked_affine_act", &masked_affine_act_cpu);
}

}  // namespace cpu
}  // namespace masked_ops
