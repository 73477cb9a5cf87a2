// The runtime of the CUDA block programs, shared by the dense and conv layers.
//
// Used by the block programs (dense_program.h, conv_program.h) and by both layers'
// elementwise functors and large-width paths: the layer's parameters, a thread's view of its
// block, the Runge-Kutta combinations, the basis of a stage and the blended bias (eq. 14), the
// cache of the d + 1 coefficient-gradient slots (eq. 23) and the adjoint sweep.
//
// Everything here is __host__ __device__: the same code runs on the GPU and, one thread (or a
// team of host threads) per block, in the CPU emulation of the tests
// (tests/cpp/cuda_emulated.cpp).
//
// Legend: B batch, m features (dense width or conv channels C), n = L + d coefficients, d
// degree, N steps, S stages, K checkpoint interval, k first nonzero coefficient of a stage and
// w its d + 1 basis weights, acc_t the accumulation type (float for float32, bfloat16 and
// float16; double for float64).
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

// The largest degree the kernels take (their basis buffers hold kMaxDegree + 1 weights).
constexpr int kMaxDegree = 15;

// POD copy of a layer's configuration, passed by value to the kernels (the conv layer reads
// m as its channels C and leaves gamma, TB and ldw unused).
struct LayerParams {
  int64_t B, m, n, d, L, N, K;
  int S;                              // stages
  double a[4][4], b[4], c[4];         // Butcher tableau (layer_config.h)
  int variant;                        // Variant as int
  double gamma, h;
  bool has_bias;
  int64_t TB;                         // rows per tile (dense small path)
  int64_t ldw;                        // dense small path: leading dimension of the shared W buffer
                                      // (m + 1: no bank conflicts)
  bool cache_slots;                   // block programs' backward: the d + 1 gradient slots of the
                                      // current knot interval live in shared memory (SlotCache)
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
SPLINET_HD CombineFn<scalar_t, acc_t> rk_combination(const LayerParams& p, Rk kind, int s, const acc_t* base,
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
SPLINET_HD SPLINET_OUTLINE int64_t stage_basis(const LayerParams& p, int64_t i, int s, acc_t* w) {
  double wd[kMaxDegree + 1];
  const int64_t k = grid_basis<double>(i, p.c[s], p.L, p.N, static_cast<int>(p.d), wd);
  for (int64_t r = 0; r <= p.d; ++r) w[r] = static_cast<acc_t>(wd[r]);
  return k;
}

// Entry j of the blended bias b(t) of step i, stage s (eq. 14), m entries per coefficient (the
// dense width or the conv channels).
template <typename scalar_t, typename acc_t>
SPLINET_HD acc_t blend_bias(const LayerParams& p, const scalar_t* bias, int64_t k, const acc_t* w, int64_t j) {
  acc_t v = w[0] * static_cast<acc_t>(bias[k * p.m + j]);
  for (int64_t r = 1; r <= p.d; ++r) v = mul_add(v, w[r], static_cast<acc_t>(bias[(k + r) * p.m + j]));
  return v;
}

// States a backward segment recomputes and keeps (x_{i0 + 1} .. x_{i1 - 1}): min(K, N) - 1.
SPLINET_HD int64_t segment_states(const LayerParams& p) { return (p.K < p.N ? p.K : p.N) - 1; }

// Saved-state slot of x_i (layer_config.h's saved_slot, usable on the device).
SPLINET_HD int64_t state_slot(int64_t i, int64_t N, int64_t K) {
  if (i == N) return (N + K - 1) / K;
  return i % K == 0 ? i / K : -1;
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
// Also instantiated on the host only, for the large paths' runners (driver_common.h:
// LargeSweep), whose hooks are host code: the pragma lets nvcc accept that.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename Prog>
SPLINET_HD void adjoint_sweep(Prog& prog, const LayerParams& p, bool last_only) {
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

}  // namespace splinet
