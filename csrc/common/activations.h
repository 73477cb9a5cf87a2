// Activations and their derivatives, matching PyTorch's CPU/CUDA formulas (ReLU'(0) = 0,
// softplus with beta = 1 and threshold = 20). Shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>

#include "bspline.h"  // SPLINET_HD

namespace splinet {

enum class Act : int { Identity = 0, Relu = 1, Tanh = 2, Sigmoid = 3, Softplus = 4 };

template <Act A>
struct Activation;

template <>
struct Activation<Act::Identity> {
  template <typename T> SPLINET_HD static T f(T a) { return a; }
  template <typename T> SPLINET_HD static T df(T, T) { return T(1); }
};

template <>
struct Activation<Act::Relu> {
  // !(a <= 0) keeps NaN, as torch.relu does.
  template <typename T> SPLINET_HD static T f(T a) { return !(a <= T(0)) ? a : T(0); }
  template <typename T> SPLINET_HD static T df(T a, T) { return a > T(0) ? T(1) : T(0); }
};

template <>
struct Activation<Act::Tanh> {
  template <typename T> SPLINET_HD static T f(T a) { return tanh(a); }
  // d tanh = 1 - y^2, from the output y = f(a).
  template <typename T> SPLINET_HD static T df(T, T y) { return T(1) - y * y; }
};

template <>
struct Activation<Act::Sigmoid> {
  template <typename T> SPLINET_HD static T f(T a) { return T(1) / (T(1) + exp(-a)); }
  template <typename T> SPLINET_HD static T df(T, T y) { return y * (T(1) - y); }
};

template <>
struct Activation<Act::Softplus> {
  // PyTorch: a > 20 ? a : log1p(exp(a)); gradient a > 20 ? 1 : e^a / (e^a + 1).
  template <typename T> SPLINET_HD static T f(T a) { return a > T(20) ? a : log1p(exp(a)); }
  template <typename T> SPLINET_HD static T df(T a, T) {
    if (a > T(20)) return T(1);
    const T z = exp(a);
    return z / (z + T(1));
  }
};

}  // namespace splinet
