// Device code of the CUDA conv layer's small-channel path: the direct single-launch program.
//
// Written as a __host__ __device__ block program on the runtime of block_runtime.h, like
// dense_program.h, so that the CPU emulation ops (tests/cpp/cuda_emulated.cpp) run the same
// code.
//
// Legend: B batch, C channels, P points of one sample's plane (product of the spatial sizes),
// fw = C^2 prod(kernel) entries of one filter, n = L + d coefficients, d degree, N steps,
// S stages, K checkpoint interval, r the kernel radius per dim ("same" zero padding).
//
// One block owns one sample at a time (a persistent grid walks the samples) and runs its
// whole N-step trajectory, or the whole adjoint sweep, in one launch: at every stage the d + 1
// coefficient filters and biases are blended into shared memory (eq. 14) and the direct
// convolution, bias, activation, slope and Runge-Kutta combinations run as barrier-separated
// phases over the sample's C x P values, which live in the block's own global workspace
// (small enough to stay in L2 for the sizes this path is chosen for). The adjoint takes the
// input gradient with the transposed convolution and accumulates eq. 23 (filter gradient
// G (x) X_s, bias gradient, scale gradient) into the block's private partial buffers, which
// the host sums in block order: deterministic, no atomics.
//
// Convolutions are cross-correlations as in PyTorch: conv(x)[co, p] = sum_{ci, o} W[co, ci, o]
// x[ci, p + o - r]; conv_transpose(y)[ci, q] = sum_{co, o} W[co, ci, o] y[co, q - o + r];
// dL/dW[co, ci, o] = sum_p G[co, p] X[ci, p + o - r].
#pragma once

#include <cstdint>

#include "block_runtime.h"

namespace splinet {

// Channels up to which "auto" takes the direct path, and the largest C x P of a sample:
// beyond either, cuDNN's convolutions (the cuDNN path) are the better tool. Provisional
// rule, not yet measured on a GPU (bench/ has the cases to measure it).
constexpr int64_t kConvDirectMaxChannels = 32;
constexpr int64_t kConvDirectMaxSample = 16 * 1024;

// Points of a thread's float32 sum over a plane's P points (up to kConvDirectMaxSample) for
// the bias gradient, added in a run of their own before the run's sum goes into a float64
// total: the error bounded by about kPlaneBiasRun roundings instead of P (a plane whose
// terms cancel), for one float64 add per run on the C threads of that phase (float64 runs
// at 1/2 to 1/64 of the float32 rate on a GPU). With a float32 second level, runs of 64 left
// a plane whose halves cancel 9 times over 4 times PyTorch's error, with a float64 one still
// 1.7 times (test_float32_sums_that_cancel_emulated_conv). float64 programs: one run, the
// sums (and bits) as before.
constexpr int kPlaneBiasRun = 16;

struct ConvGeom {
  int64_t C, P, fw, kprod;
  int64_t size[3], ksize[3], radius[3];  // spatial dims padded to 3 with size 1, kernel 1
};

template <typename scalar_t, typename acc_t>
struct ConvSmallArgs {
  LayerParams p;  // B, m = C, n, d, L, N, K, tableau, variant, h, has_bias
  ConvGeom geo;
  const scalar_t* x;
  const scalar_t* weight;  // (n, C, C, *kernel)
  const scalar_t* bias;    // (n, C) or null
  const scalar_t* scale;
  scalar_t* states;
  const scalar_t* grad_states;
  bool last_only;
  scalar_t* grad_x;
  acc_t* pW;     // (grid, n, fw)
  acc_t* pb;     // (grid, n, C) or null
  double* plam;  // (grid * nthreads)
  acc_t* work;   // (grid, conv_small_work_elems)
};

// Global workspace of one block, in samples' worth (C x P): cur, Z, kbar, G, Y, then S each
// of X_s, A_s, K_s (K_s reused as dL/dX_s), then min(K, N) - 1 recomputed segment states.
SPLINET_HD int64_t conv_small_work_samples(const LayerParams& p) { return 5 + 3 * p.S + segment_states(p); }
// Shared memory: the blended filter (fw) and bias (C); in the backward with cache_slots also
// the d + 1 filter- and bias-gradient slots of the current knot interval (SlotCache).
SPLINET_HD int64_t conv_slot_cache_elems(const LayerParams& p, const ConvGeom& g) { return (p.d + 1) * (g.fw + g.C); }
SPLINET_HD int64_t conv_small_smem_elems(const LayerParams& p, const ConvGeom& g, bool backward) {
  return g.fw + g.C + (backward && p.cache_slots ? conv_slot_cache_elems(p, g) : 0);
}

template <typename scalar_t, typename acc_t, Act ACT>
struct ConvSample {
  const ConvSmallArgs<scalar_t, acc_t>& g;
  const LayerParams& p;
  const ConvGeom& geo;
  BlockCtx ctx;
  acc_t lam;
  int64_t CP;
  acc_t *W, *bv;                                      // shared
  SlotCache<acc_t> cache;                             // shared (backward with cache_slots)
  acc_t *cur, *Z, *kbar, *G, *Y, *Xs, *As, *Ks, *seg;  // this block's workspace

  SPLINET_HD ConvSample(const ConvSmallArgs<scalar_t, acc_t>& args, BlockCtx c, acc_t* smem, int64_t block)
      : g(args), p(args.p), geo(args.geo), ctx(c), lam(static_cast<acc_t>(args.scale[0])),
        CP(args.geo.C * args.geo.P) {
    W = smem;
    bv = W + geo.fw;
    cache = SlotCache<acc_t>{bv + geo.C, bv + geo.C + (p.d + 1) * geo.fw, geo.fw, p.has_bias ? geo.C : 0, p.d + 1};
    cur = args.work + block * conv_small_work_samples(p) * CP;
    Z = cur + CP;
    kbar = Z + CP;
    G = kbar + CP;
    Y = G + CP;
    Xs = Y + CP;
    As = Xs + p.S * CP;
    Ks = As + p.S * CP;
    seg = Ks + p.S * CP;
  }

  SPLINET_HD acc_t* X_of(int s) const { return Xs + s * CP; }
  SPLINET_HD acc_t* A_of(int s) const { return As + s * CP; }
  SPLINET_HD acc_t* K_of(int s) const { return Ks + s * CP; }

  // out = a Runge-Kutta combination over the stage buffers (block_runtime.h), this thread's share.
  SPLINET_HD void combine(Rk kind, int s, const acc_t* base, acc_t* out) const {
    const acc_t* ks[4] = {K_of(0), K_of(1), K_of(2), K_of(3)};
    const auto f = rk_combination<scalar_t, acc_t>(p, kind, s, base, ks, out, nullptr);
    for (int64_t e = ctx.tid; e < CP; e += ctx.nthreads) f(e);
  }

  // Spatial coordinates of point q of a plane.
  SPLINET_HD void coords(int64_t q, int64_t* c3) const {
    c3[2] = q % geo.size[2];
    c3[1] = (q / geo.size[2]) % geo.size[1];
    c3[0] = q / (geo.size[2] * geo.size[1]);
  }

  // sum_{c2, o} W[row(c1, c2), o] in[c2, q +- (o - r)] for output channel c1 at point q:
  // transposed = false: conv (W[c1, c2]), true: conv_transpose (W[c2, c1], offsets negated).
  SPLINET_HD acc_t conv_at(const acc_t* in, int64_t c1, int64_t q, bool transposed) const {
    int64_t pc[3];
    coords(q, pc);
    const int64_t sgn = transposed ? -1 : 1;
    acc_t acc = acc_t(0);
    for (int64_t c2 = 0; c2 < geo.C; ++c2) {
      const acc_t* w = W + (transposed ? c2 * geo.C + c1 : c1 * geo.C + c2) * geo.kprod;
      const acc_t* src = in + c2 * geo.P;
      for (int64_t o0 = 0; o0 < geo.ksize[0]; ++o0) {
        const int64_t q0 = pc[0] + sgn * (o0 - geo.radius[0]);
        if (q0 < 0 || q0 >= geo.size[0]) continue;
        for (int64_t o1 = 0; o1 < geo.ksize[1]; ++o1) {
          const int64_t q1 = pc[1] + sgn * (o1 - geo.radius[1]);
          if (q1 < 0 || q1 >= geo.size[1]) continue;
          for (int64_t o2 = 0; o2 < geo.ksize[2]; ++o2) {
            const int64_t q2 = pc[2] + sgn * (o2 - geo.radius[2]);
            if (q2 < 0 || q2 >= geo.size[2]) continue;
            acc = mul_add(acc, w[(o0 * geo.ksize[1] + o1) * geo.ksize[2] + o2],
                          src[(q0 * geo.size[1] + q1) * geo.size[2] + q2]);
          }
        }
      }
    }
    return acc;
  }

  // sum_p a[co, p] b[ci, p + o - r] for filter entry e = (co, ci, o): the weight gradient.
  SPLINET_HD acc_t filter_grad_at(const acc_t* a, const acc_t* b, int64_t e) const {
    const int64_t o = e % geo.kprod, ci = (e / geo.kprod) % geo.C, co = e / (geo.kprod * geo.C);
    const int64_t o2 = o % geo.ksize[2], o1 = (o / geo.ksize[2]) % geo.ksize[1], o0 = o / (geo.ksize[2] * geo.ksize[1]);
    const int64_t d0 = o0 - geo.radius[0], d1 = o1 - geo.radius[1], d2 = o2 - geo.radius[2];
    const acc_t* ar = a + co * geo.P;
    const acc_t* br = b + ci * geo.P;
    // One float32 chain over the plane, unlike the bias's runs: a run counter here cost 2
    // integer operations a multiply-add and 4 bytes more spills (sm_90: 268 -> 272), runs of
    // the innermost loop 112-144 bytes; the CPU direct kernel splits the same sum into
    // vector lanes and samples.
    acc_t acc = acc_t(0);
    for (int64_t p0 = (d0 < 0 ? -d0 : 0); p0 < geo.size[0] - (d0 > 0 ? d0 : 0); ++p0)
      for (int64_t p1 = (d1 < 0 ? -d1 : 0); p1 < geo.size[1] - (d1 > 0 ? d1 : 0); ++p1)
        for (int64_t p2 = (d2 < 0 ? -d2 : 0); p2 < geo.size[2] - (d2 > 0 ? d2 : 0); ++p2)
          acc = mul_add(acc, ar[(p0 * geo.size[1] + p1) * geo.size[2] + p2],
                        br[((p0 + d0) * geo.size[1] + p1 + d1) * geo.size[2] + p2 + d2]);
    return acc;
  }

  // W, bv <- the blended filter and bias of step i, stage s (eq. 14). No barrier.
  SPLINET_HD void blend(int64_t i, int s) {
    acc_t w[kMaxDegree + 1];
    const int64_t k = stage_basis(p, i, s, w);
    for (int64_t e = ctx.tid; e < geo.fw; e += ctx.nthreads) {
      acc_t v = w[0] * static_cast<acc_t>(g.weight[k * geo.fw + e]);
      for (int64_t r = 1; r <= p.d; ++r) v = mul_add(v, w[r], static_cast<acc_t>(g.weight[(k + r) * geo.fw + e]));
      W[e] = v;
    }
    if (p.has_bias)
      for (int64_t c = ctx.tid; c < geo.C; c += ctx.nthreads) {
        acc_t v = w[0] * static_cast<acc_t>(g.bias[k * geo.C + c]);
        for (int64_t r = 1; r <= p.d; ++r) v = mul_add(v, w[r], static_cast<acc_t>(g.bias[(k + r) * geo.C + c]));
        bv[c] = v;
      }
  }

  // One step: cur <- x_{i+1} from cur = x_i, keeping X_s, A_s, K_s of every stage.
  SPLINET_HD void step(int64_t i) {
    for (int s = 0; s < p.S; ++s) {
      blend(i, s);
      acc_t *X = X_of(s), *A = A_of(s), *Kc = K_of(s);
      combine(Rk::StageInput, s, cur, X);
      ctx.sync();
      for (int64_t e = ctx.tid; e < CP; e += ctx.nthreads) {  // a = conv(X_s, W) + b, K_s = lam act(a)
        const int64_t c = e / geo.P;
        acc_t a = conv_at(X, c, e % geo.P, false);
        if (p.has_bias) a = a + bv[c];
        A[e] = a;
        const acc_t y = Activation<ACT>::f(a);
        if (p.variant == kSymmetric) Y[e] = y; else Kc[e] = lam * y;
      }
      ctx.sync();
      if (p.variant == kSymmetric) {  // K_s = -lam conv_transpose(act(a), W)
        for (int64_t e = ctx.tid; e < CP; e += ctx.nthreads) Kc[e] = -lam * conv_at(Y, e / geo.P, e % geo.P, true);
        ctx.sync();
      }
    }
    combine(Rk::Update, 0, cur, cur);
    ctx.sync();
  }

  // Adjoint of the step just recomputed by step(i): Z from dL/dx_{i+1} to dL/dx_i.
  SPLINET_HD void adjoint(int64_t i, acc_t* pW, acc_t* pb, double& glam) {
    const bool sym = p.variant == kSymmetric;
    for (int s = p.S - 1; s >= 0; --s) {
      blend(i, s);
      combine(Rk::StageAdjoint, s, Z, kbar);  // kbar = dL/dK_s
      ctx.sync();
      const acc_t* A = A_of(s);
      for (int64_t e = ctx.tid; e < CP; e += ctx.nthreads) {  // G = lam act'(a) V
        const acc_t v = sym ? -conv_at(kbar, e / geo.P, e % geo.P, false) : kbar[e];
        const acc_t a = A[e], y = Activation<ACT>::f(a);
        Y[e] = y;
        glam = mul_add(glam, static_cast<double>(y), static_cast<double>(v));  // rounded as on the CPU
        G[e] = act_grad<ACT>(a, y, v, lam);
      }
      ctx.sync();
      acc_t* Xbar = K_of(s);
      for (int64_t e = ctx.tid; e < CP; e += ctx.nthreads) Xbar[e] = conv_at(G, e / geo.P, e % geo.P, true);
      acc_t w[kMaxDegree + 1];
      const int64_t k = stage_basis(p, i, s, w);
      const acc_t* X = X_of(s);
      if (p.cache_slots) cache.use(ctx, k, pW, pb);
      acc_t* gw = p.cache_slots ? cache.W : pW + k * geo.fw;
      acc_t* gb = p.cache_slots ? cache.b : (pb ? pb + k * geo.C : nullptr);
      for (int64_t e = ctx.tid; e < geo.fw; e += ctx.nthreads) {  // eq. 23 into the d + 1 slots
        acc_t dw = filter_grad_at(G, X, e);
        if (sym) dw = mul_add(dw, -lam, filter_grad_at(Y, kbar, e));
        for (int64_t r = 0; r <= p.d; ++r) gw[r * geo.fw + e] = mul_add(gw[r * geo.fw + e], w[r], dw);
      }
      if (p.has_bias)
        for (int64_t c = ctx.tid; c < geo.C; c += ctx.nthreads) {
          acc_t cs = acc_t(0);
          if constexpr (sizeof(acc_t) < 8) {  // runs of kPlaneBiasRun points into float64
            double total = 0.0;
            for (int64_t q0 = 0, q1; q0 < geo.P; q0 = q1) {
              q1 = geo.P - q0 > kPlaneBiasRun ? q0 + kPlaneBiasRun : geo.P;
              acc_t run = acc_t(0);
              for (int64_t q = q0; q < q1; ++q) run = run + G[c * geo.P + q];
              total += static_cast<double>(run);
            }
            cs = static_cast<acc_t>(total);
          } else {
            for (int64_t q = 0; q < geo.P; ++q) cs = cs + G[c * geo.P + q];
          }
          for (int64_t r = 0; r <= p.d; ++r) gb[r * geo.C + c] = mul_add(gb[r * geo.C + c], w[r], cs);
        }
      ctx.sync();
    }
    combine(Rk::AdjointSum, 0, Z, Z);
    ctx.sync();
  }

  SPLINET_HD void load(acc_t* dst, const scalar_t* src) {
    for (int64_t e = ctx.tid; e < CP; e += ctx.nthreads) dst[e] = static_cast<acc_t>(src[e]);
  }
  SPLINET_HD void copy(acc_t* dst, const acc_t* src) {
    for (int64_t e = ctx.tid; e < CP; e += ctx.nthreads) dst[e] = src[e];
  }

  SPLINET_HD void forward_sample(int64_t sample) {
    b = sample;
    load(cur, g.x + b * CP);
    for (int64_t e = ctx.tid; e < CP; e += ctx.nthreads) g.states[b * CP + e] = g.x[b * CP + e];
    ctx.sync();
    for (int64_t i = 0; i < p.N; ++i) {
      step(i);
      const int64_t slot = state_slot(i + 1, p.N, p.K);
      if (slot >= 0)
        for (int64_t e = ctx.tid; e < CP; e += ctx.nthreads)
          g.states[(slot * p.B + b) * CP + e] = static_cast<scalar_t>(cur[e]);
    }
    ctx.sync();
  }

  // Hooks of adjoint_sweep (block_runtime.h) for sample b (set by backward_sample).
  int64_t b = 0;
  acc_t *pW = nullptr, *pb = nullptr;
  double* glam = nullptr;
  SPLINET_HD void load_state(int64_t slot) {
    load(cur, g.states + (slot * p.B + b) * CP);
    ctx.sync();
  }
  SPLINET_HD void save_segment(int64_t j) { copy(seg + j * CP, cur); }  // own elements: no barrier
  SPLINET_HD void load_segment(int64_t j) {
    copy(cur, seg + j * CP);
    ctx.sync();
  }
  SPLINET_HD void replay(int64_t i) { step(i); }
  SPLINET_HD void run_adjoint(int64_t i) { adjoint(i, pW, pb, *glam); }
  SPLINET_HD void add_state_grad(int64_t slot) {
    const scalar_t* gs = g.grad_states + (slot * p.B + b) * CP;
    for (int64_t e = ctx.tid; e < CP; e += ctx.nthreads) Z[e] = Z[e] + static_cast<acc_t>(gs[e]);
    ctx.sync();
  }

  SPLINET_HD void backward_sample(int64_t sample, int64_t block) {
    b = sample;
    pW = g.pW + block * p.n * geo.fw;
    pb = g.pb ? g.pb + block * p.n * geo.C : nullptr;
    glam = g.plam + block * ctx.nthreads + ctx.tid;
    const int64_t Ns = (p.N + p.K - 1) / p.K + 1;
    load(Z, g.grad_states + ((g.last_only ? 0 : Ns - 1) * p.B + b) * CP);
    ctx.sync();
    adjoint_sweep(*this, p, g.last_only);
    if (p.cache_slots) cache.write_back(ctx, pW, pb);
    for (int64_t e = ctx.tid; e < CP; e += ctx.nthreads) g.grad_x[b * CP + e] = static_cast<scalar_t>(Z[e]);
    ctx.sync();
  }
};

// The program's entry points, launched as block_kernel<Body> (cuda_exec.cuh): block `block`
// of `grid` walks the samples block, block + grid, ...
template <typename scalar_t, typename acc_t, Act ACT>
struct ConvFwdBody {
  using acc_type = acc_t;
  ConvSmallArgs<scalar_t, acc_t> args;
  SPLINET_HD void operator()(int64_t block, int64_t grid, BlockCtx ctx, acc_t* smem) const {
    ConvSample<scalar_t, acc_t, ACT> prog(args, ctx, smem, block);
    for (int64_t b = block; b < args.p.B; b += grid) prog.forward_sample(b);
  }
};

template <typename scalar_t, typename acc_t, Act ACT>
struct ConvBwdBody {
  using acc_type = acc_t;
  ConvSmallArgs<scalar_t, acc_t> args;
  SPLINET_HD void operator()(int64_t block, int64_t grid, BlockCtx ctx, acc_t* smem) const {
    ConvSample<scalar_t, acc_t, ACT> prog(args, ctx, smem, block);
    for (int64_t b = block; b < args.p.B; b += grid) prog.backward_sample(b, block);
  }
};

}  // namespace splinet
