// Fused CPU kernels of the dense SpliNet layer: the whole N-step forward in one call and
// the whole adjoint sweep (paper eqs. 17-23) in one call. Schemas: csrc/splinet_ops.cpp.
//
// Legend: B batch, R rows of one chunk of the batch, m width, n = L + d coefficients,
// d degree, N steps, S stages of the scheme, K checkpoint interval.
//
// The batch is split into a fixed number of row chunks, each walked through all N steps
// by one thread with its state in a small working set. At every stage the d + 1 nonzero
// coefficient matrices are blended into one m x m buffer (eq. 14; no per-step weight
// tensor is ever built) and applied with raw loops (small m) or ATen's GEMM (large m,
// one chunk, the GEMM threads itself). The adjoint walks back from step N - 1 to 0,
// recomputing each step's stages from the saved state, and accumulates eq. 23 into the
// d + 1 coefficient slots; per-chunk partial gradients are summed in chunk order, so the
// gradients are bitwise reproducible for a given thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/softplus.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "../common/activations.h"
#include "../common/bspline.h"
#include "../common/checks.h"
#include "../common/layer_config.h"

namespace splinet {
namespace {

// Widths from which the products of a chunk go through ATen's GEMM (MKL/oneDNN, one
// thread per chunk) instead of the raw loops below: at B = 4096 the raw loops lost to it
// from m = 16 on (bench --sizes sweep on a 2-core x86 machine).
constexpr int64_t kGemmMinWidth = 16;
// Rows x width of one chunk's working arrays on the raw-loop path, so that they stay in L2
// (the GEMM path takes one chunk per thread: its products want many rows).
constexpr int64_t kChunkElements = 16384;
// Cap on the elements of all per-chunk partial weight gradients (n m^2 each).
constexpr int64_t kPartialElements = int64_t(1) << 27;

struct DenseArgs {
  int64_t B, m, n, d, L, N, K;
  Tableau tab;
  Variant variant;
  Act act;
  double gamma, lam, h;
  bool has_bias, use_gemm;
};

template <typename T>
at::Tensor wrap(const T* p, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Row-major products on a chunk: X (R x m), W (m x m, out x in, and WT = W^T), results
// overwrite `out`. M > 0 is the width as a compile-time constant (small widths, loops
// unrolled), M = 0 reads it at run time. The raw loops are all in axpy form, so they
// vectorise without reassociating sums.
template <typename T, int M>
struct MatOps {
  int64_t R, m_rt;
  bool gemm;

  int64_t m() const { return M > 0 ? M : m_rt; }

  // out = X W^T
  void nt(const T* __restrict__ X, const T* W, const T* __restrict__ WT, T* __restrict__ out) const {
    const int64_t m = this->m();
    if (gemm) {
      at::Tensor o = wrap(out, R, m);
      at::mm_out(o, wrap(X, R, m), wrap(W, m, m).t());
      return;
    }
    for (int64_t r = 0; r < R; ++r) {
      T* o = out + r * m;
      for (int64_t j = 0; j < m; ++j) o[j] = T(0);
      for (int64_t k = 0; k < m; ++k) {
        const T xk = X[r * m + k];
        const T* wt = WT + k * m;
        for (int64_t j = 0; j < m; ++j) o[j] += xk * wt[j];
      }
    }
  }
  // out = G W
  void nn(const T* __restrict__ G, const T* __restrict__ W, T* __restrict__ out) const {
    const int64_t m = this->m();
    if (gemm) {
      at::Tensor o = wrap(out, R, m);
      at::mm_out(o, wrap(G, R, m), wrap(W, m, m));
      return;
    }
    for (int64_t r = 0; r < R; ++r) {
      T* o = out + r * m;
      for (int64_t k = 0; k < m; ++k) o[k] = T(0);
      for (int64_t j = 0; j < m; ++j) {
        const T g = G[r * m + j];
        const T* w = W + j * m;
        for (int64_t k = 0; k < m; ++k) o[k] += g * w[k];
      }
    }
  }
  // out (m x m) = G^T X
  void tn(const T* __restrict__ G, const T* __restrict__ X, T* __restrict__ out) const {
    const int64_t m = this->m();
    if (gemm) {
      at::Tensor o = wrap(out, m, m);
      at::mm_out(o, wrap(G, R, m).t(), wrap(X, R, m));
      return;
    }
    if constexpr (M > 0) {
      // Small widths: the m x m sum stays in registers instead of a store-to-load chain.
      T acc[M * M] = {};
      for (int64_t r = 0; r < R; ++r)
        for (int j = 0; j < M; ++j) {
          const T g = G[r * M + j];
          for (int k = 0; k < M; ++k) acc[j * M + k] += g * X[r * M + k];
        }
      std::copy(acc, acc + M * M, out);
      return;
    }
    std::fill(out, out + m * m, T(0));
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < m; ++j) {
        const T g = G[r * m + j];
        const T* x = X + r * m;
        T* o = out + j * m;
        for (int64_t k = 0; k < m; ++k) o[k] += g * x[k];
      }
  }
  // out (m) = column sums of G
  void colsum(const T* __restrict__ G, T* __restrict__ out) const {
    const int64_t m = this->m();
    if constexpr (M > 0) {
      T acc[M] = {};
      for (int64_t r = 0; r < R; ++r)
        for (int j = 0; j < M; ++j) acc[j] += G[r * M + j];
      std::copy(acc, acc + M, out);
      return;
    }
    std::fill(out, out + m, T(0));
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < m; ++j) out[j] += G[r * m + j];
  }
};

template <typename T>
at::Tensor wrap1d(const T* p, int64_t n) {
  return at::from_blob(const_cast<T*>(p), {n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// float32 tanh in branch-free arithmetic that the compiler vectorises (no call): for the
// short arrays of small widths ATen's per-call overhead outweighs its vectorised kernel.
// |x| < 0.3: the odd Taylor series to x^13 (truncation < 1e-9 relative); otherwise
// 1 - 2 / (e^{2|x|} + 1) with e^y = 2^k e^r, k = round(y / ln 2), Cody-Waite reduction and
// a degree-6 polynomial for e^r, |r| <= ln(2) / 2. Within 3 ulp of torch.tanh.
inline float tanh_poly(float x) {
  const float ax = std::fabs(x), x2 = x * x;
  const float small = x + x * x2 * (-0.333333333f + x2 * (0.133333333f + x2 * (-0.0539682540f +
                      x2 * (0.0218694885f + x2 * (-0.00886323552f + x2 * 0.00359212803f)))));
  const float y = 2.0f * ax < 40.0f ? 2.0f * ax : 40.0f;  // tanh(20) = 1 in float; no libm call
  const int32_t k = static_cast<int32_t>(y * 1.44269504f + 0.5f);
  const float kf = static_cast<float>(k);
  const float r = (y - kf * 0.693145752f) - kf * 1.42860677e-06f;
  const float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666672f + r * (0.0416666679f +
                  r * (0.00833333377f + r * 0.00138888892f)))));
  const int32_t bits = (k + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  const float big = 1.0f - 2.0f / (p * two_k + 1.0f);
  return ax < 0.3f ? small : (x < 0.0f ? -big : big);
}

// y = act(a) over an array. The transcendental activations go through ATen's vectorised
// kernels (the same code as the reference, so the values agree bit for bit), except
// float32 tanh on short arrays (tanh_poly); inside a parallel region ATen runs them on
// the calling thread.
constexpr int64_t kAtenActMinElements = 8192;

template <typename T>
void act_forward(Act act, const T* a, T* y, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (act == Act::Tanh && n < kAtenActMinElements) {
      for (int64_t e = 0; e < n; ++e) y[e] = tanh_poly(a[e]);
      return;
    }
  }
  at::Tensor out = wrap1d(y, n);
  const at::Tensor in = wrap1d(a, n);
  switch (act) {
    case Act::Identity: std::copy(a, a + n, y); break;
    case Act::Relu: for (int64_t e = 0; e < n; ++e) y[e] = Activation<Act::Relu>::f(a[e]); break;
    case Act::Tanh: at::tanh_out(out, in); break;
    case Act::Sigmoid: at::sigmoid_out(out, in); break;
    case Act::Softplus: at::softplus_out(out, in, 1, 20); break;
  }
}

// g = scale * act'(a) * v over an array, act' by PyTorch's backward formulas (from the
// output y where PyTorch uses it; softplus from exp(a)).
template <Act A, typename T>
void act_backward_loop(const T* __restrict__ a, const T* __restrict__ y, const T* __restrict__ v, T scale,
                       T* __restrict__ g, int64_t n) {
  if constexpr (A == Act::Relu) {  // a mask, not a branch: the signs are unpredictable
    for (int64_t e = 0; e < n; ++e) g[e] = scale * v[e] * static_cast<T>(a[e] > T(0));
  } else {
    for (int64_t e = 0; e < n; ++e) g[e] = scale * Activation<A>::df(a[e], y[e]) * v[e];
  }
}

template <typename T>
void act_backward(Act act, const T* a, const T* y, const T* v, T scale, T* g, int64_t n) {
  switch (act) {
    case Act::Identity: act_backward_loop<Act::Identity>(a, y, v, scale, g, n); break;
    case Act::Relu: act_backward_loop<Act::Relu>(a, y, v, scale, g, n); break;
    case Act::Tanh: act_backward_loop<Act::Tanh>(a, y, v, scale, g, n); break;
    case Act::Sigmoid: act_backward_loop<Act::Sigmoid>(a, y, v, scale, g, n); break;
    case Act::Softplus: {
      at::Tensor ez = wrap1d(g, n);
      at::exp_out(ez, wrap1d(a, n));
      for (int64_t e = 0; e < n; ++e) g[e] = scale * v[e] * (a[e] > T(20) ? T(1) : g[e] / (g[e] + T(1)));
      break;
    }
  }
}

// sum_e x[e] y[e] accumulated in double, in four independent chains (a fixed order).
template <typename T>
double dot_double(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t e = 0;
  for (; e + 4 <= n; e += 4)
    for (int q = 0; q < 4; ++q) acc[q] += static_cast<double>(x[e + q]) * static_cast<double>(y[e + q]);
  for (; e < n; ++e) acc[0] += static_cast<double>(x[e]) * static_cast<double>(y[e]);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// One chunk of rows [r0, r0 + R) walked through the trajectory and back.
template <typename T, int M>
class DenseChunk {
 public:
  DenseChunk(const DenseArgs& a, const T* weight, const T* bias, int64_t R)
      : a_(a), weight_(weight), bias_(bias), R_(R), ops_{R, a.m, a.use_gemm} {
    const int64_t S = a.tab.stages, Rm = R * a.m, mm = a.m * a.m;
    W_.resize(S * mm);
    WT_.resize(a.use_gemm ? 0 : S * mm);
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
    w_.resize(S * (a.d + 1));
  }

  // x_out = one step of the scheme from x_in (step i). Keeps the stage inputs X_s,
  // pre-activations a_s and activations act(a_s) of this step in Xs_/As_/Ys_ for the adjoint.
  void step(int64_t i, const T* x_in, T* x_out) {
    const int64_t S = a_.tab.stages, Rm = R_ * a_.m;
    const T h = T(a_.h), lam = T(a_.lam);
    for (int64_t s = 0; s < S; ++s) {
      blend(i, s);
      T* X = &Xs_[s * Rm];
      std::copy(x_in, x_in + Rm, X);
      for (int64_t j = 0; j < s; ++j) {
        const T c = h * T(a_.tab.a[s][j]);
        if (c == T(0)) continue;
        const T* Kj = &Ks_[j * Rm];
        for (int64_t e = 0; e < Rm; ++e) X[e] += c * Kj[e];
      }
      T* Ap = &As_[s * Rm];
      const T* W = &W_[s * a_.m * a_.m];
      ops_.nt(X, W, WT(s), Ap);  // a = X W^T + b
      if (a_.has_bias) {
        const T* bs = &b_[s * a_.m];
        for (int64_t r = 0; r < R_; ++r)
          for (int64_t j = 0; j < a_.m; ++j) Ap[r * a_.m + j] += bs[j];
      }
      T* Y = &Ys_[s * Rm];
      act_forward(a_.act, Ap, Y, Rm);
      T* Ks = &Ks_[s * Rm];
      if (a_.variant == Variant::Symmetric) {  // f = -act(a) W
        ops_.nn(Y, W, tmp_.data());
        for (int64_t e = 0; e < Rm; ++e) Ks[e] = -lam * tmp_[e];
      } else {
        for (int64_t e = 0; e < Rm; ++e) Ks[e] = lam * Y[e];
      }
    }
    std::copy(x_in, x_in + Rm, x_out);
    for (int64_t s = 0; s < S; ++s) {
      const T c = h * T(a_.tab.b[s]);
      if (c == T(0)) continue;
      const T* Ks = &Ks_[s * Rm];
      for (int64_t e = 0; e < Rm; ++e) x_out[e] += c * Ks[e];
    }
  }

  // Adjoint of the step just recomputed by step(i, ...): z holds dL/dx_{i+1} on entry and
  // dL/dx_i on exit; eq. 23 contributions go to gW (n, m, m), gb (n, m), glam.
  void step_adjoint(T* z, T* gW, T* gb, double& glam) {
    const int64_t S = a_.tab.stages, Rm = R_ * a_.m, m = a_.m, mm = m * m;
    const T h = T(a_.h), lam = T(a_.lam);
    for (int64_t s = S - 1; s >= 0; --s) {
      // kbar_s = dL/dK_s = h b_s z + h sum_{q > s} a_qs Xbar_q
      const T cb = h * T(a_.tab.b[s]);
      for (int64_t e = 0; e < Rm; ++e) kbar_[e] = cb * z[e];
      for (int64_t q = s + 1; q < S; ++q) {
        const T c = h * T(a_.tab.a[q][s]);
        if (c == T(0)) continue;
        const T* Xq = &Xbar_[q * Rm];
        for (int64_t e = 0; e < Rm; ++e) kbar_[e] += c * Xq[e];
      }
      const T* W = &W_[s * mm];
      const T* Ap = &As_[s * Rm];
      // V = dL/d(lam act(a)): kbar, or -kbar W^T for f = -act(a) W.
      const T* V = kbar_.data();
      if (a_.variant == Variant::Symmetric) {
        ops_.nt(kbar_.data(), W, WT(s), tmp_.data());
        for (int64_t e = 0; e < Rm; ++e) tmp_[e] = -tmp_[e];
        V = tmp_.data();
      }
      const T* Y = &Ys_[s * Rm];
      glam += dot_double(Y, V, Rm);  // dL/dlam += act(a_s) . V
      act_backward(a_.act, Ap, Y, V, lam, G_.data(), Rm);
      // dL/dX_s = G W (G already carries lam).
      ops_.nn(G_.data(), W, &Xbar_[s * Rm]);
      // dL/dW_s = G^T X_s (- lam act(a)^T kbar for the symmetric variant).
      ops_.tn(G_.data(), &Xs_[s * Rm], dW_.data());
      if (a_.variant == Variant::Symmetric) ops_.tn(Y, kbar_.data(), mscratch_.data());
      scatter(s, gW, gb);
    }
    for (int64_t s = 0; s < S; ++s) {
      const T* Xq = &Xbar_[s * Rm];
      for (int64_t e = 0; e < Rm; ++e) z[e] += Xq[e];
    }
  }

 private:
  const T* WT(int64_t s) const { return a_.use_gemm ? nullptr : &WT_[s * a_.m * a_.m]; }

  // W_s, b_s = sum_r b_r(u) * coefficient[k + r] at stage time t_i + c_s h (eq. 14).
  void blend(int64_t i, int64_t s) {
    const int64_t m = a_.m, mm = m * m, d = a_.d;
    double wd[16];
    const int64_t k = grid_basis<double>(i, a_.tab.c[s], a_.L, a_.N, static_cast<int>(d), wd);
    k_[s] = k;
    T* W = &W_[s * mm];
    for (int64_t r = 0; r <= d; ++r) w_[s * (d + 1) + r] = T(wd[r]);
    const T* w = &w_[s * (d + 1)];
    const T* src = weight_ + k * mm;
    for (int64_t e = 0; e < mm; ++e) W[e] = w[0] * src[e];
    for (int64_t r = 1; r <= d; ++r) {
      src = weight_ + (k + r) * mm;
      for (int64_t e = 0; e < mm; ++e) W[e] += w[r] * src[e];
    }
    if (a_.variant == Variant::Antisymmetric) {  // A = W - W^T - gamma I
      std::copy(W, W + mm, mscratch_.begin());
      for (int64_t j = 0; j < m; ++j)
        for (int64_t q = 0; q < m; ++q) W[j * m + q] = mscratch_[j * m + q] - mscratch_[q * m + j];
      for (int64_t j = 0; j < m; ++j) W[j * m + j] -= T(a_.gamma);
    }
    if (!a_.use_gemm) {
      T* WT = &WT_[s * mm];
      for (int64_t j = 0; j < m; ++j)
        for (int64_t q = 0; q < m; ++q) WT[q * m + j] = W[j * m + q];
    }
    if (a_.has_bias) {
      T* b = &b_[s * m];
      for (int64_t j = 0; j < m; ++j) b[j] = w[0] * bias_[k * m + j];
      for (int64_t r = 1; r <= d; ++r)
        for (int64_t j = 0; j < m; ++j) b[j] += w[r] * bias_[(k + r) * m + j];
    }
  }

  // Eq. 23: the stage's dL/dW and dL/db go to the d + 1 coefficient slots k .. k + d.
  void scatter(int64_t s, T* gW, T* gb) {
    const int64_t m = a_.m, mm = m * m, d = a_.d, k = k_[s];
    if (a_.variant == Variant::Symmetric) {  // mscratch_ = act(a)^T kbar
      const T lam = T(a_.lam);
      for (int64_t e = 0; e < mm; ++e) dW_[e] -= lam * mscratch_[e];
    } else if (a_.variant == Variant::Antisymmetric) {  // dW = dA - dA^T
      std::copy(dW_.begin(), dW_.end(), mscratch_.begin());
      for (int64_t j = 0; j < m; ++j)
        for (int64_t q = 0; q < m; ++q) dW_[j * m + q] = mscratch_[j * m + q] - mscratch_[q * m + j];
    }
    const T* w = &w_[s * (d + 1)];
    for (int64_t r = 0; r <= d; ++r) {
      T* dst = gW + (k + r) * mm;
      for (int64_t e = 0; e < mm; ++e) dst[e] += w[r] * dW_[e];
    }
    if (a_.has_bias) {
      ops_.colsum(G_.data(), mscratch_.data());
      for (int64_t r = 0; r <= d; ++r) {
        T* dst = gb + (k + r) * m;
        for (int64_t j = 0; j < m; ++j) dst[j] += w[r] * mscratch_[j];
      }
    }
  }

  const DenseArgs& a_;
  const T* weight_;
  const T* bias_;
  int64_t R_;
  MatOps<T, M> ops_;
  std::vector<T> W_, WT_, b_, Ks_, Xs_, As_, Ys_, tmp_, mscratch_, w_, Xbar_, kbar_, G_, dW_;
  std::vector<int64_t> k_;
};

DenseArgs make_args(const at::Tensor& x, const at::Tensor& weight, bool has_bias, const at::Tensor& scale,
                    int64_t steps, int64_t degree, const std::string& activation, const std::string& scheme,
                    const std::string& variant, double gamma, int64_t checkpoint) {
  DenseArgs a;
  a.B = x.size(0);
  a.m = x.size(1);
  a.n = weight.size(0);
  a.d = degree;
  a.L = a.n - degree;
  a.N = steps;
  a.K = checkpoint;
  a.tab = parse_scheme(scheme);
  a.variant = parse_variant(variant);
  a.gamma = gamma;
  a.lam = scale.item<double>();
  a.h = 1.0 / static_cast<double>(steps);
  a.has_bias = has_bias;
  a.use_gemm = a.m >= kGemmMinWidth;
  a.act = parse_activation(activation);
  return a;
}

// Row chunks, one thread each: at least one per thread, small enough for L2, few enough
// for the partial gradients' memory. The count depends only on the sizes and the thread
// count, so the reduction order (and the gradients) are reproducible.
std::vector<int64_t> chunk_bounds(const DenseArgs& a) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunks = threads;
  if (!a.use_gemm) chunks = std::max<int64_t>(threads, (a.B * a.m + kChunkElements - 1) / kChunkElements);
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, kPartialElements / (a.n * a.m * a.m)));
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, a.B));
  std::vector<int64_t> bounds(chunks + 1);
  for (int64_t c = 0; c <= chunks; ++c) bounds[c] = a.B * c / chunks;
  return bounds;
}

void run_chunks(int64_t chunks, const std::function<void(int64_t)>& fn) {
  if (chunks == 1) {
    fn(0);  // outside a parallel region, so ATen's kernels may use every thread
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(c);
  });
}

// Calls fn(std::integral_constant<int, M>) with M = m for the widths that get unrolled
// loops, M = 0 (run-time width) otherwise.
template <typename F>
void dispatch_width(int64_t m, F&& fn) {
  switch (m) {
    case 2: return fn(std::integral_constant<int, 2>());
    case 3: return fn(std::integral_constant<int, 3>());
    case 4: return fn(std::integral_constant<int, 4>());
    case 5: return fn(std::integral_constant<int, 5>());
    case 8: return fn(std::integral_constant<int, 8>());
    default: return fn(std::integral_constant<int, 0>());
  }
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
  const int64_t Ns = num_saved_states(a.N, a.K);
  at::Tensor states = at::empty({Ns, a.B, a.m}, x.options());
  if (a.B == 0) return states;
  const auto bounds = chunk_bounds(a);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spline_dense_fwd_cpu", [&] {
    dispatch_width(a.use_gemm ? 0 : a.m, [&](auto width) {
      constexpr int M = decltype(width)::value;
      const scalar_t* W = weight.const_data_ptr<scalar_t>();
      const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* out = states.data_ptr<scalar_t>();
      const scalar_t* x0 = x.const_data_ptr<scalar_t>();
      run_chunks(static_cast<int64_t>(bounds.size()) - 1, [&](int64_t c) {
        const int64_t r0 = bounds[c], R = bounds[c + 1] - r0, Rm = R * a.m;
        DenseChunk<scalar_t, M> chunk(a, W, b, R);
        std::vector<scalar_t> cur(x0 + r0 * a.m, x0 + r0 * a.m + Rm), nxt(Rm);
        std::copy(cur.begin(), cur.end(), out + r0 * a.m);
        for (int64_t i = 0; i < a.N; ++i) {
          chunk.step(i, cur.data(), nxt.data());
          std::swap(cur, nxt);
          const int64_t slot = saved_slot(i + 1, a.N, a.K);
          if (slot >= 0) std::copy(cur.begin(), cur.end(), out + (slot * a.B + r0) * a.m);
        }
      });
    });
  });
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
  at::Tensor grad_x = at::empty({a.B, a.m}, states.options());
  at::Tensor grad_w = at::zeros_like(weight);
  at::Tensor grad_b = bias.defined() ? at::zeros_like(bias) : at::empty({0}, states.options());
  double glam = 0.0;
  if (a.B > 0) {
    const auto bounds = chunk_bounds(a);
    const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
    const int64_t nW = a.n * a.m * a.m, nb = a.n * a.m;
    AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "spline_dense_bwd_cpu", [&] {
      dispatch_width(a.use_gemm ? 0 : a.m, [&](auto width) {
        constexpr int M = decltype(width)::value;
        const scalar_t* W = weight.const_data_ptr<scalar_t>();
        const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* X = states.const_data_ptr<scalar_t>();
        const scalar_t* GS = grad_states.const_data_ptr<scalar_t>();
        scalar_t* gx = grad_x.data_ptr<scalar_t>();
        // Per-chunk partial coefficient gradients, reduced below in chunk order.
        std::vector<std::vector<scalar_t>> pW(chunks), pb(chunks);
        std::vector<double> plam(chunks, 0.0);
        run_chunks(chunks, [&](int64_t c) {
          const int64_t r0 = bounds[c], R = bounds[c + 1] - r0, Rm = R * a.m;
          pW[c].assign(nW, scalar_t(0));
          pb[c].assign(a.has_bias ? nb : 0, scalar_t(0));
          DenseChunk<scalar_t, M> chunk(a, W, b, R);
          const int64_t Ns = num_saved_states(a.N, a.K);
          const scalar_t* g_last = GS + ((last_only ? 0 : Ns - 1) * a.B + r0) * a.m;
          std::vector<scalar_t> z(g_last, g_last + Rm);
          std::vector<scalar_t> seg(std::min(a.K, a.N) * Rm), scratch(Rm);
          // Segments [i0, i1) of K steps, last first; each starts from a saved state and
          // recomputes the states inside it (all saved when K = 1).
          for (int64_t i0 = ((a.N - 1) / a.K) * a.K; i0 >= 0; i0 -= a.K) {
            const int64_t i1 = std::min(i0 + a.K, a.N);
            const scalar_t* x_saved = X + ((i0 / a.K) * a.B + r0) * a.m;
            std::copy(x_saved, x_saved + Rm, seg.begin());
            for (int64_t i = i0; i + 1 < i1; ++i) chunk.step(i, &seg[(i - i0) * Rm], &seg[(i + 1 - i0) * Rm]);
            for (int64_t i = i1 - 1; i >= i0; --i) {
              chunk.step(i, &seg[(i - i0) * Rm], scratch.data());
              chunk.step_adjoint(z.data(), pW[c].data(), pb[c].data(), plam[c]);
              const int64_t slot = last_only ? -1 : saved_slot(i, a.N, a.K);
              if (slot >= 0) {
                const scalar_t* g = GS + (slot * a.B + r0) * a.m;
                for (int64_t e = 0; e < Rm; ++e) z[e] += g[e];
              }
            }
          }
          std::copy(z.begin(), z.end(), gx + r0 * a.m);
        });
        scalar_t* gw = grad_w.data_ptr<scalar_t>();
        scalar_t* gb = a.has_bias ? grad_b.data_ptr<scalar_t>() : nullptr;
        for (int64_t c = 0; c < chunks; ++c) {
          for (int64_t e = 0; e < nW; ++e) gw[e] += pW[c][e];
          for (int64_t e = 0; e < (a.has_bias ? nb : 0); ++e) gb[e] += pb[c][e];
          glam += plam[c];
        }
      });
    });
  }
  at::Tensor grad_scale = at::full(scale.sizes(), glam, scale.options());
  return {grad_x, grad_w, grad_b, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(splinet_cuda, CPU, m) {
  m.impl("spline_dense_fwd", &spline_dense_fwd_cpu);
  m.impl("spline_dense_bwd", &spline_dense_bwd_cpu);
}

}  // namespace splinet
