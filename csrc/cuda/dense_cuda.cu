// CUDA implementations of splinet_cuda::spline_dense_fwd / spline_dense_bwd (schemas in
// csrc/splinet_ops.cpp). The device code is in dense_program.h (block programs and the
// elementwise functors of the large-width path), the host driver in dense_driver.h; this
// file supplies the executor that launches them: the current stream, a device guard,
// dynamic shared memory above 48 KB, a persistent grid sized by the occupancy calculator,
// and a launch check after every kernel.
//
// Legend: B batch, m width, n = L + d coefficients, N steps, TB rows of a tile.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>

#include "dense_driver.h"

namespace splinet {
namespace {

template <typename Body, typename acc_t>
__global__ void block_kernel(const Body body) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  body(blockIdx.x, gridDim.x, BlockCtx{threadIdx.x, blockDim.x}, reinterpret_cast<acc_t*>(smem_raw));
}

template <typename F>
__global__ void for_each_kernel(int64_t n, const F f) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    f(e);
}

struct CudaExec {
  int device;
  cudaDeviceProp props;

  explicit CudaExec(int dev) : device(dev) { C10_CUDA_CHECK(cudaGetDeviceProperties(&props, dev)); }

  int64_t threads() const { return 256; }
  // Shared memory a block may take: the opt-in maximum, capped so that two blocks share an SM.
  int64_t max_smem_bytes() const {
    return std::min<int64_t>(static_cast<int64_t>(props.sharedMemPerBlockOptin), 100 * 1024);
  }

  template <typename Body>
  static auto kernel_of() {
    return &block_kernel<Body, typename Body::acc_type>;
  }

  // Persistent grid: as many blocks as fit on the device at once, at most one per tile.
  template <typename Body>
  int64_t grid(int64_t tiles, int64_t threads, int64_t smem) {
    auto kernel = kernel_of<Body>();
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, static_cast<int>(threads),
                                                                 static_cast<size_t>(smem)));
    const int64_t resident = std::max<int64_t>(1, static_cast<int64_t>(per_sm) * props.multiProcessorCount);
    return std::max<int64_t>(1, std::min<int64_t>(tiles, resident));
  }

  template <typename Body>
  void launch(const Body& body, int64_t grid, int64_t threads, int64_t smem) {
    auto kernel = kernel_of<Body>();
    kernel<<<static_cast<unsigned>(grid), static_cast<unsigned>(threads), static_cast<size_t>(smem),
             c10::cuda::getCurrentCUDAStream()>>>(body);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename F>
  void for_each(int64_t n, const F& f) {
    if (n <= 0) return;
    const int64_t block = 256;
    const int64_t blocks = std::min<int64_t>((n + block - 1) / block, 16 * props.multiProcessorCount);
    for_each_kernel<F><<<static_cast<unsigned>(blocks), block, 0, c10::cuda::getCurrentCUDAStream()>>>(n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor spline_dense_fwd_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                 const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale_in, int64_t steps,
                                 int64_t degree, c10::string_view activation, c10::string_view scheme,
                                 c10::string_view variant, double gamma, int64_t checkpoint) {
  check_dense_op_args("spline_dense_fwd (cuda)", x_in, weight_in, bias_in, scale_in, steps, degree, checkpoint, true);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), scale = scale_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const DenseParams p = dense_params(x, weight, bias.defined(), steps, degree, scheme, variant, gamma, checkpoint);
  const Act act = parse_activation(std::string(activation));
  CudaExec ex(x.get_device());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spline_dense_fwd_cuda", [&] {
    SPLINET_DISPATCH_ACT(act, [&] {
      out = dense_forward<scalar_t, ACT>(ex, x, weight, bias, scale, p, kPathAuto, 0);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spline_dense_bwd_cuda(
    const at::Tensor& grad_states_in, const at::Tensor& states_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale_in, int64_t steps, int64_t degree,
    c10::string_view activation, c10::string_view scheme, c10::string_view variant, double gamma,
    int64_t checkpoint) {
  TORCH_CHECK_VALUE(states_in.dim() == 3, "spline_dense_bwd: states must have shape (saved, B, m), got ",
                    states_in.sizes());
  check_dense_op_args("spline_dense_bwd (cuda)", states_in[0], weight_in, bias_in, scale_in, steps, degree,
                      checkpoint, true);
  TORCH_CHECK_VALUE(states_in.size(0) == num_saved_states(steps, checkpoint), "spline_dense_bwd: states holds ",
                    states_in.size(0), " states, expected ", num_saved_states(steps, checkpoint),
                    " for steps = ", steps, ", checkpoint = ", checkpoint);
  const bool last_only = check_state_grad("spline_dense_bwd", grad_states_in, states_in);
  const c10::cuda::CUDAGuard guard(states_in.device());
  const at::Tensor states = states_in.contiguous(), weight = weight_in.contiguous(), scale = scale_in.contiguous();
  const at::Tensor grad_states = grad_states_in.to(states.scalar_type()).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const DenseParams p =
      dense_params(states[0], weight, bias.defined(), steps, degree, scheme, variant, gamma, checkpoint);
  const Act act = parse_activation(std::string(activation));
  CudaExec ex(states.get_device());
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, states.scalar_type(), "spline_dense_bwd_cuda", [&] {
    SPLINET_DISPATCH_ACT(act, [&] {
      out = dense_backward<scalar_t, ACT>(ex, grad_states, last_only, states, weight, bias, scale, p, kPathAuto, 0);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(splinet_cuda, CUDA, m) {
  m.impl("spline_dense_fwd", &spline_dense_fwd_cuda);
  m.impl("spline_dense_bwd", &spline_dense_bwd_cuda);
}

}  // namespace splinet
