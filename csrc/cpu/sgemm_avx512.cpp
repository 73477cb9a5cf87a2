// float32 GEMM with AVX-512 for the dense and Hamiltonian CPU kernels' products (MatOps in
// matmul.h), used where MKL would run its AVX2 code: on CPUs that are not Intel's, MKL does
// not take its AVX-512 kernels. Measured on one core of an AMD EPYC (Zen 5), M x K x N = 256 x 64 x 64
// to 1024^3: MKL 85-91 GFLOP/s, this kernel 174-213 (B packed from rows or, as X W^T reads
// it, from columns).
//
// C (M x N) = A (M x K) B (K x N). B is packed panel by panel (K blocks of
// kKC rows by kNR = 32 columns, one 32 KB panel in L1, whatever B's layout: this also turns
// a transposed B into rows); A is read in place (a row-major A broadcasts from 8 rows, a
// transposed one from 8 adjacent values of a row). A register tile of 8 x 32 outputs (16
// zmm accumulators) runs over one K block with fused multiply-adds in k order; the blocks
// are added to C in k order. So every output is the same sum in the same order whatever the
// threads (which split the column panels) and wherever the operands sit in memory.
#include "matmul.h"

#if SPLINET_SGEMM_AVX512
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdlib>
#include <cstring>

namespace splinet {
namespace cpu {

bool use_sgemm_avx512() {
  static const bool use = [] {
    if (!__builtin_cpu_supports("avx512f")) return false;
    const char* env = std::getenv("SPLINET_CPU_GEMM");
    if (env != nullptr && std::strcmp(env, "aten") == 0) return false;
    if (env != nullptr && std::strcmp(env, "avx512") == 0) return true;
    return !__builtin_cpu_is("intel");
  }();
  return use;
}

}  // namespace cpu
}  // namespace splinet

#pragma GCC push_options
#pragma GCC target("avx512f")

namespace splinet {
namespace cpu {
namespace {

constexpr int64_t kMR = 8, kNR = 32, kKC = 256;

// bp[k * kNR + j] = B(k0 + k, j0 + j) for k < kc, j < nr, zero for nr <= j < kNR; B(k, j) is
// b[k ldb + j], or b[j ldb + k] when b_trans.
void pack_b(const float* b, int64_t ldb, bool b_trans, int64_t k0, int64_t kc, int64_t j0, int64_t nr, float* bp) {
  if (!b_trans) {
    for (int64_t k = 0; k < kc; ++k) {
      const float* row = b + (k0 + k) * ldb + j0;
      float* out = bp + k * kNR;
      for (int64_t j = 0; j < nr; ++j) out[j] = row[j];
      for (int64_t j = nr; j < kNR; ++j) out[j] = 0.0f;
    }
    return;
  }
  if (nr < kNR) std::fill(bp, bp + kc * kNR, 0.0f);
  for (int64_t j = 0; j < nr; ++j) {  // row j0 + j of b is column j0 + j of B: read along it
    const float* col = b + (j0 + j) * ldb + k0;
    for (int64_t k = 0; k < kc; ++k) bp[k * kNR + j] = col[k];
  }
}

// C rows i0 .. i0 + MR, columns j0 .. j0 + nr (c points at C(i0, j0)) = (or +=, with acc)
// the product of A's rows i0 .. over k0 .. k0 + kc and the packed panel.
template <int MR, bool ATrans>
void tile(const float* a, int64_t lda, int64_t i0, int64_t k0, int64_t kc, const float* bp, float* c, int64_t ldc,
          int64_t nr, bool acc) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(bp + k * kNR), b1 = _mm512_loadu_ps(bp + k * kNR + 16);
    const float* ak = ATrans ? a + (k0 + k) * lda + i0 : a + i0 * lda + k0 + k;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(ATrans ? ak[i] : ak[i * lda]);
      c0[i] = _mm512_fmadd_ps(av, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(av, b1, c1[i]);
    }
  }
  const __mmask16 m0 = nr >= 16 ? __mmask16(0xffff) : __mmask16((1u << nr) - 1);
  const __mmask16 m1 = nr >= 32 ? __mmask16(0xffff) : nr > 16 ? __mmask16((1u << (nr - 16)) - 1) : __mmask16(0);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (acc) {
      c0[i] = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, ci), c0[i]);
      c1[i] = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, ci + 16), c1[i]);
    }
    _mm512_mask_storeu_ps(ci, m0, c0[i]);
    _mm512_mask_storeu_ps(ci + 16, m1, c1[i]);
  }
}

template <bool ATrans>
void tile_rows(int64_t mr, const float* a, int64_t lda, int64_t i0, int64_t k0, int64_t kc, const float* bp, float* c,
               int64_t ldc, int64_t nr, bool acc) {
  switch (mr) {
    case 8: return tile<8, ATrans>(a, lda, i0, k0, kc, bp, c, ldc, nr, acc);
    case 7: return tile<7, ATrans>(a, lda, i0, k0, kc, bp, c, ldc, nr, acc);
    case 6: return tile<6, ATrans>(a, lda, i0, k0, kc, bp, c, ldc, nr, acc);
    case 5: return tile<5, ATrans>(a, lda, i0, k0, kc, bp, c, ldc, nr, acc);
    case 4: return tile<4, ATrans>(a, lda, i0, k0, kc, bp, c, ldc, nr, acc);
    case 3: return tile<3, ATrans>(a, lda, i0, k0, kc, bp, c, ldc, nr, acc);
    case 2: return tile<2, ATrans>(a, lda, i0, k0, kc, bp, c, ldc, nr, acc);
    default: return tile<1, ATrans>(a, lda, i0, k0, kc, bp, c, ldc, nr, acc);
  }
}

}  // namespace

void sgemm_avx512(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, bool a_trans, const float* b,
                  int64_t ldb, bool b_trans, float* c, int64_t ldc, bool threaded) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i) std::fill(c + i * ldc, c + i * ldc + N, 0.0f);
    return;
  }
  const int64_t panels = (N + kNR - 1) / kNR;
  auto run = [&](int64_t p0, int64_t p1) {
    alignas(64) float bp[kKC * kNR];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t j0 = p * kNR, nr = std::min(kNR, N - j0);
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        const int64_t kc = std::min(kKC, K - k0);
        pack_b(b, ldb, b_trans, k0, kc, j0, nr, bp);
        const bool acc = k0 > 0;  // later K blocks add to C
        for (int64_t i0 = 0; i0 < M; i0 += kMR) {
          const int64_t mr = std::min(kMR, M - i0);
          float* ct = c + i0 * ldc + j0;
          if (a_trans)
            tile_rows<true>(mr, a, lda, i0, k0, kc, bp, ct, ldc, nr, acc);
          else
            tile_rows<false>(mr, a, lda, i0, k0, kc, bp, ct, ldc, nr, acc);
        }
      }
    }
  };
  if (threaded && panels > 1 && !at::in_parallel_region() && at::get_num_threads() > 1)
    at::parallel_for(0, panels, 1, run);
  else
    run(0, panels);
}

}  // namespace cpu
}  // namespace splinet

#pragma GCC pop_options
#endif  // SPLINET_SGEMM_AVX512
