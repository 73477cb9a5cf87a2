// The chunked time sweeps of the dense and Hamiltonian CPU kernels, forward and adjoint.
//
// Each chunk of the batch's rows goes forward through the N steps, keeping the checkpointed
// states, and back through the adjoint sweep (paper eqs. 17-23); the per-chunk weight
// gradients are summed in chunk order.
//
// Legend: B batch, R rows of one chunk, row elements of one row of a state (m dense, 2m
// Hamiltonian), Rs = R row values of one chunk state, N steps, K checkpoint interval.
//
// A chunk type provides, for its R rows:
//   to_chunk(rows, chunk) / from_chunk(chunk, rows) / add_rows(rows, chunk): between R rows of
//     a (B, row) tensor and the chunk's own layout of a state (Rs values);
//   step(i, x_in, x_out): x_out = step i from x_in (with x_out null, the stages only);
//   step_adjoint(z, gW, gb, glam): the adjoint of the step just run by step();
//   kReplayNeedsOutput: whether the adjoint's replay of a step must write its next state.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/layer_config.h"
#include "parallel.h"
#include "spline_blend.h"

namespace splinet {
namespace cpu {

// The forward sweep of one chunk, rows [r0, r0 + R) of x (B, row): states (num_saved, B, row)
// receives x_0 and every saved state x_{i+1} (saved_slot).
template <typename T, typename Chunk>
void chunk_forward_sweep(Chunk& chunk, int64_t N, int64_t K, int64_t B, int64_t row, int64_t r0, int64_t R,
                         const T* x, T* states) {
  const int64_t Rs = R * row;
  std::vector<T> cur(Rs), nxt(Rs);
  chunk.to_chunk(x + r0 * row, cur.data());
  std::copy(x + r0 * row, x + r0 * row + Rs, states + r0 * row);
  // The state is stepped in these buffers and copied out, never stepped in place in
  // `states`: MKL's GEMM may round differently for differently aligned operands, and
  // the backward replays steps from buffers like these.
  for (int64_t i = 0; i < N; ++i) {
    chunk.step(i, cur.data(), nxt.data());
    std::swap(cur, nxt);
    const int64_t slot = saved_slot(i + 1, N, K);
    if (slot >= 0) chunk.from_chunk(cur.data(), states + (slot * B + r0) * row);
  }
}

// The adjoint sweep of one chunk of rows (dense and Hamiltonian kernels), from step N - 1
// down to 0: segments [i0, i1) of K steps, last first; each starts from a saved state and
// recomputes the states inside it (all saved when K = 1), then replays steps i1 - 1 .. i0
// and runs their adjoints (chunk.step / chunk.step_adjoint; a replayed step writes no next
// state unless Chunk::kReplayNeedsOutput says it needs one). `load(slot, dst)` writes saved
// state `slot` of the chunk's rows into dst (Rs values); `add_grad(slot, z)` adds the loss's
// direct gradient of saved state `slot` to z, dL/dx_i, after step i's adjoint.
template <typename T, typename Chunk, typename Load, typename AddGrad>
void chunk_adjoint_sweep(Chunk& chunk, int64_t N, int64_t K, int64_t Rs, bool last_only, T* z, T* pW, T* pb,
                         double& plam, const Load& load, const AddGrad& add_grad) {
  std::vector<T> seg(std::min(K, N) * Rs), scratch(Chunk::kReplayNeedsOutput ? Rs : 0);
  T* const replay_out = Chunk::kReplayNeedsOutput ? scratch.data() : nullptr;
  for (int64_t i0 = ((N - 1) / K) * K; i0 >= 0; i0 -= K) {
    const int64_t i1 = std::min(i0 + K, N);
    load(i0 / K, seg.data());
    for (int64_t i = i0; i + 1 < i1; ++i) chunk.step(i, &seg[(i - i0) * Rs], &seg[(i + 1 - i0) * Rs]);
    for (int64_t i = i1 - 1; i >= i0; --i) {
      chunk.step(i, &seg[(i - i0) * Rs], replay_out);
      chunk.step_adjoint(z, pW, pb, plam);
      const int64_t slot = last_only ? -1 : saved_slot(i, N, K);
      if (slot >= 0) add_grad(slot, z);
    }
  }
}

// Per-chunk partial gradients summed in chunk order (so the result depends only on the
// chunking, not on the threads' timing), in float64 and rounded once (float32: B / 512 or
// more chunks of a large batch would otherwise add in one float32 sequence; float64: the
// same sums as adding into the zeroed gradients).
template <typename T>
void reduce_partials(const std::vector<std::vector<T>>& pW, const std::vector<std::vector<T>>& pb,
                     const std::vector<double>& plam, T* gw, T* gb, double& glam) {
  if (pW.empty()) return;
  const auto sum_into = [&](const std::vector<std::vector<T>>& parts, T* out) {
    const int64_t n = static_cast<int64_t>(parts[0].size());
    double total[kCacheTile];  // a tile of the sums at a time: no buffer of n doubles
    for (int64_t t0 = 0; t0 < n; t0 += kCacheTile) {
      const int64_t len = std::min(n - t0, kCacheTile);
      std::fill(total, total + len, 0.0);
      for (size_t c = 0; c < parts.size(); ++c) {
        const T* p = parts[c].data() + t0;
        for (int64_t e = 0; e < len; ++e) total[e] += p[e];
      }
      for (int64_t e = 0; e < len; ++e) out[t0 + e] += static_cast<T>(total[e]);
    }
  };
  sum_into(pW, gw);
  sum_into(pb, gb);
  for (size_t c = 0; c < plam.size(); ++c) glam += plam[c];
}

// The whole forward: make(r0, R) returns the chunk of rows [r0, r0 + R), which
// chunk_forward_sweep walks through the N steps; one chunk per task of run_chunks.
template <typename T, typename Make>
void forward_chunks(const std::vector<int64_t>& bounds, int64_t N, int64_t K, int64_t B, int64_t row, const T* x,
                    T* states, const Make& make) {
  run_chunks(static_cast<int64_t>(bounds.size()) - 1, [&](int64_t c) {
    const int64_t r0 = bounds[c], R = bounds[c + 1] - r0;
    auto chunk = make(r0, R);
    chunk_forward_sweep(chunk, N, K, B, row, r0, R, x, states);
  });
}

// The whole adjoint sweep, from the saved states (num_saved, B, row) and the loss's gradient
// of them, grad_states (or of x_N alone, with last_only): grad_x (B, row) = dL/dx_0;
// dL/dweight (nW values), dL/dbias (nb, or none when grad_b is null) accumulate into
// grad_w / grad_b (zeroed by the caller); returns dL/dlam. Each chunk accumulates eq. 23
// into partial gradients of its own, summed in chunk order after the sweep; a single chunk
// accumulates straight into grad_w / grad_b (the same sums: the partials start at zero, as
// the gradients do).
template <typename T, typename Make>
double backward_chunks(const std::vector<int64_t>& bounds, int64_t N, int64_t K, int64_t B, int64_t row,
                       bool last_only, const T* states, const T* grad_states, T* grad_x, T* grad_w, int64_t nW,
                       T* grad_b, int64_t nb, const Make& make) {
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  std::vector<std::vector<T>> pW(chunks), pb(chunks);
  std::vector<double> plam(chunks, 0.0);
  const bool direct = chunks == 1;
  run_chunks(chunks, [&](int64_t c) {
    const int64_t r0 = bounds[c], R = bounds[c + 1] - r0, Rs = R * row;
    if (!direct) {
      pW[c].assign(nW, T(0));
      pb[c].assign(grad_b ? nb : 0, T(0));
    }
    T* gW = direct ? grad_w : pW[c].data();
    T* gB = direct ? grad_b : pb[c].data();
    auto chunk = make(r0, R);
    const int64_t Ns = num_saved_states(N, K);
    std::vector<T> z(Rs);
    chunk.to_chunk(grad_states + ((last_only ? 0 : Ns - 1) * B + r0) * row, z.data());
    chunk_adjoint_sweep(
        chunk, N, K, Rs, last_only, z.data(), gW, gB, plam[c],
        [&](int64_t slot, T* dst) { chunk.to_chunk(states + (slot * B + r0) * row, dst); },
        [&](int64_t slot, T* zp) { chunk.add_rows(grad_states + (slot * B + r0) * row, zp); });
    chunk.from_chunk(z.data(), grad_x + r0 * row);
  });
  double glam = 0.0;
  reduce_partials(pW, pb, plam, grad_w, grad_b, glam);
  return glam;
}

}  // namespace cpu
}  // namespace splinet
