// The CUDA ops splinet_cuda::spline_dense_fwd / spline_dense_bwd (schemas in csrc/splinet_ops.cpp).
//
// The device code is in dense_program.h, blend_gemm.h and step_functors.h on the runtime of
// block_runtime.h, the host driver in dense_driver.h (with driver_common.h), the launches in
// cuda_exec.cuh; the per-dtype bodies are compiled in their own units (cuda_instances.h).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_instances.h"

namespace splinet {
namespace {

at::Tensor spline_dense_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& scale, int64_t steps, int64_t degree, c10::string_view activation,
                                 c10::string_view scheme, c10::string_view variant, double gamma, int64_t checkpoint) {
  const c10::cuda::CUDAGuard guard(x.device());
  CudaExec ex(x.get_device());
  ex.check_dtype(x.scalar_type(), "spline_dense_fwd (cuda)");
  return dense_fwd_entry(ex, "spline_dense_fwd (cuda)", x, weight, bias, scale, steps, degree, activation, scheme,
                         variant, gamma, checkpoint, kPathAuto, 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spline_dense_bwd_cuda(
    const at::Tensor& grad_states, const at::Tensor& states, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& scale, int64_t steps, int64_t degree,
    c10::string_view activation, c10::string_view scheme, c10::string_view variant, double gamma,
    int64_t checkpoint) {
  const c10::cuda::CUDAGuard guard(states.device());
  CudaExec ex(states.get_device());
  ex.check_dtype(states.scalar_type(), "spline_dense_bwd (cuda)");
  return dense_bwd_entry(ex, "spline_dense_bwd (cuda)", grad_states, states, weight, bias, scale, steps, degree,
                         activation, scheme, variant, gamma, checkpoint, kPathAuto, 0);
}

}  // namespace

TORCH_LIBRARY_IMPL(splinet_cuda, CUDA, m) {
  m.impl("spline_dense_fwd", &spline_dense_fwd_cuda);
  m.impl("spline_dense_bwd", &spline_dense_bwd_cuda);
}

}  // namespace splinet
