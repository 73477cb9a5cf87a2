// The activations act and their derivatives act' over arrays, with a vectorised float32 tanh.
//
// Legend: n elements, a pre-activations, y = act(a), v the gradient of y, g = scale act'(a) v.
#pragma once

#include <ATen/ops/exp.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/softplus.h>
#include <ATen/ops/tanh.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/activations.h"
#include "memory.h"
#include "parallel.h"

namespace splinet {
namespace cpu {

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
  const float out = ax < 0.3f ? small : (x < 0.0f ? -big : big);
  return x != x ? x : out;  // NaN stays NaN
}

// The same over an array with AVX2 + FMA (tanh_avx2.cpp), where GCC builds it for x86-64;
// tanh_f32() picks it when the CPU has both.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPLINET_TANH_AVX2 1
void tanh_f32_avx2(const float* a, float* y, int64_t n);
#else
#define SPLINET_TANH_AVX2 0
#endif

inline void tanh_f32(const float* a, float* y, int64_t n) {
#if SPLINET_TANH_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) {
    tanh_f32_avx2(a, y, n);
    return;
  }
#endif
  for (int64_t e = 0; e < n; ++e) y[e] = tanh_poly(a[e]);
}

// y = act(a) over part of an array, on the calling thread. Every element's value depends on
// its input alone, so splitting an array across threads does not change the result.
template <typename T>
void act_forward_part(Act act, const T* a, T* y, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (act == Act::Tanh) {
      tanh_f32(a, y, n);
      return;
    }
  }
  if (act == Act::Relu) {
    for (int64_t e = 0; e < n; ++e) y[e] = Activation<Act::Relu>::f(a[e]);
    return;
  }
  at::Tensor out = wrap1d(y, n);
  const at::Tensor in = wrap1d(a, n);
  switch (act) {
    case Act::Identity: std::copy(a, a + n, y); break;
    case Act::Tanh: at::tanh_out(out, in); break;
    case Act::Sigmoid: at::sigmoid_out(out, in); break;
    case Act::Softplus: at::softplus_out(out, in, 1, 20); break;
    case Act::Relu: break;
  }
}

// y = act(a) over an array. float32 tanh is tanh_f32 at every length: ATen's tanh (SLEEF's
// 1-ulp vector tanh) measured 2.3 ns an element on 2 cores of an AMD EPYC, against well
// under 1 ns for tanh_f32, which at widths 64-1024 (bench --sizes cpu, cases dense64 to
// dense1024_b256) made the activation cost more than the forward's GEMMs. The other
// transcendental activations (and float64 tanh) go through ATen's vectorised kernels, which
// thread themselves; inside a parallel region ATen runs them on the calling thread.
template <typename T>
void act_forward(Act act, const T* a, T* y, int64_t n) {
  if (act == Act::Relu || (std::is_same_v<T, float> && act == Act::Tanh)) {
    parallel_elements(n, [&](int64_t b, int64_t e) { act_forward_part(act, a + b, y + b, e - b); });
    return;
  }
  act_forward_part(act, a, y, n);  // ATen's kernels thread themselves
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

// Whether act'(a) can be computed from y = act(a) alone, with y standing in for a
// (act_backward_part(act, y, y, ...) == act_backward_part(act, a, y, ...)): identity, tanh
// and sigmoid read only y, relu reads a > 0, which is y > 0. Not softplus.
inline bool kept_is_output(Act act) { return act != Act::Softplus; }

// act_backward on the calling thread.
template <typename T>
void act_backward_part(Act act, const T* a, const T* y, const T* v, T scale, T* g, int64_t n) {
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

// g = scale * act'(a) * v over an array, split across threads like parallel_elements.
template <typename T>
void act_backward(Act act, const T* a, const T* y, const T* v, T scale, T* g, int64_t n) {
  parallel_elements(n, [&](int64_t b, int64_t e) { act_backward_part(act, a + b, y + b, v + b, scale, g + b, e - b); });
}

}  // namespace cpu
}  // namespace splinet
