// Names -> ids for the layer options (activation, variant, scheme), the Butcher tableaus of the
// time-stepping schemes, and the switches that turn runtime ids into template arguments.
#pragma once

#include <string>

#include <ATen/core/Tensor.h>

#include <c10/util/Exception.h>

#include "activations.h"

namespace splinet {

enum class Variant : int { Standard = 0, Symmetric = 1, Antisymmetric = 2 };

// Explicit Runge-Kutta: X_s = x + h sum_{j<s} a[s][j] K_j at time t + c[s] h,
// x' = x + h sum_s b[s] K_s. Same values as splinet_cuda/_schemes.py.
struct Tableau {
  int stages;
  double a[4][4];
  double b[4];
  double c[4];
};

inline Tableau parse_scheme(const std::string& s) {
  if (s == "euler") return {1, {{0}}, {1.0}, {0.0}};
  if (s == "midpoint") return {2, {{0}, {0.5}}, {0.0, 1.0}, {0.0, 0.5}};
  if (s == "rk4")
    return {4, {{0}, {0.5}, {0.0, 0.5}, {0.0, 0.0, 1.0}}, {1.0 / 6, 1.0 / 3, 1.0 / 3, 1.0 / 6}, {0.0, 0.5, 0.5, 1.0}};
  if (s == "rk4_38")
    return {4, {{0}, {1.0 / 3}, {-1.0 / 3, 1.0}, {1.0, -1.0, 1.0}}, {1.0 / 8, 3.0 / 8, 3.0 / 8, 1.0 / 8},
            {0.0, 1.0 / 3, 2.0 / 3, 1.0}};
  TORCH_CHECK_VALUE(false, "unknown scheme '", s, "'; expected euler, midpoint, rk4 or rk4_38");
}

inline Act parse_activation(const std::string& s) {
  if (s == "identity") return Act::Identity;
  if (s == "relu") return Act::Relu;
  if (s == "tanh") return Act::Tanh;
  if (s == "sigmoid") return Act::Sigmoid;
  if (s == "softplus") return Act::Softplus;
  TORCH_CHECK_VALUE(false, "unknown activation '", s, "'; expected identity, relu, tanh, sigmoid or softplus");
}

inline Variant parse_variant(const std::string& s) {
  if (s == "standard") return Variant::Standard;
  if (s == "symmetric") return Variant::Symmetric;
  if (s == "antisymmetric") return Variant::Antisymmetric;
  TORCH_CHECK_VALUE(false, "unknown variant '", s, "'; expected standard, symmetric or antisymmetric");
}

// Runs `body` with `ACT` a constexpr Act equal to the runtime `act`.
#define SPLINET_DISPATCH_ACT(act, ...)                                                   \
  [&] {                                                                                  \
    switch (act) {                                                                       \
      case ::splinet::Act::Identity: { constexpr auto ACT = ::splinet::Act::Identity; return __VA_ARGS__(); } \
      case ::splinet::Act::Relu: { constexpr auto ACT = ::splinet::Act::Relu; return __VA_ARGS__(); }         \
      case ::splinet::Act::Tanh: { constexpr auto ACT = ::splinet::Act::Tanh; return __VA_ARGS__(); }         \
      case ::splinet::Act::Sigmoid: { constexpr auto ACT = ::splinet::Act::Sigmoid; return __VA_ARGS__(); }   \
      default: { constexpr auto ACT = ::splinet::Act::Softplus; return __VA_ARGS__(); }                       \
    }                                                                                    \
  }()

// Number of saved states of a forward pass that keeps every `checkpoint`-th state:
// x_0, x_K, x_2K, ... (all below N) and x_N.
inline int64_t num_saved_states(int64_t steps, int64_t checkpoint) {
  return (steps + checkpoint - 1) / checkpoint + 1;
}

// The backward ops take dLoss/d(saved states), shaped like the states, or dLoss/dx_N alone,
// shaped like one state (the layer's output when no trajectory is returned), which spares
// a zero-filled tensor of all saved states. Returns whether `grad` is the latter.
inline bool check_state_grad(const char* op, const at::Tensor& grad, const at::Tensor& states) {
  const bool last_only = grad.dim() == states.dim() - 1 && grad.sizes() == states.sizes().slice(1);
  TORCH_CHECK_VALUE(last_only || grad.sizes() == states.sizes(), op, ": grad_states must have the shape of states ",
                    states.sizes(), " or of one state ", states.sizes().slice(1), ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.is_floating_point(), op, ": grad_states must be floating, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == states.device(), op, ": grad_states is on ", grad.device(),
                    " but states is on ", states.device());
  return last_only;
}

// Saved-state slot of state x_i, or -1 when it is not saved (see num_saved_states).
inline int64_t saved_slot(int64_t i, int64_t steps, int64_t checkpoint) {
  if (i == steps) return num_saved_states(steps, checkpoint) - 1;
  return i % checkpoint == 0 ? i / checkpoint : -1;
}

}  // namespace splinet
