// Elementwise functors and fused-GEMM epilogues of the dense and conv layers' large-width paths.
//
// They sit around the GEMMs / convolutions that ATen runs (and the dense fused GEMM of
// blend_gemm.h): each is a functor over a flat index e (or an output entry (i, j) for the
// epilogues), launched as one grid-stride kernel on the GPU and run as a loop by the CPU
// emulation. Used by dense_driver.h and conv_driver.h.
//
// Legend: m features (dense width or conv channels C), d degree, k first nonzero coefficient,
// w its d + 1 basis weights, acc_t the accumulation type.
#pragma once

#include "block_runtime.h"

namespace splinet {

// Forward epilogue of a stage: a = (X W^T)[e] + b, kept for the adjoint (A, acc_t);
// K = lam act(a), or act(a) into Y (GEMM dtype) for the symmetric variant.
template <typename scalar_t, typename acc_t, Act ACT>
struct EpilogueFn {
  const scalar_t* prod;
  const acc_t* bv;  // bias of feature / channel (e / inner) % m
  int64_t m, inner;
  const scalar_t* scale;
  acc_t* A;
  acc_t* K;
  scalar_t* Y;
  SPLINET_HD void operator()(int64_t e) const {
    acc_t a = static_cast<acc_t>(prod[e]);
    if (bv) a = a + bv[(e / inner) % m];
    if (A) A[e] = a;
    const acc_t y = Activation<ACT>::f(a);
    if (Y) Y[e] = static_cast<scalar_t>(y);
    else K[e] = static_cast<acc_t>(scale[0]) * y;
  }
};

// K = -lam (act(a) W)[e] (symmetric variant).
template <typename scalar_t, typename acc_t>
struct NegScaleFn {
  const scalar_t* prod;
  const scalar_t* scale;
  acc_t* K;
  SPLINET_HD void operator()(int64_t e) const { K[e] = -static_cast<acc_t>(scale[0]) * static_cast<acc_t>(prod[e]); }
};

// Adjoint through the activation: V = kbar, the stage's adjoint combination evaluated here
// (or -(kbar W^T)[e] for the symmetric variant), G = lam act'(a) V (GEMM dtype),
// P = act(a) V (for dL/dlam), Y = act(a) (symmetric).
template <typename scalar_t, typename acc_t, Act ACT>
struct AdjointActFn {
  const acc_t* A;
  CombineFn<scalar_t, acc_t> kbar;  // Rk::StageAdjoint
  const scalar_t* VT;  // symmetric: kbar W^T
  const scalar_t* scale;
  scalar_t* G;
  acc_t* P;
  scalar_t* Y;
  SPLINET_HD void operator()(int64_t e) const {
    const acc_t a = A[e], y = Activation<ACT>::f(a);
    const acc_t v = VT ? -static_cast<acc_t>(VT[e]) : kbar.value(e);
    P[e] = y * v;
    G[e] = static_cast<scalar_t>(act_grad<ACT>(a, y, v, static_cast<acc_t>(scale[0])));
    if (Y) Y[e] = static_cast<scalar_t>(y);
  }
};

// Eq. 23 for one stage: the stage's weight gradient dW (dA - dA^T for the antisymmetric
// dense variant, with - lam dW2 added for the symmetric variants) and bias gradient (colsum)
// scattered into the d + 1 coefficient slots k .. k + d of the acc_t gradients:
// e < wsize an entry of one coefficient (m^2 or C^2 prod(kernel)), then bsize bias entries.
template <typename scalar_t, typename acc_t>
struct ScatterFn {
  int64_t d, k;
  acc_t w[kMaxDegree + 1];
  int64_t wsize, bsize;
  int64_t antisym_m;    // m for the antisymmetric dense variant, else 0
  const scalar_t* dW;
  const scalar_t* dW2;  // symmetric: act(a)^T kbar (dense) or its conv analogue, else null
  const acc_t* colsum;
  const scalar_t* scale;
  acc_t* gW;
  acc_t* gb;
  // Entry e of the stage's weight gradient, dw, into the d + 1 slots.
  SPLINET_HD void add_weight(int64_t e, acc_t dw) const {
    for (int64_t r = 0; r <= d; ++r) gW[(k + r) * wsize + e] = mul_add(gW[(k + r) * wsize + e], w[r], dw);
  }
  SPLINET_HD void operator()(int64_t e) const {
    if (e < wsize) {
      acc_t dw = static_cast<acc_t>(dW[e]);
      if (antisym_m) dw = dw - static_cast<acc_t>(dW[(e % antisym_m) * antisym_m + e / antisym_m]);
      if (dW2) dw = mul_add(dw, -static_cast<acc_t>(scale[0]), static_cast<acc_t>(dW2[e]));
      add_weight(e, dw);
    } else if (gb) {
      const int64_t j = e - wsize;
      for (int64_t r = 0; r <= d; ++r) gb[(k + r) * bsize + j] = mul_add(gb[(k + r) * bsize + j], w[r], colsum[j]);
    }
  }
};

// ---------------------------------------------------------------------------------------
// Epilogues of the fused GEMM (blend_gemm.h): called once per output entry (i, j) of an
// (rows x m) product with its float32 (float64) accumulator v.

// A forward stage on v = (X_s W(t)^T)[i, j]: a = v + b(t)_j (blended here, eq. 14), kept in A
// for the adjoint when A is set; K_s = lam act(a). For the symmetric variant the first
// product stores act(a) in Y and stops, and the second (neg, v = (Y W(t))[i, j]) gives
// K_s = -lam v. Then `next` runs at the entry: the next stage's input, or after the last
// stage the update x' = x + h sum b_s K_s (in place on x, and x' in the GEMM dtype as the
// next step's first stage input and, when save is set, the saved state).
template <typename scalar_t, typename acc_t, Act ACT>
struct StageEpi {
  LayerParams p;
  const scalar_t* bias;  // (n, m) or null
  int64_t k;
  acc_t w[kMaxDegree + 1];
  const scalar_t* scale;
  bool neg;
  acc_t* A;
  scalar_t* Y;
  acc_t* Ks;
  CombineFn<scalar_t, acc_t> next;
  scalar_t* save;
  SPLINET_HD void operator()(int64_t i, int64_t j, acc_t v) const {
    const int64_t e = i * p.m + j;
    const acc_t lam = static_cast<acc_t>(scale[0]);
    acc_t slope;
    if (neg) {
      slope = -lam * v;
    } else {
      acc_t a = v;
      if (bias) a = a + blend_bias(p, bias, k, w, j);
      if (A) A[e] = a;
      const acc_t y = Activation<ACT>::f(a);
      if (Y) {
        Y[e] = static_cast<scalar_t>(y);
        return;
      }
      slope = lam * y;
    }
    Ks[e] = slope;
    next(e);
    if (save) save[e] = next.out_st[e];
  }
};

// Stores the product: out_acc and/or out_st at (i, j) of a row-major (rows x m) matrix.
template <typename scalar_t, typename acc_t>
struct StoreEpi {
  int64_t m;
  acc_t* out_acc;
  scalar_t* out_st;
  SPLINET_HD void operator()(int64_t i, int64_t j, acc_t v) const {
    if (out_acc) out_acc[i * m + j] = v;
    if (out_st) out_st[i * m + j] = static_cast<scalar_t>(v);
  }
};

// Eq. 23 in the epilogue of a weight-gradient product v = (P^T Q)[i, j] summed over the
// batch: sign v (times lam when scale is set) added to the d + 1 slots of the m x m
// coefficient gradients by the stage's ScatterFn. One entry per thread and launch, so no
// atomics.
template <typename scalar_t, typename acc_t>
struct SlotScatterEpi {
  ScatterFn<scalar_t, acc_t> slots;  // wsize = m^2
  int64_t m;
  acc_t sign;
  const scalar_t* scale;
  SPLINET_HD void operator()(int64_t i, int64_t j, acc_t v) const {
    acc_t dw = sign * v;
    if (scale) dw = dw * static_cast<acc_t>(scale[0]);
    slots.add_weight(i * m + j, dw);
  }
};

// A conv filter (C, C, *kernel; wsize entries) and bias (C) of one stage, blended flat (eq. 14).
template <typename scalar_t, typename acc_t>
struct FlatBlendFn {
  int64_t d, k;
  acc_t w[kMaxDegree + 1];
  int64_t wsize, bsize;
  const scalar_t* weight;
  const scalar_t* bias;
  scalar_t* W;
  acc_t* bv;
  SPLINET_HD void operator()(int64_t e) const {
    if (e < wsize) {
      acc_t v = w[0] * static_cast<acc_t>(weight[k * wsize + e]);
      for (int64_t r = 1; r <= d; ++r) v = mul_add(v, w[r], static_cast<acc_t>(weight[(k + r) * wsize + e]));
      W[e] = static_cast<scalar_t>(v);
    } else if (bias) {
      const int64_t j = e - wsize;
      acc_t v = w[0] * static_cast<acc_t>(bias[k * bsize + j]);
      for (int64_t r = 1; r <= d; ++r) v = mul_add(v, w[r], static_cast<acc_t>(bias[(k + r) * bsize + j]));
      bv[j] = v;
    }
  }
};

}  // namespace splinet
