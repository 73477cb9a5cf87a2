// Fused CPU kernels of the convolutional SpliNet layer: the whole N-step forward in one
// call and the whole adjoint sweep (paper eqs. 17-23) in one call. Schemas:
// csrc/splinet_ops.cpp.
//
// Legend: B batch, C channels, P points of one (b, c) plane (product of the spatial
// sizes), n = L + d coefficients, d degree, N steps, S stages of the scheme, K checkpoint
// interval.
//
// At every stage the d + 1 nonzero coefficient filters (and biases) are blended into one
// (C, C, *k) buffer (eq. 14; no per-step filter tensor is ever built) and the convolution
// itself is ATen's (oneDNN for float32, which also adds the bias). Activation, scale and
// the Runge-Kutta combinations run in one elementwise pass over fixed blocks of a plane;
// tanh, sigmoid and softplus come from ATen's vectorised ops. The adjoint walks back from
// step N - 1 to 0, recomputing each step's stages from the saved state (segments of K
// steps from the saved checkpoint), takes dL/dX and dL/dK of every stage from
// at::convolution_backward and scatters dL/dK into the d + 1 coefficient slots with the
// basis weights (eq. 23). Reductions (bias, scale) go through per-block partial sums added
// in block order, so the results do not depend on the thread count; ATen's CPU
// convolutions are deterministic, hence so is the whole op.
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
#include <cmath>
#include <string>
#include <vector>

#include "../common/activations.h"
#include "../common/bspline.h"
#include "../common/checks.h"
#include "../common/layer_config.h"

namespace splinet {
namespace {

// Elements per block of the elementwise passes (a plane holds ceil(P / kConvBlock) blocks).
constexpr int64_t kConvBlock = 4096;

struct ConvArgs {
  int64_t B, C, P, n, d, L, N, K;
  Tableau tab;
  Variant variant;
  double lam, h;
  bool has_bias;
  std::vector<int64_t> state_shape;   // (B, C, *spatial)
  std::vector<int64_t> filter_shape;  // (C, C, *kernel)
  std::vector<int64_t> ones, zeros, padding;
  int64_t blocks_per_plane, blocks;
};

// Activations PyTorch evaluates with vectorised transcendental functions: computed by
// the ATen op on the whole state (threaded, and bit-identical to PyTorch's own forward).
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
  // it is not a function of act(a_s)); writes x_{i+1} to x_out unless it is null.
  void step(int64_t i, const at::Tensor& x, T* x_out, bool record) {
    const int64_t S = a_.tab.stages;
    const T lam = T(a_.lam);
    Xs_[0] = x;
    for (int64_t s = 0; s < S; ++s) {
      blend(i, s);
      const c10::optional<at::Tensor> b = a_.has_bias ? c10::optional<at::Tensor>(bvec_[s]) : c10::nullopt;
      As_[s] = at::convolution(Xs_[s], filt_[s], b, a_.ones, a_.padding, a_.ones, false, a_.zeros, 1).contiguous();
      const T* ap = As_[s].const_data_ptr<T>();
      if (A == Act::Identity) Ys_[s] = As_[s];
      if (A == Act::Tanh) at::tanh_out(Ys_[s], As_[s]);
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
        const at::Tensor t =
            at::convolution(Ys_[s], filt_[s], c10::nullopt, a_.ones, a_.padding, a_.ones, true, a_.zeros, 1)
                .contiguous();
        const T* __restrict__ tp = t.const_data_ptr<T>();
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
      at::Tensor Vt;
      if (sym) Vt = at::convolution(kbar_, filt_[s], c10::nullopt, a_.ones, a_.padding, a_.ones, false, a_.zeros, 1)
                        .contiguous();
      const T* __restrict__ vp = sym ? Vt.const_data_ptr<T>() : kb;
      const T vsign = sym ? T(-1) : T(1);
      const T* __restrict__ ap = As_[s].const_data_ptr<T>();
      // act(a): stored, except identity (a itself) and the standard relu (recomputed here).
      const bool y_inline = A == Act::Relu && !sym;
      const T* __restrict__ yp = A == Act::Identity ? ap : y_inline ? nullptr : Ys_[s].const_data_ptr<T>();
      const T* __restrict__ dp = A == Act::Softplus ? Ds_[s].const_data_ptr<T>() : nullptr;
      for_blocks([&](int64_t, int64_t e0, int64_t e1, int64_t u) {
        constexpr int kLanes = 8;
        T pl[kLanes] = {}, pb[kLanes] = {};
        int64_t e = e0;
        for (; e + kLanes <= e1; e += kLanes)
          for (int l = 0; l < kLanes; ++l) {
            const T v = vsign * vp[e + l], y = y_inline ? act_here<A>(ap[e + l]) : yp[e + l];
            const T df = A == Act::Softplus ? dp[e + l] : Activation<A>::df(ap[e + l], y);
            const T g = lam * df * v;
            pl[l] += y * v;
            pb[l] += g;
            G[e + l] = g;
          }
        for (; e < e1; ++e) {
          const T v = vsign * vp[e], y = y_inline ? act_here<A>(ap[e]) : yp[e];
          const T df = A == Act::Softplus ? dp[e] : Activation<A>::df(ap[e], y);
          const T g = lam * df * v;
          pl[0] += y * v;
          pb[0] += g;
          G[e] = g;
        }
        double sl = 0.0, sb = 0.0;
        for (int l = 0; l < kLanes; ++l) {
          sl += static_cast<double>(pl[l]);
          sb += static_cast<double>(pb[l]);
        }
        part_lam[u] = sl;
        part_b[u] = sb;
      });
      for (int64_t u = 0; u < nb; ++u) glam += part_lam[u];
      // dL/dX_s = conv_transpose(G, K), dL/dK_s = G (x) X_s (G already carries lam). Two
      // single-output calls: on CPU, asking convolution_backward for both at once takes a
      // several times slower path (measured, torch 2.13, float32 and float64).
      Xbar_[s] = std::get<0>(at::convolution_backward(G_, Xs_[s], filt_[s], c10::nullopt, a_.ones, a_.padding,
                                                      a_.ones, false, a_.zeros, 1, {true, false, false}))
                     .contiguous();
      const at::Tensor dK = std::get<1>(at::convolution_backward(G_, Xs_[s], filt_[s], c10::nullopt, a_.ones,
                                                                 a_.padding, a_.ones, false, a_.zeros, 1,
                                                                 {false, true, false}))
                                .contiguous();
      T* dk = dK.data_ptr<T>();
      if (sym) {  // the explicit K of conv_transpose: -lam * dL/dK of <conv(kbar, K), act(a)>
        const at::Tensor dKs =
            std::get<1>(at::convolution_backward(Ys_[s], kbar_, filt_[s], c10::nullopt, a_.ones, a_.padding,
                                                 a_.ones, false, a_.zeros, 1, {false, true, false}))
                .contiguous();
        const T* dks = dKs.const_data_ptr<T>();
        for (int64_t e = 0; e < fw_; ++e) dk[e] -= lam * dks[e];
      }
      // Eq. 23: the stage's dL/dK and dL/db go to the d + 1 coefficient slots k .. k + d.
      const int64_t d = a_.d, k = k_[s];
      const T* w = &w_[s * (d + 1)];
      T* gw = gW.data_ptr<T>();
      for (int64_t r = 0; r <= d; ++r) {
        T* dst = gw + (k + r) * fw_;
        for (int64_t e = 0; e < fw_; ++e) dst[e] += w[r] * dk[e];
      }
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
  // fn(channel, first element, end element, block index) over every block, in parallel.
  template <typename F>
  void for_blocks(const F& fn) const {
    const int64_t bpp = a_.blocks_per_plane, P = a_.P, C = a_.C;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::min<int64_t>(kConvBlock, std::max<int64_t>(P, 1)));
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
    double wd[16];
    const int64_t k = grid_basis<double>(i, a_.tab.c[s], a_.L, a_.N, static_cast<int>(d), wd);
    k_[s] = k;
    T* w = &w_[s * (d + 1)];
    for (int64_t r = 0; r <= d; ++r) w[r] = T(wd[r]);
    T* K = filt_[s].data_ptr<T>();
    const T* src = weight_ + k * fw_;
    for (int64_t e = 0; e < fw_; ++e) K[e] = w[0] * src[e];
    for (int64_t r = 1; r <= d; ++r) {
      src = weight_ + (k + r) * fw_;
      for (int64_t e = 0; e < fw_; ++e) K[e] += w[r] * src[e];
    }
    if (bias_ != nullptr) {
      T* b = bvec_[s].data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) b[c] = w[0] * bias_[k * C + c];
      for (int64_t r = 1; r <= d; ++r)
        for (int64_t c = 0; c < C; ++c) b[c] += w[r] * bias_[(k + r) * C + c];
    }
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
  std::vector<T> w_;
  std::vector<int64_t> k_;
};

ConvArgs make_conv_args(const at::Tensor& x, const at::Tensor& weight, bool has_bias, const at::Tensor& scale,
                        int64_t steps, int64_t degree, c10::string_view scheme, c10::string_view variant,
                        int64_t checkpoint) {
  ConvArgs a;
  a.B = x.size(0);
  a.C = x.size(1);
  a.P = 1;
  for (int64_t j = 2; j < x.dim(); ++j) a.P *= x.size(j);
  a.n = weight.size(0);
  a.d = degree;
  a.L = a.n - degree;
  a.N = steps;
  a.K = checkpoint;
  a.tab = parse_scheme(std::string(scheme));
  a.variant = parse_variant(std::string(variant));
  TORCH_CHECK_VALUE(a.variant != Variant::Antisymmetric,
                    "spline_conv: variant 'antisymmetric' is defined for dense layers only; expected standard or "
                    "symmetric");
  a.lam = scale.item<double>();
  TORCH_CHECK_VALUE(std::isfinite(a.lam), "spline_conv: scale must be finite, got ", a.lam);
  a.h = 1.0 / static_cast<double>(steps);
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
  const int64_t Ns = num_saved_states(a.N, a.K);
  std::vector<int64_t> shape{Ns};
  shape.insert(shape.end(), a.state_shape.begin(), a.state_shape.end());
  at::Tensor states = at::empty(shape, x.options());
  states[0].copy_(x);
  if (x.numel() == 0) {
    for (int64_t j = 1; j < Ns; ++j) states[j].copy_(x);
    return states;
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
        stepper.step(i, cur, nxt.data_ptr<scalar_t>(), false);
        cur = nxt;
      }
    });
  });
  return states;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spline_conv_bwd_cpu(
    const at::Tensor& grad_states_in, const at::Tensor& states_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale, int64_t steps, int64_t degree,
    c10::string_view activation, c10::string_view scheme, c10::string_view variant, double /*gamma*/,
    int64_t checkpoint) {
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK_VALUE(states_in.dim() >= 4 && states_in.dim() <= 6,
                    "spline_conv_bwd: states must have shape (saved, B, C, *spatial), got ", states_in.sizes());
  check_conv_args("spline_conv_bwd", states_in[0], weight_in, bias_in, scale, steps, degree, checkpoint, false);
  const int64_t Ns = num_saved_states(steps, checkpoint);
  TORCH_CHECK_VALUE(states_in.size(0) == Ns, "spline_conv_bwd: states holds ", states_in.size(0),
                    " states, expected ", Ns, " for steps = ", steps, ", checkpoint = ", checkpoint);
  const bool last_only = check_state_grad("spline_conv_bwd", grad_states_in, states_in);
  const at::Tensor states = states_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor grad_states = grad_states_in.to(states.scalar_type()).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const ConvArgs a =
      make_conv_args(states[0], weight, bias.defined(), scale, steps, degree, scheme, variant, checkpoint);
  const Act act = parse_activation(std::string(activation));
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
            stepper.step(i, state_at(i), nullptr, true);
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

}  // namespace

TORCH_LIBRARY_IMPL(splinet_cuda, CPU, m) {
  m.impl("spline_conv_fwd", &spline_conv_fwd_cpu);
  m.impl("spline_conv_bwd", &spline_conv_bwd_cpu);
}

}  // namespace splinet
