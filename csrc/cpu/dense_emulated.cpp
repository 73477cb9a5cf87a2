// Test-only CPU implementations of splinet_cuda::cuda_dense_fwd_emulated / _bwd_emulated
// (schemas in csrc/splinet_ops.cpp): the CUDA dense driver (csrc/cuda/dense_driver.h) with
// an executor that runs each block's program sequentially with one thread (every phase of
// the programs is a block-strided loop, so one thread covers it and the barriers are no-ops)
// and each elementwise kernel as a loop. The GEMMs of the large-width path go through ATen
// as on the GPU. This is what tests the CUDA kernels' arithmetic and indexing on machines
// without a GPU; races and launch configuration are only tested on a GPU.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../cuda/dense_driver.h"

namespace splinet {
namespace {

struct HostExec {
  int64_t blocks;  // grid size to emulate (0: one block per tile)

  int64_t threads() const { return 1; }
  int64_t max_smem_bytes() const { return 100 * 1024; }  // as CudaExec on an H100 / A100

  template <typename Body>
  int64_t grid(int64_t tiles, int64_t, int64_t) const {
    return blocks > 0 ? std::min(blocks, tiles) : tiles;
  }

  template <typename Body>
  void launch(const Body& body, int64_t grid, int64_t, int64_t smem) const {
    using acc_t = typename Body::acc_type;
    std::vector<acc_t> shared(static_cast<size_t>(smem) / sizeof(acc_t));
    for (int64_t b = 0; b < grid; ++b) body(b, grid, BlockCtx{0, 1}, shared.data());
  }

  template <typename F>
  void for_each(int64_t n, const F& f) const {
    for (int64_t e = 0; e < n; ++e) f(e);
  }
};

at::Tensor fwd_emulated(const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
                        const at::Tensor& scale_in, int64_t steps, int64_t degree, c10::string_view activation,
                        c10::string_view scheme, c10::string_view variant, double gamma, int64_t checkpoint,
                        int64_t path, int64_t tile_rows, int64_t blocks) {
  check_dense_op_args("cuda_dense_fwd_emulated", x_in, weight_in, bias_in, scale_in, steps, degree, checkpoint, false);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), scale = scale_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const DenseParams p = dense_params(x, weight, bias.defined(), steps, degree, scheme, variant, gamma, checkpoint);
  const Act act = parse_activation(std::string(activation));
  HostExec ex{blocks};
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cuda_dense_fwd_emulated", [&] {
    SPLINET_DISPATCH_ACT(act, [&] { out = dense_forward<scalar_t, ACT>(ex, x, weight, bias, scale, p, path, tile_rows); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_emulated(
    const at::Tensor& grad_states_in, const at::Tensor& states_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale_in, int64_t steps, int64_t degree,
    c10::string_view activation, c10::string_view scheme, c10::string_view variant, double gamma, int64_t checkpoint,
    int64_t path, int64_t tile_rows, int64_t blocks) {
  TORCH_CHECK_VALUE(states_in.dim() == 3, "cuda_dense_bwd_emulated: states must have shape (saved, B, m)");
  check_dense_op_args("cuda_dense_bwd_emulated", states_in[0], weight_in, bias_in, scale_in, steps, degree,
                      checkpoint, false);
  TORCH_CHECK_VALUE(states_in.size(0) == num_saved_states(steps, checkpoint),
                    "cuda_dense_bwd_emulated: wrong number of saved states");
  const bool last_only = check_state_grad("cuda_dense_bwd_emulated", grad_states_in, states_in);
  const at::Tensor states = states_in.contiguous(), weight = weight_in.contiguous(), scale = scale_in.contiguous();
  const at::Tensor grad_states = grad_states_in.to(states.scalar_type()).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const DenseParams p =
      dense_params(states[0], weight, bias.defined(), steps, degree, scheme, variant, gamma, checkpoint);
  const Act act = parse_activation(std::string(activation));
  HostExec ex{blocks};
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "cuda_dense_bwd_emulated", [&] {
    SPLINET_DISPATCH_ACT(act, [&] {
      out = dense_backward<scalar_t, ACT>(ex, grad_states, last_only, states, weight, bias, scale, p, path, tile_rows);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(splinet_cuda, CPU, m) {
  m.impl("cuda_dense_fwd_emulated", &fwd_emulated);
  m.impl("cuda_dense_bwd_emulated", &bwd_emulated);
}

}  // namespace splinet
