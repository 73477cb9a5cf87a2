// Fused CPU kernels of the Hamiltonian SpliNet layer (Ruthotto & Haber, "Hamiltonian CNNs"): the whole
// N-step Verlet forward in one call and its whole discrete adjoint in one call. Schemas:
// csrc/splinet_ops.cpp; the math is splinet_cuda/reference.py::spline_ode_hamiltonian.
//
// Legend: B batch, R rows of one chunk of the batch, m width of each of the two states
// y, z (x = [y | z] is (B, 2m)), n = L + d coefficients, d degree, N steps, K checkpoint
// interval, h = 1 / N, lam = scale, c = h lam.
//
// With F_sym(x; K, b) = -act(x K^T + b) K (row vectors), step j (t_j = j h, all four
// controls blended at t_j, eq. 14 with stage fraction 0):
//
//   a1 = z_j K1^T + b1,      s1 = act(a1),   y_{j+1} = y_j - c s1 K1      (= y_j + c F_sym(z_j; K1, b1))
//   a2 = y_{j+1} K2^T + b2,  s2 = act(a2),   z_{j+1} = z_j + c s2 K2      (= z_j - c F_sym(y_{j+1}; K2, b2))
//
// Each half step is the dense layer's symmetric right-hand side with its sign; the
// adjoint of one half, x_out = x_tgt + sgn h lam F_sym(x_in; K, b), given g = dL/dx_out:
//
//   kbar = sgn h g,  V = -kbar K^T,  dL/dlam += <s, V>,  G = lam act'(a) * V,
//   dL/dx_in += G K,  dL/dK = G^T x_in - lam s^T kbar,  dL/db = colsum(G),  dL/dx_tgt = g.
//
// The adjoint of a step runs the z half (sgn -1, x_in = y_{j+1}) first, then the y half
// (sgn +1, x_in = z_j) with the updated dL/dy_{j+1}. The Verlet step could be inverted
// exactly in exact arithmetic, but the backward recomputes each step from the saved states
// (segments of K steps from the saved checkpoint), as the dense op does: inverting would
// let rounding errors of the reversed steps into the gradients.
//
// The dense kernel's building blocks do the rest: the chunks of rows and their sweeps with
// the chunk-order reduction (parallel.h, sweep.h), the products (matmul.h), the blend and
// eq. 23 scatter (spline_blend.h).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../common/activations.h"
#include "../common/checks.h"
#include "../common/layer_config.h"
#include "matmul.h"
#include "parallel.h"
#include "spline_blend.h"
#include "sweep.h"
#include "vec_activations.h"

namespace splinet {
namespace {

using namespace cpu;

struct HamArgs : SplineSteps {
  int64_t B, m;
  Act act;
  bool has_bias, use_gemm;
};

// (B, 2m) rows [r0, r0 + R) <-> a chunk state (y block, then z block).
template <typename T>
void unpack_rows(const T* src, int64_t R, int64_t m, T* dst) {
  for (int64_t r = 0; r < R; ++r) {
    std::copy(src + r * 2 * m, src + r * 2 * m + m, dst + r * m);
    std::copy(src + r * 2 * m + m, src + (r + 1) * 2 * m, dst + (R + r) * m);
  }
}

template <typename T>
void pack_rows(const T* src, int64_t R, int64_t m, T* dst) {
  for (int64_t r = 0; r < R; ++r) {
    std::copy(src + r * m, src + (r + 1) * m, dst + r * 2 * m);
    std::copy(src + (R + r) * m, src + (R + r + 1) * m, dst + r * 2 * m + m);
  }
}

// One chunk of rows [r0, r0 + R). A state of the chunk is one buffer of 2 R m values:
// y (R x m) followed by z (R x m).
template <typename T, int M>
class HamChunk {
 public:
  HamChunk(const HamArgs& a, const T* weight, const T* bias, int64_t R)
      : a_(a), weight_(weight), bias_(bias), R_(R), ops_{R, a.m, a.use_gemm} {
    const int64_t Rm = R * a.m, mm = a.m * a.m;
    K_.resize(2 * mm);
    KT_.resize(a.use_gemm ? 0 : 2 * mm);
    b_.resize(2 * a.m, T(0));
    Xin_.resize(2 * Rm);
    A_.resize(2 * Rm);
    S_.resize(2 * Rm);
    tmp_.resize(Rm);
    kbar_.resize(Rm);
    G_.resize(Rm);
    dK_.resize(mm);
    mscratch_.resize(mm);
    w_.resize(a.d + 1);
  }

  // R rows of a (B, 2m) tensor to and from the chunk's layout (sweep.h).
  void to_chunk(const T* rows, T* chunk) const { unpack_rows(rows, R_, a_.m, chunk); }
  void from_chunk(const T* chunk, T* rows) const { pack_rows(chunk, R_, a_.m, rows); }
  void add_rows(const T* rows, T* chunk) {
    const int64_t Rs = 2 * R_ * a_.m;
    if (static_cast<int64_t>(rows_.size()) < Rs) rows_.resize(Rs);
    unpack_rows(rows, R_, a_.m, rows_.data());
    for (int64_t e = 0; e < Rs; ++e) chunk[e] += rows_[e];
  }

  // The second half reads the first half's output: the adjoint's replay writes it too.
  static constexpr bool kReplayNeedsOutput = true;

  // out = one Verlet step (step i) from in; both are chunk states (y then z). Keeps each
  // half's input, pre-activation and activation for step_adjoint.
  void step(int64_t i, const T* in, T* out) {
    const int64_t Rm = R_ * a_.m;
    const T c = T(a_.h) * T(a_.lam);
    blend(i);
    const T *y = in, *z = in + Rm;
    T *y1 = out, *z1 = out + Rm;
    half(0, z);  // tmp_ = s1 K1
    for (int64_t e = 0; e < Rm; ++e) y1[e] = y[e] - c * tmp_[e];
    half(1, y1);  // tmp_ = s2 K2
    for (int64_t e = 0; e < Rm; ++e) z1[e] = z[e] + c * tmp_[e];
  }

  // Adjoint of the step just recomputed by step(i, ...): g (a chunk state: dL/dy, dL/dz)
  // holds dL/dx_{i+1} on entry and dL/dx_i on exit; eq. 23 contributions go to
  // gW (n, 2, m, m), gb (n, 2, m), glam.
  void step_adjoint(T* g, T* gW, T* gb, double& glam) {
    const int64_t Rm = R_ * a_.m;
    T *gy = g, *gz = g + Rm;
    half_adjoint(1, T(-1), gz, gy, gW, gb, glam);  // z_{i+1} = z_i + c s2 K2, input y_{i+1}
    half_adjoint(0, T(1), gy, gz, gW, gb, glam);   // y_{i+1} = y_i - c s1 K1, input z_i
  }

 private:
  const T* KT(int q) const { return a_.use_gemm ? nullptr : &KT_[q * a_.m * a_.m]; }

  // Half q (0: K1, b1; 1: K2, b2) at input x: a = x K^T + b, s = act(a), tmp_ = s K.
  void half(int q, const T* x) {
    const int64_t Rm = R_ * a_.m, m = a_.m;
    T* X = &Xin_[q * Rm];
    std::copy(x, x + Rm, X);
    T* Ap = &A_[q * Rm];
    const T* Kq = &K_[q * m * m];
    ops_.nt(X, Kq, KT(q), Ap);
    if (a_.has_bias) ops_.add_bias(Ap, &b_[q * m], 0, Rm);
    T* S = &S_[q * Rm];
    act_forward(a_.act, Ap, S, Rm);
    ops_.nn(S, Kq, tmp_.data());
  }

  // Adjoint of x_out = x_tgt + sgn h lam F_sym(x_in; K_q, b_q) (see the header): g_out is
  // dL/dx_out (also dL/dx_tgt, left as is), g_in gets += dL/dx_in.
  void half_adjoint(int q, T sgn, const T* g_out, T* g_in, T* gW, T* gb, double& glam) {
    const int64_t Rm = R_ * a_.m, m = a_.m, mm = m * m;
    const T lam = T(a_.lam), hs = sgn * T(a_.h);
    const T* Kq = &K_[q * mm];
    for (int64_t e = 0; e < Rm; ++e) kbar_[e] = hs * g_out[e];
    ops_.nt(kbar_.data(), Kq, KT(q), tmp_.data());
    for (int64_t e = 0; e < Rm; ++e) tmp_[e] = -tmp_[e];  // V = -kbar K^T
    const T* S = &S_[q * Rm];
    glam += dot_double(S, tmp_.data(), Rm);
    act_backward(a_.act, &A_[q * Rm], S, tmp_.data(), lam, G_.data(), Rm);
    ops_.nn(G_.data(), Kq, tmp_.data());  // dL/dx_in = G K
    for (int64_t e = 0; e < Rm; ++e) g_in[e] += tmp_[e];
    ops_.tn(G_.data(), &Xin_[q * Rm], dK_.data());  // G^T x_in
    ops_.tn(S, kbar_.data(), mscratch_.data());     // s^T kbar
    for (int64_t e = 0; e < mm; ++e) dK_[e] -= lam * mscratch_[e];
    scatter(q, gW, gb);
  }

  // K_q, b_q = sum_r b_r(u) * coefficient[k + r][q] at t_i (eq. 14, stage fraction 0).
  void blend(int64_t i) {
    const int64_t m = a_.m, mm = m * m, d = a_.d;
    k_ = basis_weights(i, 0.0, a_.L, a_.N, d, w_.data());
    for (int q = 0; q < 2; ++q) {  // coefficient k + r of half q at (k + r) * 2 + q
      blend_coefficients(&K_[q * mm], weight_ + (k_ * 2 + q) * mm, 2 * mm, w_.data(), d, 0, mm);
      if (!a_.use_gemm) transpose_square(&K_[q * mm], m, &KT_[q * mm]);
      if (a_.has_bias) blend_coefficients(&b_[q * m], bias_ + (k_ * 2 + q) * m, 2 * m, w_.data(), d, 0, m);
    }
  }

  // Eq. 23: half q's dL/dK and dL/db go to the coefficient slots (k .. k + d, q).
  void scatter(int q, T* gW, T* gb) {
    const int64_t m = a_.m, mm = m * m, d = a_.d;
    scatter_coefficients(gW + (k_ * 2 + q) * mm, 2 * mm, dK_.data(), w_.data(), d, 0, mm);
    if (a_.has_bias) {
      ops_.colsum(G_.data(), mscratch_.data());
      scatter_coefficients(gb + (k_ * 2 + q) * m, 2 * m, mscratch_.data(), w_.data(), d, 0, m);
    }
  }

  const HamArgs& a_;
  const T* weight_;
  const T* bias_;
  int64_t R_;
  MatOps<T, M> ops_;
  int64_t k_ = 0;
  std::vector<T> K_, KT_, b_, Xin_, A_, S_, tmp_, kbar_, G_, dK_, mscratch_, w_;
  std::vector<T> rows_;  // add_rows' unpacked rows
};

void check_hamiltonian_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& scale, int64_t steps,
                            int64_t degree, c10::string_view scheme, c10::string_view variant, int64_t checkpoint) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) % 2 == 0, op, ": x must have shape (B, 2m), the states [y | z], got ",
                    x.sizes());
  const int64_t m = x.size(1) / 2;
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == 2 && weight.size(2) == m && weight.size(3) == m, op,
                    ": weight must have shape (n, 2, m, m) with m = ", m, " (x is (B, 2m)), got ", weight.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   " (cpu): x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
                   " differs from x dtype ", x.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 3 && bias->size(0) == weight.size(0) && bias->size(1) == 2 && bias->size(2) == m,
                      op, ": bias must have shape (n, 2, m) = (", weight.size(0), ", 2, ", m, "), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                     " differs from x dtype ", x.scalar_type());
  }
  check_layer_common_args(op, weight, scale, steps, degree, checkpoint);
  // The scheme and variant strings keep the dense ops' schema (and layer_function); only
  // this pair names the Hamiltonian layer.
  TORCH_CHECK_VALUE(std::string(scheme) == "verlet", op, ": scheme must be 'verlet' (the layer's only scheme), got '",
                    std::string(scheme), "'");
  TORCH_CHECK_VALUE(std::string(variant) == "hamiltonian", op, ": variant must be 'hamiltonian', got '",
                    std::string(variant), "'");
}

HamArgs make_args(const at::Tensor& x, const at::Tensor& weight, bool has_bias, const at::Tensor& scale,
                  int64_t steps, int64_t degree, c10::string_view activation, int64_t checkpoint) {
  HamArgs a;
  static_cast<SplineSteps&>(a) = spline_steps(weight.size(0), degree, steps, checkpoint, scale.item<double>());
  a.B = x.size(0);
  a.m = x.size(1) / 2;
  a.act = parse_activation(std::string(activation));
  a.has_bias = has_bias;
  a.use_gemm = a.m >= kGemmMinWidth;
  return a;
}

// Chunks of the batch: a row's working width is 2m (y and z), one chunk's partial weight
// gradient 2 n m^2.
std::vector<int64_t> ham_chunk_bounds(const HamArgs& a) {
  return chunk_bounds(a.B, 2 * a.m, 2 * a.n * a.m * a.m, a.use_gemm);
}

// gamma is part of the schema (the dense ops' shape, reused by layer_function) and unused.
at::Tensor spline_hamiltonian_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                      const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale,
                                      int64_t steps, int64_t degree, c10::string_view activation,
                                      c10::string_view scheme, c10::string_view variant, double /*gamma*/,
                                      int64_t checkpoint) {
  check_hamiltonian_args("spline_hamiltonian_fwd", x_in, weight_in, bias_in, scale, steps, degree, scheme, variant,
                         checkpoint);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const HamArgs a = make_args(x, weight, bias.defined(), scale, steps, degree, activation, checkpoint);
  const int64_t Ns = num_saved_states(a.N, a.K);
  at::Tensor states = at::empty({Ns, a.B, 2 * a.m}, x.options());
  if (a.B == 0) return states;
  const auto bounds = ham_chunk_bounds(a);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spline_hamiltonian_fwd_cpu", [&] {
    dispatch_width(a.use_gemm ? 0 : a.m, [&](auto width) {
      constexpr int M = decltype(width)::value;
      const scalar_t* W = weight.const_data_ptr<scalar_t>();
      const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
      forward_chunks(bounds, a.N, a.K, a.B, 2 * a.m, x.const_data_ptr<scalar_t>(), states.data_ptr<scalar_t>(),
                     [&](int64_t, int64_t R) { return HamChunk<scalar_t, M>(a, W, b, R); });
    });
  });
  return states;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spline_hamiltonian_bwd_cpu(
    const at::Tensor& grad_states_in, const at::Tensor& states_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale, int64_t steps, int64_t degree,
    c10::string_view activation, c10::string_view scheme, c10::string_view variant, double /*gamma*/,
    int64_t checkpoint) {
  TORCH_CHECK_VALUE(states_in.dim() == 3, "spline_hamiltonian_bwd: states must have shape (saved, B, 2m), got ",
                    states_in.sizes());
  TORCH_CHECK_VALUE(states_in.size(0) >= 1, "spline_hamiltonian_bwd: states is empty");
  check_hamiltonian_args("spline_hamiltonian_bwd", states_in[0], weight_in, bias_in, scale, steps, degree, scheme,
                         variant, checkpoint);
  TORCH_CHECK_VALUE(states_in.size(0) == num_saved_states(steps, checkpoint), "spline_hamiltonian_bwd: states holds ",
                    states_in.size(0), " states, expected ", num_saved_states(steps, checkpoint), " for steps = ",
                    steps, ", checkpoint = ", checkpoint);
  const bool last_only = check_state_grad("spline_hamiltonian_bwd", grad_states_in, states_in);
  const at::Tensor states = states_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor grad_states = grad_states_in.to(states.scalar_type()).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const HamArgs a = make_args(states[0], weight, bias.defined(), scale, steps, degree, activation, checkpoint);
  at::Tensor grad_x = at::empty({a.B, 2 * a.m}, states.options());
  at::Tensor grad_w = at::zeros_like(weight);
  at::Tensor grad_b = bias.defined() ? at::zeros_like(bias) : at::empty({0}, states.options());
  double glam = 0.0;
  if (a.B > 0) {
    const auto bounds = ham_chunk_bounds(a);
    AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "spline_hamiltonian_bwd_cpu", [&] {
      dispatch_width(a.use_gemm ? 0 : a.m, [&](auto width) {
        constexpr int M = decltype(width)::value;
        const scalar_t* W = weight.const_data_ptr<scalar_t>();
        const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
        glam = backward_chunks(bounds, a.N, a.K, a.B, 2 * a.m, last_only, states.const_data_ptr<scalar_t>(),
                               grad_states.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                               grad_w.data_ptr<scalar_t>(), a.n * 2 * a.m * a.m,
                               a.has_bias ? grad_b.data_ptr<scalar_t>() : nullptr, a.n * 2 * a.m,
                               [&](int64_t, int64_t R) { return HamChunk<scalar_t, M>(a, W, b, R); });
      });
    });
  }
  at::Tensor grad_scale = at::full(scale.sizes(), glam, scale.options());
  return {grad_x, grad_w, grad_b, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(splinet_cuda, CPU, m) {
  m.impl("spline_hamiltonian_fwd", &spline_hamiltonian_fwd_cpu);
  m.impl("spline_hamiltonian_bwd", &spline_hamiltonian_bwd_cpu);
}

}  // namespace splinet
