// Schemas of every op of the compiled extension masked_ops._C, in one place.
//
// These are the fused *primitives* that surround the heavy convolution (which stays with
// oneDNN / cuDNN). Their exact math is the pure-PyTorch reference in
// masked_ops/backends/reference.py; kernels are registered per dispatch key in cpu/ and
// cuda/, fake (meta) kernels and autograd formulas in masked_ops/backends/compiled.py.
//
// Conventions: x is N x C x H x W (contiguous or channels_last); mask/keep are N x 1 x H x W
// floating 0/1 tensors of x's dtype; activation is a name from masked_ops/activations.py.
#include <Python.h>
#include <torch/library.h>

// Importing masked_ops._C from Python loads the shared library, which runs the static
// registrations below; the module itself defines nothing.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// The fills and the epilogue take x in any layout and return their image in x's (contiguous or
// channels_last; other strides are copied to one of them inside; their fake kernels say the same), so
// torch.compile may hand them whatever layout it chose for the convs around them. With inductor's
// default for custom ops (the strides of the eager trace), a model whose convs inductor runs in
// channels_last paid a transpose before and after each fill (EfficientNet-Lite0, NCHW, batch 16,
// compiled: 686 ms with it, 466 ms without). Ops with outputs in a mask's layout keep the default.
static const std::vector<at::Tag> kImageOp = {at::Tag::flexible_layout};

TORCH_LIBRARY(masked_ops, m) {
  // Fake (meta) kernels live in this Python module: importing it on demand lets torch.ops
  // calls on fake tensors work before the user imported it.
  m.set_python_module("masked_ops.backends.compiled");
  // Removed pixels filled from visible neighbours, `iters` rings deep; iters == 0 zeroes them.
  m.def("neighbor_fill(Tensor x, Tensor mask, int iters) -> Tensor", kImageOp);
  // The same fill in place, for converted models that own x (no autograd): writes only the
  // pixels the fill reaches; visible and unreached pixels keep their values (iters == 0: no-op).
  // x may be any non-overlapping strided view, e.g. the interior of a zero-padded buffer.
  m.def("neighbor_fill_(Tensor(a!) x, Tensor mask, int iters) -> ()", kImageOp);
  // act(y * scale + bias) on kept positions, 0 elsewhere. scale: N x 1 x Ho x Wo or None.
  m.def("conv_epilogue(Tensor y, Tensor keep, Tensor? scale, Tensor? bias, str activation) -> Tensor", kImageOp);
  // The same epilogue written over y (a conv output the converted model owns; no autograd): a
  // large fresh buffer costs more to fault in than the pass itself on CPU.
  m.def("conv_epilogue_(Tensor(a!) y, Tensor keep, Tensor? scale, Tensor? bias, str activation) -> ()", kImageOp);
  // The backward of conv_epilogue in one pass: (grad_y, grad_scale, grad_bias); those not asked for
  // (need_scale, need_bias) come back as 0-element tensors.
  m.def("conv_epilogue_backward(Tensor grad, Tensor y, Tensor keep, Tensor? scale, Tensor? bias, str activation, "
        "bool need_scale, bool need_bias) -> (Tensor, Tensor, Tensor)");
  // act(x * scale[c] + shift[c]) on visible pixels, 0 elsewhere (eval-mode BatchNorm + activation).
  m.def("masked_affine_act(Tensor x, Tensor mask, Tensor scale, Tensor shift, str activation) -> Tensor", kImageOp);
  // (y, mask_out, indices): max pool of x with removed = 0, zeroed where mask_out = 0;
  // indices as ATen's max_pool2d_with_indices (flat h*W+w per plane) for the backward.
  m.def("masked_max_pool2d(Tensor x, Tensor mask, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, bool ceil_mode) -> (Tensor, Tensor, Tensor)");
  // (y, mask_out): avg pool of x with removed = 0, zeroed where no visible pixel in the window.
  m.def("masked_avg_pool2d(Tensor x, Tensor mask, int[2] kernel_size, int[2] stride, int[2] padding, "
        "bool ceil_mode, bool count_include_pad) -> (Tensor, Tensor)");
  // Global masked mean -> N x C: sum(m * x) / sum(m), 0 where sum(m) == 0 (hard and soft masks).
  m.def("masked_mean(Tensor x, Tensor mask) -> Tensor");
  // The input a soft-masked conv reads: each pixel blended with its neighbour fill by its mask value
  // in [0, 1], `iters` rings (0: m * x); the hard fill at a 0/1 mask. fill_grad: fill values pass
  // gradient to x (only the backward reads it). pads (left, right, top, bottom; >= 0): zeros around
  // the result, as F.pad after the fill (a TF-"same" conv's input); the CPU kernel writes the fill
  // straight into the padded buffer.
  m.def("soft_fill(Tensor x, Tensor mask, int iters, bool fill_grad, int[4] pads) -> Tensor", kImageOp);
  // Its backward: (grad_x, grad_mask), the rings recomputed; grad has x's shape (the padded
  // result's gradient narrowed to the interior: any strides).
  m.def("soft_fill_backward(Tensor grad, Tensor x, Tensor mask, int iters, bool fill_grad) -> (Tensor, Tensor)",
        kImageOp);
  // ROAD's linear imputation (masked_ops/explain/imputation.py): per image and channel, u solving
  // (D - W) u = b on the removed pixels (b: N x C x H x W float64, 0 elsewhere; removed: N x 1 x H x W
  // bool, each image with a visible pixel), to a largest residual <= tol; returns (u, the final largest
  // residual per image and channel, N x C) so that the caller decides what non-convergence means.
  m.def("imputation_solve(Tensor b, Tensor removed, float tol, int max_iter) -> (Tensor, Tensor)");
}
