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
// without a GPU. Built with ThreadSanitizer (`make racecheck`: tools/racecheck.py,
// tests/test_races.py), the thread teams, with all blocks of a launch running at once and a
// probe that deletes one barrier, check the block programs for races; launch configuration
// and the cuBLAS/cuDNN calls are only tested on a GPU (tools/gpu_check.py).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "cuda/conv_driver.h"
#include "cuda/dense_driver.h"

namespace splinet {
namespace {

// The barrier probe of the race check (tools/racecheck.py, tests/test_races.py), test-only
// state of this library, set between launches by the emulation_barriers op:
//  - skip: barrier call sites whose calls every thread of every team passes straight
//    through. A site is a pair of return addresses (offsets in this library): the call into
//    HostBarrier::wait and the one above it. Where the compiler inlined BlockCtx::sync into
//    the program, the first is the barrier's line and the second its caller's context; where
//    it kept sync out of line, the first is inside sync and the second the barrier's line.
//    Either way the pair tells the barriers apart (tests/test_races.py maps them to lines;
//    outside the race check's build the second is 0). All threads of a block pass the same
//    sites in the same order (a __syncthreads in divergent code would be undefined on the
//    GPU too), so skipping one site everywhere is the program with that one __syncthreads
//    deleted, and it cannot deadlock;
//  - concurrent: the blocks of a launch run at the same time, each with its own shared
//    memory, as on the GPU (otherwise one after the other), so that a race between blocks
//    on global memory is visible too;
//  - crossings: how many times the teams crossed a barrier at each site since the last
//    call, the census the sweep over sites starts from.
using Site = std::pair<uintptr_t, uintptr_t>;

struct BarrierProbe {
  std::mutex mu;
  std::vector<Site> skip;  // sorted
  bool concurrent = false;
  std::map<Site, int64_t> crossings;
};

BarrierProbe& probe() {
  static BarrierProbe p;
  return p;
}

// This library's load address: barrier sites are reported relative to it, so that
// addr2line on the library maps them to source lines.
uintptr_t library_base() {
  static const uintptr_t base = [] {
    Dl_info info{};
    dladdr(reinterpret_cast<void*>(&library_base), &info);
    return reinterpret_cast<uintptr_t>(info.dli_fbase);
  }();
  return base;
}

// A reusable barrier for the host threads of one emulated block.
class HostBarrier {
 public:
  HostBarrier(int64_t count, const std::vector<Site>* skip) : count_(count), skip_(skip) {}
  // Called through BlockCtx::sync_fn from the block programs' ctx.sync(). Never inlined, so
  // that its return addresses are the program's. The second is read through the callers'
  // frame pointers, which only the race check's build keeps (SPLINET_RACECHECK): elsewhere
  // the walk could read garbage, and sites are not needed.
  __attribute__((noinline)) static void wait(void* self) {
    const uintptr_t base = library_base();
#ifdef SPLINET_RACECHECK
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wframe-address"  // safe here: every caller keeps its frame pointer
    const uintptr_t above = reinterpret_cast<uintptr_t>(__builtin_return_address(1)) - base;
#pragma GCC diagnostic pop
#else
    const uintptr_t above = 0;
#endif
    const Site site{reinterpret_cast<uintptr_t>(__builtin_return_address(0)) - base, above};
    auto* b = static_cast<HostBarrier*>(self);
    if (b->skip_ && std::binary_search(b->skip_->begin(), b->skip_->end(), site)) return;
    b->wait(site);
  }
  void wait(const Site& site) {
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t gen = gen_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++gen_;
      ++crossings_[site];
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }
  // After the team has joined: its crossings into the probe's census.
  void report() {
    std::lock_guard<std::mutex> lock(probe().mu);
    for (const auto& [site, n] : crossings_) probe().crossings[site] += n;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t count_, waiting_ = 0, gen_ = 0;
  const std::vector<Site>* skip_;
  std::map<Site, int64_t> crossings_;
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
    const size_t elems = static_cast<size_t>(smem) / sizeof(acc_t);
    if (nthreads == 1) {
      std::vector<acc_t> shared(elems);
      for (int64_t b = 0; b < grid; ++b) body(b, grid, BlockCtx{0, 1}, shared.data());
      return;
    }
    bool concurrent;
    std::vector<Site> skip;
    {
      std::lock_guard<std::mutex> lock(probe().mu);
      concurrent = probe().concurrent;
      skip = probe().skip;
    }
    // A team per block, one block after the other, or all of them at once (the probe's
    // concurrent mode), each block with its own shared memory and barrier.
    const int64_t at_once = concurrent ? grid : 1;
    std::vector<std::vector<acc_t>> shared(static_cast<size_t>(at_once));
    for (int64_t b0 = 0; b0 < grid; b0 += at_once) {
      const int64_t nb = std::min(at_once, grid - b0);
      std::vector<std::unique_ptr<HostBarrier>> barriers;
      for (int64_t j = 0; j < nb; ++j) {
        // Poisoned shared memory: a phase that reads what no phase wrote shows up as NaN.
        shared[j].assign(elems, std::numeric_limits<acc_t>::quiet_NaN());
        barriers.push_back(std::make_unique<HostBarrier>(nthreads, skip.empty() ? nullptr : &skip));
      }
      std::vector<std::thread> team;
      for (int64_t j = 0; j < nb; ++j)
        for (int64_t t = 0; t < nthreads; ++t)
          team.emplace_back([&, j, t] {
            body(b0 + j, grid, BlockCtx{t, nthreads, &HostBarrier::wait, barriers[j].get()}, shared[j].data());
          });
      for (auto& th : team) th.join();
      for (auto& bar : barriers) bar->report();
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

// The race check's probe (BarrierProbe above): sets the barrier sites to skip (flattened
// pairs) and whether blocks run at once, for the launches that follow, and returns the
// census of the launches since the previous call as (site pair, crossings) triples, flattened.
std::vector<int64_t> emulation_barriers(at::IntArrayRef skip, bool concurrent_blocks) {
  TORCH_CHECK_VALUE(skip.size() % 2 == 0, "emulation_barriers: skip holds pairs of addresses, got ", skip.size());
  std::lock_guard<std::mutex> lock(probe().mu);
  std::vector<int64_t> census;
  for (const auto& [site, n] : probe().crossings) {
    census.push_back(static_cast<int64_t>(site.first));
    census.push_back(static_cast<int64_t>(site.second));
    census.push_back(n);
  }
  probe().crossings.clear();
  probe().skip.clear();
  for (size_t i = 0; i < skip.size(); i += 2)
    probe().skip.emplace_back(static_cast<uintptr_t>(skip[i]), static_cast<uintptr_t>(skip[i + 1]));
  std::sort(probe().skip.begin(), probe().skip.end());
  probe().concurrent = concurrent_blocks;
  return census;
}

}  // namespace

// In their own namespace, not splinet_cuda's (the public ops): dense takes the arguments of
// spline_dense_fwd / _bwd, then path (0 auto, 1 small-width trajectory program, 2 large-width
// GEMM path, 3 fused blended GEMM), tile_rows (0: as on the GPU), blocks (the grid) and threads
// (host threads per block); conv the arguments of spline_conv_fwd / _bwd, then path (0 auto,
// 1 direct single-launch program, 2 cuDNN path), blocks and threads. emulation_barriers is
// the race check's probe (tests/test_races.py).
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
  // No tensor argument to dispatch on: one kernel for every dispatch key.
  m.def("emulation_barriers(int[] skip, bool concurrent_blocks) -> int[]", &emulation_barriers);
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
