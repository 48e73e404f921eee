// soft_fill's pads argument (csrc/ops.cpp), shared by the CPU and CUDA kernels: zeros around the
// result, (left, right, top, bottom), as F.pad after the fill.
#pragma once

#include <ATen/ATen.h>

namespace masked_ops {

// Whether pads adds anything; a clear error unless it is four non-negative counts.
inline bool check_pads(at::IntArrayRef pads, const char* op) {
  TORCH_CHECK(pads.size() == 4, op, ": pads must be (left, right, top, bottom), got ", pads);
  bool any = false;
  for (const int64_t p : pads) {
    TORCH_CHECK(p >= 0, op, ": pads must be >= 0 (zeros added around the result), got ", pads);
    any = any || p > 0;
  }
  return any;
}

// out with pads' zeros around it, in out's layout (kernels that cannot write into the padded buffer).
inline at::Tensor pad_result(const at::Tensor& out, at::IntArrayRef pads) {
  const auto fmt = out.suggest_memory_format();
  return at::constant_pad_nd(out, pads, 0).contiguous(fmt);
}

}  // namespace masked_ops
