// Host side shared by the CUDA dense and conv layer drivers (dense_driver.h, conv_driver.h).
//
// The drivers are templated on an executor, so that the same driver runs the GPU kernels
// (CudaExec, cuda_exec.cuh) and the CPU emulation of the same block programs (HostExec,
// tests/cpp/cuda_emulated.cpp). An executor provides:
//   kHalfTypes: whether bfloat16 / float16 are taken; kTensorCores: whether it has them
//   grid<Body>(tiles, threads, smem_bytes) -> blocks to launch (persistent: <= tiles)
//   launch(Body, grid, threads, smem_bytes): body(block, grid, BlockCtx, acc_t* smem) per block
//   for_each(n, F): f(e) for e in [0, n)
//   max_smem_bytes(), threads(), multiprocessors(), image_arch()
//
// Here: the layer parameters from the op's arguments, the checks the drivers add to the
// layers' shared ones, the preparation of an op's inputs, the dtype dispatch, the workspace
// cap of a persistent launch, and the large paths' forward and adjoint sweeps over a runner
// (DenseLarge, ConvLarge).
//
// Legend: B batch, m features (dense width or conv channels C), n = L + d coefficients, d
// degree, N steps, S stages, K checkpoint interval.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/layer_config.h"
#include "block_runtime.h"

namespace splinet {

template <typename acc_t>
inline at::ScalarType acc_type_of() {
  return std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
}

// B rows (samples) of m features (channels), n coefficients.
inline LayerParams layer_params(int64_t B, int64_t m, int64_t n, bool has_bias, int64_t steps, int64_t degree,
                                c10::string_view scheme, c10::string_view variant, double gamma, int64_t checkpoint) {
  LayerParams p{};
  p.B = B;
  p.m = m;
  p.n = n;
  p.d = degree;
  p.L = p.n - degree;
  p.N = steps;
  p.K = checkpoint;
  const Tableau tab = parse_scheme(std::string(scheme));
  p.S = tab.stages;
  for (int s = 0; s < 4; ++s) {
    p.b[s] = tab.b[s];
    p.c[s] = tab.c[s];
    for (int j = 0; j < 4; ++j) p.a[s][j] = tab.a[s][j];
  }
  p.variant = static_cast<int>(parse_variant(std::string(variant)));
  p.gamma = gamma;
  p.h = 1.0 / static_cast<double>(steps);
  p.has_bias = has_bias;
  p.ldw = p.m + 1;
  return p;
}

// Cap on the global workspace of a persistent launch (per-block partial gradients, segment
// states): fewer blocks, each walking more tiles, when the per-block share is large (e.g. a
// long checkpoint interval).
constexpr int64_t kWorkspaceBytes = int64_t(256) << 20;

inline int64_t cap_grid(int64_t grid, int64_t bytes_per_block) {
  return std::max<int64_t>(1, std::min<int64_t>(grid, kWorkspaceBytes / std::max<int64_t>(1, bytes_per_block)));
}

// ---------------------------------------------------------------------------------------
// The large paths' sweeps over a runner (DenseLarge or ConvLarge: cur(), step(i, save),
// adjoint(i, z, gW, gb, glam)), which holds the stage buffers K (S, *state shape) in acc_t.

// A Runge-Kutta combination (block_runtime.h) over a runner's stage buffers.
template <typename scalar_t, typename acc_t>
CombineFn<scalar_t, acc_t> stage_combination(const LayerParams& p, const at::Tensor& K, Rk kind, int s,
                                             const at::Tensor& base, acc_t* out_acc, scalar_t* out_st) {
  const acc_t* ks[4] = {};
  for (int j = 0; j < p.S; ++j) ks[j] = K[j].data_ptr<acc_t>();
  return rk_combination<scalar_t, acc_t>(p, kind, s, base.data_ptr<acc_t>(), ks, out_acc, out_st);
}

template <typename Run, typename scalar_t = typename Run::scalar_type>
void large_forward(Run& run, const LayerParams& p, const at::Tensor& x, at::Tensor& states) {
  states[0].copy_(x);
  run.cur().copy_(x);
  const int64_t state_numel = x.numel();
  for (int64_t i = 0; i < p.N; ++i) {
    const int64_t slot = saved_slot(i + 1, p.N, p.K);
    run.step(i, slot >= 0 ? states.data_ptr<scalar_t>() + slot * state_numel : nullptr);
  }
}

// adjoint_sweep's hooks for a large-path runner; z (dL/dx_i) and the gradient accumulators
// are acc_t tensors, seg holds a segment's recomputed states.
template <typename Run>
struct LargeSweep {
  Run& run;
  const at::Tensor& states;
  const at::Tensor& grad_states;
  at::Tensor seg;
  at::Tensor &z, &gW, &gb, &glam;
  void load_state(int64_t slot) { run.cur().copy_(states[slot]); }
  void save_segment(int64_t j) { seg[j].copy_(run.cur()); }
  void load_segment(int64_t j) { run.cur().copy_(seg[j]); }
  void replay(int64_t i) { run.step(i); }
  void run_adjoint(int64_t i) { run.adjoint(i, z, gW, gb, glam); }
  void add_state_grad(int64_t slot) { z.add_(grad_states[slot]); }
};

template <typename Run>
void large_backward(Run& run, const LayerParams& p, const at::Tensor& states, const at::Tensor& grad_states,
                    bool last_only, at::Tensor& z, at::Tensor& gW, at::Tensor& gb, at::Tensor& glam) {
  std::vector<int64_t> seg_shape{segment_states(p)};
  seg_shape.insert(seg_shape.end(), z.sizes().begin(), z.sizes().end());
  LargeSweep<Run> sweep{run, states, grad_states, segment_states(p) > 0 ? at::empty(seg_shape, z.options()) : at::Tensor(),
                        z, gW, gb, glam};
  adjoint_sweep(sweep, p, last_only);
}

// ---------------------------------------------------------------------------------------
// Op entry points (dense_fwd_entry, conv_bwd_entry, ...): checks, contiguous inputs, dtype
// and activation dispatch.

// What the CUDA drivers add to the layers' shared checks (checks.h): the kernels unroll up to
// kMaxDegree, and read the scale on x's device (the entries convert it to x's dtype, as the CPU
// op does, and return its gradient in the scale's own dtype).
inline void check_driver_args(const char* op, const at::Tensor& x, const at::Tensor& scale, int64_t degree) {
  TORCH_CHECK_VALUE(degree <= kMaxDegree, op, ": degree must be <= ", kMaxDegree, ", got ", degree);
  TORCH_CHECK_VALUE(scale.device() == x.device(), op, ": scale is on ", scale.device(), " but x is on ", x.device());
}

// An op's tensors as the drivers take them: contiguous, the scale (lam) in the states' dtype as
// on the CPU, the backward's state gradients too; x is the forward's input or the backward's
// saved states.
struct OpInputs {
  at::Tensor x, weight, bias, scale, grad_states;
  bool last_only = false;  // backward: grad_states holds dL/dx_N only
};

// The forward's inputs, once the layer's checks have passed.
inline OpInputs fwd_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& scale) {
  OpInputs in;
  in.x = x.contiguous();
  in.weight = weight.contiguous();
  in.scale = scale.to(in.x.scalar_type()).contiguous();
  in.bias = bias.has_value() ? bias->contiguous() : at::Tensor();
  return in;
}

// The backward's inputs, once the layer's checks of states[0] have passed: the saved states
// must be as many as the forward keeps, the state gradients all of them or the last.
inline OpInputs bwd_inputs(const char* op, const at::Tensor& grad_states, const at::Tensor& states,
                           const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& scale,
                           int64_t steps, int64_t checkpoint) {
  TORCH_CHECK_VALUE(states.size(0) == num_saved_states(steps, checkpoint), op, ": states holds ", states.size(0),
                    " states, expected ", num_saved_states(steps, checkpoint), " for steps = ", steps,
                    ", checkpoint = ", checkpoint);
  OpInputs in;
  in.last_only = check_state_grad(op, grad_states, states);
  in.x = states.contiguous();
  in.weight = weight.contiguous();
  in.scale = scale.to(in.x.scalar_type()).contiguous();
  in.grad_states = grad_states.to(in.x.scalar_type()).contiguous();
  in.bias = bias.has_value() ? bias->contiguous() : at::Tensor();
  return in;
}

// The dtype dispatch of the entries: bfloat16 and float16 too where HALF (Exec::kHalfTypes).
#define SPLINET_DISPATCH_TYPES(HALF, TYPE, NAME, ...)                                   \
  [&] {                                                                                 \
    if constexpr (HALF) {                                                               \
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__); \
    } else {                                                                            \
      AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__);                              \
    }                                                                                   \
  }()

}  // namespace splinet
