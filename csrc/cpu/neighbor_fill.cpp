// neighbor_fill on CPU: all `iters` fill iterations in one pass per channel.
//
// The fill pattern depends on the mask alone. Per sample we compute once which removed
// pixels get filled and in which iteration (their "level": the Chebyshev distance to the
// nearest visible pixel, if <= iters), and for each filled pixel which of its 3x3
// neighbours are known before that iteration (level lower than its own). Processing the
// filled pixels in level order, each one is the mean of those neighbours, which are final
// by then; this is exactly the reference's iteration (masked_ops/backends/reference.py)
// without touching the pixels that do not change.
//
// NCHW: one task per (n, c) plane. NHWC: one task per (n, channel block), the channel loop
// innermost (contiguous, vectorisable).
#include "common.h"

#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace masked_ops {
namespace cpu {
namespace {

// The 3x3 neighbours in row-major order; bit k of a pixel's neighbour set is kNeighbour[k].
constexpr int kDy[8] = {-1, -1, -1, 0, 0, 1, 1, 1};
constexpr int kDx[8] = {-1, 0, 1, -1, 1, -1, 0, 1};

// The filled pixels of one sample in level order, with their known-neighbour sets.
struct FillPlan {
  std::vector<int32_t> pixel;      // flat h*W+w
  std::vector<uint8_t> neighbours; // bit k: neighbour k is known before this pixel's level
};

FillPlan plan_fill(const uint8_t* visible, int64_t H, int64_t W, int64_t iters) {
  FillPlan plan;
  const int64_t HW = H * W;
  // level: 0 visible, t filled in iteration t, -1 not (yet) reached.
  std::vector<int32_t> level(HW);
  for (int64_t p = 0; p < HW; ++p) level[p] = visible[p] ? 0 : -1;

  auto for_each_neighbour = [&](int64_t p, auto&& f) {
    const int64_t h = p / W, w = p % W;
    for (int k = 0; k < 8; ++k) {
      const int64_t hh = h + kDy[k], ww = w + kDx[k];
      if (hh >= 0 && hh < H && ww >= 0 && ww < W) f(k, hh * W + ww);
    }
  };

  // Level 1: removed pixels with a visible neighbour.
  std::vector<int32_t> frontier;
  for (int64_t p = 0; p < HW; ++p) {
    if (level[p] != -1) continue;
    bool reached = false;
    for_each_neighbour(p, [&](int, int64_t q) { reached = reached || level[q] == 0; });
    if (reached) frontier.push_back(static_cast<int32_t>(p));
  }
  for (int32_t p : frontier) level[p] = 1;
  // Level t: unreached neighbours of level t-1 (the 3x3 dilation of the known region).
  size_t begin = 0;
  plan.pixel = frontier;
  for (int64_t t = 2; t <= iters; ++t) {
    const size_t end = plan.pixel.size();
    if (begin == end) break;
    for (size_t i = begin; i < end; ++i) {
      for_each_neighbour(plan.pixel[i], [&](int, int64_t q) {
        if (level[q] == -1) {
          level[q] = static_cast<int32_t>(t);
          plan.pixel.push_back(static_cast<int32_t>(q));
        }
      });
    }
    begin = end;
  }
  plan.neighbours.resize(plan.pixel.size());
  for (size_t i = 0; i < plan.pixel.size(); ++i) {
    const int32_t own = level[plan.pixel[i]];
    uint8_t bits = 0;
    for_each_neighbour(plan.pixel[i], [&](int k, int64_t q) {
      if (level[q] >= 0 && level[q] < own) bits |= static_cast<uint8_t>(1u << k);
    });
    plan.neighbours[i] = bits;
  }
  return plan;
}

template <typename scalar_t>
void fill_nchw(const scalar_t* x, scalar_t* out, const uint8_t* vis, const std::vector<FillPlan>& plans,
               int64_t N, int64_t C, int64_t H, int64_t W) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W;
  int64_t offset[8];
  for (int k = 0; k < 8; ++k) offset[k] = kDy[k] * W + kDx[k];
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C;
      const scalar_t* xp = x + plane * HW;
      scalar_t* op = out + plane * HW;
      const uint8_t* v = vis + n * HW;
      // Select, never multiply: removed values (NaN/inf included) are never read.
      for (int64_t p = 0; p < HW; ++p) op[p] = v[p] ? xp[p] : scalar_t(0);
      if (plans.empty()) continue;
      const FillPlan& plan = plans[n];
      const size_t count = plan.pixel.size();
      for (size_t i = 0; i < count; ++i) {
        const int64_t p = plan.pixel[i];
        const unsigned bits = plan.neighbours[i];
        opmath_t acc = 0;
        int cnt = 0;
        for (int k = 0; k < 8; ++k) {
          if (bits & (1u << k)) {
            acc += static_cast<opmath_t>(op[p + offset[k]]);
            ++cnt;
          }
        }
        op[p] = static_cast<scalar_t>(acc / static_cast<opmath_t>(cnt));
      }
    }
  });
}

template <typename scalar_t>
void fill_nhwc(const scalar_t* x, scalar_t* out, const uint8_t* vis, const std::vector<FillPlan>& plans,
               int64_t N, int64_t C, int64_t H, int64_t W) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W;
  int64_t offset[8];
  for (int k = 0; k < 8; ++k) offset[k] = (kDy[k] * W + kDx[k]) * C;
  if (plans.empty()) {
    // iters == 0: zero the removed pixels, one task range over all pixels of the batch.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
    at::parallel_for(0, N * HW, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        scalar_t* o = out + p * C;
        const scalar_t* xp = x + p * C;
        if (vis[p]) {
          std::copy(xp, xp + C, o);
        } else {
          std::fill(o, o + C, scalar_t(0));
        }
      }
    });
    return;
  }
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    opmath_t acc[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      const int64_t c0 = (task % blocks) * kBlock;
      const int64_t cb = std::min(kBlock, C - c0);
      const scalar_t* xs = x + n * HW * C + c0;
      scalar_t* os = out + n * HW * C + c0;
      const uint8_t* v = vis + n * HW;
      for (int64_t p = 0; p < HW; ++p) {
        scalar_t* o = os + p * C;
        if (v[p]) {
          std::copy(xs + p * C, xs + p * C + cb, o);
        } else {
          std::fill(o, o + cb, scalar_t(0));
        }
      }
      const FillPlan& plan = plans[n];
      const size_t count = plan.pixel.size();
      for (size_t i = 0; i < count; ++i) {
        scalar_t* o = os + plan.pixel[i] * C;
        const unsigned bits = plan.neighbours[i];
        for (int64_t c = 0; c < cb; ++c) acc[c] = 0;
        int cnt = 0;
        for (int k = 0; k < 8; ++k) {
          if (bits & (1u << k)) {
            const scalar_t* q = o + offset[k];
            for (int64_t c = 0; c < cb; ++c) acc[c] += static_cast<opmath_t>(q[c]);
            ++cnt;
          }
        }
        const opmath_t denom = static_cast<opmath_t>(cnt);
        for (int64_t c = 0; c < cb; ++c) o[c] = static_cast<scalar_t>(acc[c] / denom);
      }
    }
  });
}

at::Tensor neighbor_fill_cpu(const at::Tensor& x_in, const at::Tensor& mask, int64_t iters) {
  check_image(x_in, "neighbor_fill: x");
  check_mask_like(mask, x_in, x_in.size(2), x_in.size(3), "neighbor_fill: mask");
  TORCH_CHECK(iters >= 0, "neighbor_fill: iters must be >= 0, got ", iters);
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor out = at::empty_like(x, x.options().memory_format(fmt));
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (x.numel() == 0) return out;
  TORCH_CHECK(H * W < (int64_t(1) << 31), "neighbor_fill: H*W too large");
  const at::Tensor vis = visible_map(mask);
  const uint8_t* vp = vis.data_ptr<uint8_t>();

  std::vector<FillPlan> plans;
  if (iters > 0) {
    plans.resize(N);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) plans[n] = plan_fill(vp + n * H * W, H, W, iters);
    });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "neighbor_fill_cpu", [&] {
    if (fmt == at::MemoryFormat::ChannelsLast) {
      fill_nhwc<scalar_t>(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), vp, plans, N, C, H, W);
    } else {
      fill_nchw<scalar_t>(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), vp, plans, N, C, H, W);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(masked_ops, CPU, m) {
  m.impl("neighbor_fill", &neighbor_fill_cpu);
}

}  // namespace cpu
}  // namespace masked_ops
