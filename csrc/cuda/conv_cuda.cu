// The CUDA ops splinet_cuda::spline_conv_fwd / spline_conv_bwd (schemas in csrc/splinet_ops.cpp).
//
// For few channels the single-launch direct program of conv_program.h, otherwise cuDNN
// convolutions through ATen around the blend, epilogue and eq. 23 scatter kernels
// (step_functors.h); the host driver is conv_driver.h (with driver_common.h), the launches
// cuda_exec.cuh; the per-dtype bodies are compiled in their own units (cuda_instances.h).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_instances.h"

namespace splinet {
namespace {

at::Tensor spline_conv_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& scale, int64_t steps, int64_t degree, c10::string_view activation,
                                c10::string_view scheme, c10::string_view variant, double /*gamma*/,
                                int64_t checkpoint) {
  const c10::cuda::CUDAGuard guard(x.device());
  CudaExec ex(x.get_device());
  ex.check_dtype(x.scalar_type(), "spline_conv_fwd (cuda)");
  return conv_fwd_entry(ex, "spline_conv_fwd (cuda)", x, weight, bias, scale, steps, degree, activation, scheme,
                        variant, checkpoint, 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spline_conv_bwd_cuda(
    const at::Tensor& grad_states, const at::Tensor& states, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& scale, int64_t steps, int64_t degree,
    c10::string_view activation, c10::string_view scheme, c10::string_view variant, double /*gamma*/,
    int64_t checkpoint) {
  const c10::cuda::CUDAGuard guard(states.device());
  CudaExec ex(states.get_device());
  ex.check_dtype(states.scalar_type(), "spline_conv_bwd (cuda)");
  return conv_bwd_entry(ex, "spline_conv_bwd (cuda)", grad_states, states, weight, bias, scale, steps, degree,
                        activation, scheme, variant, checkpoint, 0);
}

}  // namespace

TORCH_LIBRARY_IMPL(splinet_cuda, CUDA, m) {
  m.impl("spline_conv_fwd", &spline_conv_fwd_cuda);
  m.impl("spline_conv_bwd", &spline_conv_bwd_cuda);
}

}  // namespace splinet
