// Test-only CPU implementations of the splinet_cuda::cuda_*_emulated ops (schemas in
// csrc/splinet_ops.cpp): the CUDA layer drivers (csrc/cuda/dense_driver.h, conv_driver.h)
// with an executor that runs each block's program sequentially with one thread (every phase
// of the programs is a block-strided loop, so one thread covers it and the barriers are
// no-ops) and each elementwise kernel as a loop. GEMMs and convolutions go through ATen as on
// the GPU. This is what tests the CUDA kernels' arithmetic and indexing on machines without a
// GPU; races, launch configuration and the cuBLAS/cuDNN calls are only tested on a GPU.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../cuda/conv_driver.h"
#include "../cuda/dense_driver.h"

namespace splinet {
namespace {

struct HostExec {
  static constexpr bool kHalfTypes = false;
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

at::Tensor dense_fwd_emulated(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& scale, int64_t steps, int64_t degree, c10::string_view activation,
                              c10::string_view scheme, c10::string_view variant, double gamma, int64_t checkpoint,
                              int64_t path, int64_t tile_rows, int64_t blocks) {
  HostExec ex{blocks};
  return dense_fwd_entry(ex, "cuda_dense_fwd_emulated", x, weight, bias, scale, steps, degree, activation, scheme,
                         variant, gamma, checkpoint, path, tile_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_bwd_emulated(
    const at::Tensor& grad_states, const at::Tensor& states, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& scale, int64_t steps, int64_t degree,
    c10::string_view activation, c10::string_view scheme, c10::string_view variant, double gamma, int64_t checkpoint,
    int64_t path, int64_t tile_rows, int64_t blocks) {
  HostExec ex{blocks};
  return dense_bwd_entry(ex, "cuda_dense_bwd_emulated", grad_states, states, weight, bias, scale, steps, degree,
                         activation, scheme, variant, gamma, checkpoint, path, tile_rows);
}

at::Tensor conv_fwd_emulated(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const at::Tensor& scale, int64_t steps, int64_t degree, c10::string_view activation,
                             c10::string_view scheme, c10::string_view variant, double /*gamma*/, int64_t checkpoint,
                             int64_t path, int64_t blocks) {
  HostExec ex{blocks};
  return conv_fwd_entry(ex, "cuda_conv_fwd_emulated", x, weight, bias, scale, steps, degree, activation, scheme,
                        variant, checkpoint, path);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bwd_emulated(
    const at::Tensor& grad_states, const at::Tensor& states, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& scale, int64_t steps, int64_t degree,
    c10::string_view activation, c10::string_view scheme, c10::string_view variant, double /*gamma*/,
    int64_t checkpoint, int64_t path, int64_t blocks) {
  HostExec ex{blocks};
  return conv_bwd_entry(ex, "cuda_conv_bwd_emulated", grad_states, states, weight, bias, scale, steps, degree,
                        activation, scheme, variant, checkpoint, path);
}

}  // namespace

TORCH_LIBRARY_IMPL(splinet_cuda, CPU, m) {
  m.impl("cuda_dense_fwd_emulated", &dense_fwd_emulated);
  m.impl("cuda_dense_bwd_emulated", &dense_bwd_emulated);
  m.impl("cuda_conv_fwd_emulated", &conv_fwd_emulated);
  m.impl("cuda_conv_bwd_emulated", &conv_bwd_emulated);
}

}  // namespace splinet
