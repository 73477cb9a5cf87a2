// Host side of the CUDA convolutional SpliNet layer: path choice, buffers, launches, cuDNN runs.
//
// 1-3 spatial dims, "same" zero padding, stride 1; standard and symmetric variants. Templated
// on an executor (driver_common.h) like dense_driver.h: CudaExec on the GPU, HostExec in the
// CPU emulation used by the tests. Few channels run the direct single-launch program
// (conv_program.h); otherwise (the cuDNN path) per stage a blend kernel writes the filter K(t) and bias b(t) from the d + 1 nonzero
// coefficients (eq. 14; never a per-step filter tensor), the convolution is ATen's (cuDNN on
// the GPU, float32 accumulation for bfloat16/float16), and bias, activation, slope and the
// Runge-Kutta combinations are single elementwise kernels (step_functors.h). The adjoint walks
// back from step N - 1 to 0 recomputing each step from its saved (or segment-recomputed)
// state, takes dL/dX_s and dL/dK_s of every stage from cuDNN's data and weight gradients, and
// a scatter kernel adds dL/dK_s and dL/db_s into the d + 1 coefficient slots (eq. 23) of
// float32 (float64) accumulators.
//
// Legend: B batch, C channels, P points of one (b, c) plane, fw = C^2 prod(kernel) entries of
// one filter, n = L + d coefficients, d degree, N steps, S stages, K checkpoint interval.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <string>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/layer_config.h"
#include "conv_program.h"
#include "driver_common.h"
#include "step_functors.h"

namespace splinet {

struct ConvSetup {
  LayerParams p;  // B, m = C, n, d, L, N, K, tableau, variant, h, has_bias (gamma, TB unused)
  ConvGeom geo;
  int64_t P, fw;
  std::vector<int64_t> state_shape, ones, zeros, padding, sum_dims;
};

inline ConvSetup conv_setup(const at::Tensor& x, const at::Tensor& weight, bool has_bias, int64_t steps,
                            int64_t degree, c10::string_view scheme, c10::string_view variant, int64_t checkpoint) {
  ConvSetup c;
  c.p = layer_params(x.size(0), x.size(1), weight.size(0), has_bias, steps, degree, scheme, variant, 0.0, checkpoint);
  TORCH_CHECK_VALUE(c.p.variant != kAntisymmetric,
                    "spline_conv: variant 'antisymmetric' is defined for dense layers only; expected standard or "
                    "symmetric");
  c.P = 1;
  for (int64_t j = 2; j < x.dim(); ++j) c.P *= x.size(j);
  c.fw = weight.numel() / weight.size(0);
  c.state_shape = x.sizes().vec();
  const size_t sd = static_cast<size_t>(x.dim() - 2);
  c.ones.assign(sd, 1);
  c.zeros.assign(sd, 0);
  c.padding.resize(sd);
  for (size_t j = 0; j < sd; ++j) c.padding[j] = weight.size(3 + static_cast<int64_t>(j)) / 2;
  c.geo.C = x.size(1);
  c.geo.P = c.P;
  c.geo.fw = c.fw;
  c.geo.kprod = c.fw / (c.geo.C * c.geo.C);
  for (int64_t j = 0; j < 3; ++j) {
    const bool has = j < x.dim() - 2;
    c.geo.size[j] = has ? x.size(2 + j) : 1;
    c.geo.ksize[j] = has ? weight.size(3 + j) : 1;
    c.geo.radius[j] = c.geo.ksize[j] / 2;
  }
  c.sum_dims.push_back(0);
  for (int64_t j = 2; j < x.dim(); ++j) c.sum_dims.push_back(j);
  return c;
}

template <typename scalar_t, typename acc_t, Act ACT, typename Exec>
class ConvLarge {
 public:
  using scalar_type = scalar_t;
  ConvLarge(Exec& ex, const ConvSetup& c, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& scale)
      : ex_(ex), c_(c), p_(c.p), weight_(weight), bias_(bias), scale_(scale) {
    const auto st = weight.options(), acc = weight.options().dtype(acc_type_of<acc_t>());
    std::vector<int64_t> stage_shape{p_.S};
    stage_shape.insert(stage_shape.end(), c.state_shape.begin(), c.state_shape.end());
    std::vector<int64_t> filt_shape{p_.S};
    filt_shape.insert(filt_shape.end(), weight.sizes().begin() + 1, weight.sizes().end());
    cur_ = at::empty(c.state_shape, acc);
    X_ = at::empty(stage_shape, st);
    A_ = at::empty(stage_shape, acc);
    K_ = at::empty(stage_shape, acc);
    filt_ = at::empty(filt_shape, st);
    bv_ = at::empty({p_.S, p_.m}, acc);
    Y_ = at::empty(c.state_shape, st);
  }

  at::Tensor& cur() { return cur_; }

  // One step from cur_ (x_i) to cur_ (x_{i+1}); x_{i+1} also to save (GEMM dtype) when set.
  void step(int64_t i, scalar_t* save = nullptr) {
    const int64_t E = cur_.numel();
    const bool sym = p_.variant == kSymmetric;
    for (int s = 0; s < p_.S; ++s) {
      blend(i, s);
      ex_.for_each(E, combination(Rk::StageInput, s, cur_, nullptr, X_[s].data_ptr<scalar_t>()));
      const at::Tensor prod = conv(X_[s], s, false);
      EpilogueFn<scalar_t, acc_t, ACT> epi{prod.data_ptr<scalar_t>(), p_.has_bias ? bv_[s].data_ptr<acc_t>() : nullptr,
                                           p_.m, c_.P, scale_.data_ptr<scalar_t>(), A_[s].data_ptr<acc_t>(),
                                           K_[s].data_ptr<acc_t>(), sym ? Y_.data_ptr<scalar_t>() : nullptr};
      ex_.for_each(E, epi);
      if (sym) {  // K_s = -lam conv_transpose(act(a), K)
        const at::Tensor t = conv(Y_, s, true);
        ex_.for_each(E, NegScaleFn<scalar_t, acc_t>{t.data_ptr<scalar_t>(), scale_.data_ptr<scalar_t>(),
                                                    K_[s].data_ptr<acc_t>()});
      }
    }
    ex_.for_each(E, combination(Rk::Update, 0, cur_, cur_.data_ptr<acc_t>(), save));
  }

  void adjoint(int64_t i, at::Tensor& z, at::Tensor& gW, at::Tensor& gb, at::Tensor& glam) {
    const int64_t E = cur_.numel();
    const bool sym = p_.variant == kSymmetric;
    if (!kbar_st_.defined()) {
      kbar_st_ = at::empty(c_.state_shape, weight_.options());
      G_ = at::empty(c_.state_shape, weight_.options());
      P_ = at::empty(c_.state_shape, cur_.options());
    }
    for (int s = p_.S - 1; s >= 0; --s) {
      // V = kbar, or -conv(kbar, K) (the adjoint of conv_transpose is conv) for the symmetric variant.
      const CombineFn<scalar_t, acc_t> kbar =
          combination(Rk::StageAdjoint, s, z, nullptr, kbar_st_.data_ptr<scalar_t>());
      at::Tensor vt;
      if (sym) {
        ex_.for_each(E, kbar);
        vt = conv(kbar_st_, s, false);
      }
      AdjointActFn<scalar_t, acc_t, ACT> adj{A_[s].data_ptr<acc_t>(), kbar,
                                             sym ? vt.data_ptr<scalar_t>() : nullptr, scale_.data_ptr<scalar_t>(),
                                             G_.data_ptr<scalar_t>(), P_.data_ptr<acc_t>(),
                                             sym ? Y_.data_ptr<scalar_t>() : nullptr};
      ex_.for_each(E, adj);
      glam.add_(at::sum(P_, at::kDouble));
      // dL/dX_s = conv_transpose(G, K) and dL/dK_s = G (x) X_s (G carries lam).
      auto grads = at::convolution_backward(G_, X_[s], filt_[s], c10::nullopt, c_.ones, c_.padding, c_.ones, false,
                                            c_.zeros, 1, {true, true, false});
      K_[s].copy_(std::get<0>(grads));
      const at::Tensor dK = std::get<1>(grads).contiguous();
      at::Tensor dK2;  // symmetric: the explicit K of conv_transpose, dL/dK of <conv(kbar, K), act(a)>
      if (sym)
        dK2 = std::get<1>(at::convolution_backward(Y_, kbar_st_, filt_[s], c10::nullopt, c_.ones, c_.padding,
                                                   c_.ones, false, c_.zeros, 1, {false, true, false}))
                  .contiguous();
      at::Tensor colsum;
      if (p_.has_bias) colsum = at::sum(G_, c_.sum_dims, false, acc_type_of<acc_t>());
      ScatterFn<scalar_t, acc_t> sc{p_.d, 0, {}, c_.fw, p_.m, 0, dK.data_ptr<scalar_t>(),
                                    sym ? dK2.data_ptr<scalar_t>() : nullptr,
                                    p_.has_bias ? colsum.data_ptr<acc_t>() : nullptr, scale_.data_ptr<scalar_t>(),
                                    gW.data_ptr<acc_t>(), p_.has_bias ? gb.data_ptr<acc_t>() : nullptr};
      sc.k = stage_basis(p_, i, s, sc.w);
      ex_.for_each(c_.fw + (p_.has_bias ? p_.m : 0), sc);
    }
    ex_.for_each(E, combination(Rk::AdjointSum, 0, z, z.data_ptr<acc_t>(), nullptr));
  }

 private:
  // A Runge-Kutta combination over the stage buffers K_.
  CombineFn<scalar_t, acc_t> combination(Rk kind, int s, const at::Tensor& base, acc_t* out_acc,
                                         scalar_t* out_st) const {
    return stage_combination(p_, K_, kind, s, base, out_acc, out_st);
  }

  at::Tensor conv(const at::Tensor& in, int s, bool transposed) const {
    return at::convolution(in, filt_[s], c10::nullopt, c_.ones, c_.padding, c_.ones, transposed, c_.zeros, 1)
        .contiguous();
  }

  void blend(int64_t i, int s) {
    FlatBlendFn<scalar_t, acc_t> bl{p_.d, 0, {}, c_.fw, p_.m, weight_.data_ptr<scalar_t>(),
                                    p_.has_bias ? bias_.data_ptr<scalar_t>() : nullptr, filt_[s].data_ptr<scalar_t>(),
                                    bv_[s].data_ptr<acc_t>()};
    bl.k = stage_basis(p_, i, s, bl.w);
    ex_.for_each(c_.fw + (p_.has_bias ? p_.m : 0), bl);
  }

  Exec& ex_;
  ConvSetup c_;
  LayerParams p_;
  at::Tensor weight_, bias_, scale_;
  at::Tensor cur_, X_, A_, K_, filt_, bv_, Y_, kbar_st_, G_, P_;
};

// Paths: 0 chooses (direct when C <= kConvDirectMaxChannels, C P <= kConvDirectMaxSample and
// the filter fits in shared memory), 1 the direct single-launch program, 2 the cuDNN path.
inline bool conv_use_direct(int64_t path, const ConvSetup& c, int64_t elem_bytes, int64_t smem_budget) {
  TORCH_CHECK_VALUE(path >= 0 && path <= 2, "spline_conv: path must be 0, 1 or 2, got ", path);
  if (path == 2) return false;
  const bool fits = conv_small_smem_elems(c.p, c.geo, false) * elem_bytes <= smem_budget;
  if (path == 1) {
    TORCH_CHECK_VALUE(fits, "spline_conv: a filter of ", c.fw, " entries does not fit the direct kernel's shared memory");
    return true;
  }
  return fits && c.geo.C <= kConvDirectMaxChannels && c.geo.C * c.geo.P <= kConvDirectMaxSample;
}

template <typename scalar_t, typename acc_t>
ConvSmallArgs<scalar_t, acc_t> conv_small_args(const ConvSetup& c, const at::Tensor& weight, const at::Tensor& bias,
                                               const at::Tensor& scale) {
  ConvSmallArgs<scalar_t, acc_t> a{};
  a.p = c.p;
  a.geo = c.geo;
  a.weight = weight.data_ptr<scalar_t>();
  a.bias = c.p.has_bias ? bias.data_ptr<scalar_t>() : nullptr;
  a.scale = scale.data_ptr<scalar_t>();
  return a;
}

template <typename scalar_t, Act ACT, typename Exec>
at::Tensor conv_forward(Exec& ex, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                        const at::Tensor& scale, const ConvSetup& c, int64_t path) {
  using acc_t = at::opmath_type<scalar_t>;
  const LayerParams& p = c.p;
  std::vector<int64_t> shape{num_saved_states(p.N, p.K)};
  shape.insert(shape.end(), c.state_shape.begin(), c.state_shape.end());
  at::Tensor states = at::empty(shape, x.options());
  states[0].copy_(x);
  if (x.numel() == 0) {
    states.copy_(x.unsqueeze(0).expand_as(states));
    return states;
  }
  if (conv_use_direct(path, c, sizeof(acc_t), ex.max_smem_bytes())) {
    using Body = ConvFwdBody<scalar_t, acc_t, ACT>;
    const int64_t smem = conv_small_smem_elems(p, c.geo, false) * sizeof(acc_t);
    const int64_t grid =
        cap_grid(ex.template grid<Body>(p.B, ex.threads(), smem), conv_small_work_samples(p) * c.geo.C * c.P * sizeof(acc_t));
    at::Tensor work = at::empty({grid * conv_small_work_samples(p) * c.geo.C * c.P}, x.options().dtype(acc_type_of<acc_t>()));
    Body body{conv_small_args<scalar_t, acc_t>(c, weight, bias, scale)};
    body.args.x = x.data_ptr<scalar_t>();
    body.args.states = states.data_ptr<scalar_t>();
    body.args.work = work.data_ptr<acc_t>();
    ex.launch(body, grid, ex.threads(), smem);
    return states;
  }
  ConvLarge<scalar_t, acc_t, ACT, Exec> run(ex, c, weight, bias, scale);
  large_forward(run, p, x, states);
  return states;
}

template <typename scalar_t, Act ACT, typename Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_backward(
    Exec& ex, const at::Tensor& grad_states, bool last_only, const at::Tensor& states, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& scale, const ConvSetup& c, int64_t path) {
  using acc_t = at::opmath_type<scalar_t>;
  const LayerParams& p = c.p;
  const auto acc_opts = states.options().dtype(acc_type_of<acc_t>());
  const int64_t Ns = num_saved_states(p.N, p.K);
  at::Tensor z = at::empty(c.state_shape, acc_opts);  // dL/dx_i, from i = N down
  z.copy_(last_only ? grad_states : grad_states[Ns - 1]);
  at::Tensor gW = at::zeros(weight.sizes(), acc_opts);
  at::Tensor gb = p.has_bias ? at::zeros(bias.sizes(), acc_opts) : at::Tensor();
  at::Tensor glam = at::zeros({}, states.options().dtype(at::kDouble));
  if (states.numel() > 0 && conv_use_direct(path, c, sizeof(acc_t), ex.max_smem_bytes())) {
    using Body = ConvBwdBody<scalar_t, acc_t, ACT>;
    // The current interval's gradient slots go to shared memory when they fit beside the filter.
    ConvSetup cs = c;
    cs.p.cache_slots = conv_small_smem_elems(cs.p, c.geo, false) + conv_slot_cache_elems(cs.p, c.geo) <=
                       ex.max_smem_bytes() / static_cast<int64_t>(sizeof(acc_t));
    const int64_t smem = conv_small_smem_elems(cs.p, c.geo, true) * sizeof(acc_t), threads = ex.threads();
    const int64_t per_block =
        (conv_small_work_samples(p) * c.geo.C * c.P + p.n * (c.fw + p.m)) * sizeof(acc_t) + threads * 8;
    const int64_t grid = cap_grid(ex.template grid<Body>(p.B, threads, smem), per_block);
    at::Tensor work = at::empty({grid * conv_small_work_samples(p) * c.geo.C * c.P}, acc_opts);
    // Per-block partial gradients, summed over blocks in block order.
    at::Tensor pW = at::zeros({grid, p.n, c.fw}, acc_opts);
    at::Tensor pb = p.has_bias ? at::zeros({grid, p.n, p.m}, acc_opts) : at::Tensor();
    at::Tensor plam = at::zeros({grid * threads}, states.options().dtype(at::kDouble));
    at::Tensor grad_x = at::empty(c.state_shape, states.options());
    Body body{conv_small_args<scalar_t, acc_t>(cs, weight, bias, scale)};
    body.args.states = states.data_ptr<scalar_t>();
    body.args.grad_states = grad_states.data_ptr<scalar_t>();
    body.args.last_only = last_only;
    body.args.grad_x = grad_x.data_ptr<scalar_t>();
    body.args.pW = pW.data_ptr<acc_t>();
    body.args.pb = p.has_bias ? pb.data_ptr<acc_t>() : nullptr;
    body.args.plam = plam.data_ptr<double>();
    body.args.work = work.data_ptr<acc_t>();
    ex.launch(body, grid, threads, smem);
    at::Tensor grad_b = p.has_bias ? pb.sum(0).to(bias.scalar_type()) : at::empty({0}, states.options());
    return {grad_x, pW.sum(0).view(weight.sizes()).to(weight.scalar_type()), grad_b,
            plam.sum().to(scale.scalar_type()).reshape(scale.sizes())};
  }
  if (states.numel() > 0) {
    ConvLarge<scalar_t, acc_t, ACT, Exec> run(ex, c, weight, bias, scale);
    large_backward(run, p, states, grad_states, last_only, z, gW, gb, glam);
  }
  at::Tensor grad_b = p.has_bias ? gb.to(bias.scalar_type()) : at::empty({0}, states.options());
  return {z.to(states.scalar_type()), gW.to(weight.scalar_type()), grad_b,
          glam.to(scale.scalar_type()).reshape(scale.sizes())};
}

// One dtype's forward / backward (see dense_forward_typed).
template <typename scalar_t, typename Exec>
at::Tensor conv_forward_typed(Exec& ex, Act act, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& scale, const ConvSetup& c, int64_t path) {
  at::Tensor out;
  SPLINET_DISPATCH_ACT(act, [&] { out = conv_forward<scalar_t, ACT>(ex, x, weight, bias, scale, c, path); });
  return out;
}

template <typename scalar_t, typename Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_backward_typed(
    Exec& ex, Act act, const at::Tensor& grad_states, bool last_only, const at::Tensor& states,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& scale, const ConvSetup& c, int64_t path) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  SPLINET_DISPATCH_ACT(act, [&] {
    out = conv_backward<scalar_t, ACT>(ex, grad_states, last_only, states, weight, bias, scale, c, path);
  });
  return out;
}

// Op entry points shared by the CUDA ops (conv_cuda.cu) and the emulation ops (see
// dense_fwd_entry).
template <typename Exec>
at::Tensor conv_fwd_entry(Exec& ex, const char* op, const at::Tensor& x_in, const at::Tensor& weight_in,
                          const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale_in, int64_t steps,
                          int64_t degree, c10::string_view activation, c10::string_view scheme,
                          c10::string_view variant, int64_t checkpoint, int64_t path) {
  check_conv_args(op, x_in, weight_in, bias_in, scale_in, steps, degree, checkpoint, Exec::kHalfTypes);
  check_driver_args(op, x_in, scale_in, degree);
  const OpInputs in = fwd_inputs(x_in, weight_in, bias_in, scale_in);
  const ConvSetup c = conv_setup(in.x, in.weight, in.bias.defined(), steps, degree, scheme, variant, checkpoint);
  const Act act = parse_activation(std::string(activation));
  at::Tensor out;
  SPLINET_DISPATCH_TYPES(Exec::kHalfTypes, in.x.scalar_type(), "splinet_layer_fwd", [&] {
    out = conv_forward_typed<scalar_t>(ex, act, in.x, in.weight, in.bias, in.scale, c, path);
  });
  return out;
}

template <typename Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bwd_entry(
    Exec& ex, const char* op, const at::Tensor& grad_states_in, const at::Tensor& states_in,
    const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale_in, int64_t steps,
    int64_t degree, c10::string_view activation, c10::string_view scheme, c10::string_view variant,
    int64_t checkpoint, int64_t path) {
  TORCH_CHECK_VALUE(states_in.dim() >= 4 && states_in.dim() <= 6, op,
                    ": states must have shape (saved, B, C, *spatial), got ", states_in.sizes());
  check_conv_args(op, states_in[0], weight_in, bias_in, scale_in, steps, degree, checkpoint, Exec::kHalfTypes);
  check_driver_args(op, states_in[0], scale_in, degree);
  const OpInputs in = bwd_inputs(op, grad_states_in, states_in, weight_in, bias_in, scale_in, steps, checkpoint);
  const ConvSetup c = conv_setup(in.x[0], in.weight, in.bias.defined(), steps, degree, scheme, variant, checkpoint);
  const Act act = parse_activation(std::string(activation));
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  SPLINET_DISPATCH_TYPES(Exec::kHalfTypes, in.x.scalar_type(), "splinet_layer_bwd", [&] {
    out = conv_backward_typed<scalar_t>(ex, act, in.grad_states, in.last_only, in.x, in.weight, in.bias, in.scale, c,
                                        path);
  });
  std::get<3>(out) = std::get<3>(out).to(scale_in.scalar_type());  // in the scale's dtype
  return out;
}

}  // namespace splinet
