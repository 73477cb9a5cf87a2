// A layer's weight at one time from its spline coefficients (paper eq. 14), and the adjoint.
//
// The blend runs over the d + 1 nonzero coefficients; its adjoint scatters that weight's
// gradient into theirs (eq. 23). Shared by the dense, Hamiltonian and conv CPU kernels, with
// the spline and step sizes their arguments have in common.
//
// Legend: L knot intervals, d degree, N steps, k the first nonzero coefficient, w the d + 1
// basis values b_0(u) .. b_d(u) at that time.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/bspline.h"

namespace splinet {
namespace cpu {

// The spline and time-step sizes that every layer's arguments share.
struct SplineSteps {
  int64_t n, d, L, N, K;  // coefficients n = L + d, degree, knot intervals, steps, checkpoint interval
  double lam, h;          // the scale, the step h = 1 / N
};

inline SplineSteps spline_steps(int64_t n, int64_t degree, int64_t steps, int64_t checkpoint, double lam) {
  return {n, degree, n - degree, steps, checkpoint, lam, 1.0 / static_cast<double>(steps)};
}

// Elements of one cache-resident tile of a loop that sweeps the same array several times
// (the d + 1 terms of the blend and of the eq. 23 scatter): 16 KB of float32.
constexpr int64_t kCacheTile = 4096;

// w = the d + 1 nonzero basis values at step i's stage time t_i + frac h, rounded to T;
// returns k.
template <typename T>
inline int64_t basis_weights(int64_t i, double frac, int64_t L, int64_t N, int64_t d, T* w) {
  double wd[16];
  const int64_t k = grid_basis<double>(i, frac, L, N, static_cast<int>(d), wd);
  for (int64_t r = 0; r <= d; ++r) w[r] = T(wd[r]);
  return k;
}

// dst = c src (or dst += c src) over n elements: restrict pointers and c in a register,
// so the loop vectorises (the weights live in a member array the stores could alias).
template <typename T>
inline void blend_tile(T* __restrict__ dst, const T* __restrict__ src, const T c, int64_t n, bool add) {
  if (add) {
    for (int64_t e = 0; e < n; ++e) dst[e] += c * src[e];
  } else {
    for (int64_t e = 0; e < n; ++e) dst[e] = c * src[e];
  }
}

// Eq. 14 over the elements [e0, e1): dst = sum_r w[r] coef_r, coef_r = coef + r stride (the
// coefficients k .. k + d of one weight, coef pointing at k's), the terms added in r order.
// A tile of dst stays in L1 across the d + 1 terms.
template <typename T>
inline void blend_coefficients(T* dst, const T* coef, int64_t stride, const T* w, int64_t d, int64_t e0,
                               int64_t e1) {
  for (int64_t t0 = e0; t0 < e1; t0 += kCacheTile) {
    const int64_t t1 = std::min(e1, t0 + kCacheTile);
    blend_tile(dst + t0, coef + t0, w[0], t1 - t0, false);
    for (int64_t r = 1; r <= d; ++r) blend_tile(dst + t0, coef + r * stride + t0, w[r], t1 - t0, true);
  }
}

// Eq. 23 over the elements [e0, e1): coef_r += w[r] grad for r = 0 .. d (coef_r as in
// blend_coefficients, here the coefficients' gradients). A tile of grad stays in L1 across
// the d + 1 slots.
template <typename T>
inline void scatter_coefficients(T* coef, int64_t stride, const T* grad, const T* w, int64_t d, int64_t e0,
                                 int64_t e1) {
  for (int64_t t0 = e0; t0 < e1; t0 += kCacheTile) {
    const int64_t t1 = std::min(e1, t0 + kCacheTile);
    for (int64_t r = 0; r <= d; ++r) blend_tile(coef + r * stride + t0, grad + t0, w[r], t1 - t0, true);
  }
}

// WT = W^T for m x m matrices: the raw product loops read a blended weight by columns.
template <typename T>
inline void transpose_square(const T* W, int64_t m, T* WT) {
  for (int64_t j = 0; j < m; ++j)
    for (int64_t q = 0; q < m; ++q) WT[q * m + j] = W[j * m + q];
}

}  // namespace cpu
}  // namespace splinet
