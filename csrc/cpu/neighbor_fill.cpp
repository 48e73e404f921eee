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
#include <array>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace masked_ops {
namespace cpu {
namespace {

// The 3x3 neighbours in row-major order (the order the sums run in).
constexpr int kDy[8] = {-1, -1, -1, 0, 0, 1, 1, 1};
constexpr int kDx[8] = {-1, 0, 1, -1, 1, -1, 0, 1};

// The filled pixels of one sample in level order. For each: its known neighbours (level
// lower than its own) as flat indices h*W+w, packed first in row-major order; the unused
// slots hold the sentinel H*W, which the NCHW loop points at a zero cell so that every
// pixel sums exactly 8 cells without branches (adding +0 changes no sum).
struct FillPlan {
  std::vector<int32_t> pixel;
  std::vector<std::array<int32_t, 8>> neighbour;
  std::vector<uint8_t> count;
};

FillPlan plan_fill(const uint8_t* visible, int64_t H, int64_t W, int64_t iters) {
  // Work on grids padded by one pixel, so neighbour lookups need no bounds checks.
  const int64_t Hp = H + 2, Wp = W + 2;
  constexpr int32_t kNever = std::numeric_limits<int32_t>::max();  // unreached or border
  std::vector<uint8_t> known(Hp * Wp, 0), row(Hp * Wp, 0), grown(Hp * Wp, 0);
  std::vector<int32_t> level(Hp * Wp, kNever);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t w = 0; w < W; ++w) {
      const uint8_t v = visible[h * W + w] ? 1 : 0;
      known[(h + 1) * Wp + w + 1] = v;
      if (v) level[(h + 1) * Wp + w + 1] = 0;
    }
  }
  // Level t = pixels added by the t-th 3x3 dilation of the known region (separable max).
  std::vector<int64_t> per_level(iters + 1, 0);
  for (int64_t t = 1; t <= iters; ++t) {
    for (int64_t h = 1; h <= H; ++h) {
      const uint8_t* k = known.data() + h * Wp;
      uint8_t* r = row.data() + h * Wp;
      for (int64_t w = 1; w <= W; ++w) r[w] = k[w - 1] | k[w] | k[w + 1];
    }
    int64_t added = 0;
    for (int64_t h = 1; h <= H; ++h) {
      const uint8_t* up = row.data() + (h - 1) * Wp;
      const uint8_t* mid = row.data() + h * Wp;
      const uint8_t* down = row.data() + (h + 1) * Wp;
      const uint8_t* k = known.data() + h * Wp;
      uint8_t* g = grown.data() + h * Wp;
      int32_t* lv = level.data() + h * Wp;
      for (int64_t w = 1; w <= W; ++w) {
        const uint8_t d = up[w] | mid[w] | down[w];
        const uint8_t fresh = d & static_cast<uint8_t>(k[w] ^ 1);
        g[w] = d;
        added += fresh;
        lv[w] = fresh ? static_cast<int32_t>(t) : lv[w];
      }
    }
    if (added == 0) break;
    per_level[t] = added;
    known.swap(grown);
  }
  // Filled pixels in level order (a counting sort by level), with their known neighbours.
  std::vector<int64_t> start(iters + 2, 0);
  for (int64_t t = 1; t <= iters; ++t) start[t + 1] = start[t] + per_level[t];
  const int64_t count = start[iters + 1];
  FillPlan plan;
  plan.pixel.resize(count);
  plan.neighbour.resize(count);
  plan.count.resize(count);
  int64_t offset[8];
  for (int k = 0; k < 8; ++k) offset[k] = kDy[k] * Wp + kDx[k];
  const int32_t sentinel = static_cast<int32_t>(H * W);
  for (int64_t h = 1; h <= H; ++h) {
    for (int64_t w = 1; w <= W; ++w) {
      const int64_t pp = h * Wp + w;
      const int32_t own = level[pp];
      if (own == 0 || own == kNever) continue;
      const int64_t i = start[own]++;
      plan.pixel[i] = static_cast<int32_t>((h - 1) * W + (w - 1));
      auto& nb = plan.neighbour[i];
      int cnt = 0;
      for (int k = 0; k < 8; ++k) {
        if (level[pp + offset[k]] < own) nb[cnt++] = static_cast<int32_t>((h - 1 + kDy[k]) * W + (w - 1 + kDx[k]));
      }
      for (int k = cnt; k < 8; ++k) nb[k] = sentinel;
      plan.count[i] = static_cast<uint8_t>(cnt);
    }
  }
  return plan;
}

// Per-sample select masks as all-ones / all-zeros words of the scalar's width: zeroing removed
// pixels becomes a bitwise and (a select: NaN there never enters arithmetic) that vectorises.
template <typename scalar_t>
std::vector<bits_of<scalar_t>> select_masks(const uint8_t* vis, int64_t count) {
  std::vector<bits_of<scalar_t>> sel(count);
  for (int64_t i = 0; i < count; ++i) sel[i] = vis[i] ? static_cast<bits_of<scalar_t>>(~bits_of<scalar_t>(0)) : 0;
  return sel;
}

template <typename scalar_t>
inline void select_copy(const scalar_t* x, scalar_t* out, const bits_of<scalar_t>* sel, int64_t count) {
  using B = bits_of<scalar_t>;
  for (int64_t i = 0; i < count; ++i) {
    B b;
    std::memcpy(&b, x + i, sizeof(B));
    b &= sel[i];
    std::memcpy(out + i, &b, sizeof(B));
  }
}

template <typename scalar_t>
void fill_nchw(const scalar_t* x, scalar_t* out, const uint8_t* vis, const std::vector<FillPlan>& plans,
               int64_t N, int64_t C, int64_t H, int64_t W) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W;
  const auto sel = select_masks<scalar_t>(vis, N * HW);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    // One plane in opmath plus a zero cell at index HW (the neighbour sentinel); it stays in
    // cache while the levels are filled in order.
    std::vector<opmath_t> buf(plans.empty() ? 0 : HW + 1);
    std::vector<scalar_t> tmp(plans.empty() || std::is_same_v<opmath_t, scalar_t> ? 0 : HW);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C;
      const scalar_t* xp = x + plane * HW;
      scalar_t* op = out + plane * HW;
      if (plans.empty()) {
        select_copy(xp, op, sel.data() + n * HW, HW);
        continue;
      }
      if constexpr (std::is_same_v<opmath_t, scalar_t>) {
        select_copy(xp, buf.data(), sel.data() + n * HW, HW);
      } else {
        select_copy(xp, tmp.data(), sel.data() + n * HW, HW);
        for (int64_t p = 0; p < HW; ++p) buf[p] = static_cast<opmath_t>(tmp[p]);
      }
      buf[HW] = opmath_t(0);
      const FillPlan& plan = plans[n];
      const size_t count = plan.pixel.size();
      const int32_t* pix = plan.pixel.data();
      const std::array<int32_t, 8>* nb = plan.neighbour.data();
      const uint8_t* cnt = plan.count.data();
      opmath_t* b = buf.data();
      for (size_t i = 0; i < count; ++i) {
        const int32_t* q = nb[i].data();
        const opmath_t acc = ((((((b[q[0]] + b[q[1]]) + b[q[2]]) + b[q[3]]) + b[q[4]]) + b[q[5]]) + b[q[6]]) + b[q[7]];
        // Round to the storage dtype at every level, as the reference does.
        b[pix[i]] = static_cast<opmath_t>(static_cast<scalar_t>(acc / static_cast<opmath_t>(cnt[i])));
      }
      for (int64_t p = 0; p < HW; ++p) op[p] = static_cast<scalar_t>(buf[p]);
    }
  });
}

constexpr int64_t kChannelBlock = 64;

// The filled pixels of one sample over one block of cb <= kChannelBlock channels (channels
// innermost), in level order; at(p) is the element offset of flat pixel p from xs.
template <typename scalar_t, typename Offset>
void fill_channel_block(scalar_t* xs, const FillPlan& plan, int64_t cb, Offset at) {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t acc[kChannelBlock];
  for (size_t i = 0; i < plan.pixel.size(); ++i) {
    const int cnt = plan.count[i];
    for (int64_t c = 0; c < cb; ++c) acc[c] = 0;
    for (int k = 0; k < cnt; ++k) {
      const scalar_t* q = xs + at(plan.neighbour[i][k]);
      for (int64_t c = 0; c < cb; ++c) acc[c] += static_cast<opmath_t>(q[c]);
    }
    scalar_t* o = xs + at(plan.pixel[i]);
    const opmath_t denom = static_cast<opmath_t>(cnt);
    for (int64_t c = 0; c < cb; ++c) o[c] = static_cast<scalar_t>(acc[c] / denom);
  }
}

template <typename scalar_t>
void fill_nhwc(const scalar_t* x, scalar_t* out, const uint8_t* vis, const std::vector<FillPlan>& plans,
               int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t HW = H * W;
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
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      const int64_t c0 = (task % blocks) * kChannelBlock;
      const int64_t cb = std::min(kChannelBlock, C - c0);
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
      fill_channel_block(os, plans[n], cb, [C](int32_t p) { return static_cast<int64_t>(p) * C; });
    }
  });
}

// In place: only the pixels the fill reaches (levels 1..iters) are written; visible and
// unreached pixels are never touched, so x may be any strided view (the interior of a padded
// buffer, say). A filled pixel reads only lower levels, which are final when it is computed.
// Channels innermost (stride 1, channels_last or a view of it): one task per (sample, channel
// block), as fill_nhwc. Otherwise one task per (sample, channel), as fill_nchw.
template <typename scalar_t>
void fill_strided_inplace(scalar_t* x, const std::vector<FillPlan>& plans, int64_t N, int64_t C, int64_t W,
                          int64_t sN, int64_t sC, int64_t sH, int64_t sW) {
  using opmath_t = at::opmath_type<scalar_t>;
  auto offset = [&](int32_t p) { return static_cast<int64_t>(p / W) * sH + static_cast<int64_t>(p % W) * sW; };
  if (sC == 1) {
    const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
    at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks;
        const int64_t c0 = (task % blocks) * kChannelBlock;
        fill_channel_block(x + n * sN + c0, plans[n], std::min(kChannelBlock, C - c0), offset);
      }
    });
    return;
  }
  // One channel at a time: the element offsets of each sample's filled pixels and their
  // neighbours are computed once, not once per channel.
  std::vector<std::vector<int64_t>> offsets(N);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const FillPlan& plan = plans[n];
      auto& off = offsets[n];
      off.resize(plan.pixel.size() * 9);
      for (size_t i = 0; i < plan.pixel.size(); ++i) {
        off[i * 9] = offset(plan.pixel[i]);
        for (int k = 0; k < plan.count[i]; ++k) off[i * 9 + 1 + k] = offset(plan.neighbour[i][k]);
      }
    }
  });
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C;
      scalar_t* xs = x + n * sN + (plane % C) * sC;
      const FillPlan& plan = plans[n];
      const int64_t* off = offsets[n].data();
      for (size_t i = 0; i < plan.pixel.size(); ++i, off += 9) {
        opmath_t acc = 0;
        for (int k = 0; k < plan.count[i]; ++k) acc += static_cast<opmath_t>(xs[off[1 + k]]);
        xs[off[0]] = static_cast<scalar_t>(acc / static_cast<opmath_t>(plan.count[i]));
      }
    }
  });
}

void neighbor_fill_inplace_cpu(at::Tensor& x, const at::Tensor& mask, int64_t iters) {
  check_image(x, "neighbor_fill_: x");
  check_mask_like(mask, x, x.size(2), x.size(3), "neighbor_fill_: mask");
  TORCH_CHECK(iters >= 0, "neighbor_fill_: iters must be >= 0, got ", iters);
  check_writable(x, "neighbor_fill_: x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  iters = saturated_rings(iters, H, W);
  if (iters == 0 || x.numel() == 0) return;
  TORCH_CHECK(H * W < (int64_t(1) << 31), "neighbor_fill_: H*W too large");
  const at::Tensor vis = visible_map(mask);
  const uint8_t* vp = vis.data_ptr<uint8_t>();
  std::vector<FillPlan> plans(N);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) plans[n] = plan_fill(vp + n * H * W, H, W, iters);
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "neighbor_fill_inplace_cpu", [&] {
    fill_strided_inplace<scalar_t>(x.data_ptr<scalar_t>(), plans, N, C, W, x.stride(0), x.stride(1), x.stride(2),
                                   x.stride(3));
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
  iters = saturated_rings(iters, H, W);
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
  m.impl("neighbor_fill_", &neighbor_fill_inplace_cpu);
}

}  // namespace cpu
}  // namespace masked_ops
