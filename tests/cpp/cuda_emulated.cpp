// The test-only extension splinet_cuda._emulation: the CUDA layer drivers on the CPU.
//
// Built by setup.py when SPLINET_EMULATION=1 (`make build-test`, which `make test` runs), with
// csrc/ on the include path; never part of a user's install, and not in the source
// distribution (which holds no tests). Its ops splinet_cuda_emulation::cuda_*_emulated run the
// CUDA layer drivers (csrc/cuda/dense_driver.h, conv_driver.h) with an executor that runs each
// block's program with one thread (every phase of the programs is a block-strided loop, so one
// thread covers it and the barriers are no-ops) or with a team of host threads meeting at a
// host barrier, and each elementwise kernel as a loop. GEMMs and convolutions go through ATen
// as on the GPU. This is what tests the CUDA kernels' arithmetic and indexing on machines
// without a GPU; races, launch configuration and the cuBLAS/cuDNN calls are only tested on a
// GPU (tools/gpu_check.py).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <condition_variable>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

#include "cuda/conv_driver.h"
#include "cuda/dense_driver.h"

namespace splinet {
namespace {

// A reusable barrier for the host threads of one emulated block.
class HostBarrier {
 public:
  explicit HostBarrier(int64_t count) : count_(count) {}
  static void wait(void* self) { static_cast<HostBarrier*>(self)->wait(); }
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t gen = gen_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t count_, waiting_ = 0, gen_ = 0;
};

struct HostExec {
  static constexpr bool kHalfTypes = false;
  static constexpr bool kTensorCores = false;  // the fused GEMM runs its scalar fragments
  int64_t blocks;        // grid size to emulate (0: one block per tile)
  int64_t nthreads = 1;  // host threads per block (1: sequential, no barrier)

  HostExec(int64_t blocks_, int64_t threads_) : blocks(blocks_), nthreads(threads_) {
    TORCH_CHECK_VALUE(blocks >= 0, "emulation: blocks must be >= 0, got ", blocks);
    TORCH_CHECK_VALUE(nthreads >= 1 && nthreads <= 64, "emulation: threads must be in [1, 64], got ", nthreads);
  }

  int64_t threads() const { return nthreads; }
  // A fixed grid plays a device with that many multiprocessors (the small path's row choice).
  int64_t multiprocessors() const { return std::max<int64_t>(1, blocks); }
  int64_t max_smem_bytes() const { return 100 * 1024; }  // as CudaExec on an H100 / A100
  int image_arch() const { return 0; }  // no device image (kTensorCores is false)

  template <typename Body>
  int64_t grid(int64_t tiles, int64_t, int64_t) const {
    return blocks > 0 ? std::min(blocks, tiles) : tiles;
  }

  template <typename Body>
  void launch(const Body& body, int64_t grid, int64_t, int64_t smem) const {
    using acc_t = typename Body::acc_type;
    std::vector<acc_t> shared(static_cast<size_t>(smem) / sizeof(acc_t));
    for (int64_t b = 0; b < grid; ++b) {
      if (nthreads == 1) {
        body(b, grid, BlockCtx{0, 1}, shared.data());
        continue;
      }
      // Poisoned shared memory: a phase that reads what no phase wrote shows up as NaN.
      std::fill(shared.begin(), shared.end(), std::numeric_limits<acc_t>::quiet_NaN());
      HostBarrier barrier(nthreads);
      std::vector<std::thread> team;
      for (int64_t t = 0; t < nthreads; ++t)
        team.emplace_back([&, t] { body(b, grid, BlockCtx{t, nthreads, &HostBarrier::wait, &barrier}, shared.data()); });
      for (auto& th : team) th.join();
    }
  }

  template <typename F>
  void for_each(int64_t n, const F& f) const {
    for (int64_t e = 0; e < n; ++e) f(e);
  }
};

at::Tensor dense_fwd_emulated(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& scale, int64_t steps, int64_t degree, c10::string_view activation,
                              c10::string_view scheme, c10::string_view variant, double gamma, int64_t checkpoint,
                              int64_t path, int64_t tile_rows, int64_t blocks, int64_t threads) {
  HostExec ex{blocks, threads};
  return dense_fwd_entry(ex, "cuda_dense_fwd_emulated", x, weight, bias, scale, steps, degree, activation, scheme,
                         variant, gamma, checkpoint, path, tile_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_bwd_emulated(
    const at::Tensor& grad_states, const at::Tensor& states, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& scale, int64_t steps, int64_t degree,
    c10::string_view activation, c10::string_view scheme, c10::string_view variant, double gamma, int64_t checkpoint,
    int64_t path, int64_t tile_rows, int64_t blocks, int64_t threads) {
  HostExec ex{blocks, threads};
  return dense_bwd_entry(ex, "cuda_dense_bwd_emulated", grad_states, states, weight, bias, scale, steps, degree,
                         activation, scheme, variant, gamma, checkpoint, path, tile_rows);
}

at::Tensor conv_fwd_emulated(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const at::Tensor& scale, int64_t steps, int64_t degree, c10::string_view activation,
                             c10::string_view scheme, c10::string_view variant, double /*gamma*/, int64_t checkpoint,
                             int64_t path, int64_t blocks, int64_t threads) {
  HostExec ex{blocks, threads};
  return conv_fwd_entry(ex, "cuda_conv_fwd_emulated", x, weight, bias, scale, steps, degree, activation, scheme,
                        variant, checkpoint, path);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bwd_emulated(
    const at::Tensor& grad_states, const at::Tensor& states, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& scale, int64_t steps, int64_t degree,
    c10::string_view activation, c10::string_view scheme, c10::string_view variant, double /*gamma*/,
    int64_t checkpoint, int64_t path, int64_t blocks, int64_t threads) {
  HostExec ex{blocks, threads};
  return conv_bwd_entry(ex, "cuda_conv_bwd_emulated", grad_states, states, weight, bias, scale, steps, degree,
                        activation, scheme, variant, checkpoint, path);
}

}  // namespace

// In their own namespace, not splinet_cuda's (the public ops): dense takes the arguments of
// spline_dense_fwd / _bwd, then path (0 auto, 1 small-width trajectory program, 2 large-width
// GEMM path, 3 fused blended GEMM), tile_rows (0: as on the GPU), blocks (the grid) and threads
// (host threads per block); conv the arguments of spline_conv_fwd / _bwd, then path (0 auto,
// 1 direct single-launch program, 2 cuDNN path), blocks and threads.
TORCH_LIBRARY(splinet_cuda_emulation, m) {
  m.def("cuda_dense_fwd_emulated(Tensor x, Tensor weight, Tensor? bias, Tensor scale, int steps, int degree, "
        "str activation, str scheme, str variant, float gamma, int checkpoint, int path, int tile_rows, int blocks, "
        "int threads) -> Tensor");
  m.def("cuda_dense_bwd_emulated(Tensor grad_states, Tensor states, Tensor weight, Tensor? bias, Tensor scale, "
        "int steps, int degree, str activation, str scheme, str variant, float gamma, int checkpoint, int path, "
        "int tile_rows, int blocks, int threads) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_conv_fwd_emulated(Tensor x, Tensor weight, Tensor? bias, Tensor scale, int steps, int degree, "
        "str activation, str scheme, str variant, float gamma, int checkpoint, int path, int blocks, int threads) "
        "-> Tensor");
  m.def("cuda_conv_bwd_emulated(Tensor grad_states, Tensor states, Tensor weight, Tensor? bias, Tensor scale, "
        "int steps, int degree, str activation, str scheme, str variant, float gamma, int checkpoint, int path, "
        "int blocks, int threads) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(splinet_cuda_emulation, CPU, m) {
  m.impl("cuda_dense_fwd_emulated", &dense_fwd_emulated);
  m.impl("cuda_dense_bwd_emulated", &dense_bwd_emulated);
  m.impl("cuda_conv_fwd_emulated", &conv_fwd_emulated);
  m.impl("cuda_conv_bwd_emulated", &conv_bwd_emulated);
}

}  // namespace splinet

extern "C" {
// Importing splinet_cuda._emulation loads this library, whose static initialisers register the ops.
PyObject* PyInit__emulation(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_emulation", "splinet_cuda's test-only CUDA emulation ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
