// Names -> ids for the layer options (SPEC 1.2-1.3), the Butcher tableaus of the
// time-stepping schemes, and the switches that turn runtime ids into template arguments.
#pragma once

#include <string>

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

// Saved-state slot of state x_i, or -1 when it is not saved (see num_saved_states).
inline int64_t saved_slot(int64_t i, int64_t steps, int64_t checkpoint) {
  if (i == steps) return num_saved_states(steps, checkpoint) - 1;
  return i % checkpoint == 0 ? i / checkpoint : -1;
}

}  // namespace splinet
