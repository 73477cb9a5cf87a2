// The CUDA build's translation units: declarations of the per-dtype bodies each .cu compiles.
//
// Every (layer, direction, dtype) body, with its five activations, is instantiated in a .cu
// file of its own (dense_fwd_f32.cu, conv_bwd_half.cu, ...) so that nvcc compiles them in
// parallel: a single unit holding every kernel took over ten minutes per architecture. The op
// files (dense_cuda.cu, conv_cuda.cu) include this header and see only the declarations below:
// they dispatch on the dtype and instantiate no kernel.
//
// Files: dense_{fwd,bwd}_{f32,f64,bf16,f16}.cu (bfloat16 / float16 hold the tensor-core GEMM,
// the largest device code, so each has its own unit) and conv_{fwd,bwd}_{f32,f64,half}.cu.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "conv_driver.h"
#include "cuda_exec.cuh"
#include "dense_driver.h"

// The explicit instantiations, written `extern SPLINET_X(T);` (declaration, here) and
// `SPLINET_X(T);` (definition, in the unit that compiles it).
#define SPLINET_DENSE_FWD(T)                                                                                    \
  template at::Tensor dense_forward_typed<T, CudaExec>(CudaExec&, Act, const at::Tensor&, const at::Tensor&,  \
                                                       const at::Tensor&, const at::Tensor&, const LayerParams&, \
                                                       int64_t, int64_t)
#define SPLINET_DENSE_BWD(T)                                                                                    \
  template std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_backward_typed<T, CudaExec>(      \
      CudaExec&, Act, const at::Tensor&, bool, const at::Tensor&, const at::Tensor&, const at::Tensor&,         \
      const at::Tensor&, const LayerParams&, int64_t, int64_t)
#define SPLINET_CONV_FWD(T)                                                                                   \
  template at::Tensor conv_forward_typed<T, CudaExec>(CudaExec&, Act, const at::Tensor&, const at::Tensor&,  \
                                                      const at::Tensor&, const at::Tensor&, const ConvSetup&, \
                                                      int64_t)
#define SPLINET_CONV_BWD(T)                                                                                     \
  template std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_backward_typed<T, CudaExec>(       \
      CudaExec&, Act, const at::Tensor&, bool, const at::Tensor&, const at::Tensor&, const at::Tensor&,         \
      const at::Tensor&, const ConvSetup&, int64_t)

namespace splinet {

extern SPLINET_DENSE_FWD(float);
extern SPLINET_DENSE_FWD(double);
extern SPLINET_DENSE_FWD(c10::BFloat16);
extern SPLINET_DENSE_FWD(c10::Half);
extern SPLINET_DENSE_BWD(float);
extern SPLINET_DENSE_BWD(double);
extern SPLINET_DENSE_BWD(c10::BFloat16);
extern SPLINET_DENSE_BWD(c10::Half);
extern SPLINET_CONV_FWD(float);
extern SPLINET_CONV_FWD(double);
extern SPLINET_CONV_FWD(c10::BFloat16);
extern SPLINET_CONV_FWD(c10::Half);
extern SPLINET_CONV_BWD(float);
extern SPLINET_CONV_BWD(double);
extern SPLINET_CONV_BWD(c10::BFloat16);
extern SPLINET_CONV_BWD(c10::Half);

}  // namespace splinet
