// Device code of the CUDA dense layer: the small-width trajectory program and the blend of W(t).
//
// Written as __host__ __device__ block programs on the runtime of block_runtime.h, so that the
// same code runs on the GPU (csrc/cuda/dense_cuda.cu) and, one thread per block, on the CPU in
// the test-only emulation ops (tests/cpp/cuda_emulated.cpp): that is how the kernels'
// arithmetic and indexing are tested on machines without a GPU.
//
// Legend: B batch, m width, n = L + d coefficients, d degree, N steps, S stages, K checkpoint
// interval, TB rows of one batch tile, acc_t the accumulation type (float for float32,
// bfloat16 and float16; double for float64).
//
// Small widths (m <= kSmallMaxWidth): one block owns a tile of TB batch rows and walks all N
// steps with the tile's state, stage inputs, pre-activations and slopes in shared memory.
// At every stage the d + 1 nonzero coefficient matrices are blended into one m x m shared
// buffer (eq. 14) and the products, bias, activation and update run from shared memory.
// The adjoint walks back from step N - 1 to 0 in the same launch, recomputing each step's
// stages from the saved (or segment-recomputed) state, and accumulates eq. 23 into the block's
// own slice of a partial coefficient-gradient buffer (no atomics); the host sums the slices
// in block order, so the gradients are deterministic for a given grid.
//
// Every phase is a block-strided loop `for (e = tid; e < count; e += nthreads)` followed by a
// barrier: with tid = 0, nthreads = 1 and no barrier it is the sequential program; the
// emulation also runs it with several host threads and a host barrier.
#pragma once

#include <cstdint>

#include "block_runtime.h"

namespace splinet {

// Widths handled by the shared-memory trajectory program; wider layers take the GEMM path
// (dense_driver.h).
constexpr int64_t kSmallMaxWidth = 64;

// Rows of a thread's float32 sum over a tile's R rows (the weight and bias gradients: R up
// to 256, dense_small_tile_rows) added in a run of their own before the run's sum goes into
// the running total: two float32 levels bound the error by about kRowSumRun + R / kRowSumRun
// roundings instead of R (rows whose terms cancel; float64 would run at 1/2 to 1/64 of the
// float32 rate on a GPU). float32 layers only: float64 sums in one run (their bits as
// before), and bfloat16 / float16 values carry more error than the sum's (there the runs
// added spills on sm_90, 176 -> 188 bytes).
template <typename scalar_t, typename acc_t>
constexpr int kRowSumRun = std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float> ? 16 : 0;

// sum over r < R of the terms term(acc, r) adds (acc = mul_add(acc, ...)), from zero, in runs
// of kRowSumRun rows.
template <typename scalar_t, typename acc_t, typename Term>
SPLINET_HD acc_t row_sum(int64_t R, const Term& term) {
  constexpr int run_rows = kRowSumRun<scalar_t, acc_t>;
  acc_t total = acc_t(0);
  if constexpr (run_rows > 0) {
    for (int64_t r0 = 0, r1; r0 < R; r0 = r1) {
      r1 = R - r0 > run_rows ? r0 + run_rows : R;
      acc_t run = acc_t(0);
      for (int64_t r = r0; r < r1; ++r) run = term(run, r);
      total = total + run;
    }
  } else {
    for (int64_t r = 0; r < R; ++r) total = term(total, r);
  }
  return total;
}

// Entry (j, q) of the blended matrix of step i, stage s (eq. 14): W(t) = sum_r w_r weight[k + r],
// or A(t) = W(t) - W(t)^T - gamma I for the antisymmetric variant.
template <typename scalar_t, typename acc_t>
SPLINET_HD acc_t blend_entry(const LayerParams& p, const scalar_t* weight, int64_t k, const acc_t* w, int64_t j,
                             int64_t q) {
  const int64_t m = p.m, mm = m * m;
  const scalar_t* src = weight + k * mm;
  acc_t v = w[0] * static_cast<acc_t>(src[j * m + q]);
  for (int64_t r = 1; r <= p.d; ++r) v = mul_add(v, w[r], static_cast<acc_t>(src[r * mm + j * m + q]));
  if (p.variant == kAntisymmetric) {
    acc_t t = w[0] * static_cast<acc_t>(src[q * m + j]);
    for (int64_t r = 1; r <= p.d; ++r) t = mul_add(t, w[r], static_cast<acc_t>(src[r * mm + q * m + j]));
    v = v - t;
    if (j == q) v -= static_cast<acc_t>(p.gamma);
  }
  return v;
}

// W(t) (m x m, in the GEMM's dtype) and b(t) (m, acc_t) of one stage as an elementwise functor,
// for the large widths' cuBLAS path (dense_driver.h): e < m^2 an entry of W, then the m bias
// entries.
template <typename scalar_t, typename acc_t>
struct BlendFn {
  LayerParams p;
  const scalar_t* weight;
  const scalar_t* bias;
  int64_t k;
  acc_t w[kMaxDegree + 1];
  scalar_t* W;
  acc_t* bv;
  SPLINET_HD void operator()(int64_t e) const {
    const int64_t mm = p.m * p.m;
    if (e < mm) W[e] = static_cast<scalar_t>(blend_entry(p, weight, k, w, e / p.m, e % p.m));
    else if (p.has_bias) bv[e - mm] = blend_bias(p, bias, k, w, e - mm);
  }
};

// ---------------------------------------------------------------------------------------
// Small widths: the trajectory program of one block.

// Pointers of one launch. Partial gradients are per block: pW (grid, n, m, m), pb (grid, n, m),
// plam (grid * nthreads) in acc_t / double; seg (grid, K - 1, TB, m) holds the states a
// backward segment recomputes (K > 1).
template <typename scalar_t, typename acc_t>
struct DenseSmallArgs {
  LayerParams p;
  const scalar_t* x;           // fwd: x0 (B, m)
  const scalar_t* weight;      // (n, m, m)
  const scalar_t* bias;        // (n, m) or null
  const scalar_t* scale;       // 1 value: lam
  scalar_t* states;            // fwd: out; bwd: in (saved, B, m)
  const scalar_t* grad_states; // bwd: (saved, B, m) or (B, m) when last_only
  bool last_only;
  scalar_t* grad_x;            // bwd: (B, m)
  acc_t* pW;
  acc_t* pb;
  double* plam;
  acc_t* seg;
};

// Shared-memory layout (acc_t elements): W (m x ldw), bias (m), then TB x m buffers: cur, kbar,
// G, Y, Z, and S (or 1 in the forward) blocks each of stage inputs X_s and pre-activations
// A_s, and S blocks of slopes K_s (reused as dL/dX_s in the adjoint); in the backward with
// cache_slots, the d + 1 weight- and bias-gradient slots of the current knot interval.
inline int64_t dense_slot_cache_elems(const LayerParams& p) { return (p.d + 1) * (p.m * p.m + p.m); }
inline int64_t dense_small_smem_elems(const LayerParams& p, bool backward) {
  const int64_t TBm = p.TB * p.m, Sk = backward ? p.S : 1;
  const int64_t cache = backward && p.cache_slots ? dense_slot_cache_elems(p) : 0;
  return p.m * p.ldw + p.m + TBm * (5 + 2 * Sk + p.S) + cache;
}

template <typename scalar_t, typename acc_t, Act ACT>
struct DenseTile {
  const DenseSmallArgs<scalar_t, acc_t>& g;
  const LayerParams& p;
  BlockCtx ctx;
  bool keep;  // keep X_s, A_s of every stage (backward)
  acc_t lam;
  acc_t *W, *bv, *cur, *kbar, *G, *Y, *Z, *Xs, *As, *Ks;
  SlotCache<acc_t> cache;

  SPLINET_HD DenseTile(const DenseSmallArgs<scalar_t, acc_t>& args, BlockCtx c, acc_t* smem, bool backward)
      : g(args), p(args.p), ctx(c), keep(backward), lam(static_cast<acc_t>(args.scale[0])) {
    const int64_t TBm = p.TB * p.m, Sk = backward ? p.S : 1;
    W = smem;
    bv = W + p.m * p.ldw;
    cur = bv + p.m;
    kbar = cur + TBm;
    G = kbar + TBm;
    Y = G + TBm;
    Z = Y + TBm;
    Xs = Z + TBm;
    As = Xs + Sk * TBm;
    Ks = As + Sk * TBm;
    cache = SlotCache<acc_t>{Ks + p.S * TBm, Ks + p.S * TBm + (p.d + 1) * p.m * p.m, p.m * p.m,
                             p.has_bias ? p.m : 0, p.d + 1};
  }

  SPLINET_HD acc_t* X_of(int s) const { return Xs + (keep ? s : 0) * p.TB * p.m; }
  SPLINET_HD acc_t* A_of(int s) const { return As + (keep ? s : 0) * p.TB * p.m; }
  SPLINET_HD acc_t* K_of(int s) const { return Ks + s * p.TB * p.m; }

  // out = a Runge-Kutta combination over the stage buffers, this thread's share of [0, n).
  SPLINET_HD void combine(Rk kind, int s, const acc_t* base, acc_t* out, int64_t n) const {
    const acc_t* ks[4] = {K_of(0), K_of(1), K_of(2), K_of(3)};
    const auto f = rk_combination<scalar_t, acc_t>(p, kind, s, base, ks, out, nullptr);
    for (int64_t e = ctx.tid; e < n; e += ctx.nthreads) f(e);
  }

  // W, bv <- the blended matrix and bias of step i, stage s. No barrier.
  SPLINET_HD void blend(int64_t i, int s) {
    acc_t w[kMaxDegree + 1];
    const int64_t k = stage_basis(p, i, s, w), m = p.m;
    for (int64_t e = ctx.tid; e < m * m; e += ctx.nthreads) {
      const int64_t j = e / m, q = e % m;
      W[j * p.ldw + q] = blend_entry(p, g.weight, k, w, j, q);
    }
    if (p.has_bias)
      for (int64_t j = ctx.tid; j < m; j += ctx.nthreads) bv[j] = blend_bias(p, g.bias, k, w, j);
  }

  // One step of the scheme for the R rows of the tile: cur <- x_{i+1} from cur = x_i.
  SPLINET_HD void step(int64_t i, int64_t R) {
    const int64_t m = p.m, Rm = R * m;
    for (int s = 0; s < p.S; ++s) {
      blend(i, s);
      acc_t *X = X_of(s), *A = A_of(s), *Kc = K_of(s);
      combine(Rk::StageInput, s, cur, X, Rm);
      ctx.sync();
      for (int64_t e = ctx.tid; e < Rm; e += ctx.nthreads) {  // a = X_s W^T + b, K_s = lam act(a)
        const int64_t r = e / m, j = e % m;
        const acc_t* xr = X + r * m;
        const acc_t* wj = W + j * p.ldw;
        acc_t acc = acc_t(0);
        for (int64_t q = 0; q < m; ++q) acc = mul_add(acc, xr[q], wj[q]);
        if (p.has_bias) acc = acc + bv[j];
        A[e] = acc;
        const acc_t y = Activation<ACT>::f(acc);
        if (p.variant == kSymmetric) Y[e] = y; else Kc[e] = lam * y;
      }
      ctx.sync();
      if (p.variant == kSymmetric) {  // K_s = -lam act(a) W
        for (int64_t e = ctx.tid; e < Rm; e += ctx.nthreads) {
          const int64_t r = e / m, q = e % m;
          acc_t acc = acc_t(0);
          for (int64_t j = 0; j < m; ++j) acc = mul_add(acc, Y[r * m + j], W[j * p.ldw + q]);
          Kc[e] = -lam * acc;
        }
        ctx.sync();
      }
    }
    combine(Rk::Update, 0, cur, cur, Rm);
    ctx.sync();
  }

  // Adjoint of the step just recomputed by step(i, R) (paper eqs. 17-23, general explicit RK):
  // Z holds dL/dx_{i+1} on entry, dL/dx_i on exit; eq. 23 goes to this block's partials.
  SPLINET_HD void adjoint(int64_t i, int64_t R, acc_t* pW, acc_t* pb, double& glam) {
    const int64_t m = p.m, Rm = R * m, mm = m * m;
    for (int s = p.S - 1; s >= 0; --s) {
      blend(i, s);
      combine(Rk::StageAdjoint, s, Z, kbar, Rm);  // kbar = dL/dK_s; K_of(q > s) holds dL/dX_q
      ctx.sync();
      const acc_t* A = A_of(s);
      for (int64_t e = ctx.tid; e < Rm; e += ctx.nthreads) {  // G = lam act'(a) V
        const int64_t r = e / m, j = e % m;
        acc_t v = kbar[e];
        if (p.variant == kSymmetric) {  // V = -kbar W^T
          acc_t acc = acc_t(0);
          for (int64_t q = 0; q < m; ++q) acc = mul_add(acc, kbar[r * m + q], W[j * p.ldw + q]);
          v = -acc;
        }
        const acc_t a = A[e], y = Activation<ACT>::f(a);
        Y[e] = y;
        glam = mul_add(glam, static_cast<double>(y), static_cast<double>(v));  // dL/dlam += act(a) . V
        G[e] = act_grad<ACT>(a, y, v, lam);
      }
      ctx.sync();
      acc_t* Xbar = K_of(s);  // K_s is not needed any more
      for (int64_t e = ctx.tid; e < Rm; e += ctx.nthreads) {  // dL/dX_s = G W
        const int64_t r = e / m, q = e % m;
        acc_t acc = acc_t(0);
        for (int64_t j = 0; j < m; ++j) acc = mul_add(acc, G[r * m + j], W[j * p.ldw + q]);
        Xbar[e] = acc;
      }
      acc_t w[kMaxDegree + 1];
      const int64_t k = stage_basis(p, i, s, w);
      const acc_t* X = X_of(s);
      // The d + 1 slots k .. k + d: in shared memory (fetched when the sweep enters the knot
      // interval, written back when it leaves: the same sums as accumulating in pW directly),
      // or the block's partials in global memory.
      if (p.cache_slots) cache.use(ctx, k, pW, pb);
      acc_t* gw = p.cache_slots ? cache.W : pW + k * mm;
      acc_t* gb = p.cache_slots ? cache.b : (pb ? pb + k * m : nullptr);
      for (int64_t e = ctx.tid; e < mm; e += ctx.nthreads) {  // eq. 23: dL/dW_s = G^T X_s -> d + 1 slots
        const int64_t j = e / m, q = e % m;
        acc_t dw = row_sum<scalar_t, acc_t>(
            R, [&](acc_t acc, int64_t r) { return mul_add(acc, G[r * m + j], X[r * m + q]); });
        if (p.variant == kSymmetric) {  // - lam act(a)^T kbar
          const acc_t t = row_sum<scalar_t, acc_t>(
              R, [&](acc_t acc, int64_t r) { return mul_add(acc, Y[r * m + j], kbar[r * m + q]); });
          dw = mul_add(dw, -lam, t);
        } else if (p.variant == kAntisymmetric) {  // dW = dA - dA^T
          const acc_t t = row_sum<scalar_t, acc_t>(
              R, [&](acc_t acc, int64_t r) { return mul_add(acc, G[r * m + q], X[r * m + j]); });
          dw = dw - t;
        }
        for (int64_t r = 0; r <= p.d; ++r) gw[r * mm + e] = mul_add(gw[r * mm + e], w[r], dw);
      }
      if (p.has_bias)
        for (int64_t j = ctx.tid; j < m; j += ctx.nthreads) {
          const acc_t cs = row_sum<scalar_t, acc_t>(R, [&](acc_t acc, int64_t r) { return acc + G[r * m + j]; });
          for (int64_t r = 0; r <= p.d; ++r) gb[r * m + j] = mul_add(gb[r * m + j], w[r], cs);
        }
      ctx.sync();
    }
    combine(Rk::AdjointSum, 0, Z, Z, Rm);  // dL/dx_i = dL/dx_{i+1} + sum_s dL/dX_s
    ctx.sync();
  }

  SPLINET_HD void load(acc_t* dst, const scalar_t* src, int64_t Rm) {
    for (int64_t e = ctx.tid; e < Rm; e += ctx.nthreads) dst[e] = static_cast<acc_t>(src[e]);
  }
  SPLINET_HD void store(scalar_t* dst, const acc_t* src, int64_t Rm) {
    for (int64_t e = ctx.tid; e < Rm; e += ctx.nthreads) dst[e] = static_cast<scalar_t>(src[e]);
  }

  SPLINET_HD void forward_tile(int64_t tile) {
    const int64_t r0 = tile * p.TB, R = (p.B - r0 < p.TB ? p.B - r0 : p.TB), Rm = R * p.m;
    load(cur, g.x + r0 * p.m, Rm);
    for (int64_t e = ctx.tid; e < Rm; e += ctx.nthreads) g.states[r0 * p.m + e] = g.x[r0 * p.m + e];
    ctx.sync();
    for (int64_t i = 0; i < p.N; ++i) {
      step(i, R);
      const int64_t slot = state_slot(i + 1, p.N, p.K);
      if (slot >= 0) store(g.states + (slot * p.B + r0) * p.m, cur, Rm);  // own elements: no barrier
    }
  }

  // Hooks of adjoint_sweep for the tile [r0, r0 + R) (set by backward_tile).
  int64_t r0 = 0, R = 0;
  acc_t *pW = nullptr, *pb = nullptr, *seg = nullptr;
  double* glam = nullptr;
  SPLINET_HD void load_state(int64_t slot) {
    load(cur, g.states + (slot * p.B + r0) * p.m, R * p.m);
    ctx.sync();
  }
  SPLINET_HD void save_segment(int64_t j) {  // own elements: no barrier
    for (int64_t e = ctx.tid; e < R * p.m; e += ctx.nthreads) seg[j * p.TB * p.m + e] = cur[e];
  }
  SPLINET_HD void load_segment(int64_t j) {
    for (int64_t e = ctx.tid; e < R * p.m; e += ctx.nthreads) cur[e] = seg[j * p.TB * p.m + e];
    ctx.sync();
  }
  SPLINET_HD void replay(int64_t i) { step(i, R); }
  SPLINET_HD void run_adjoint(int64_t i) { adjoint(i, R, pW, pb, *glam); }
  SPLINET_HD void add_state_grad(int64_t slot) {  // the loss's direct term of dL/dx_i
    const scalar_t* gs = g.grad_states + (slot * p.B + r0) * p.m;
    for (int64_t e = ctx.tid; e < R * p.m; e += ctx.nthreads) Z[e] = Z[e] + static_cast<acc_t>(gs[e]);
    ctx.sync();
  }

  SPLINET_HD void backward_tile(int64_t tile, int64_t block) {
    r0 = tile * p.TB;
    R = p.B - r0 < p.TB ? p.B - r0 : p.TB;
    pW = g.pW + block * p.n * p.m * p.m;
    pb = g.pb ? g.pb + block * p.n * p.m : nullptr;
    seg = g.seg ? g.seg + block * segment_states(p) * p.TB * p.m : nullptr;
    glam = g.plam + block * ctx.nthreads + ctx.tid;
    const int64_t Ns = (p.N + p.K - 1) / p.K + 1;
    load(Z, g.grad_states + ((g.last_only ? 0 : Ns - 1) * p.B + r0) * p.m, R * p.m);
    ctx.sync();
    adjoint_sweep(*this, p, g.last_only);
    if (p.cache_slots) cache.write_back(ctx, pW, pb);
    store(g.grad_x + r0 * p.m, Z, R * p.m);
    ctx.sync();
  }
};

// Block entry points: block `block` of `grid` walks the tiles block, block + grid, ...
template <typename scalar_t, typename acc_t, Act ACT>
SPLINET_HD void dense_small_fwd_block(const DenseSmallArgs<scalar_t, acc_t>& args, int64_t block, int64_t grid,
                                      BlockCtx ctx, acc_t* smem) {
  DenseTile<scalar_t, acc_t, ACT> t(args, ctx, smem, false);
  const int64_t tiles = (args.p.B + args.p.TB - 1) / args.p.TB;
  for (int64_t tile = block; tile < tiles; tile += grid) t.forward_tile(tile);
}

template <typename scalar_t, typename acc_t, Act ACT>
SPLINET_HD void dense_small_bwd_block(const DenseSmallArgs<scalar_t, acc_t>& args, int64_t block, int64_t grid,
                                      BlockCtx ctx, acc_t* smem) {
  DenseTile<scalar_t, acc_t, ACT> t(args, ctx, smem, true);
  const int64_t tiles = (args.p.B + args.p.TB - 1) / args.p.TB;
  for (int64_t tile = block; tile < tiles; tile += grid) t.backward_tile(tile, block);
}

// The program's entry points, launched as block_kernel<Body> (cuda_exec.cuh).
template <typename scalar_t, typename acc_t, Act ACT>
struct SmallFwdBody {
  using acc_type = acc_t;
  DenseSmallArgs<scalar_t, acc_t> args;
  SPLINET_HD void operator()(int64_t block, int64_t grid, BlockCtx ctx, acc_t* smem) const {
    dense_small_fwd_block<scalar_t, acc_t, ACT>(args, block, grid, ctx, smem);
  }
};

template <typename scalar_t, typename acc_t, Act ACT>
struct SmallBwdBody {
  using acc_type = acc_t;
  DenseSmallArgs<scalar_t, acc_t> args;
  SPLINET_HD void operator()(int64_t block, int64_t grid, BlockCtx ctx, acc_t* smem) const {
    dense_small_bwd_block<scalar_t, acc_t, ACT>(args, block, grid, ctx, smem);
  }
};

}  // namespace splinet
