// Many models in one call: the chunked sweeps of csrc/cpu/sweep.h over a leading model dimension.
//
// M models (an ensemble, or one model per vmapped sample) each run the chunks and arithmetic of
// their own single-model call, so every model's results equal that call's bit for bit; the
// (model, chunk) tasks share one parallel loop (each task's kernels then single-threaded inside
// it), where single-model calls would each split a small batch over the threads in turn.
// A tensor with a leading dimension of 1 is shared by every model (stride 0, never copied).
// Per-sample gradients (one row a model, all else shared) are the exception: one-row chunks
// would be all per-step overhead, so the rows run as one batch of the single-model kernel,
// each accumulating its own gradients (backward_rows). Its sums per row are a one-row call's,
// but its element-wise activations run over the whole batch: sigmoid and softplus (a
// vectorised exp) may round apart from the one-row call's in the last bit.
//
// Legend: M models, B batch (per model), R rows of one chunk, row elements of one row of a
// state, N steps, K checkpoint interval.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "../common/layer_config.h"
#include "parallel.h"
#include "sweep.h"

namespace splinet {
namespace cpu {

// One call of a layer op over M models: its tensors with their leading model dimension (M, or
// 1 for a tensor that every model shares), contiguous; the config; each model's scale.
struct ModelsCall {
  int64_t M = 0;
  at::Tensor x, weight, bias;  // bias undefined without one
  std::vector<double> lam;     // each model's scale (paper eq. 24's T)
  int64_t steps = 0, degree = 0, checkpoint = 1;
  std::string activation, scheme, variant;
  double gamma = 0.0;
  // Weight, bias and scale shared by every model (a leading dim of 1): per-sample gradients.
  bool shared_params = false;

  // Elements between two models' slices of t: 0 when every model shares it.
  static int64_t stride(const at::Tensor& t) { return t.size(0) == 1 ? 0 : t.numel() / t.size(0); }
};

// fn(model, chunk) for every model and chunk. `flatten`: all tasks in one parallel loop;
// else model after model, each chunk loop as its single-model call runs it (a layer whose one
// chunk threads its own GEMMs).
template <typename F>
void run_model_chunks(int64_t models, int64_t chunks, bool flatten, const F& fn) {
  if (!flatten) {
    for (int64_t mi = 0; mi < models; ++mi) run_chunks(chunks, [&](int64_t c) { fn(mi, c); });
    return;
  }
  run_chunks(models * chunks, [&](int64_t t) { fn(t / chunks, t % chunks); });
}

// The forward of M models (forward_chunks per model): x (Mx, B, row) with stride x_stride
// between models (0: shared), states (M, num_saved, B, row); make(model, r0, R) returns the
// model's chunk of rows [r0, r0 + R).
template <typename T, typename Make>
void forward_models(const std::vector<int64_t>& bounds, int64_t models, bool flatten, int64_t N, int64_t K,
                    int64_t B, int64_t row, const T* x, int64_t x_stride, T* states, const Make& make) {
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t per_model = num_saved_states(N, K) * B * row;
  run_model_chunks(models, chunks, flatten, [&](int64_t mi, int64_t c) {
    const int64_t r0 = bounds[c], R = bounds[c + 1] - r0;
    auto chunk = make(mi, r0, R);
    chunk_forward_sweep(chunk, N, K, B, row, r0, R, x + mi * x_stride, states + mi * per_model);
  });
}

// The adjoint sweep of one chunk, rows [r0, r0 + R) of a (B, row) batch, as backward_chunks
// runs it: states (num_saved, B, row) and grad_states (the same, or (B, row) with last_only)
// of the chunk's model; grad_x (B, row) receives dL/dx_0; gW, gB, plam accumulate eq. 23.
template <typename T, typename Chunk>
void adjoint_chunk(Chunk& chunk, int64_t N, int64_t K, int64_t B, int64_t row, int64_t r0, int64_t R,
                   bool last_only, const T* states, const T* grad_states, T* grad_x, T* gW, T* gB, double& plam) {
  const int64_t Rs = R * row, Ns = num_saved_states(N, K);
  std::vector<T> z(Rs);
  chunk.to_chunk(grad_states + ((last_only ? 0 : Ns - 1) * B + r0) * row, z.data());
  chunk_adjoint_sweep(
      chunk, N, K, Rs, last_only, z.data(), gW, gB, plam,
      [&](int64_t slot, T* dst) { chunk.to_chunk(states + (slot * B + r0) * row, dst); },
      [&](int64_t slot, T* zp) { chunk.add_rows(grad_states + (slot * B + r0) * row, zp); });
  chunk.from_chunk(z.data(), grad_x + r0 * row);
}

// Strides (elements between models; 0: shared) of the backward's inputs.
struct ModelsBackwardStrides {
  int64_t states, grad_states;
};

// The adjoint of M models (backward_chunks per model): grad_x (M, B, row), grad_w (M, nW) and
// grad_b (M, nb; null without bias) zeroed by the caller; returns each model's dL/dlam. Each
// model's chunk partials are summed in chunk order (reduce_partials), as its single-model
// call sums them; a model of one chunk accumulates straight into its gradients.
template <typename T, typename Make>
std::vector<double> backward_models(const std::vector<int64_t>& bounds, int64_t models, bool flatten, int64_t N,
                                    int64_t K, int64_t B, int64_t row, bool last_only, const T* states,
                                    const T* grad_states, ModelsBackwardStrides strides, T* grad_x, T* grad_w,
                                    int64_t nW, T* grad_b, int64_t nb, const Make& make) {
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  const bool direct = chunks == 1;
  std::vector<std::vector<std::vector<T>>> pW(models, std::vector<std::vector<T>>(chunks)),
      pb(models, std::vector<std::vector<T>>(chunks));
  std::vector<std::vector<double>> plam(models, std::vector<double>(chunks, 0.0));
  run_model_chunks(models, chunks, flatten, [&](int64_t mi, int64_t c) {
    const int64_t r0 = bounds[c], R = bounds[c + 1] - r0;
    if (!direct) {
      pW[mi][c].assign(nW, T(0));
      pb[mi][c].assign(grad_b ? nb : 0, T(0));
    }
    T* gW = direct ? grad_w + mi * nW : pW[mi][c].data();
    T* gB = direct ? (grad_b ? grad_b + mi * nb : nullptr) : pb[mi][c].data();
    auto chunk = make(mi, r0, R);
    adjoint_chunk(chunk, N, K, B, row, r0, R, last_only, states + mi * strides.states,
                  grad_states + mi * strides.grad_states, grad_x + mi * B * row, gW, gB, plam[mi][c]);
  });
  std::vector<double> glam(models, 0.0);
  for (int64_t mi = 0; mi < models; ++mi)
    reduce_partials(pW[mi], pb[mi], plam[mi], grad_w + mi * nW, grad_b ? grad_b + mi * nb : nullptr, glam[mi]);
  return glam;
}

// Per-sample gradients (the input alone mapped, one row a model, the weights, bias and scale
// shared): the models' rows run as one batch through the single-model kernel's chunks, each
// row accumulating its own gradients (per-row gradients of the chunk type); grad_w (M, nW),
// grad_b (M, nb; null without bias) zeroed by the caller, glam (M) too.
template <typename T, typename Make>
void backward_rows(const std::vector<int64_t>& bounds, int64_t N, int64_t K, int64_t M, int64_t row, bool last_only,
                   const T* states, const T* grad_states, T* grad_x, T* grad_w, int64_t nW, T* grad_b, int64_t nb,
                   double* glam, const Make& make) {
  run_chunks(static_cast<int64_t>(bounds.size()) - 1, [&](int64_t c) {
    const int64_t r0 = bounds[c], R = bounds[c + 1] - r0;
    auto chunk = make(r0, R);
    chunk.set_per_row_grads(grad_w + r0 * nW, grad_b ? grad_b + r0 * nb : nullptr, glam + r0);
    double unused = 0.0;
    adjoint_chunk<T>(chunk, N, K, M, row, r0, R, last_only, states, grad_states, grad_x, nullptr, nullptr, unused);
  });
}

// The dense kernel over a leading model dimension (implemented next to DenseChunk in
// dense_cpu.cpp; the ops in dense_models_cpu.cpp): states (M, num_saved, B, m) filled; the
// backward returns (grad_x (M, B, m), grad_w (M, n, m, m), grad_b (M, n, m) or empty (0,),
// each model's dL/dlam).
void dense_models_forward(const ModelsCall& call, const at::Tensor& states);
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<double>> dense_models_backward(
    const ModelsCall& call, const at::Tensor& grad_states, bool last_only, const at::Tensor& states);

}  // namespace cpu
}  // namespace splinet
