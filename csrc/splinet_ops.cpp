// The one place where splinet_cuda's operator schemas are defined. Implementations
// are registered next to their kernels (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for
// CUDA); fake (meta) implementations for torch.compile live in splinet_cuda/_ops.py.
#include <torch/library.h>

#ifndef SPLINET_NO_PYTHON
#include <Python.h>

#include "cpu/memory.h"

// setup.py passes the CUDA build's TORCH_CUDA_ARCH_LIST, entries separated by commas (no
// quotes survive the build's command line, so the tokens are turned into a string here).
#define SPLINET_STRINGIFY_(...) #__VA_ARGS__
#define SPLINET_STRINGIFY(...) SPLINET_STRINGIFY_(__VA_ARGS__)
#ifdef SPLINET_CUDA_ARCHS
#define SPLINET_CUDA_ARCH_STRING SPLINET_STRINGIFY(SPLINET_CUDA_ARCHS)
#else
#define SPLINET_CUDA_ARCH_STRING ""
#endif

// The kept-tensor cache of the CPU kernels (csrc/cpu/memory.h's KeptCache), as module
// functions: plain host state, no tensors, nothing for the dispatcher or torch.compile to
// trace. splinet_cuda/_memory.py wraps them (argument checks, docstrings).
namespace {

using splinet::cpu::KeptCache;

// Runs f, turning a C++ exception (a bad SPLINET_KEPT_CACHE_MB) into a Python ValueError.
template <typename F>
PyObject* guarded(F f) {
  try {
    return f();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// () -> (bytes held, blocks held, limit in bytes)
PyObject* kept_cache_stats(PyObject*, PyObject*) {
  return guarded([] {
    const KeptCache::Stats s = KeptCache::get().stats();
    return Py_BuildValue("(KKK)", static_cast<unsigned long long>(s.bytes),
                         static_cast<unsigned long long>(s.blocks), static_cast<unsigned long long>(s.limit));
  });
}

// (limit in bytes, a non-negative int) -> None
PyObject* set_kept_cache_limit(PyObject*, PyObject* arg) {
  const unsigned long long limit = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  return guarded([limit] {
    KeptCache::get().set_limit(static_cast<std::size_t>(limit));
    Py_RETURN_NONE;
  });
}

// () -> None
PyObject* empty_kept_cache(PyObject*, PyObject*) {
  return guarded([] {
    KeptCache::get().empty();
    Py_RETURN_NONE;
  });
}

PyMethodDef methods[] = {
    {"kept_cache_stats", kept_cache_stats, METH_NOARGS, "(bytes held, blocks held, limit in bytes)"},
    {"set_kept_cache_limit", set_kept_cache_limit, METH_O, "sets the limit in bytes"},
    {"empty_kept_cache", empty_kept_cache, METH_NOARGS, "releases every block held"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// Importing splinet_cuda._C loads this library, whose static initialisers register
// the ops with the dispatcher. The module holds one constant, `cuda_arch_list`: the
// architectures a CUDA build has kernels for ("" without CUDA), against which
// splinet_cuda/_cuda_archs.py checks a GPU before the first launch; and the kept-tensor
// cache's functions above.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "splinet_cuda operator library", -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "cuda_arch_list", SPLINET_CUDA_ARCH_STRING) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
#endif  // SPLINET_NO_PYTHON

TORCH_LIBRARY(splinet_cuda, m) {
  // B-spline basis at the times t (SpliNet paper, eqs. 9-10): first nonzero coefficient k (int64, T)
  // and the degree + 1 weights (T, degree + 1), in t's dtype.
  m.def("basis_table(Tensor t, int knots, int degree) -> (Tensor, Tensor)");

  // Dense layer (any variant and explicit Runge-Kutta scheme), x (B, m), weight (n, m, m),
  // bias (n, m), scale 0-dim.
  // Forward: the whole N-step trajectory in one call; returns the saved states
  // (x_0, x_K, x_2K, ... below N, then x_N), all N + 1 of them when checkpoint = 1.
  m.def("spline_dense_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor scale, SymInt steps, int degree, "
        "str activation, str scheme, str variant, float gamma, int checkpoint) -> Tensor");
  // Adjoint sweep from step N - 1 down to 0 (paper eqs. 17-23), given dLoss/d(saved states)
  // or dLoss/dx_N alone (shaped like one state):
  // returns (grad_x, grad_weight, grad_bias (empty without bias), grad_scale).
  m.def("spline_dense_bwd(Tensor grad_states, Tensor states, Tensor weight, Tensor? bias, Tensor scale, "
        "SymInt steps, int degree, str activation, str scheme, str variant, float gamma, int checkpoint) "
        "-> (Tensor, Tensor, Tensor, Tensor)");

  // The same pair keeping what the adjoint needs from each step (CPU): the forward also
  // returns a value of every step, stage and unit, (steps, stages, B, m): the activation
  // act(a), or for softplus, whose derivative needs a, the pre-activation a. It keeps all
  // steps + 1 states; the backward reads them instead of replaying each step's forward
  // product (3 products a step in fwd + bwd instead of 4, for N S B m more memory), and
  // the blended weight of every step and stage, (steps, stages, m * m padded to 64 bytes),
  // that the backward reads instead of blending again (N S m^2 more: what eager autograd
  // keeps for its matmuls too). Both are opaque to callers: what the forward returns, the
  // backward takes.
  m.def("spline_dense_fwd_saved(Tensor x, Tensor weight, Tensor? bias, Tensor scale, SymInt steps, int degree, "
        "str activation, str scheme, str variant, float gamma) -> (Tensor, Tensor, Tensor)");
  m.def("spline_dense_bwd_saved(Tensor grad_states, Tensor states, Tensor preact, Tensor blended, Tensor weight, "
        "Tensor? bias, "
        "Tensor scale, SymInt steps, int degree, str activation, str scheme, str variant, float gamma) "
        "-> (Tensor, Tensor, Tensor, Tensor)");

  // --- Many dense models in one call (csrc/cpu/dense_models_cpu.cpp): torch.func ensembles and
  // per-sample gradients. The tensors of spline_dense_fwd / _bwd with a leading model dimension:
  // x (M, B, m), weight (M, n, m, m), bias (M, n, m), scale (M,); each leading dim is M or 1 (one
  // tensor shared by every model, e.g. the weights of per-sample gradients). Every model runs
  // the chunks and arithmetic of its own single-model call (bit-identical results; per-sample
  // gradients, one row a model, run as one batch: see csrc/cpu/models.h).
  // Forward: the saved states of every model, (M, num_saved, B, m).
  m.def("spline_dense_fwd_models(Tensor x, Tensor weight, Tensor? bias, Tensor scale, SymInt steps, int degree, "
        "str activation, str scheme, str variant, float gamma, int checkpoint) -> Tensor");
  // Adjoint of every model, given grad_states (M, num_saved, B, m) or (M, B, m) (dLoss/dx_N
  // alone), states (M, num_saved, B, m): per-model gradients (grad_x (M, B, m), grad_weight
  // (M, n, m, m), grad_bias (M, n, m) or empty (0,), grad_scale (M,)), never summed over models.
  m.def("spline_dense_bwd_models(Tensor grad_states, Tensor states, Tensor weight, Tensor? bias, Tensor scale, "
        "SymInt steps, int degree, str activation, str scheme, str variant, float gamma, int checkpoint) "
        "-> (Tensor, Tensor, Tensor, Tensor)");

  // --- Conv layer (csrc/cpu/conv_cpu.cpp) ---------------------------------------------
  // x (B, C, *spatial) with 1-3 spatial dims, weight (n, C, C, *kernel) odd kernels ("same"
  // zero padding, stride 1), bias (n, C), scale 0-dim; variants standard / symmetric
  // (gamma unused). Forward: the saved states (num_saved, B, C, *spatial), same convention
  // as spline_dense_fwd.
  m.def("spline_conv_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor scale, SymInt steps, int degree, "
        "str activation, str scheme, str variant, float gamma, int checkpoint) -> Tensor");
  // Adjoint sweep: (grad_x, grad_weight (n, C, C, *kernel), grad_bias (n, C) or empty (0,)
  // without bias, grad_scale shaped like scale).
  m.def("spline_conv_bwd(Tensor grad_states, Tensor states, Tensor weight, Tensor? bias, Tensor scale, "
        "SymInt steps, int degree, str activation, str scheme, str variant, float gamma, int checkpoint) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // The pair keeping each step's pre-activations, as spline_dense_fwd_saved / _bwd_saved
  // but without the blended filters (C^2 k values: blended again in no time): preact
  // (steps, stages, B, C, *spatial); the backward replays no forward convolution.
  m.def("spline_conv_fwd_saved(Tensor x, Tensor weight, Tensor? bias, Tensor scale, SymInt steps, int degree, "
        "str activation, str scheme, str variant, float gamma) -> (Tensor, Tensor)");
  m.def("spline_conv_bwd_saved(Tensor grad_states, Tensor states, Tensor preact, Tensor weight, Tensor? bias, "
        "Tensor scale, SymInt steps, int degree, str activation, str scheme, str variant, float gamma) "
        "-> (Tensor, Tensor, Tensor, Tensor)");

  // --- Hamiltonian layer (csrc/cpu/hamiltonian_cpu.cpp; Ruthotto-Haber's Verlet scheme) ---
  // x = [y | z] (B, 2m), the two states side by side; weight (n, 2, m, m) ([:, 0] = K1,
  // [:, 1] = K2), bias (n, 2, m), scale 0-dim. The dense ops' schema, so one autograd
  // wrapper serves both: scheme must be "verlet", variant "hamiltonian", gamma is unused.
  // Forward: the saved states (num_saved, B, 2m), same convention as spline_dense_fwd.
  m.def("spline_hamiltonian_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor scale, SymInt steps, int degree, "
        "str activation, str scheme, str variant, float gamma, int checkpoint) -> Tensor");
  // Discrete adjoint of the Verlet steps, given dLoss/d(saved states) or dLoss/dx_N alone:
  // (grad_x (B, 2m), grad_weight (n, 2, m, m), grad_bias (n, 2, m) or empty (0,), grad_scale).
  m.def("spline_hamiltonian_bwd(Tensor grad_states, Tensor states, Tensor weight, Tensor? bias, Tensor scale, "
        "SymInt steps, int degree, str activation, str scheme, str variant, float gamma, int checkpoint) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}
