// masked_ops._C_cuda: the CUDA kernels, in a library of their own.
//
// masked_ops._C (csrc/ops.cpp and csrc/cpu/) links only what every torch build has, so it loads on a
// CPU-only torch too; this library links libc10_cuda and the CUDA runtime and is imported only when
// torch has CUDA (masked_ops/backends/compiled.py). Importing it runs the static registrations of
// csrc/cuda/*.cu (TORCH_LIBRARY_IMPL(masked_ops, CUDA, ...)) for the schemas _C defined first.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
