// The uniform B-spline basis (SpliNet paper, eqs. 9-10, on uniform knots), shared by the CPU
// and CUDA kernels.
//
// Legend: L knot intervals on [0, 1], d degree, n = L + d coefficients, N time steps.
// Knots tau_k = k / L for every integer k (the uniform knot vector extends past both
// ends), so at t in [0, 1] with k = min(floor(t L), L - 1), u = t L - k, exactly the
// coefficients j = k .. k + d are nonzero, with weights b_r(u), r = 0 .. d
// (Cox-de Boor, paper eqs. 9-10).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SPLINET_HD __host__ __device__ __forceinline__
#else
#define SPLINET_HD inline
#endif

namespace splinet {

// a + b * c with the product and the sum rounded one by one. The CPU build never fuses them
// (x86-64 code without -mfma has no FMA instruction), but the device compiler contracts
// a + b * c into one FMA, whose single rounding makes the device's values differ from the
// CPU's in the last bit; the _rn intrinsics are never contracted. Host code is unchanged.
template <typename T>
SPLINET_HD T add_product_rn(T a, T b, T c) {
#ifdef __CUDA_ARCH__
  if constexpr (std::is_same<T, double>::value) {
    return __dadd_rn(a, __dmul_rn(b, c));
  } else if constexpr (std::is_same<T, float>::value) {
    return __fadd_rn(a, __fmul_rn(b, c));
  } else {
    return a + b * c;
  }
#else
  return a + b * c;
#endif
}

// Cox-de Boor's triangular scheme (de Boor's BasisFuns) on uniform unit knots.
// With knots at the integers and u in the interval [0, 1], the scheme's
// left[j] = u + j - 1 and right[j] = j - u, so every denominator
// right[r + 1] + left[j - r] equals j: no knot array is needed. Works for any
// degree; `w` must hold degree + 1 values. With a compile-time degree the loops unroll.
template <typename T>
SPLINET_HD void bspline_weights(T u, int degree, T* w) {
  w[0] = T(1);
  for (int j = 1; j <= degree; ++j) {
    T saved = T(0);
    const T inv_j = T(1) / T(j);
    for (int r = 0; r < j; ++r) {
      const T temp = w[r] * inv_j;
      w[r] = add_product_rn(saved, T(r + 1) - u, temp);  // rounded as on the CPU
      saved = (u + T(j - r - 1)) * temp;
    }
    w[j] = saved;
  }
}

// Position x = t * L in units of knot intervals -> (first nonzero coefficient k, u).
// t = 1 belongs to the last interval. The caller has checked 0 <= x <= L.
SPLINET_HD int64_t knot_interval(double x, int64_t L, double* u) {
  int64_t k = static_cast<int64_t>(floor(x));
  if (k > L - 1) k = L - 1;
  if (k < 0) k = 0;
  *u = x - static_cast<double>(k);
  return k;
}

// Position of the time t = (i + c) / N of step i, stage fraction c, in knot units.
// Written as ((i + c) * L) / N so that t = i / N with L = N lands exactly on knot i
// (paper Remark 1). The Python basis table uses the same expression.
SPLINET_HD double grid_position(int64_t i, double c, int64_t L, int64_t N) {
  return ((static_cast<double>(i) + c) * static_cast<double>(L)) / static_cast<double>(N);
}

// Basis of step i, stage fraction c: writes degree + 1 weights, returns k.
template <typename T>
SPLINET_HD int64_t grid_basis(int64_t i, double c, int64_t L, int64_t N, int degree, T* w) {
  double u;
  const int64_t k = knot_interval(grid_position(i, c, L, N), L, &u);
  bspline_weights<T>(static_cast<T>(u), degree, w);
  return k;
}

}  // namespace splinet
