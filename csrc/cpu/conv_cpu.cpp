// Fused CPU kernels of the convolutional SpliNet layer: the whole N-step forward in one
// call and the whole adjoint sweep (paper eqs. 17-23) in one call. Schemas:
// csrc/splinet_ops.cpp.
//
// Legend: B batch, C channels, P points of one (b, c) plane (product of the spatial
// sizes), n = L + d coefficients, d degree, N steps, S stages of the scheme, K checkpoint
// interval.
//
// At every stage the d + 1 nonzero coefficient filters (and biases) are blended into one
// (C, C, *k) buffer (eq. 14; no per-step filter tensor is ever built). The convolutions
// themselves are the direct kernels of conv_direct.h up to kDirectMaxChannels channels,
// and ATen's above (oneDNN for float32, which also adds the bias). Activation, scale and
// the Runge-Kutta combinations run in one elementwise pass over fixed blocks of a plane;
// sigmoid, softplus and float64 tanh come from ATen's vectorised ops, float32 tanh from
// the kernels' own (act_forward). The adjoint walks back from step N - 1 to 0,
// recomputing each step's stages from the saved state (segments of K steps from the saved
// checkpoint), takes dL/dX and dL/dK of every stage (the transposed
// convolution and the filter gradient, or at::convolution_backward) and scatters dL/dK into
// the d + 1 coefficient slots with the basis weights (eq. 23). Reductions (bias, scale,
// the direct filter gradient) go through partial sums added in a fixed order, so the
// results do not depend on the thread count; ATen's CPU convolutions are deterministic,
// hence so is the whole op.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/softplus.h>
#include <ATen/ops/softplus_backward.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <memory>
#include <cmath>
#include <string>
#include <vector>

#include "../common/activations.h"
#include "../common/checks.h"
#include "../common/layer_config.h"
#include "conv_direct.h"
#include "matmul.h"
#include "spline_blend.h"
#include "vec_activations.h"

namespace splinet {
namespace {

// Elements per block of the elementwise passes (a plane holds ceil(P / kConvBlock) blocks).
constexpr int64_t kConvBlock = 4096;
// Elements per task of a parallel elementwise pass: a state of 32K values (B = 16, C = 32,
// L = 64: bench case conv1d) still splits across threads, where with the convolutions
// threaded the passes left on one thread took a third of fwd+bwd.
constexpr int64_t kConvParallelElements = 8192;

struct ConvArgs : cpu::SplineSteps {
  int64_t B, C, P;
  Tableau tab;
  Variant variant;
  bool has_bias;
  std::vector<int64_t> state_shape;   // (B, C, *spatial)
  std::vector<int64_t> filter_shape;  // (C, C, *kernel)
  std::vector<int64_t> ones, zeros, padding;
  int64_t blocks_per_plane, blocks;
};

// Activations evaluated over the whole state by a vectorised transcendental function
// (ATen's op, or for float32 tanh act_forward's), kept in Ys_ for the slope pass.
template <Act A>
constexpr bool kAtenAct = A == Act::Tanh || A == Act::Sigmoid || A == Act::Softplus;

// act(a) for the activations computed here (identity, relu). Unlike Activation<Relu>::f,
// a NaN propagates, as in torch.relu.
template <Act A, typename T>
inline T act_here(T a) {
  if (A == Act::Relu) return (a > T(0) || a != a) ? a : T(0);
  return Activation<A>::f(a);
}

// One step's worth of stage data and the two sweeps over it.
template <typename T, Act A>
class ConvStepper {
 public:
  ConvStepper(const ConvArgs& a, const at::Tensor& weight, const T* bias, const at::TensorOptions& opt)
      : a_(a), opt_(opt), weight_(weight.const_data_ptr<T>()), bias_(bias) {
    const int64_t S = a.tab.stages;
    const std::vector<int64_t> spatial(a.state_shape.begin() + 2, a.state_shape.end());
    const std::vector<int64_t> kernel(a.filter_shape.begin() + 2, a.filter_shape.end());
    int64_t taps = 1;
    for (const int64_t k : kernel) taps *= k;
    if (cpu::direct_conv_pays(a.C, taps)) {
      direct_ = std::make_unique<cpu::DirectConv<T>>(a.B, a.C, spatial, kernel);
      packed_.resize(S);
    }
    fw_ = 1;
    for (const int64_t v : a.filter_shape) fw_ *= v;
    for (int64_t s = 0; s < S; ++s) {
      filt_.push_back(at::empty(a.filter_shape, opt));
      bvec_.push_back(bias != nullptr ? at::empty({a.C}, opt) : at::Tensor());
      Ks_.push_back(at::empty(a.state_shape, opt));
      const bool store_y = kAtenAct<A> || (A == Act::Relu && a.variant == Variant::Symmetric);
      Ys_.push_back(store_y ? at::empty(a.state_shape, opt) : at::Tensor());
      Xs_.push_back(s > 0 ? at::empty(a.state_shape, opt) : at::Tensor());
    }
    As_.resize(S);
    Ds_.resize(S);
    Xbar_.resize(S);
    w_.assign(S * (a.d + 1), T(0));
    k_.assign(S, 0);
  }

  // One step of the scheme from x (contiguous, step i). Keeps the stage inputs X_s, the
  // pre-activations a_s and act(a_s) for the adjoint (with `record`, also act'(a_s) where
  // it is not a function of act(a_s)); writes x_{i+1} to x_out unless it is null. With
  // `pre` (this step's (S, B, C, *spatial) pre-activations) the a_s are written there, or,
  // with `pre_given`, read from there instead of computed: the adjoint's replay of a step
  // then runs no forward convolution.
  void step(int64_t i, const at::Tensor& x, T* x_out, bool record, const at::Tensor& pre = at::Tensor(),
            bool pre_given = false) {
    const int64_t S = a_.tab.stages;
    const T lam = T(a_.lam);
    Xs_[0] = x;
    for (int64_t s = 0; s < S; ++s) {
      blend(i, s);
      if (pre.defined() && (pre_given || direct_)) As_[s] = pre[s];
      if (!pre_given) conv(s, Xs_[s], As_[s], true);
      if (pre.defined() && !pre_given && !direct_) pre[s].copy_(As_[s]);
      const T* ap = As_[s].const_data_ptr<T>();
      if (A == Act::Identity) Ys_[s] = As_[s];
      if (A == Act::Tanh) {
        // float32: the kernels' own vector tanh (act_forward), several times ATen's speed
        if (std::is_same_v<T, float> && As_[s].is_contiguous())
          cpu::act_forward(Act::Tanh, ap, Ys_[s].data_ptr<T>(), As_[s].numel());
        else
          at::tanh_out(Ys_[s], As_[s]);
      }
      if (A == Act::Sigmoid) at::sigmoid_out(Ys_[s], As_[s]);
      if (A == Act::Softplus) {
        at::softplus_out(Ys_[s], As_[s], 1, 20);
        if (record) {
          if (!ones_.defined()) ones_ = at::ones(a_.state_shape, opt_);
          if (!Ds_[s].defined()) Ds_[s] = at::empty(a_.state_shape, opt_);
          at::softplus_backward_out(Ds_[s], ones_, As_[s], 1, 20);  // PyTorch's e^a / (e^a + 1)
        }
      }
      T* __restrict__ kp = Ks_[s].data_ptr<T>();
      // Replaying a step for its adjoint, the last stage's slope is not needed.
      const bool slope_needed = s + 1 < S || x_out != nullptr;
      if (a_.variant == Variant::Symmetric) {
        if (A == Act::Relu) {
          T* __restrict__ yp = Ys_[s].data_ptr<T>();
          for_blocks([&](int64_t, int64_t e0, int64_t e1, int64_t) {
            for (int64_t e = e0; e < e1; ++e) yp[e] = act_here<A>(ap[e]);
          });
        }
        if (!slope_needed) continue;
        // f = -conv_transpose(act(a), K)
        conv_t(s, Ys_[s], tmp_);
        const T* __restrict__ tp = tmp_.const_data_ptr<T>();
        for_blocks([&](int64_t, int64_t e0, int64_t e1, int64_t) {
          for (int64_t e = e0; e < e1; ++e) kp[e] = -lam * tp[e];
          combine(s, x, x_out, e0, e1);
        });
      } else if (slope_needed) {  // standard: relu(a) is recomputed from a where needed, not stored
        const T* __restrict__ yp = kAtenAct<A> ? Ys_[s].const_data_ptr<T>() : nullptr;
        for_blocks([&](int64_t, int64_t e0, int64_t e1, int64_t) {
          if (kAtenAct<A>) {
            for (int64_t e = e0; e < e1; ++e) kp[e] = lam * yp[e];
          } else {
            for (int64_t e = e0; e < e1; ++e) kp[e] = lam * act_here<A>(ap[e]);
          }
          combine(s, x, x_out, e0, e1);
        });
      }
    }
  }

  // Adjoint of the step just recomputed by step(i, ..., record = true): z holds dL/dx_{i+1}
  // on entry and dL/dx_i on exit (plus `extra`, dL/dx_i from the saved states, when not
  // null). Eq. 23 contributions go to gW (n, C, C, *k), gb (n * C doubles), glam.
  void step_adjoint(at::Tensor& z, const T* extra, at::Tensor& gW, std::vector<double>& gb, double& glam) {
    const int64_t S = a_.tab.stages, C = a_.C, nb = a_.blocks;
    const T h = T(a_.h), lam = T(a_.lam);
    T* __restrict__ zp = z.data_ptr<T>();
    if (!G_.defined()) G_ = at::empty(a_.state_shape, opt_);
    T* __restrict__ G = G_.data_ptr<T>();
    std::vector<double> part_lam(nb), part_b(nb);
    std::vector<double> gbias(C);
    for (int64_t s = S - 1; s >= 0; --s) {
      // kbar_s = dL/dK_s = h b_s z + h sum_{q > s} a_qs Xbar_q
      const T cb = h * T(a_.tab.b[s]);
      std::array<const T*, 4> xq{};
      std::array<T, 4> cq{};
      int nq = 0;
      for (int64_t q = s + 1; q < S; ++q) {
        const T c = h * T(a_.tab.a[q][s]);
        if (c == T(0)) continue;
        xq[nq] = Xbar_[q].const_data_ptr<T>();
        cq[nq++] = c;
      }
      const bool sym = a_.variant == Variant::Symmetric;
      if (!kbar_.defined()) kbar_ = at::empty(a_.state_shape, opt_);
      T* __restrict__ kb = kbar_.data_ptr<T>();
      for_blocks([&](int64_t, int64_t e0, int64_t e1, int64_t) {
        for (int64_t e = e0; e < e1; ++e) kb[e] = cb * zp[e];
        for (int j = 0; j < nq; ++j) {
          const T c = cq[j];
          const T* __restrict__ src = xq[j];
          for (int64_t e = e0; e < e1; ++e) kb[e] += c * src[e];
        }
      });
      // V = dL/d(lam act(a)): kbar (standard), or -conv(kbar, K) for f = -conv_transpose(act(a), K)
      // (the adjoint of conv_transpose is conv). G = lam act'(a) V; dL/dlam += sum act(a) V.
      if (sym) conv(s, kbar_, tmp_, false);
      const T* __restrict__ vp = sym ? tmp_.const_data_ptr<T>() : kb;
      const T vsign = sym ? T(-1) : T(1);
      const T* __restrict__ ap = As_[s].const_data_ptr<T>();
      // act(a): stored, except identity (a itself) and the standard relu (recomputed here).
      const bool y_inline = A == Act::Relu && !sym;
      const T* __restrict__ yp = A == Act::Identity ? ap : y_inline ? nullptr : Ys_[s].const_data_ptr<T>();
      const T* __restrict__ dp = A == Act::Softplus ? Ds_[s].const_data_ptr<T>() : nullptr;
      // dL/dlam and dL/db of each block in kLanes partial sums, float64 totals of
      // cpu::kSumBlock-element runs (a plane's B x P terms may cancel: see kSumBlock).
      for_blocks([&](int64_t, int64_t e0, int64_t e1, int64_t u) {
        using cpu::kLanes;
        constexpr int64_t run = cpu::kSumBlock<T>;
        double tl[kLanes] = {}, tb[kLanes] = {};
        for (int64_t f0 = e0, f1; f0 < e1; f0 = f1) {
          f1 = e1 - f0 > run ? f0 + run : e1;  // run: a multiple of kLanes
          T pl[kLanes] = {}, pb[kLanes] = {};
          int64_t e = f0;
          for (; e + kLanes <= f1; e += kLanes)
            for (int l = 0; l < kLanes; ++l) {
              const T v = vsign * vp[e + l], y = y_inline ? act_here<A>(ap[e + l]) : yp[e + l];
              const T df = A == Act::Softplus ? dp[e + l] : Activation<A>::df(ap[e + l], y);
              const T g = lam * df * v;
              pl[l] += y * v;
              pb[l] += g;
              G[e + l] = g;
            }
          for (; e < f1; ++e) {
            const T v = vsign * vp[e], y = y_inline ? act_here<A>(ap[e]) : yp[e];
            const T df = A == Act::Softplus ? dp[e] : Activation<A>::df(ap[e], y);
            const T g = lam * df * v;
            pl[0] += y * v;
            pb[0] += g;
            G[e] = g;
          }
          for (int l = 0; l < kLanes; ++l) {
            tl[l] += static_cast<double>(pl[l]);
            tb[l] += static_cast<double>(pb[l]);
          }
        }
        double sl = 0.0, sb = 0.0;
        for (int l = 0; l < kLanes; ++l) {
          sl += tl[l];
          sb += tb[l];
        }
        part_lam[u] = sl;
        part_b[u] = sb;
      });
      for (int64_t u = 0; u < nb; ++u) glam += part_lam[u];
      // dL/dX_s = conv_transpose(G, K), dL/dK_s = G (x) X_s (G already carries lam).
      input_grad(s, G_, Xbar_[s]);
      filter_grad(s, G_, Xs_[s], dK_);
      T* dk = dK_.data_ptr<T>();
      if (sym) {  // the explicit K of conv_transpose: -lam * dL/dK of <conv(kbar, K), act(a)>
        filter_grad(s, Ys_[s], kbar_, dKs_);
        const T* dks = dKs_.const_data_ptr<T>();
        for (int64_t e = 0; e < fw_; ++e) dk[e] -= lam * dks[e];
      }
      // Eq. 23: the stage's dL/dK and dL/db go to the d + 1 coefficient slots k .. k + d.
      const int64_t d = a_.d, k = k_[s];
      const T* w = &w_[s * (d + 1)];
      cpu::scatter_coefficients(gW.data_ptr<T>() + k * fw_, fw_, dk, w, d, 0, fw_);
      if (a_.has_bias) {
        std::fill(gbias.begin(), gbias.end(), 0.0);
        for (int64_t u = 0; u < nb; ++u) gbias[(u / a_.blocks_per_plane) % C] += part_b[u];
        for (int64_t r = 0; r <= d; ++r)
          for (int64_t c = 0; c < C; ++c) gb[(k + r) * C + c] += static_cast<double>(w[r]) * gbias[c];
      }
    }
    // z_i = z_{i+1} + sum_s Xbar_s (+ dL/dx_i from the saved states)
    for_blocks([&](int64_t, int64_t e0, int64_t e1, int64_t) {
      for (int64_t s = 0; s < S; ++s) {
        const T* __restrict__ xb = Xbar_[s].const_data_ptr<T>();
        for (int64_t e = e0; e < e1; ++e) zp[e] += xb[e];
      }
      if (extra != nullptr)
        for (int64_t e = e0; e < e1; ++e) zp[e] += extra[e];
    });
  }

 private:
  // The three products of a stage, by the direct kernels (C <= kDirectMaxChannels) or ATen's
  // convolution. out = conv(in, K_s) (+ b_s when with_bias).
  void conv(int64_t s, const at::Tensor& in, at::Tensor& out, bool with_bias) {
    if (direct_) {
      if (!out.defined()) out = at::empty(a_.state_shape, opt_);
      direct_->conv(packed_[s], in.const_data_ptr<T>(), out.data_ptr<T>(), with_bias);
      return;
    }
    const c10::optional<at::Tensor> b =
        with_bias && a_.has_bias ? c10::optional<at::Tensor>(bvec_[s]) : c10::nullopt;
    out = at::convolution(in, filt_[s], b, a_.ones, a_.padding, a_.ones, false, a_.zeros, 1).contiguous();
  }

  // out = conv_transpose(in, K_s): the symmetric variant's second product.
  void conv_t(int64_t s, const at::Tensor& in, at::Tensor& out) {
    if (direct_) {
      if (!out.defined()) out = at::empty(a_.state_shape, opt_);
      direct_->conv_t(packed_[s], in.const_data_ptr<T>(), out.data_ptr<T>());
      return;
    }
    out = at::convolution(in, filt_[s], c10::nullopt, a_.ones, a_.padding, a_.ones, true, a_.zeros, 1).contiguous();
  }

  // out = dL/dX of conv(X, K_s) for output gradient g (the same product as conv_t).
  void input_grad(int64_t s, const at::Tensor& g, at::Tensor& out) {
    if (direct_) return conv_t(s, g, out);
    out = std::get<0>(at::convolution_backward(g, Xs_[s], filt_[s], c10::nullopt, a_.ones, a_.padding, a_.ones,
                                               false, a_.zeros, 1, {true, false, false}))
              .contiguous();
  }

  // out = dL/dK of conv(x, K_s) for output gradient g: sum over the batch of g (x) x.
  // ATen: one single-output call; on CPU, asking convolution_backward for dX and dK at once
  // takes a several times slower path (measured, torch 2.13, float32 and float64).
  void filter_grad(int64_t s, const at::Tensor& g, const at::Tensor& x, at::Tensor& out) {
    if (direct_) {
      if (!out.defined()) out = at::empty(a_.filter_shape, opt_);
      direct_->filter_grad(g.const_data_ptr<T>(), x.const_data_ptr<T>(), out.data_ptr<T>());
      return;
    }
    out = std::get<1>(at::convolution_backward(g, x, filt_[s], c10::nullopt, a_.ones, a_.padding, a_.ones, false,
                                               a_.zeros, 1, {false, true, false}))
              .contiguous();
  }

  // fn(channel, first element, end element, block index) over every block, in parallel.
  template <typename F>
  void for_blocks(const F& fn) const {
    const int64_t bpp = a_.blocks_per_plane, P = a_.P, C = a_.C;
    const int64_t grain =
        std::max<int64_t>(1, kConvParallelElements / std::min<int64_t>(kConvBlock, std::max<int64_t>(P, 1)));
    at::parallel_for(0, a_.blocks, grain, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t plane = u / bpp, sub = u % bpp;
        const int64_t e0 = plane * P + sub * kConvBlock;
        const int64_t e1 = plane * P + std::min(P, (sub + 1) * kConvBlock);
        fn(plane % C, e0, e1, u);
      }
    });
  }

  // After K_s is written on [e0, e1): the next stage input X_{s+1} = x + h sum_{j<=s} a_{s+1,j} K_j,
  // or, after the last stage, x_out = x + h sum_j b_j K_j.
  void combine(int64_t s, const at::Tensor& x, T* x_out, int64_t e0, int64_t e1) {
    const int64_t S = a_.tab.stages;
    const T h = T(a_.h);
    T* __restrict__ dst = nullptr;
    const double* coef = nullptr;
    int64_t nj = 0;
    if (s + 1 < S) {
      dst = Xs_[s + 1].data_ptr<T>();
      coef = a_.tab.a[s + 1];
      nj = s + 1;
    } else if (x_out != nullptr) {
      dst = x_out;
      coef = a_.tab.b;
      nj = S;
    }
    if (dst == nullptr) return;
    const T* __restrict__ xp = x.const_data_ptr<T>();
    for (int64_t e = e0; e < e1; ++e) dst[e] = xp[e];
    for (int64_t j = 0; j < nj; ++j) {
      const T c = h * T(coef[j]);
      if (c == T(0)) continue;
      const T* __restrict__ kp = Ks_[j].const_data_ptr<T>();
      for (int64_t e = e0; e < e1; ++e) dst[e] += c * kp[e];
    }
  }

  // K_s, b_s = sum_r b_r(u) * coefficient[k + r] at stage time t_i + c_s h (eq. 14).
  void blend(int64_t i, int64_t s) {
    const int64_t d = a_.d, C = a_.C;
    T* w = &w_[s * (d + 1)];
    const int64_t k = cpu::basis_weights(i, a_.tab.c[s], a_.L, a_.N, d, w);
    k_[s] = k;
    T* K = filt_[s].data_ptr<T>();
    cpu::blend_coefficients(K, weight_ + k * fw_, fw_, w, d, 0, fw_);
    if (bias_ != nullptr) cpu::blend_coefficients(bvec_[s].data_ptr<T>(), bias_ + k * C, C, w, d, 0, C);
    if (direct_) direct_->pack_filter(K, bias_ != nullptr ? bvec_[s].const_data_ptr<T>() : nullptr, packed_[s]);
  }

  const ConvArgs& a_;
  at::TensorOptions opt_;
  const T* weight_;
  const T* bias_;
  int64_t fw_ = 0;  // elements of one filter, C * C * prod(kernel)
  // Per stage: blended filter and bias, stage input X_s (X_0 = x), pre-activation a_s,
  // act(a_s), softplus' (a_s), slope K_s = lam f, and dL/dX_s.
  std::vector<at::Tensor> filt_, bvec_, Xs_, As_, Ys_, Ds_, Ks_, Xbar_;
  at::Tensor G_, kbar_, ones_;
  at::Tensor tmp_, dK_, dKs_;  // the symmetric variant's second product; the stage's filter gradients
  std::unique_ptr<cpu::DirectConv<T>> direct_;  // null: ATen's convolution
  std::vector<cpu::PackedFilter<T>> packed_;    // per stage, for direct_
  std::vector<T> w_;
  std::vector<int64_t> k_;
};

ConvArgs make_conv_args(const at::Tensor& x, const at::Tensor& weight, bool has_bias, const at::Tensor& scale,
                        int64_t steps, int64_t degree, c10::string_view scheme, c10::string_view variant,
                        int64_t checkpoint) {
  ConvArgs a;
  static_cast<cpu::SplineSteps&>(a) =
      cpu::spline_steps(weight.size(0), degree, steps, checkpoint, scale.item<double>());
  a.B = x.size(0);
  a.C = x.size(1);
  a.P = 1;
  for (int64_t j = 2; j < x.dim(); ++j) a.P *= x.size(j);
  a.tab = parse_scheme(std::string(scheme));
  a.variant = parse_variant(std::string(variant));
  TORCH_CHECK_VALUE(a.variant != Variant::Antisymmetric,
                    "spline_conv: variant 'antisymmetric' is defined for dense layers only; expected standard or "
                    "symmetric");
  TORCH_CHECK_VALUE(std::isfinite(a.lam), "spline_conv: scale must be finite, got ", a.lam);
  a.has_bias = has_bias;
  a.state_shape = x.sizes().vec();
  a.filter_shape = weight.sizes().slice(1).vec();
  const size_t sd = static_cast<size_t>(x.dim() - 2);
  a.ones.assign(sd, 1);
  a.zeros.assign(sd, 0);
  a.padding.resize(sd);
  for (size_t j = 0; j < sd; ++j) a.padding[j] = weight.size(3 + static_cast<int64_t>(j)) / 2;
  a.blocks_per_plane = std::max<int64_t>(1, (a.P + kConvBlock - 1) / kConvBlock);
  a.blocks = a.B * a.C * a.blocks_per_plane;
  return a;
}

// The forward sweep into `states` (num_saved, B, C, *spatial) and, when defined, the
// pre-activations `preact` (N, S, B, C, *spatial) (checkpoint = 1 only).
void conv_forward(const ConvArgs& a, Act act, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  at::Tensor& states, const at::Tensor& preact) {
  const int64_t Ns = num_saved_states(a.N, a.K);
  states[0].copy_(x);
  if (x.numel() == 0) {
    for (int64_t j = 1; j < Ns; ++j) states[j].copy_(x);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spline_conv_fwd_cpu", [&] {
    SPLINET_DISPATCH_ACT(act, [&] {
      ConvStepper<scalar_t, ACT> stepper(a, weight, bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                         x.options());
      at::Tensor cur = states[0];
      at::Tensor scratch[2] = {at::empty(a.state_shape, x.options()), at::empty(a.state_shape, x.options())};
      for (int64_t i = 0; i < a.N; ++i) {
        const int64_t slot = saved_slot(i + 1, a.N, a.K);
        at::Tensor nxt = slot >= 0 ? states[slot] : scratch[i % 2];
        stepper.step(i, cur, nxt.data_ptr<scalar_t>(), false, preact.defined() ? preact[i] : at::Tensor());
        cur = nxt;
      }
    });
  });
}

// The adjoint sweep; with `preact` (checkpoint = 1) each step's pre-activations are read,
// not recomputed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_backward(
    const ConvArgs& a, Act act, const at::Tensor& grad_states, bool last_only, const at::Tensor& states,
    const at::Tensor& preact, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& scale) {
  const int64_t Ns = num_saved_states(a.N, a.K);
  at::Tensor grad_x = (last_only ? grad_states : grad_states[Ns - 1]).clone();
  at::Tensor grad_w = at::zeros(weight.sizes(), weight.options());
  at::Tensor grad_b = bias.defined() ? at::zeros(bias.sizes(), bias.options()) : at::empty({0}, states.options());
  double glam = 0.0;
  if (states.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "spline_conv_bwd_cpu", [&] {
      SPLINET_DISPATCH_ACT(act, [&] {
        ConvStepper<scalar_t, ACT> stepper(a, weight, bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                           states.options());
        std::vector<double> gb(a.has_bias ? a.n * a.C : 0, 0.0);
        const int64_t seg_len = std::min(a.K, a.N);
        std::vector<int64_t> seg_shape{seg_len};
        seg_shape.insert(seg_shape.end(), a.state_shape.begin(), a.state_shape.end());
        at::Tensor seg = seg_len > 1 ? at::empty(seg_shape, states.options()) : at::Tensor();
        at::Tensor z = grad_x;  // dL/dx_N, updated in place down to dL/dx_0
        // Segments [i0, i1) of K steps, last first; each starts from a saved state and
        // recomputes the states inside it (all saved when K = 1).
        for (int64_t i0 = ((a.N - 1) / a.K) * a.K; i0 >= 0; i0 -= a.K) {
          const int64_t i1 = std::min(i0 + a.K, a.N);
          const at::Tensor x_saved = states[i0 / a.K];
          auto state_at = [&](int64_t i) { return i == i0 ? x_saved : seg[i - i0]; };
          for (int64_t i = i0; i + 1 < i1; ++i)
            stepper.step(i, state_at(i), seg[i + 1 - i0].data_ptr<scalar_t>(), false);
          for (int64_t i = i1 - 1; i >= i0; --i) {
            const bool kept = preact.defined();
            stepper.step(i, state_at(i), nullptr, true, kept ? preact[i] : at::Tensor(), kept);
            const int64_t slot = last_only ? -1 : saved_slot(i, a.N, a.K);
            const scalar_t* extra = slot >= 0 ? grad_states[slot].const_data_ptr<scalar_t>() : nullptr;
            stepper.step_adjoint(z, extra, grad_w, gb, glam);
          }
        }
        if (a.has_bias) {
          scalar_t* gbp = grad_b.data_ptr<scalar_t>();
          for (int64_t e = 0; e < a.n * a.C; ++e) gbp[e] = static_cast<scalar_t>(gb[e]);
        }
      });
    });
  }
  at::Tensor grad_scale = at::full(scale.sizes(), glam, scale.options());
  return {grad_x, grad_w, grad_b, grad_scale};
}

std::vector<int64_t> with_leading(std::vector<int64_t> lead, const std::vector<int64_t>& shape) {
  lead.insert(lead.end(), shape.begin(), shape.end());
  return lead;
}

at::Tensor spline_conv_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                               const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale, int64_t steps,
                               int64_t degree, c10::string_view activation, c10::string_view scheme,
                               c10::string_view variant, double /*gamma*/, int64_t checkpoint) {
  at::AutoDispatchBelowADInplaceOrView guard;
  check_conv_args("spline_conv_fwd", x_in, weight_in, bias_in, scale, steps, degree, checkpoint, false);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const ConvArgs a = make_conv_args(x, weight, bias.defined(), scale, steps, degree, scheme, variant, checkpoint);
  const Act act = parse_activation(std::string(activation));
  at::Tensor states = at::empty(with_leading({num_saved_states(a.N, a.K)}, a.state_shape), x.options());
  conv_forward(a, act, x, weight, bias, states, at::Tensor());
  return states;
}

// Checks of the backward ops' states and state gradient; returns whether grad_states is
// dL/dx_N alone.
bool check_conv_bwd_states(const char* op, const at::Tensor& grad_states, const at::Tensor& states,
                           const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& scale,
                           int64_t steps, int64_t degree, int64_t checkpoint) {
  TORCH_CHECK_VALUE(states.dim() >= 4 && states.dim() <= 6, op,
                    ": states must have shape (saved, B, C, *spatial), got ", states.sizes());
  check_conv_args(op, states[0], weight, bias, scale, steps, degree, checkpoint, false);
  const int64_t Ns = num_saved_states(steps, checkpoint);
  TORCH_CHECK_VALUE(states.size(0) == Ns, op, ": states holds ", states.size(0), " states, expected ", Ns,
                    " for steps = ", steps, ", checkpoint = ", checkpoint);
  return check_state_grad(op, grad_states, states);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spline_conv_bwd_cpu(
    const at::Tensor& grad_states_in, const at::Tensor& states_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale, int64_t steps, int64_t degree,
    c10::string_view activation, c10::string_view scheme, c10::string_view variant, double /*gamma*/,
    int64_t checkpoint) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool last_only = check_conv_bwd_states("spline_conv_bwd", grad_states_in, states_in, weight_in, bias_in,
                                               scale, steps, degree, checkpoint);
  const at::Tensor states = states_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor grad_states = grad_states_in.to(states.scalar_type()).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const ConvArgs a =
      make_conv_args(states[0], weight, bias.defined(), scale, steps, degree, scheme, variant, checkpoint);
  return conv_backward(a, parse_activation(std::string(activation)), grad_states, last_only, states, at::Tensor(),
                       weight, bias, scale);
}

// Forward that also returns the pre-activations of every step and stage,
// (N, S, B, C, *spatial): all N + 1 states are kept (checkpoint = 1).
std::tuple<at::Tensor, at::Tensor> spline_conv_fwd_saved_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
    const at::Tensor& scale, int64_t steps, int64_t degree, c10::string_view activation, c10::string_view scheme,
    c10::string_view variant, double /*gamma*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  check_conv_args("spline_conv_fwd_saved", x_in, weight_in, bias_in, scale, steps, degree, 1, false);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const ConvArgs a = make_conv_args(x, weight, bias.defined(), scale, steps, degree, scheme, variant, 1);
  at::Tensor states = at::empty(with_leading({a.N + 1}, a.state_shape), x.options());
  at::Tensor preact = at::empty(with_leading({a.N, a.tab.stages}, a.state_shape), x.options());
  conv_forward(a, parse_activation(std::string(activation)), x, weight, bias, states, preact);
  return {states, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spline_conv_bwd_saved_cpu(
    const at::Tensor& grad_states_in, const at::Tensor& states_in, const at::Tensor& preact_in,
    const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale, int64_t steps,
    int64_t degree, c10::string_view activation, c10::string_view scheme, c10::string_view variant,
    double /*gamma*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool last_only = check_conv_bwd_states("spline_conv_bwd_saved", grad_states_in, states_in, weight_in,
                                               bias_in, scale, steps, degree, 1);
  const at::Tensor states = states_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor grad_states = grad_states_in.to(states.scalar_type()).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const ConvArgs a = make_conv_args(states[0], weight, bias.defined(), scale, steps, degree, scheme, variant, 1);
  check_kept_tensor("spline_conv_bwd_saved", "preact", preact_in, with_leading({a.N, a.tab.stages}, a.state_shape),
                    "(steps, stages, B, C, *spatial)", states);
  return conv_backward(a, parse_activation(std::string(activation)), grad_states, last_only, states,
                       preact_in.contiguous(), weight, bias, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(splinet_cuda, CPU, m) {
  m.impl("spline_conv_fwd", &spline_conv_fwd_cpu);
  m.impl("spline_conv_bwd", &spline_conv_bwd_cpu);
  m.impl("spline_conv_fwd_saved", &spline_conv_fwd_saved_cpu);
  m.impl("spline_conv_bwd_saved", &spline_conv_bwd_saved_cpu);
}

}  // namespace splinet
