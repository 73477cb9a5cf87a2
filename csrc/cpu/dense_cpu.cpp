// Fused CPU kernels of the dense SpliNet layer: the whole N-step forward in one call and
// the whole adjoint sweep (paper eqs. 17-23) in one call. Schemas: csrc/splinet_ops.cpp.
//
// Legend: B batch, R rows of one chunk of the batch, m width, n = L + d coefficients,
// d degree, N steps, S stages of the scheme, K checkpoint interval.
//
// The batch is split into a fixed number of row chunks, each walked through all N steps
// by one thread with its state in a small working set. At every stage the d + 1 nonzero
// coefficient matrices are blended into one m x m buffer (eq. 14; no per-step weight
// tensor is ever built) and applied with raw loops (small m) or a GEMM (m >= 16; one
// chunk per thread, each GEMM on its thread; from m = 128 the whole batch is one chunk whose
// GEMMs and element-wise loops use every thread). The adjoint walks back from step N - 1 to 0,
// recomputing each step's stages from the saved state, and accumulates eq. 23 into the
// d + 1 coefficient slots; per-chunk partial gradients are summed in chunk order, so the
// gradients are bitwise reproducible for a given thread count.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../common/activations.h"
#include "../common/checks.h"
#include "../common/layer_config.h"
#include "matmul.h"
#include "memory.h"
#include "models.h"
#include "parallel.h"
#include "spline_blend.h"
#include "sweep.h"
#include "vec_activations.h"

namespace splinet {
namespace {

using namespace cpu;

struct DenseArgs : SplineSteps {
  int64_t B, m;
  Tableau tab;
  Variant variant;
  Act act;
  double gamma;
  bool has_bias, use_gemm;
  bool soa;  // chunks in the transposed layout (see DenseChunk)
};

// Widths from which the batch is one chunk whose GEMMs ATen threads over every core (and
// whose element-wise loops go through parallel_elements): one blend, one eq. 23 scatter and
// no partial gradients (n m^2 each) per step, instead of one per thread. Below it, one chunk
// per thread with a single-threaded GEMM each wins (small products).
constexpr int64_t kThreadedGemmWidth = 128;

// The batch from which the unrolled widths take transposed chunks, and the most rows of
// one. Measured fwd+bwd on 2 threads (bench --sizes cpu): peaks_n100 (m = 5, B = 1000, 2
// chunks) 15% faster than row-major chunks, sin (m = 4, B = 256) the same, sin_b20 (10 rows
// a chunk) 6% slower; Peaks in 8 chunks of 125 rows 12% slower than in 2 (the per-chunk
// blend of every stage).
constexpr int64_t kSoAMinBatch = 256;
constexpr int64_t kSoAMaxRows = 512;

// The batch's chunks. Transposed chunks keep their values (the kept stage values included)
// in their own layout, so their bounds depend on B alone, never on the thread count, which
// may differ between the forward and the backward: max(2, ceil(B / kSoAMaxRows)) chunks
// (so a machine with more cores than that runs these small layers on fewer threads).
std::vector<int64_t> dense_bounds(const DenseArgs& a) {
  if (a.soa) {
    const int64_t chunks = std::max<int64_t>(2, (a.B + kSoAMaxRows - 1) / kSoAMaxRows);
    std::vector<int64_t> bounds(chunks + 1);
    for (int64_t c = 0; c <= chunks; ++c) bounds[c] = a.B * c / chunks;
    return bounds;
  }
  return chunk_bounds(a.B, a.m, a.n * a.m * a.m, a.use_gemm, a.m >= kThreadedGemmWidth);
}

// One chunk of rows [r0, r0 + R) walked through the trajectory and back. With a.soa (an
// unrolled width and a batch of at least kSoAMinBatch rows) the chunk keeps its arrays
// transposed (MatOps' SoA layout): states, stage values and the kept values of its rows are
// m rows of R values.
template <typename T, int M>
class DenseChunk {
 public:
  DenseChunk(const DenseArgs& a, const T* weight, const T* bias, int64_t R)
      : a_(a), weight_(weight), bias_(bias), R_(R), ops_{R, a.m, a.use_gemm, a.soa} {
    const int64_t S = a.tab.stages, Rm = R * a.m, mm = a.m * a.m;
    W_.resize(S * mm);
    WT_.resize(a.use_gemm || ops_.soa ? 0 : S * mm);
    b_.resize(S * a.m, T(0));
    Ks_.resize(S * Rm);
    Xs_.resize(S * Rm);
    As_.resize(S * Rm);
    Ys_.resize(S * Rm);
    tmp_.resize(Rm);
    mscratch_.resize(mm);
    Xbar_.resize(S * Rm);
    kbar_.resize(Rm);
    G_.resize(Rm);
    dW_.resize(mm);
    k_.resize(S);
    Wp_.resize(S);
    X_.resize(S);
    A_.resize(S);
    Y_.resize(S);
    w_.resize(S * (a.d + 1));
  }

  // The kept values of every step and stage, (N, S, B, m), of which this chunk owns rows
  // r0 .. r0 + R (R m values in the chunk's own layout, transposed in an SoA chunk: only
  // this kernel reads them back, with the same chunks, which then depend on B alone):
  // step() records them there (replay = false, the forward) or reads them instead of
  // running its forward product (replay = true, the backward), so that fwd+bwd
  // takes 3 products a step instead of 4. What is kept is act(a_s) when the activation's
  // derivative is a function of its output (kept_is_output), so that the replay neither
  // copies nor recomputes the activation, and else the pre-activation a_s. The replayed
  // values are those the forward computed, so the gradients equal the recomputing
  // backward's bit for bit.
  //
  // With `blended` (N, S, kept_weight_stride(m)) the blended weight of every step and stage is
  // kept as well: the forward writes it there (blends straight into it when this chunk is
  // the whole batch, else chunk 0 copies its own), and the backward reads it instead of
  // blending again (a pass over d + 2 m x m matrices a stage: at m = 1024 about a third of
  // one GEMM's time).
  void set_kept(T* preact, T* blended, bool replay, int64_t r0) {
    preact_ = preact;
    blended_ = blended;
    replay_ = replay;
    row0_ = r0;
  }

  // Per-sample gradients (the model-dim ops with the input alone mapped, one row a model):
  // every row of the chunk accumulates its own eq. 23 contributions into gW (rows, n, m, m),
  // gb (rows, n, m; null without bias) and glam (rows), pointing at the chunk's first row,
  // instead of step_adjoint's arguments (which it then leaves alone). Each row's sums run
  // in the order of a one-row call of the layer.
  void set_per_row_grads(T* gW, T* gb, double* glam) {
    row_gW_ = gW;
    row_gb_ = gb;
    row_glam_ = glam;
    row_sum_.resize(a_.m);
  }

  // R rows of a (B, m) tensor to and from the chunk's layout (MatOps::to_chunk etc.).
  void to_chunk(const T* rows, T* chunk) const { ops_.to_chunk(rows, chunk); }
  void from_chunk(const T* chunk, T* rows) const { ops_.from_chunk(chunk, rows); }
  void add_rows(const T* rows, T* chunk) const { ops_.add_rows(rows, chunk); }

  // The adjoint's replay of a step needs its stages only: chunk_adjoint_sweep passes no x_out.
  static constexpr bool kReplayNeedsOutput = false;

  // x_out = one step of the scheme from x_in (step i), or only its stages when x_out is
  // null. Keeps the stage inputs X_s,
  // pre-activations a_s and activations act(a_s) of this step for the adjoint (in Xs_/As_/Ys_,
  // or the activations in the kept tensor: set_kept).
  void step(int64_t i, const T* x_in, T* x_out) {
    const int64_t S = a_.tab.stages, Rm = R_ * a_.m, m = a_.m;
    const T h = T(a_.h), lam = T(a_.lam);
    for (int64_t s = 0; s < S; ++s) {
      blend(i, s);
      // Stage input X_s = x_i + h sum_j a_sj K_j; the first stage's is x_i itself.
      const T* X = x_in;
      if (s > 0) {
        T* Xw = &Xs_[s * Rm];
        parallel_elements(Rm, [&](int64_t b, int64_t end) {
          std::copy(x_in + b, x_in + end, Xw + b);
          for (int64_t j = 0; j < s; ++j) {
            const T c = h * T(a_.tab.a[s][j]);
            if (c == T(0)) continue;
            const T* Kj = &Ks_[j * Rm];
            for (int64_t e = b; e < end; ++e) Xw[e] += c * Kj[e];
          }
        });
        X = Xw;
      }
      X_[s] = X;
      T* Ap = &As_[s * Rm];
      const T* W = Wp_[s];
      T* saved = preact_ ? preact_ + ((i * S + s) * a_.B + row0_) * m : nullptr;
      const bool replay = saved && replay_;
      // Keeping act(a): the stage's activations live in the kept tensor itself (written
      // there by the forward, read there by the replay), and stand in for a in act'(a).
      const bool keep_y = saved && kept_is_output(a_.act);
      T* Y = keep_y ? saved : &Ys_[s * Rm];
      A_[s] = keep_y ? Y : Ap;
      Y_[s] = Y;
      if (!replay) ops_.nt(X, W, WT(s), Ap);  // a = X W^T (+ b below)
      // The rest of the stage in one pass over row ranges: the bias, the kept values
      // (recorded, or read back instead of the product), act(a), K = lam act(a).
      T* Ks = &Ks_[s * Rm];
      const T* bs = &b_[s * m];
      const bool sym = a_.variant == Variant::Symmetric;
      parallel_rows(R_, m, [&](int64_t r0, int64_t r1) {
        const int64_t e0 = r0 * m, e1 = r1 * m;
        if (replay) {
          if (!keep_y) {
            std::copy(saved + e0, saved + e1, Ap + e0);
            act_forward_part(a_.act, Ap + e0, Y + e0, e1 - e0);
          }
        } else {
          if (a_.has_bias) ops_.add_bias(Ap, bs, e0, e1);
          if (saved && !keep_y) std::copy(Ap + e0, Ap + e1, saved + e0);
          act_forward_part(a_.act, Ap + e0, Y + e0, e1 - e0);
        }
        if (sym) return;
        if (s + 1 < S) {
          for (int64_t e = e0; e < e1; ++e) Ks[e] = lam * Y[e];
        } else if (x_out) {  // the last stage: x_out in this pass too, its own K straight from act(a)
          update(x_in, x_out, e0, e1, S - 1, Y);
        }
      });
      if (sym) {  // f = -act(a) W
        ops_.nn(Y, W, tmp_.data());
        parallel_elements(Rm, [&](int64_t b, int64_t end) {
          for (int64_t e = b; e < end; ++e) Ks[e] = -lam * tmp_[e];
        });
      }
    }
    if (a_.variant == Variant::Symmetric && x_out)
      parallel_elements(Rm, [&](int64_t b, int64_t end) { update(x_in, x_out, b, end, S); });
  }

  // x_out[e] = x_in[e] + sum_{s < stages} h b_s K_s[e] (+ h b_stages lam Ylast[e]) over
  // [e0, e1), added in stage order; the first term reads x_in (no separate copy pass).
  void update(const T* x_in, T* x_out, int64_t e0, int64_t e1, int64_t stages, const T* Ylast = nullptr) const {
    const int64_t Rm = R_ * a_.m;
    const T h = T(a_.h), lam = T(a_.lam);
    const T* src = x_in;
    for (int64_t s = 0; s < stages; ++s) {
      const T c = h * T(a_.tab.b[s]);
      if (c == T(0)) continue;
      const T* Ks = &Ks_[s * Rm];
      for (int64_t e = e0; e < e1; ++e) x_out[e] = src[e] + c * Ks[e];
      src = x_out;
    }
    const T c = Ylast ? h * T(a_.tab.b[stages]) : T(0);
    if (c != T(0)) {
      for (int64_t e = e0; e < e1; ++e) x_out[e] = src[e] + c * (lam * Ylast[e]);
      src = x_out;
    }
    if (src == x_in) std::copy(x_in + e0, x_in + e1, x_out + e0);
  }

  // Adjoint of the step just recomputed by step(i, ...): z holds dL/dx_{i+1} on entry and
  // dL/dx_i on exit; eq. 23 contributions go to gW (n, m, m), gb (n, m), glam.
  void step_adjoint(T* z, T* gW, T* gb, double& glam) {
    const int64_t S = a_.tab.stages, Rm = R_ * a_.m;
    const T h = T(a_.h), lam = T(a_.lam);
    for (int64_t s = S - 1; s >= 0; --s) {
      // kbar_s = dL/dK_s = h b_s z + h sum_{q > s} a_qs Xbar_q; then G = lam act'(a) V with
      // V = dL/d(lam act(a)): kbar itself (in the same pass), or -kbar W^T for f = -act(a) W.
      const T cb = h * T(a_.tab.b[s]);
      const T* W = Wp_[s];
      const T* Ap = A_[s];
      const T* Y = Y_[s];
      const bool sym = a_.variant == Variant::Symmetric;
      parallel_elements(Rm, [&](int64_t b, int64_t end) {
        for (int64_t e = b; e < end; ++e) kbar_[e] = cb * z[e];
        for (int64_t q = s + 1; q < S; ++q) {
          const T c = h * T(a_.tab.a[q][s]);
          if (c == T(0)) continue;
          const T* Xq = &Xbar_[q * Rm];
          for (int64_t e = b; e < end; ++e) kbar_[e] += c * Xq[e];
        }
        if (!sym) act_backward_part(a_.act, Ap + b, Y + b, kbar_.data() + b, lam, G_.data() + b, end - b);
      });
      const T* V = kbar_.data();
      if (sym) {
        ops_.nt(kbar_.data(), W, WT(s), tmp_.data());
        parallel_elements(Rm, [&](int64_t b, int64_t end) {
          for (int64_t e = b; e < end; ++e) tmp_[e] = -tmp_[e];
        });
        V = tmp_.data();
        act_backward(a_.act, Ap, Y, V, lam, G_.data(), Rm);
      }
      if (row_gW_) {  // per-row gradients (set_per_row_grads)
        ops_.nn(G_.data(), W, &Xbar_[s * Rm]);
        scatter_rows(s, Y, V);
        continue;
      }
      glam += dot_double(Y, V, Rm);  // dL/dlam += act(a_s) . V
      // dL/dX_s = G W (G already carries lam).
      ops_.nn(G_.data(), W, &Xbar_[s * Rm]);
      // dL/dW_s = G^T X_s (- lam act(a)^T kbar for the symmetric variant).
      ops_.tn(G_.data(), X_[s], dW_.data());
      if (a_.variant == Variant::Symmetric) ops_.tn(Y, kbar_.data(), mscratch_.data());
      scatter(s, gW, gb);
    }
    parallel_elements(Rm, [&](int64_t b, int64_t end) {
      for (int64_t s = 0; s < S; ++s) {
        const T* Xq = &Xbar_[s * Rm];
        for (int64_t e = b; e < end; ++e) z[e] += Xq[e];
      }
    });
  }

 private:
  const T* WT(int64_t s) const { return a_.use_gemm ? nullptr : &WT_[s * a_.m * a_.m]; }

  // W_s, b_s = sum_r b_r(u) * coefficient[k + r] at stage time t_i + c_s h (eq. 14).
  void blend(int64_t i, int64_t s) {
    const int64_t m = a_.m, mm = m * m, d = a_.d;
    T* w = &w_[s * (d + 1)];
    const int64_t k = basis_weights(i, a_.tab.c[s], a_.L, a_.N, d, w);
    k_[s] = k;
    if (a_.has_bias) blend_coefficients(&b_[s * m], bias_ + k * m, m, w, d, 0, m);
    T* W = &W_[s * mm];
    T* kept = blended_ ? blended_ + (i * a_.tab.stages + s) * kept_weight_stride(m, sizeof(T)) : nullptr;
    const bool whole_batch = R_ == a_.B;
    if (kept && replay_) {  // the forward's blend, read back
      Wp_[s] = kept;
      transpose_for_loops(s);
      return;
    }
    if (kept && whole_batch) W = kept;
    Wp_[s] = W;
    parallel_elements(mm, [&](int64_t b, int64_t end) { blend_coefficients(W, weight_ + k * mm, mm, w, d, b, end); });
    if (a_.variant == Variant::Antisymmetric) {  // A = W - W^T - gamma I
      minus_transpose(W);
      for (int64_t j = 0; j < m; ++j) W[j * m + j] -= T(a_.gamma);
    }
    if (kept && !whole_batch && row0_ == 0) std::copy(W, W + mm, kept);
    transpose_for_loops(s);
  }

  // X = X - X^T for an m x m matrix (through mscratch_).
  void minus_transpose(T* X) {
    const int64_t m = a_.m;
    std::copy(X, X + m * m, mscratch_.begin());
    parallel_rows(m, m, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t q = 0; q < m; ++q) X[j * m + q] = mscratch_[j * m + q] - mscratch_[q * m + j];
    });
  }

  // W_s^T for the raw loops of run-time widths (MatOps without GEMM, row-major).
  void transpose_for_loops(int64_t s) {
    if (a_.use_gemm || ops_.soa) return;
    transpose_square(Wp_[s], a_.m, &WT_[s * a_.m * a_.m]);
  }

  // Eq. 23: the stage's dL/dW and dL/db go to the d + 1 coefficient slots k .. k + d
  // (dL/db = the column sums of G, or `bias_grad` where given).
  void scatter(int64_t s, T* gW, T* gb, const T* bias_grad = nullptr) {
    const int64_t m = a_.m, mm = m * m, d = a_.d, k = k_[s];
    if (a_.variant == Variant::Symmetric) {  // mscratch_ = act(a)^T kbar
      const T lam = T(a_.lam);
      parallel_elements(mm, [&](int64_t b, int64_t end) {
        for (int64_t e = b; e < end; ++e) dW_[e] -= lam * mscratch_[e];
      });
    } else if (a_.variant == Variant::Antisymmetric) {  // dW = dA - dA^T
      minus_transpose(dW_.data());
    }
    const T* w = &w_[s * (d + 1)];
    parallel_elements(mm, [&](int64_t b, int64_t end) {
      scatter_coefficients(gW + k * mm, mm, dW_.data(), w, d, b, end);
    });
    if (a_.has_bias) {
      if (!bias_grad) {
        ops_.colsum(G_.data(), mscratch_.data());
        bias_grad = mscratch_.data();
      }
      scatter_coefficients(gb + k * m, m, bias_grad, w, d, 0, m);
    }
  }

  // Element (r, j) of an R x m array in the chunk's layout.
  T at(const T* A, int64_t r, int64_t j) const { return ops_.soa ? A[j * R_ + r] : A[r * a_.m + j]; }

  // out (m x m) = A(r, :)^T B(r, :), one row's G^T X as MatOps::tn adds it for a one-row chunk.
  void row_outer(const T* A, const T* Bm, int64_t r, T* out) const {
    const int64_t m = a_.m;
    for (int64_t j = 0; j < m; ++j)
      for (int64_t k = 0; k < m; ++k) out[j * m + k] = T(0) + at(A, r, j) * at(Bm, r, k);
  }

  // The stage's eq. 23 contributions of each row to its own gradients (set_per_row_grads):
  // dL/dlam in dot_double's order, dL/dW = g^T x, dL/db = g.
  void scatter_rows(int64_t s, const T* Y, const T* V) {
    const int64_t m = a_.m, n = a_.n;
    for (int64_t r = 0; r < R_; ++r) {
      double acc[4] = {0.0, 0.0, 0.0, 0.0};
      int64_t e = 0;
      for (; e + 4 <= m; e += 4)
        for (int q = 0; q < 4; ++q) acc[q] += double(at(Y, r, e + q)) * double(at(V, r, e + q));
      for (; e < m; ++e) acc[0] += double(at(Y, r, e)) * double(at(V, r, e));
      row_glam_[r] += (acc[0] + acc[1]) + (acc[2] + acc[3]);
      row_outer(G_.data(), X_[s], r, dW_.data());
      if (a_.variant == Variant::Symmetric) row_outer(Y, kbar_.data(), r, mscratch_.data());
      for (int64_t j = 0; j < m; ++j) row_sum_[j] = T(0) + at(G_.data(), r, j);
      scatter(s, row_gW_ + r * n * m * m, row_gb_ ? row_gb_ + r * n * m : nullptr, row_sum_.data());
    }
  }

  const DenseArgs& a_;
  const T* weight_;
  const T* bias_;
  int64_t R_;
  MatOps<T, M> ops_;
  Scratch<T> W_, WT_, b_, Ks_, Xs_, As_, Ys_, tmp_, mscratch_, w_, Xbar_, kbar_, G_, dW_;
  std::vector<int64_t> k_;
  // Stage inputs of the last step() (x_in for the first stage, else Xs_), read by its
  // adjoint: x_in must outlive step_adjoint (the sweep's segment buffer does).
  std::vector<const T*> X_;
  // The pre-activations (or, keeping act(a), the activations again) and activations of
  // each stage of the last step(): As_/Ys_, or rows of the kept tensor.
  std::vector<const T*> A_, Y_;
  // Each stage's blended weight: W_, or a matrix of the kept `blended` tensor.
  std::vector<const T*> Wp_;
  T* row_gW_ = nullptr;  // per-row gradients (set_per_row_grads)
  T* row_gb_ = nullptr;
  double* row_glam_ = nullptr;
  Scratch<T> row_sum_;
  T* preact_ = nullptr;
  T* blended_ = nullptr;
  bool replay_ = false;
  int64_t row0_ = 0;
};

DenseArgs make_args(const at::Tensor& x, const at::Tensor& weight, bool has_bias, const at::Tensor& scale,
                    int64_t steps, int64_t degree, const std::string& activation, const std::string& scheme,
                    const std::string& variant, double gamma, int64_t checkpoint) {
  DenseArgs a;
  static_cast<SplineSteps&>(a) = spline_steps(weight.size(0), degree, steps, checkpoint, scale.item<double>());
  a.B = x.size(0);
  a.m = x.size(1);
  a.tab = parse_scheme(scheme);
  a.variant = parse_variant(variant);
  a.gamma = gamma;
  a.has_bias = has_bias;
  a.use_gemm = a.m >= kGemmMinWidth;
  a.soa = !a.use_gemm && unrolled_width(a.m) && a.B >= kSoAMinBatch;
  a.act = parse_activation(activation);
  return a;
}

// The forward sweep into `states` (num_saved, B, m) and, when defined, the kept stage values
// `preact` (N, S, B, m) and blended weights `blended` (N, S, kept_weight_stride(m)) for a
// backward without the forward product or the blend (checkpoint = 1 only).
void dense_forward(const DenseArgs& a, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& states, const at::Tensor& preact, const at::Tensor& blended) {
  if (a.B == 0) return;
  const auto bounds = dense_bounds(a);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spline_dense_fwd_cpu", [&] {
    dispatch_width(a.use_gemm ? 0 : a.m, [&](auto width) {
      constexpr int M = decltype(width)::value;
      const scalar_t* W = weight.const_data_ptr<scalar_t>();
      const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* pre = preact.defined() ? preact.data_ptr<scalar_t>() : nullptr;
      scalar_t* wk = blended.defined() ? blended.data_ptr<scalar_t>() : nullptr;
      forward_chunks(bounds, a.N, a.K, a.B, a.m, x.const_data_ptr<scalar_t>(), states.data_ptr<scalar_t>(),
                     [&](int64_t r0, int64_t R) {
                       DenseChunk<scalar_t, M> chunk(a, W, b, R);
                       chunk.set_kept(pre, wk, false, r0);
                       return chunk;
                     });
    });
  });
}

// The adjoint sweep (paper eqs. 17-23) from the saved states and, when defined, the
// forward's kept stage values and blended weights (then no step replays its forward
// product or blends its weight).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_backward(
    const DenseArgs& a, const at::Tensor& grad_states, bool last_only, const at::Tensor& states,
    const at::Tensor& preact, const at::Tensor& blended, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& scale) {
  at::Tensor grad_x = at::empty({a.B, a.m}, states.options());
  at::Tensor grad_w = at::zeros_like(weight);
  at::Tensor grad_b = bias.defined() ? at::zeros_like(bias) : at::empty({0}, states.options());
  double glam = 0.0;
  if (a.B > 0) {
    const auto bounds = dense_bounds(a);
    AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "spline_dense_bwd_cpu", [&] {
      dispatch_width(a.use_gemm ? 0 : a.m, [&](auto width) {
        constexpr int M = decltype(width)::value;
        const scalar_t* W = weight.const_data_ptr<scalar_t>();
        const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
        // Only read (replay mode), never written.
        scalar_t* pre = preact.defined() ? const_cast<scalar_t*>(preact.const_data_ptr<scalar_t>()) : nullptr;
        scalar_t* wk = blended.defined() ? const_cast<scalar_t*>(blended.const_data_ptr<scalar_t>()) : nullptr;
        glam = backward_chunks(bounds, a.N, a.K, a.B, a.m, last_only, states.const_data_ptr<scalar_t>(),
                               grad_states.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                               grad_w.data_ptr<scalar_t>(), a.n * a.m * a.m,
                               a.has_bias ? grad_b.data_ptr<scalar_t>() : nullptr, a.n * a.m,
                               [&](int64_t r0, int64_t R) {
                                 DenseChunk<scalar_t, M> chunk(a, W, b, R);
                                 chunk.set_kept(pre, wk, true, r0);
                                 return chunk;
                               });
      });
    });
  }
  at::Tensor grad_scale = at::full(scale.sizes(), glam, scale.options());
  return {grad_x, grad_w, grad_b, grad_scale};
}

at::Tensor spline_dense_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale, int64_t steps,
                                int64_t degree, c10::string_view activation, c10::string_view scheme,
                                c10::string_view variant, double gamma, int64_t checkpoint) {
  check_dense_args("spline_dense_fwd (cpu)", x_in, weight_in, bias_in, scale, steps, degree, checkpoint, false);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const DenseArgs a = make_args(x, weight, bias.defined(), scale, steps, degree, std::string(activation),
                                std::string(scheme), std::string(variant), gamma, checkpoint);
  at::Tensor states = at::empty({num_saved_states(a.N, a.K), a.B, a.m}, x.options());
  dense_forward(a, x, weight, bias, states, at::Tensor(), at::Tensor());
  return states;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spline_dense_bwd_cpu(
    const at::Tensor& grad_states_in, const at::Tensor& states_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale, int64_t steps, int64_t degree,
    c10::string_view activation, c10::string_view scheme, c10::string_view variant, double gamma,
    int64_t checkpoint) {
  TORCH_CHECK_VALUE(states_in.dim() == 3, "spline_dense_bwd: states must have shape (saved, B, m), got ",
                    states_in.sizes());
  check_dense_args("spline_dense_bwd (cpu)", states_in[0], weight_in, bias_in, scale, steps, degree, checkpoint, false);
  TORCH_CHECK_VALUE(states_in.size(0) == num_saved_states(steps, checkpoint),
                    "spline_dense_bwd: states holds ", states_in.size(0), " states, expected ",
                    num_saved_states(steps, checkpoint), " for steps = ", steps, ", checkpoint = ", checkpoint);
  const bool last_only = check_state_grad("spline_dense_bwd", grad_states_in, states_in);
  const at::Tensor states = states_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor grad_states = grad_states_in.to(states.scalar_type()).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const DenseArgs a = make_args(states[0], weight, bias.defined(), scale, steps, degree, std::string(activation),
                                std::string(scheme), std::string(variant), gamma, checkpoint);
  return dense_backward(a, grad_states, last_only, states, at::Tensor(), at::Tensor(), weight, bias, scale);
}

// Forward that also returns the kept values of every step and stage, (N, S, B, m), and their
// blended weights, (N, S, kept_weight_stride(m)): all N + 1 states are kept (checkpoint = 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor> spline_dense_fwd_saved_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
    const at::Tensor& scale, int64_t steps, int64_t degree, c10::string_view activation, c10::string_view scheme,
    c10::string_view variant, double gamma) {
  check_dense_args("spline_dense_fwd_saved (cpu)", x_in, weight_in, bias_in, scale, steps, degree, 1, false);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const DenseArgs a = make_args(x, weight, bias.defined(), scale, steps, degree, std::string(activation),
                                std::string(scheme), std::string(variant), gamma, 1);
  at::Tensor states = kept_empty({a.N + 1, a.B, a.m}, x.options());
  at::Tensor preact = kept_empty({a.N, a.tab.stages, a.B, a.m}, x.options());
  at::Tensor blended = kept_empty({a.N, a.tab.stages, kept_weight_stride(a.m, x.element_size())}, x.options());
  blended.narrow(2, a.m * a.m, blended.size(2) - a.m * a.m).zero_();  // the padding: defined values
  dense_forward(a, x, weight, bias, states, preact, blended);
  return {states, preact, blended};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spline_dense_bwd_saved_cpu(
    const at::Tensor& grad_states_in, const at::Tensor& states_in, const at::Tensor& preact_in,
    const at::Tensor& blended_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
    const at::Tensor& scale, int64_t steps, int64_t degree, c10::string_view activation, c10::string_view scheme,
    c10::string_view variant, double gamma) {
  TORCH_CHECK_VALUE(states_in.dim() == 3, "spline_dense_bwd_saved: states must have shape (steps + 1, B, m), got ",
                    states_in.sizes());
  check_dense_args("spline_dense_bwd_saved (cpu)", states_in[0], weight_in, bias_in, scale, steps, degree, 1, false);
  TORCH_CHECK_VALUE(states_in.size(0) == steps + 1, "spline_dense_bwd_saved: states holds ", states_in.size(0),
                    " states, expected steps + 1 = ", steps + 1);
  const bool last_only = check_state_grad("spline_dense_bwd_saved", grad_states_in, states_in);
  const at::Tensor states = states_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor grad_states = grad_states_in.to(states.scalar_type()).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const DenseArgs a = make_args(states[0], weight, bias.defined(), scale, steps, degree, std::string(activation),
                                std::string(scheme), std::string(variant), gamma, 1);
  const char* op = "spline_dense_bwd_saved";
  check_kept_tensor(op, "preact", preact_in, {a.N, a.tab.stages, a.B, a.m}, "(steps, stages, B, m)", states);
  check_kept_tensor(op, "blended", blended_in, {a.N, a.tab.stages, kept_weight_stride(a.m, states.element_size())},
                    "(steps, stages, padded m * m)", states);
  return dense_backward(a, grad_states, last_only, states, preact_in.contiguous(), blended_in.contiguous(), weight,
                        bias, scale);
}

}  // namespace

// --- Hooks of the model-dim ops (csrc/cpu/dense_models_cpu.cpp; declared in models.h) ------
// Every model runs the chunks of its own spline_dense_fwd / _bwd call, with its own scale.
namespace cpu {
namespace {

std::vector<DenseArgs> models_args(const ModelsCall& c, const at::Tensor& one_state) {
  const DenseArgs a = make_args(one_state, c.weight[0], c.bias.defined(), at::scalar_tensor(c.lam[0], at::kDouble),
                                c.steps, c.degree, c.activation, c.scheme, c.variant, c.gamma, c.checkpoint);
  std::vector<DenseArgs> args(c.M, a);
  for (int64_t mi = 0; mi < c.M; ++mi) args[mi].lam = c.lam[mi];
  return args;
}

// A layer whose one chunk threads its own GEMMs (dense_bounds) runs model after model.
bool flatten_models(const DenseArgs& a) { return a.m < kThreadedGemmWidth; }

// Per-sample gradients' shape (one row a model, the weights shared) at a width of the raw
// loops: the rows run as one batch (backward_rows), where one-row chunks would be all
// overhead (a blend, a scatter and their loops per row and step).
bool per_row(const ModelsCall& c, int64_t models_of_rows, int64_t B, int64_t m) {
  return c.shared_params && c.M > 1 && models_of_rows == c.M && B == 1 && m < kGemmMinWidth;
}

}  // namespace

void dense_models_forward(const ModelsCall& c, const at::Tensor& states) {
  const auto args = models_args(c, c.x[0]);
  const DenseArgs& a = args[0];
  if (a.B == 0) return;
  if (per_row(c, c.x.size(0), a.B, a.m)) {  // the M rows as one batch of the single-model kernel
    const at::Tensor x = c.x.view({c.M, a.m});
    const DenseArgs f = models_args(c, x)[0];
    at::Tensor folded = at::empty({num_saved_states(f.N, f.K), c.M, a.m}, x.options());
    dense_forward(f, x, c.weight[0], c.bias.defined() ? c.bias[0] : at::Tensor(), folded, at::Tensor(), at::Tensor());
    states.copy_(folded.unsqueeze(2).transpose(0, 1));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "spline_dense_fwd_models_cpu", [&] {
    dispatch_width(a.use_gemm ? 0 : a.m, [&](auto width) {
      constexpr int M = decltype(width)::value;
      const scalar_t* W = c.weight.const_data_ptr<scalar_t>();
      const scalar_t* b = c.bias.defined() ? c.bias.const_data_ptr<scalar_t>() : nullptr;
      const int64_t ws = ModelsCall::stride(c.weight), bs = b ? ModelsCall::stride(c.bias) : 0;
      forward_models(dense_bounds(a), c.M, flatten_models(a), a.N, a.K, a.B, a.m, c.x.const_data_ptr<scalar_t>(),
                     ModelsCall::stride(c.x), states.data_ptr<scalar_t>(), [&](int64_t mi, int64_t, int64_t R) {
                       return DenseChunk<scalar_t, M>(args[mi], W + mi * ws, b ? b + mi * bs : nullptr, R);
                     });
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<double>> dense_models_backward(
    const ModelsCall& c, const at::Tensor& grad_states, bool last_only, const at::Tensor& states) {
  const auto args = models_args(c, states[0][0]);
  const DenseArgs& a = args[0];
  at::Tensor grad_x = at::empty({c.M, a.B, a.m}, states.options());
  at::Tensor grad_w = at::zeros({c.M, a.n, a.m, a.m}, states.options());
  at::Tensor grad_b =
      c.bias.defined() ? at::zeros({c.M, a.n, a.m}, states.options()) : at::empty({0}, states.options());
  std::vector<double> glam(c.M, 0.0);
  if (a.B == 0) return {grad_x, grad_w, grad_b, glam};
  if (per_row(c, states.size(0), a.B, a.m)) {  // the M rows as one batch, per-row gradients
    const int64_t Ns = states.size(1), m = a.m;
    const at::Tensor st = states.view({c.M, Ns, m}).transpose(0, 1).contiguous();
    const at::Tensor gs =
        last_only ? grad_states.expand({c.M, 1, m}).reshape({c.M, m}).contiguous()
                  : grad_states.expand({c.M, Ns, 1, m}).reshape({c.M, Ns, m}).transpose(0, 1).contiguous();
    const DenseArgs f = models_args(c, st[0])[0];
    AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "spline_dense_bwd_models_cpu", [&] {
      dispatch_width(f.m, [&](auto width) {
        constexpr int M = decltype(width)::value;
        const scalar_t* W = c.weight.const_data_ptr<scalar_t>();
        const scalar_t* b = c.bias.defined() ? c.bias.const_data_ptr<scalar_t>() : nullptr;
        backward_rows(dense_bounds(f), f.N, f.K, c.M, m, last_only, st.const_data_ptr<scalar_t>(),
                      gs.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>(),
                      f.n * m * m, b ? grad_b.data_ptr<scalar_t>() : nullptr, f.n * m, glam.data(),
                      [&](int64_t, int64_t R) { return DenseChunk<scalar_t, M>(f, W, b, R); });
      });
    });
    return {grad_x, grad_w, grad_b, glam};
  }
  AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "spline_dense_bwd_models_cpu", [&] {
    dispatch_width(a.use_gemm ? 0 : a.m, [&](auto width) {
      constexpr int M = decltype(width)::value;
      const scalar_t* W = c.weight.const_data_ptr<scalar_t>();
      const scalar_t* b = c.bias.defined() ? c.bias.const_data_ptr<scalar_t>() : nullptr;
      const int64_t ws = ModelsCall::stride(c.weight), bs = b ? ModelsCall::stride(c.bias) : 0;
      glam = backward_models(
          dense_bounds(a), c.M, flatten_models(a), a.N, a.K, a.B, a.m, last_only, states.const_data_ptr<scalar_t>(),
          grad_states.const_data_ptr<scalar_t>(), {ModelsCall::stride(states), ModelsCall::stride(grad_states)},
          grad_x.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>(), a.n * a.m * a.m,
          b ? grad_b.data_ptr<scalar_t>() : nullptr, a.n * a.m, [&](int64_t mi, int64_t, int64_t R) {
            return DenseChunk<scalar_t, M>(args[mi], W + mi * ws, b ? b + mi * bs : nullptr, R);
          });
    });
  });
  return {grad_x, grad_w, grad_b, glam};
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(splinet_cuda, CPU, m) {
  m.impl("spline_dense_fwd", &spline_dense_fwd_cpu);
  m.impl("spline_dense_bwd", &spline_dense_bwd_cpu);
  m.impl("spline_dense_fwd_saved", &spline_dense_fwd_saved_cpu);
  m.impl("spline_dense_bwd_saved", &spline_dense_bwd_saved_cpu);
}

}  // namespace splinet
