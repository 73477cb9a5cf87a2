// The dense layer's CPU ops over a leading model dimension (M models in one call: torch.func
// ensembles and per-sample gradients); the kernel is the single-model one (dense_cpu.cpp's
// hooks, models.h). Schemas: csrc/splinet_ops.cpp.
//
// Legend: M models, B batch, m width, n = L + d coefficients, N steps, K checkpoint interval.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../common/checks.h"
#include "../common/layer_config.h"
#include "models.h"

namespace splinet {
namespace {

using namespace cpu;

// The model count of the tensors' leading dims: each is M or 1 (shared by every model).
int64_t model_count(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  int64_t M = 1;
  for (const auto& [name, t] : tensors)
    if (t->defined()) M = std::max<int64_t>(M, t->size(0));
  for (const auto& [name, t] : tensors)
    TORCH_CHECK_VALUE(!t->defined() || t->size(0) == M || t->size(0) == 1, op, ": ", name,
                      " has a leading model dimension of ", t->size(0), " but another tensor has ", M,
                      ": each must be the model count or 1 (shared)");
  return M;
}

void check_model_dims(const char* op, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      const at::Tensor& scale) {
  TORCH_CHECK_VALUE(weight.dim() == 4, op, ": weight must have shape (M, n, m, m), got ", weight.sizes());
  TORCH_CHECK_VALUE(!bias.has_value() || bias->dim() == 3, op, ": bias must have shape (M, n, m), got ",
                    bias->sizes());
  TORCH_CHECK_VALUE(scale.dim() == 1, op, ": scale must have shape (M,), got ", scale.sizes());
}

ModelsCall make_call(int64_t M, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& scale, int64_t steps, int64_t degree, c10::string_view activation,
                     c10::string_view scheme, c10::string_view variant, double gamma, int64_t checkpoint) {
  ModelsCall c;
  c.M = M;
  c.weight = weight.contiguous();
  c.bias = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor lam = scale.to(at::kDouble).contiguous();
  c.lam.resize(M);
  for (int64_t mi = 0; mi < M; ++mi) c.lam[mi] = lam.const_data_ptr<double>()[lam.size(0) == 1 ? 0 : mi];
  c.steps = steps;
  c.degree = degree;
  c.activation = std::string(activation);
  c.scheme = std::string(scheme);
  c.variant = std::string(variant);
  c.gamma = gamma;
  c.checkpoint = checkpoint;
  c.shared_params = weight.size(0) == 1 && (!bias.has_value() || bias->size(0) == 1) && scale.size(0) == 1;
  return c;
}

c10::optional<at::Tensor> first_model(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>((*t)[0]) : c10::nullopt;
}

at::Tensor spline_dense_fwd_models_cpu(const at::Tensor& x, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias, const at::Tensor& scale, int64_t steps,
                                       int64_t degree, c10::string_view activation, c10::string_view scheme,
                                       c10::string_view variant, double gamma, int64_t checkpoint) {
  const char* op = "spline_dense_fwd_models (cpu)";
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must have shape (M, B, m), got ", x.sizes());
  check_model_dims(op, weight, bias, scale);
  const at::Tensor none;
  const int64_t M =
      model_count(op, {{"x", &x}, {"weight", &weight}, {"bias", bias ? &*bias : &none}, {"scale", &scale}});
  TORCH_CHECK_VALUE(x.size(0) > 0 && weight.size(0) > 0, op, ": need at least one model");
  check_dense_args(op, x[0], weight[0], first_model(bias), scale[0], steps, degree, checkpoint, false);
  ModelsCall c = make_call(M, weight, bias, scale, steps, degree, activation, scheme, variant, gamma, checkpoint);
  c.x = x.contiguous();
  at::Tensor states = at::empty({M, num_saved_states(steps, checkpoint), x.size(1), x.size(2)}, x.options());
  dense_models_forward(c, states);
  return states;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spline_dense_bwd_models_cpu(
    const at::Tensor& grad_states_in, const at::Tensor& states_in, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& scale, int64_t steps, int64_t degree,
    c10::string_view activation, c10::string_view scheme, c10::string_view variant, double gamma,
    int64_t checkpoint) {
  const char* op = "spline_dense_bwd_models (cpu)";
  TORCH_CHECK_VALUE(states_in.dim() == 4, op, ": states must have shape (M, saved, B, m), got ", states_in.sizes());
  TORCH_CHECK_VALUE(grad_states_in.dim() >= 1, op, ": grad_states must have a leading model dimension");
  check_model_dims(op, weight, bias, scale);
  const at::Tensor none;
  const int64_t M = model_count(op, {{"grad_states", &grad_states_in}, {"states", &states_in}, {"weight", &weight},
                                     {"bias", bias ? &*bias : &none}, {"scale", &scale}});
  TORCH_CHECK_VALUE(states_in.size(0) > 0 && weight.size(0) > 0, op, ": need at least one model");
  check_dense_args(op, states_in[0][0], weight[0], first_model(bias), scale[0], steps, degree, checkpoint, false);
  TORCH_CHECK_VALUE(states_in.size(1) == num_saved_states(steps, checkpoint), op, ": states holds ",
                    states_in.size(1), " states a model, expected ", num_saved_states(steps, checkpoint),
                    " for steps = ", steps, ", checkpoint = ", checkpoint);
  const bool last_only = check_state_grad(op, grad_states_in[0], states_in[0]);
  ModelsCall c = make_call(M, weight, bias, scale, steps, degree, activation, scheme, variant, gamma, checkpoint);
  const at::Tensor states = states_in.contiguous();
  const at::Tensor grad_states = grad_states_in.to(states.scalar_type()).contiguous();
  auto [grad_x, grad_w, grad_b, glam] = dense_models_backward(c, grad_states, last_only, states);
  // Each model's dL/dlam in the scale's dtype, rounded from double as spline_dense_bwd rounds it.
  at::Tensor grad_scale = at::tensor(glam, scale.options().dtype(at::kDouble)).to(scale.scalar_type());
  return {grad_x, grad_w, grad_b, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(splinet_cuda, CPU, m) {
  m.impl("spline_dense_fwd_models", &spline_dense_fwd_models_cpu);
  m.impl("spline_dense_bwd_models", &spline_dense_bwd_models_cpu);
}

}  // namespace splinet
