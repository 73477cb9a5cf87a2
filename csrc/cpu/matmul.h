// The matrix products of one chunk of rows, and the kernels' fixed-order sums.
//
// MatOps runs raw loops for small widths and a GEMM (ATen's or sgemm_avx512) for large ones.
//
// Legend: R rows of one chunk of the batch, m width (M when a compile-time constant).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "memory.h"

namespace splinet {
namespace cpu {

// Widths from which the products of a chunk go through a GEMM (ATen's or sgemm_avx512, one
// thread per chunk) instead of MatOps' raw loops: at B = 4096 the raw loops lost to it
// from m = 16 on (bench --sizes sweep on a 2-core x86 machine).
constexpr int64_t kGemmMinWidth = 16;

// Partial sums of the fixed-order reductions below (one vector of float32 with AVX2).
constexpr int kLanes = 8;

// Rows of a float32 sum over rows (the row-major chunks' small-width weight gradients, the
// transposed chunks' bias gradients, the conv bias and scale gradients' points) added in
// float32 before their run's sum goes into a float64 total. Added in one float32 sequence, R
// rows whose terms cancel leave an error of up to R roundings of the terms (the bias gradient
// 2.2e-3 off, scaled, at 2341 equal rows, where PyTorch's pairwise sums were 20-30 times
// closer); in runs of 64 rows (8 a lane in the lane sums) at most 64 (8), for one float64 add
// per run and output, where a float64 sum of every term would take a conversion and a
// float64 add (half the vector width) per term. float64 sums take one run: their order, and
// bits, are as before.
template <typename T>
constexpr int64_t kSumBlock = std::is_same_v<T, float> ? 64 : std::numeric_limits<int64_t>::max();

// sum_r x[r] in kLanes partial sums, lane l taking r = l mod kLanes, added pairwise at the
// end: a fixed order that vectorises without reassociation. The lanes sum runs of
// kSumBlock<T> values into float64 totals.
template <typename T>
double lane_sum(const T* __restrict__ x, int64_t n) {
  double total[kLanes] = {};
  T acc[kLanes] = {};
  const int64_t whole = n - n % kLanes;
  int64_t r = 0;
  while (r < whole) {  // the inner loop as one vector add a step (runs end on a whole vector)
    const int64_t stop = whole - r > kSumBlock<T> ? r + kSumBlock<T> : whole;
    for (; r < stop; r += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] += x[r + l];
    for (int l = 0; l < kLanes; ++l) {
      total[l] += acc[l];
      acc[l] = T(0);
    }
  }
  for (int l = 0; r < n; ++r, ++l) acc[l] += x[r];
  for (int l = 0; l < kLanes; ++l) total[l] += acc[l];
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) total[l] += total[l + w];
  return total[0];
}

// sum_e x[e] y[e] accumulated in double, in four independent chains (a fixed order).
template <typename T>
double dot_double(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t e = 0;
  for (; e + 4 <= n; e += 4)
    for (int q = 0; q < 4; ++q) acc[q] += static_cast<double>(x[e + q]) * static_cast<double>(y[e + q]);
  for (; e < n; ++e) acc[0] += static_cast<double>(x[e]) * static_cast<double>(y[e]);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// float32 C (M x N, ldc) = A B: A (M x K) row-major (lda), or
// A(i, k) = a[k lda + i] with a_trans; B (K x N) row-major (ldb), or B(k, j) = b[j ldb + k]
// with b_trans. AVX-512 (sgemm_avx512.cpp); threaded over column panels when `threaded` and
// not already inside a parallel region. Built where GCC targets x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPLINET_SGEMM_AVX512 1
void sgemm_avx512(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, bool a_trans, const float* b,
                  int64_t ldb, bool b_trans, float* c, int64_t ldc, bool threaded);
// Whether float32 chunk products take sgemm_avx512 rather than ATen's GEMM: on CPUs with
// AVX-512 that are not Intel's, where MKL (ATen's BLAS on x86) runs its AVX2 code.
// SPLINET_CPU_GEMM=aten or =avx512 forces either (avx512 only where the CPU has it); read
// once.
bool use_sgemm_avx512();
#else
#define SPLINET_SGEMM_AVX512 0
inline bool use_sgemm_avx512() { return false; }
#endif

// Products on a chunk: X (R x m), W (m x m, out x in, and WT = W^T), results overwrite
// `out`. M > 0 is the width as a compile-time constant (small widths, loops unrolled), M = 0
// reads it at run time. The raw loops are all in axpy form, so they vectorise without
// reassociating sums.
//
// SoA (M > 0 only): the chunk's R x m arrays are stored transposed, m rows of R values
// (element (r, j) at j R + r), so that every axpy runs over R contiguous values instead of
// a row of m = 2-8, which no vector width divides evenly (bench case peaks, m = 5, B = 1000:
// fwd+bwd 15% faster). to_chunk / from_chunk / add_rows convert between a block of R rows
// of a (B, m) tensor and this layout.
template <typename T, int M>
struct MatOps {
  int64_t R, m_rt;
  bool gemm;
  bool soa = false;  // the transposed layout (M > 0 only)

  int64_t m() const { return M > 0 ? M : m_rt; }

  // chunk = rows (R x m, row-major), in this layout.
  void to_chunk(const T* __restrict__ rows, T* __restrict__ chunk) const {
    if constexpr (M > 0) {
      if (soa) {
        for (int64_t r = 0; r < R; ++r)
          for (int j = 0; j < M; ++j) chunk[j * R + r] = rows[r * M + j];
        return;
      }
    }
    std::copy(rows, rows + R * m(), chunk);
  }
  // rows (R x m, row-major) = chunk.
  void from_chunk(const T* __restrict__ chunk, T* __restrict__ rows) const {
    if constexpr (M > 0) {
      if (soa) {
        for (int64_t r = 0; r < R; ++r)
          for (int j = 0; j < M; ++j) rows[r * M + j] = chunk[j * R + r];
        return;
      }
    }
    std::copy(chunk, chunk + R * m(), rows);
  }
  // chunk += rows (R x m, row-major).
  void add_rows(const T* __restrict__ rows, T* __restrict__ chunk) const {
    if constexpr (M > 0) {
      if (soa) {
        for (int64_t r = 0; r < R; ++r)
          for (int j = 0; j < M; ++j) chunk[j * R + r] += rows[r * M + j];
        return;
      }
    }
    const int64_t n = R * m();
    for (int64_t e = 0; e < n; ++e) chunk[e] += rows[e];
  }
  // chunk[e] += bias[column of e] over the flat range [e0, e1) of the chunk's array.
  void add_bias(T* __restrict__ chunk, const T* __restrict__ bias, int64_t e0, int64_t e1) const {
    if constexpr (M > 0) {
      if (soa) {
        for (int64_t j = e0 / R; j < M && j * R < e1; ++j) {
          const int64_t lo = std::max(e0, j * R), hi = std::min(e1, (j + 1) * R);
          const T bj = bias[j];
          for (int64_t e = lo; e < hi; ++e) chunk[e] += bj;
        }
        return;
      }
    }
    const int64_t m = this->m();
    for (int64_t r = e0 / m; r < e1 / m; ++r)
      for (int64_t j = 0; j < m; ++j) chunk[r * m + j] += bias[j];
  }

  // MKL's GEMM can round differently when an operand is not 16-byte aligned (seen on an
  // AMD EPYC in float32 and float64: the same values at an 8-byte offset gave other bits),
  // and the chunks' operands sit at offsets of R m elements in stage buffers, state rows and
  // kept tensors, which differ between the kept and the replaying backward. So an operand
  // off kScratchAlign is first copied to an aligned per-thread buffer (`slot` 0 or 1, one
  // per operand): the same values then give the same product wherever they are kept. Rows
  // of a multiple of 16 floats (8 doubles) never need the copy.
  static const T* gemm_operand(const T* p, int64_t n, int slot) {
    if (reinterpret_cast<std::uintptr_t>(p) % kScratchAlign == 0) return p;
    thread_local Scratch<T> buf[2];
    Scratch<T>& b = buf[slot];
    if (b.size() < n) b.resize(n);
    std::copy(p, p + n, b.data());
    return b.data();
  }

  // out (rows x cols) = op(A) op(B) on a GEMM over `depth`: A stored rows x depth, or depth x
  // rows with a_trans; B stored depth x cols, or cols x depth with b_trans; all dense
  // row-major. sgemm_avx512 where use_sgemm_avx512() says so, else ATen's with aligned
  // operands (gemm_operand).
  static void gemm_product(int64_t rows, int64_t cols, int64_t depth, const T* a, bool a_trans, const T* b,
                           bool b_trans, T* out) {
#if SPLINET_SGEMM_AVX512
    if constexpr (std::is_same_v<T, float>) {
      if (use_sgemm_avx512())
        return sgemm_avx512(rows, cols, depth, a, a_trans ? rows : depth, a_trans, b, b_trans ? depth : cols, b_trans,
                            out, cols, true);
    }
#endif
    const T* ap = gemm_operand(a, rows * depth, 0);
    const T* bp = gemm_operand(b, depth * cols, 1);
    at::Tensor o = wrap(out, rows, cols);
    at::mm_out(o, a_trans ? wrap(ap, depth, rows).t() : wrap(ap, rows, depth),
               b_trans ? wrap(bp, cols, depth).t() : wrap(bp, depth, cols));
  }

  // out = X W^T
  void nt(const T* __restrict__ X, const T* W, const T* __restrict__ WT, T* __restrict__ out) const {
    const int64_t m = this->m();
    if constexpr (M > 0) {
      if (soa) {  // out_j = sum_k W[j][k] X_k, k ascending (as the row-major loop adds)
        T w[M * M];
        std::copy(W, W + M * M, w);
        for (int64_t r = 0; r < R; ++r) {  // vectorised over r; the M x M sums unrolled
          T x[M];
          for (int k = 0; k < M; ++k) x[k] = X[k * R + r];
          for (int j = 0; j < M; ++j) {
            T acc = T(0);
            for (int k = 0; k < M; ++k) acc += w[j * M + k] * x[k];
            out[j * R + r] = acc;
          }
        }
        return;
      }
    }
    if (gemm) {
      gemm_product(R, m, m, X, false, W, true, out);
      return;
    }
    for (int64_t r = 0; r < R; ++r) {
      T* o = out + r * m;
      for (int64_t j = 0; j < m; ++j) o[j] = T(0);
      for (int64_t k = 0; k < m; ++k) {
        const T xk = X[r * m + k];
        const T* wt = WT + k * m;
        for (int64_t j = 0; j < m; ++j) o[j] += xk * wt[j];
      }
    }
  }
  // out = G W
  void nn(const T* __restrict__ G, const T* __restrict__ W, T* __restrict__ out) const {
    const int64_t m = this->m();
    if constexpr (M > 0) {
      if (soa) {  // out_k = sum_j W[j][k] G_j, j ascending
        T w[M * M];
        std::copy(W, W + M * M, w);
        for (int64_t r = 0; r < R; ++r) {
          T g[M];
          for (int j = 0; j < M; ++j) g[j] = G[j * R + r];
          for (int k = 0; k < M; ++k) {
            T acc = T(0);
            for (int j = 0; j < M; ++j) acc += w[j * M + k] * g[j];
            out[k * R + r] = acc;
          }
        }
        return;
      }
    }
    if (gemm) {
      gemm_product(R, m, m, G, false, W, false, out);
      return;
    }
    for (int64_t r = 0; r < R; ++r) {
      T* o = out + r * m;
      for (int64_t k = 0; k < m; ++k) o[k] = T(0);
      for (int64_t j = 0; j < m; ++j) {
        const T g = G[r * m + j];
        const T* w = W + j * m;
        for (int64_t k = 0; k < m; ++k) o[k] += g * w[k];
      }
    }
  }
  // out (m x m) = G^T X. The row-major raw loops sum the rows in runs of kSumBlock<T> into
  // float64 totals (float32: see kSumBlock; float64: one run, the sums as they were).
  void tn(const T* __restrict__ G, const T* __restrict__ X, T* __restrict__ out) const {
    const int64_t m = this->m();
    constexpr int64_t block = kSumBlock<T>;
    if constexpr (M > 0) {
      if (soa) {  // out[j][k] = G_j . X_k, in kLanes fixed partial sums each
        // float32 throughout: a transposed chunk holds at most kSoAMaxRows = 512 rows, so a
        // lane adds at most 64, as many as one run of kSumBlock (a run of 8 a lane would
        // cost a quarter of this loop's vector operations in float64 adds).
        for (int j = 0; j < M; ++j) {
          T acc[M][kLanes] = {};
          const T* __restrict__ g = G + j * R;
          int64_t r = 0;
          for (; r + kLanes <= R; r += kLanes)
            for (int k = 0; k < M; ++k)
              for (int l = 0; l < kLanes; ++l) acc[k][l] += g[r + l] * X[k * R + r + l];
          for (int l = 0; r < R; ++r, ++l)
            for (int k = 0; k < M; ++k) acc[k][l] += g[r] * X[k * R + r];
          for (int k = 0; k < M; ++k) {
            for (int w = kLanes / 2; w > 0; w /= 2)
              for (int l = 0; l < w; ++l) acc[k][l] += acc[k][l + w];
            out[j * M + k] = acc[k][0];
          }
        }
        return;
      }
    }
    if (gemm) {
      gemm_product(m, m, R, G, true, X, false, out);
      return;
    }
    if constexpr (M > 0) {
      // Small widths: the m x m sum stays in registers instead of a store-to-load chain.
      double total[M * M] = {};
      for (int64_t r0 = 0, r1; r0 < R; r0 = r1) {
        r1 = R - r0 > block ? r0 + block : R;
        T acc[M * M] = {};
        for (int64_t r = r0; r < r1; ++r)
          for (int j = 0; j < M; ++j) {
            const T g = G[r * M + j];
            for (int k = 0; k < M; ++k) acc[j * M + k] += g * X[r * M + k];
          }
        for (int e = 0; e < M * M; ++e) total[e] += acc[e];
      }
      for (int e = 0; e < M * M; ++e) out[e] = T(total[e]);
      return;
    }
    // Run-time widths below kGemmMinWidth: out holds a run's float32 sums, `total` the
    // float64 ones (on the stack up to that width).
    double stack_total[kGemmMinWidth * kGemmMinWidth] = {};
    std::vector<double> heap_total(m * m > kGemmMinWidth * kGemmMinWidth ? m * m : 0, 0.0);
    double* total = heap_total.empty() ? stack_total : heap_total.data();
    for (int64_t r0 = 0, r1; r0 < R; r0 = r1) {
      r1 = R - r0 > block ? r0 + block : R;
      std::fill(out, out + m * m, T(0));
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < m; ++j) {
          const T g = G[r * m + j];
          const T* x = X + r * m;
          T* o = out + j * m;
          for (int64_t k = 0; k < m; ++k) o[k] += g * x[k];
        }
      for (int64_t e = 0; e < m * m; ++e) total[e] += out[e];
    }
    for (int64_t e = 0; e < m * m; ++e) out[e] = T(total[e]);
  }
  // out (m) = column sums of G (the bias gradient) in float64: m conversions and adds a
  // row, next to the m^2 multiply-adds a row of each product; the transposed chunks' columns
  // in lane_sum's runs (8 values a lane, then float64), which keeps the m = 2-8 layers' sum as
  // cheap as before.
  void colsum(const T* __restrict__ G, T* __restrict__ out) const {
    const int64_t m = this->m();
    if constexpr (M > 0) {
      if (soa) {
        for (int j = 0; j < M; ++j) out[j] = T(lane_sum(G + j * R, R));
        return;
      }
      double acc[M] = {};
      for (int64_t r = 0; r < R; ++r)
        for (int j = 0; j < M; ++j) acc[j] += G[r * M + j];
      for (int j = 0; j < M; ++j) out[j] = T(acc[j]);
      return;
    }
    double stack_acc[kGemmMinWidth] = {};
    std::vector<double> heap_acc(m > kGemmMinWidth ? m : 0, 0.0);
    double* acc = heap_acc.empty() ? stack_acc : heap_acc.data();
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < m; ++j) acc[j] += G[r * m + j];
    for (int64_t j = 0; j < m; ++j) out[j] = T(acc[j]);
  }
};

// The widths that get unrolled loops (dispatch_width's cases).
inline bool unrolled_width(int64_t m) { return m == 2 || m == 3 || m == 4 || m == 5 || m == 8; }

// Calls fn(std::integral_constant<int, M>) with M = m for the widths that get unrolled
// loops (unrolled_width), M = 0 (run-time width) otherwise.
template <typename F>
void dispatch_width(int64_t m, F&& fn) {
  switch (m) {
    case 2: return fn(std::integral_constant<int, 2>());
    case 3: return fn(std::integral_constant<int, 3>());
    case 4: return fn(std::integral_constant<int, 4>());
    case 5: return fn(std::integral_constant<int, 5>());
    case 8: return fn(std::integral_constant<int, 8>());
    default: return fn(std::integral_constant<int, 0>());
  }
}

}  // namespace cpu
}  // namespace splinet
