// The one place where splinet_cuda's operator schemas are defined. Implementations
// are registered next to their kernels (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for
// CUDA); fake (meta) implementations for torch.compile live in splinet_cuda/_ops.py.
#include <torch/library.h>

#ifndef SPLINET_NO_PYTHON
#include <Python.h>

extern "C" {
// Importing splinet_cuda._C loads this library, whose static initialisers register
// the ops with the dispatcher; the module itself holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "splinet_cuda operator library", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif  // SPLINET_NO_PYTHON

TORCH_LIBRARY(splinet_cuda, m) {
  // B-spline basis at the times t (SPEC 1.1): first nonzero coefficient k (int64, T)
  // and the degree + 1 weights (T, degree + 1), in t's dtype.
  m.def("basis_table(Tensor t, int knots, int degree) -> (Tensor, Tensor)");
}
