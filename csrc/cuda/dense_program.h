// Device code of the CUDA dense SpliNet layer, written as __host__ __device__ block programs
// so that the same code runs on the GPU (csrc/cuda/dense_cuda.cu) and, one thread per block,
// on the CPU in the test-only emulation ops (csrc/cpu/cuda_emulated.cpp): that is how the
// kernels' arithmetic and indexing are tested on machines without a GPU.
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
#include <type_traits>

#include "../common/activations.h"
#include "../common/bspline.h"

// A function the device compiler must call rather than inline, where inlining copies of it
// into unrolled or repeated call sites would multiply the kernels' size and compile time.
#if defined(__CUDACC__)
#define SPLINET_OUTLINE __noinline__
#else
#define SPLINET_OUTLINE
#endif

namespace splinet {

// Widths handled by the shared-memory trajectory program; wider layers take the GEMM path
// (dense_driver.h).
constexpr int64_t kSmallMaxWidth = 64;
constexpr int kMaxDegree = 15;

// POD copy of the layer's configuration, passed by value to the kernels.
struct DenseParams {
  int64_t B, m, n, d, L, N, K;
  int S;                              // stages
  double a[4][4], b[4], c[4];         // Butcher tableau (layer_config.h)
  int variant;                        // Variant as int
  double gamma, h;
  bool has_bias;
  int64_t TB;                         // rows per tile (small path)
  int64_t ldw;                        // leading dimension of the shared W buffer (m + 1: no bank conflicts)
  bool cache_slots;                   // small-path backward: the d + 1 gradient slots of the current
                                      // knot interval live in shared memory
};

constexpr int kStandard = 0, kSymmetric = 1, kAntisymmetric = 2;  // == Variant

// A thread's view of its block. On the GPU sync() is __syncthreads(); the CPU emulation runs
// a block either with one thread (no barrier needed) or with several host threads that meet
// at a host barrier (sync_fn), which exercises the thread-to-data mapping and the barriers.
struct BlockCtx {
  int64_t tid, nthreads;
  void (*sync_fn)(void*) = nullptr;
  void* sync_arg = nullptr;
  SPLINET_HD void sync() const {
#ifdef __CUDA_ARCH__
    __syncthreads();
#else
    if (sync_fn) sync_fn(sync_arg);
#endif
  }
};

// acc + x * y. In float64 on the GPU the product and the sum are rounded separately (never
// contracted to an FMA), as on the CPU, so the kernel can match the CPU backend bit for bit
// in float64 where the summation order is the same; float32 may use FMA.
template <typename T>
SPLINET_HD T mul_add(T acc, T x, T y) {
  if constexpr (std::is_same<T, double>::value) return add_product_rn(acc, x, y);
  return acc + x * y;
}

// act'(a) * v * lam with the same expression order as the CPU kernel (csrc/cpu/dense_cpu.cpp).
template <Act A, typename T>
SPLINET_HD T act_grad(T a, T y, T v, T lam) {
  if constexpr (A == Act::Relu) {
    return lam * v * (a > T(0) ? T(1) : T(0));
  } else {
    return lam * Activation<A>::df(a, y) * v;
  }
}

// out = c0 base + sum_j c_j K_j over a flat index, written in acc_t (out_acc) and/or the
// storage dtype (out_st); terms with c_j = 0 are left out (add).
template <typename scalar_t, typename acc_t>
struct CombineFn {
  const acc_t* base;
  acc_t c0;
  const acc_t* K[4];
  acc_t c[4];
  int nk;
  acc_t* out_acc;
  scalar_t* out_st;
  SPLINET_HD void add(acc_t cj, const acc_t* Kj) {
    if (cj == acc_t(0)) return;
    K[nk] = Kj;
    c[nk++] = cj;
  }
  SPLINET_HD acc_t value(int64_t e) const {
    acc_t v = c0 * base[e];
    for (int j = 0; j < nk; ++j) v = mul_add(v, c[j], K[j][e]);
    return v;
  }
  SPLINET_HD void operator()(int64_t e) const {
    const acc_t v = value(e);
    if (out_acc) out_acc[e] = v;
    if (out_st) out_st[e] = static_cast<scalar_t>(v);
  }
};

// The explicit Runge-Kutta combinations over the S stage buffers Ks and their
// adjoints, used by the block programs and the large paths alike:
//   stage input  X_s = x + h sum_{j<s} a_sj K_j          update  x' = x + h sum_s b_s K_s
//   adjoint      kbar_s = h b_s z + h sum_{q>s} a_qs Xbar_q   (Xbar_q = dL/dX_q in Ks[q])
//                z' = z + sum_s Xbar_s
enum class Rk { StageInput, Update, StageAdjoint, AdjointSum };

template <typename scalar_t, typename acc_t>
SPLINET_HD CombineFn<scalar_t, acc_t> rk_combination(const DenseParams& p, Rk kind, int s, const acc_t* base,
                                                     const acc_t* const* Ks, acc_t* out_acc, scalar_t* out_st) {
  const acc_t h = static_cast<acc_t>(p.h);
  CombineFn<scalar_t, acc_t> f{base, acc_t(1), {}, {}, 0, out_acc, out_st};
  switch (kind) {
    case Rk::StageInput:
      for (int j = 0; j < s; ++j) f.add(h * static_cast<acc_t>(p.a[s][j]), Ks[j]);
      break;
    case Rk::Update:
      for (int j = 0; j < p.S; ++j) f.add(h * static_cast<acc_t>(p.b[j]), Ks[j]);
      break;
    case Rk::StageAdjoint:
      f.c0 = h * static_cast<acc_t>(p.b[s]);
      for (int q = s + 1; q < p.S; ++q) f.add(h * static_cast<acc_t>(p.a[q][s]), Ks[q]);
      break;
    case Rk::AdjointSum:
      for (int j = 0; j < p.S; ++j) f.add(acc_t(1), Ks[j]);
      break;
  }
  return f;
}

// Basis of step i, stage s: weights (acc_t) of the d + 1 nonzero coefficients; returns the first.
// Called once per stage and phase, so a call costs nothing while each inlined copy of the
// Cox-de Boor loops added to every block program.
template <typename acc_t>
SPLINET_HD SPLINET_OUTLINE int64_t stage_basis(const DenseParams& p, int64_t i, int s, acc_t* w) {
  double wd[kMaxDegree + 1];
  const int64_t k = grid_basis<double>(i, p.c[s], p.L, p.N, static_cast<int>(p.d), wd);
  for (int64_t r = 0; r <= p.d; ++r) w[r] = static_cast<acc_t>(wd[r]);
  return k;
}

// Entry (j, q) of the blended matrix of step i, stage s (eq. 14): W(t) = sum_r w_r weight[k + r],
// or A(t) = W(t) - W(t)^T - gamma I for the antisymmetric variant.
template <typename scalar_t, typename acc_t>
SPLINET_HD acc_t blend_entry(const DenseParams& p, const scalar_t* weight, int64_t k, const acc_t* w, int64_t j,
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

template <typename scalar_t, typename acc_t>
SPLINET_HD acc_t blend_bias(const DenseParams& p, const scalar_t* bias, int64_t k, const acc_t* w, int64_t j) {
  acc_t v = w[0] * static_cast<acc_t>(bias[k * p.m + j]);
  for (int64_t r = 1; r <= p.d; ++r) v = mul_add(v, w[r], static_cast<acc_t>(bias[(k + r) * p.m + j]));
  return v;
}

// States a backward segment recomputes and keeps (x_{i0 + 1} .. x_{i1 - 1}): min(K, N) - 1.
SPLINET_HD int64_t segment_states(const DenseParams& p) { return (p.K < p.N ? p.K : p.N) - 1; }

// Saved-state slot of x_i (layer_config.h's saved_slot, usable on the device).
SPLINET_HD int64_t state_slot(int64_t i, int64_t N, int64_t K) {
  if (i == N) return (N + K - 1) / K;
  return i % K == 0 ? i / K : -1;
}

// ---------------------------------------------------------------------------------------
// Small widths: the trajectory program of one block.

// Pointers of one launch. Partial gradients are per block: pW (grid, n, m, m), pb (grid, n, m),
// plam (grid * nthreads) in acc_t / double; seg (grid, K - 1, TB, m) holds the states a
// backward segment recomputes (K > 1).
template <typename scalar_t, typename acc_t>
struct DenseSmallArgs {
  DenseParams p;
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
inline int64_t dense_slot_cache_elems(const DenseParams& p) { return (p.d + 1) * (p.m * p.m + p.m); }
inline int64_t dense_small_smem_elems(const DenseParams& p, bool backward) {
  const int64_t TBm = p.TB * p.m, Sk = backward ? p.S : 1;
  const int64_t cache = backward && p.cache_slots ? dense_slot_cache_elems(p) : 0;
  return p.m * p.ldw + p.m + TBm * (5 + 2 * Sk + p.S) + cache;
}

// Shared-memory cache of the d + 1 gradient slots (eq. 23) of the knot interval the adjoint
// sweep is in: fetched from the block's partials when the sweep enters an interval, written
// back when it leaves (the same sums as accumulating in the partials directly). Each thread
// moves the entries it accumulates (the block-strided mapping of the eq. 23 loops), so no
// barrier is needed; k is the same in every thread.
template <typename acc_t>
struct SlotCache {
  acc_t* W;       // slots x wsize
  acc_t* b;       // slots x bsize (bsize = 0 without bias)
  int64_t wsize, bsize, slots;
  int64_t k = -1;  // first cached slot, -1 for none

  SPLINET_HD void write_back(const BlockCtx& ctx, acc_t* pW, acc_t* pb) {
    if (k < 0) return;
    for (int64_t e = ctx.tid; e < wsize; e += ctx.nthreads)
      for (int64_t r = 0; r < slots; ++r) pW[(k + r) * wsize + e] = W[r * wsize + e];
    for (int64_t j = ctx.tid; j < bsize; j += ctx.nthreads)
      for (int64_t r = 0; r < slots; ++r) pb[(k + r) * bsize + j] = b[r * bsize + j];
    k = -1;
  }
  SPLINET_HD void use(const BlockCtx& ctx, int64_t k_new, acc_t* pW, acc_t* pb) {
    if (k_new == k) return;
    write_back(ctx, pW, pb);
    for (int64_t e = ctx.tid; e < wsize; e += ctx.nthreads)
      for (int64_t r = 0; r < slots; ++r) W[r * wsize + e] = pW[(k_new + r) * wsize + e];
    for (int64_t j = ctx.tid; j < bsize; j += ctx.nthreads)
      for (int64_t r = 0; r < slots; ++r) b[r * bsize + j] = pb[(k_new + r) * bsize + j];
    k = k_new;
  }
};

// The adjoint sweep of a block program (DenseTile, ConvSample), from step N - 1 down to 0:
// segments [i0, i1) of K steps, last first. Each starts from its saved state (slot i0 / K)
// and recomputes the states inside it into the program's segment buffer (all saved when
// K = 1); then steps i1 - 1 .. i0 are replayed from their states and their adjoints run.
// The loss's direct gradient of a saved state x_i joins dL/dx_i after step i's adjoint.
// Also instantiated on the host only, for the large paths' runners (dense_driver.h), whose
// hooks are host code: the pragma lets nvcc accept that.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename Prog>
SPLINET_HD void adjoint_sweep(Prog& prog, const DenseParams& p, bool last_only) {
  for (int64_t i0 = ((p.N - 1) / p.K) * p.K; i0 >= 0; i0 -= p.K) {
    const int64_t i1 = i0 + p.K < p.N ? i0 + p.K : p.N;
    if (i1 - i0 > 1) {
      prog.load_state(i0 / p.K);
      for (int64_t i = i0; i + 1 < i1; ++i) {
        prog.replay(i);
        prog.save_segment(i - i0);  // x_{i+1}
      }
    }
    for (int64_t i = i1 - 1; i >= i0; --i) {
      if (i == i0) prog.load_state(i0 / p.K); else prog.load_segment(i - i0 - 1);
      prog.replay(i);
      prog.run_adjoint(i);
      const int64_t slot = last_only ? -1 : state_slot(i, p.N, p.K);
      if (slot >= 0) prog.add_state_grad(slot);
    }
  }
}

template <typename scalar_t, typename acc_t, Act ACT>
struct DenseTile {
  const DenseSmallArgs<scalar_t, acc_t>& g;
  const DenseParams& p;
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
        acc_t dw = acc_t(0);
        for (int64_t r = 0; r < R; ++r) dw = mul_add(dw, G[r * m + j], X[r * m + q]);
        if (p.variant == kSymmetric) {  // - lam act(a)^T kbar
          acc_t t = acc_t(0);
          for (int64_t r = 0; r < R; ++r) t = mul_add(t, Y[r * m + j], kbar[r * m + q]);
          dw = mul_add(dw, -lam, t);
        } else if (p.variant == kAntisymmetric) {  // dW = dA - dA^T
          acc_t t = acc_t(0);
          for (int64_t r = 0; r < R; ++r) t = mul_add(t, G[r * m + q], X[r * m + j]);
          dw = dw - t;
        }
        for (int64_t r = 0; r <= p.d; ++r) gw[r * mm + e] = mul_add(gw[r * mm + e], w[r], dw);
      }
      if (p.has_bias)
        for (int64_t j = ctx.tid; j < m; j += ctx.nthreads) {
          acc_t cs = acc_t(0);
          for (int64_t r = 0; r < R; ++r) cs = cs + G[r * m + j];
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


}  // namespace splinet
