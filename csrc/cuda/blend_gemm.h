// The dense layer's fused GEMM for large widths, with the blend of W(t) and the epilogue fused.
//
// It computes
//   C[M x N] = sum_k A(i, k) B(k, j),   then  epi(i, j, C[i, j])  for every entry,
// where either operand may be read transposed and B may be the blended weight of one stage,
// W(t) = sum_r w_r weight[k + r] (eq. 14; A(t) = W - W^T - gamma I for the antisymmetric
// variant), formed from the d + 1 coefficient tiles while the B tile is loaded into shared
// memory. The epilogue functor (step_functors.h) gets the float32 (float64) accumulator, so
// bias, activation, slope and the Runge-Kutta combinations, or the eq. 23 scatter of G^T X
// into the d + 1 coefficient-gradient slots, run on it without a round trip through memory.
//
// A block owns BM x BN output tiles (a persistent loop over them); its 8 warps are arranged
// 2 x 4, each owning a (BM / 2) x (BN / 4) warp tile of 16 x 16 fragments. Per BK slice of K
// the block stages A (BM x BK) and B (BK x BN) in shared memory in the GEMM dtype (double
// buffered: the next slice's loads are in flight while this one is multiplied), and each
// warp multiplies its fragments:
//   - on the GPU for bfloat16 / float16 with tensor cores (nvcuda::wmma m16n16k16, float32
//     accumulators), the fragments going through a per-warp shared scratch for the epilogue;
//   - otherwise (float32 / float64 on the GPU, and every dtype in the CPU emulation) with
//     scalar multiply-adds, each of a warp's 32 lanes owning 1 / 32 of the warp tile.
// The emulation (tests/cpp/cuda_emulated.cpp) thus tests the tiling, loaders, blend, padding
// of ragged edges and epilogues on the CPU; the wmma calls themselves only run on a GPU.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "dense_program.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define SPLINET_UNROLL _Pragma("unroll")
#else
#define SPLINET_UNROLL
#endif

namespace splinet {

// How an operand is read. A(i, k): kRows P[i * ld + k], kCols P[k * ld + i].
// B(k, j): kRows P[k * ld + j], kCols P[j * ld + k], kBlend W(t)[k, j], kBlendT W(t)[j, k].
enum GemmOperand : int { kRows = 0, kCols = 1, kBlend = 2, kBlendT = 3 };

template <typename scalar_t, typename acc_t>
struct GemmArgs {
  int64_t M, N, K;
  const scalar_t* a;
  int64_t lda;
  int a_mode;
  const scalar_t* b;  // kRows / kCols
  int64_t ldb;
  int b_mode;
  // kBlend / kBlendT: the layer's coefficients (n, m, m), the first nonzero one and the weights.
  LayerParams p;
  const scalar_t* weight;
  int64_t kc;
  acc_t w[kMaxDegree + 1];
};

constexpr int kGemmWarps = 8, kGemmWarpsN = 4, kGemmThreads = 32 * kGemmWarps;

// The oldest virtual architecture (compute_70 = 70) with wmma fragments of a 16-bit GEMM
// dtype: float16 from Volta, bfloat16 from Ampere. The tensor-core GEMM is compiled into the
// images of that architecture or later only (older images trap), and the host picks it only
// where the image the driver loaded has it (CudaExec::image_arch); older GPUs take cuBLAS.
template <typename scalar_t>
constexpr int wmma_min_arch() {
  return std::is_same<scalar_t, c10::BFloat16>::value ? 80 : 70;
}

// Tile geometry for a GEMM dtype; the padded leading dimensions keep wmma's 32-byte
// fragment alignment (16-bit types) and spread shared-memory banks.
template <typename scalar_t, int BM_, int BN_>
struct GemmTile {
  static constexpr bool kHalf = sizeof(scalar_t) == 2;
  static constexpr int BM = BM_, BN = BN_, BK = kHalf ? 32 : 16;
  static constexpr int LDA = BK + (kHalf ? 8 : 1), LDB = BN + (kHalf ? 8 : 1);
  static constexpr int WM = BM / (kGemmWarps / kGemmWarpsN), WN = BN / kGemmWarpsN;
  static constexpr int FM = WM / 16, FN = WN / 16;
  static constexpr int kPerLane = WM * WN / 32;  // scalar path: accumulators of one lane
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tiles are made of 16 x 16 fragments");
  // Bytes: two buffers of A and B tiles, then (tensor cores) one 16 x 16 float scratch per warp.
  static constexpr int64_t kOperandBytes = 2 * int64_t(BM * LDA + BK * LDB) * sizeof(scalar_t);
  static constexpr int64_t kScratchOffset = ((kOperandBytes + 127) / 128) * 128;
  static constexpr int64_t kSmemBytes = kScratchOffset + kGemmWarps * 256 * 4;
};

// One element of the A or B operand (zero outside the matrix: ragged edges).
template <typename scalar_t, typename acc_t>
SPLINET_HD scalar_t gemm_a(const GemmArgs<scalar_t, acc_t>& g, int64_t i, int64_t k) {
  if (i >= g.M || k >= g.K) return scalar_t(0);
  return g.a_mode == kRows ? g.a[i * g.lda + k] : g.a[k * g.lda + i];
}

// The blend of one B element, a call on the device rather than inlined: the loaders unroll
// over a thread's 8-32 elements of a slice, and inlining the (d + 1)-term blend, with the
// antisymmetric variant's second one, into each made every GEMM kernel several times larger
// (and its compile minutes longer) for loads that wait on memory anyway.
template <typename scalar_t, typename acc_t>
SPLINET_HD SPLINET_OUTLINE scalar_t gemm_blended(const GemmArgs<scalar_t, acc_t>& g, int64_t j, int64_t q) {
  return static_cast<scalar_t>(blend_entry(g.p, g.weight, g.kc, g.w, j, q));
}

template <typename scalar_t, typename acc_t>
SPLINET_HD scalar_t gemm_b(const GemmArgs<scalar_t, acc_t>& g, int64_t k, int64_t j) {
  if (k >= g.K || j >= g.N) return scalar_t(0);
  switch (g.b_mode) {
    case kRows: return g.b[k * g.ldb + j];
    case kCols: return g.b[j * g.ldb + k];
    case kBlend: return gemm_blended(g, k, j);
    default: return gemm_blended(g, j, k);
  }
}

// One epilogue element, a call on the device for the same reason: the epilogue runs once
// per output tile, over unrolled fragment loops, and the stage epilogue (bias, activation,
// slope, Runge-Kutta combination) inlined into each iteration dominated the kernel's size.
template <typename Epi, typename acc_t>
SPLINET_HD SPLINET_OUTLINE void gemm_epilogue_at(const Epi& epi, int64_t i, int64_t j, acc_t v) {
  epi(i, j, v);
}

// The warps a thread runs and the lanes it plays: on the GPU its own warp and lane; in the
// emulation a host thread plays whole warps (tid, tid + nthreads, ...), all 32 lanes each.
struct WarpRole {
  int first, step, lane, lanes;
};
SPLINET_HD WarpRole warp_role(const BlockCtx& ctx) {
#ifdef __CUDA_ARCH__
  return {static_cast<int>(ctx.tid / 32), kGemmWarps, static_cast<int>(ctx.tid % 32), 1};
#else
  return {static_cast<int>(ctx.tid), static_cast<int>(ctx.nthreads), 0, 32};
#endif
}

#ifdef __CUDA_ARCH__
constexpr int kRoleWarps = 1, kRoleLanes = 1;
#else
constexpr int kRoleWarps = kGemmWarps, kRoleLanes = 32;
#endif

// Scalar accumulators of the warps and lanes a thread plays. Lane l owns the warp-tile
// entries t = q * 32 + l (row t / WN, column t % WN).
template <typename acc_t, typename Tile>
struct ScalarAcc {
  acc_t v[kRoleWarps][kRoleLanes][Tile::kPerLane];

  // Slot of the a-th warp and l-th lane a thread plays (always 0, 0 on the GPU, so that the
  // accumulators are indexed by compile-time constants and stay in registers).
  SPLINET_HD static int slot(int i, int count) { return count == 1 ? 0 : i; }

  SPLINET_HD void zero() {
    for (int a = 0; a < kRoleWarps; ++a)
      for (int l = 0; l < kRoleLanes; ++l)
        SPLINET_UNROLL
        for (int q = 0; q < Tile::kPerLane; ++q) v[a][l][q] = acc_t(0);
  }
  template <typename scalar_t>
  SPLINET_HD void mma(const WarpRole& role, const scalar_t* As, const scalar_t* Bs) {
    for (int wp = role.first, a = 0; wp < kGemmWarps; wp += role.step, ++a) {
      const int r0 = (wp / kGemmWarpsN) * Tile::WM, c0 = (wp % kGemmWarpsN) * Tile::WN;
      acc_t(*va)[Tile::kPerLane] = v[slot(a, kRoleWarps)];
      for (int l = 0; l < role.lanes; ++l) {
        const int lane = role.lane + l;
        acc_t* vl = va[slot(l, kRoleLanes)];
        for (int kk = 0; kk < Tile::BK; ++kk) {
          SPLINET_UNROLL
          for (int q = 0; q < Tile::kPerLane; ++q) {
            const int t = q * 32 + lane, r = r0 + t / Tile::WN, c = c0 + t % Tile::WN;
            vl[q] += static_cast<acc_t>(As[r * Tile::LDA + kk]) * static_cast<acc_t>(Bs[kk * Tile::LDB + c]);
          }
        }
      }
      if (kRoleWarps == 1) break;
    }
  }
  template <typename Epi>
  SPLINET_HD void epilogue(const WarpRole& role, int64_t row0, int64_t col0, int64_t M, int64_t N,
                           const Epi& epi) const {
    for (int wp = role.first, a = 0; wp < kGemmWarps; wp += role.step, ++a) {
      const int r0 = (wp / kGemmWarpsN) * Tile::WM, c0 = (wp % kGemmWarpsN) * Tile::WN;
      for (int l = 0; l < role.lanes; ++l) {
        const acc_t* vl = v[slot(a, kRoleWarps)][slot(l, kRoleLanes)];
        SPLINET_UNROLL
        for (int q = 0; q < Tile::kPerLane; ++q) {
          const int t = q * 32 + role.lane + l;
          const int64_t i = row0 + r0 + t / Tile::WN, j = col0 + c0 + t % Tile::WN;
          if (i < M && j < N) gemm_epilogue_at(epi, i, j, vl[q]);
        }
      }
      if (kRoleWarps == 1) break;
    }
  }
};

#if defined(__CUDACC__)
template <typename scalar_t>
using wmma_type_t = std::conditional_t<std::is_same<scalar_t, c10::Half>::value, __half, __nv_bfloat16>;

// Tensor-core accumulators of one warp (GPU, 16-bit GEMM dtypes).
template <typename scalar_t, typename Tile>
struct WmmaAcc {
  using T = wmma_type_t<scalar_t>;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f[Tile::FM][Tile::FN];

  __device__ void zero() {
    SPLINET_UNROLL
    for (int fi = 0; fi < Tile::FM; ++fi)
      SPLINET_UNROLL
      for (int fj = 0; fj < Tile::FN; ++fj) nvcuda::wmma::fill_fragment(f[fi][fj], 0.0f);
  }
  __device__ void mma(const WarpRole& role, const scalar_t* As_, const scalar_t* Bs_) {
    using namespace nvcuda;
    const T* As = reinterpret_cast<const T*>(As_);
    const T* Bs = reinterpret_cast<const T*>(Bs_);
    const int r0 = (role.first / kGemmWarpsN) * Tile::WM, c0 = (role.first % kGemmWarpsN) * Tile::WN;
    SPLINET_UNROLL
    for (int kk = 0; kk < Tile::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[Tile::FM];
      SPLINET_UNROLL
      for (int fi = 0; fi < Tile::FM; ++fi) wmma::load_matrix_sync(a[fi], As + (r0 + fi * 16) * Tile::LDA + kk, Tile::LDA);
      SPLINET_UNROLL
      for (int fj = 0; fj < Tile::FN; ++fj) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(b, Bs + kk * Tile::LDB + c0 + fj * 16, Tile::LDB);
        SPLINET_UNROLL
        for (int fi = 0; fi < Tile::FM; ++fi) wmma::mma_sync(f[fi][fj], a[fi], b, f[fi][fj]);
      }
    }
  }
  // Each fragment goes through the warp's 16 x 16 scratch; the lanes apply the epilogue.
  template <typename Epi>
  __device__ void epilogue(const WarpRole& role, int64_t row0, int64_t col0, int64_t M, int64_t N, const Epi& epi,
                           float* scratch) const {
    using namespace nvcuda;
    const int r0 = (role.first / kGemmWarpsN) * Tile::WM, c0 = (role.first % kGemmWarpsN) * Tile::WN;
    float* mine = scratch + role.first * 256;
    SPLINET_UNROLL
    for (int fi = 0; fi < Tile::FM; ++fi)
      SPLINET_UNROLL
      for (int fj = 0; fj < Tile::FN; ++fj) {
        wmma::store_matrix_sync(mine, f[fi][fj], 16, wmma::mem_row_major);
        __syncwarp();
        for (int t = role.lane; t < 256; t += 32) {
          const int64_t i = row0 + r0 + fi * 16 + t / 16, j = col0 + c0 + fj * 16 + t % 16;
          if (i < M && j < N) gemm_epilogue_at(epi, i, j, mine[t]);
        }
        __syncwarp();
      }
  }
};
#endif

// The A and B elements of one K slice that a thread moves to shared memory, held in
// registers while the previous slice is multiplied (software pipelining). Element q of a
// thread is e = tid + q * nthreads of the tile's flat index; consecutive threads read
// consecutive addresses of the operand's contiguous dimension. On the GPU (256 threads) the
// counts are exact and the loops unroll, so the staging arrays stay in registers.
template <typename Tile, typename scalar_t>
struct SliceRegs {
#ifdef __CUDA_ARCH__
  static constexpr int kA = Tile::BM * Tile::BK / kGemmThreads, kB = Tile::BK * Tile::BN / kGemmThreads;
#else
  static constexpr int kA = Tile::BM * Tile::BK, kB = Tile::BK * Tile::BN;
#endif
  scalar_t a[kA], b[kB];

  SPLINET_HD static int64_t stride(const BlockCtx& ctx) {
#ifdef __CUDA_ARCH__
    return kGemmThreads;
#else
    return ctx.nthreads;
#endif
  }
  // f(q, row, k) for the thread's A elements, g(q, k, column) for its B elements.
  template <typename acc_t, typename FA, typename FB>
  SPLINET_HD static void each(const GemmArgs<scalar_t, acc_t>& g, const BlockCtx& ctx, FA fa, FB fb) {
    const int64_t st = stride(ctx);
    const bool a_rows = g.a_mode == kRows, b_rows = g.b_mode == kRows || g.b_mode == kBlend;
    SPLINET_UNROLL
    for (int q = 0; q < kA; ++q) {
      const int64_t e = ctx.tid + q * st;
      if (e >= Tile::BM * Tile::BK) break;
      fa(q, static_cast<int>(a_rows ? e / Tile::BK : e % Tile::BM), static_cast<int>(a_rows ? e % Tile::BK : e / Tile::BM));
    }
    SPLINET_UNROLL
    for (int q = 0; q < kB; ++q) {
      const int64_t e = ctx.tid + q * st;
      if (e >= Tile::BK * Tile::BN) break;
      fb(q, static_cast<int>(b_rows ? e / Tile::BN : e % Tile::BK), static_cast<int>(b_rows ? e % Tile::BN : e / Tile::BK));
    }
  }

  // Global (or blended) values of the slice at k0.
  template <typename acc_t>
  SPLINET_HD void fetch(const GemmArgs<scalar_t, acc_t>& g, const BlockCtx& ctx, int64_t row0, int64_t col0,
                        int64_t k0) {
    each(g, ctx, [&](int q, int r, int kk) { a[q] = gemm_a(g, row0 + r, k0 + kk); },
         [&](int q, int kk, int c) { b[q] = gemm_b(g, k0 + kk, col0 + c); });
  }
  template <typename acc_t>
  SPLINET_HD void store(const GemmArgs<scalar_t, acc_t>& g, const BlockCtx& ctx, scalar_t* As, scalar_t* Bs) const {
    each(g, ctx, [&](int q, int r, int kk) { As[r * Tile::LDA + kk] = a[q]; },
         [&](int q, int kk, int c) { Bs[kk * Tile::LDB + c] = b[q]; });
  }
};

// The K loop of one output tile, double-buffered: slice t + 1 is fetched into registers
// while slice t is multiplied from shared memory, then stored into the other buffer; one
// barrier per slice (a buffer is rewritten only after the barrier that follows its last use).
template <typename Tile, typename scalar_t, typename acc_t, typename Acc>
SPLINET_HD void gemm_k_loop(const GemmArgs<scalar_t, acc_t>& g, const BlockCtx& ctx, const WarpRole& role,
                            int64_t row0, int64_t col0, scalar_t* smem_ops, Acc& acc) {
  constexpr int64_t kBuf = Tile::BM * Tile::LDA + Tile::BK * Tile::LDB;  // elements of one buffer
  SliceRegs<Tile, scalar_t> regs;
  regs.fetch(g, ctx, row0, col0, 0);
  regs.store(g, ctx, smem_ops, smem_ops + Tile::BM * Tile::LDA);
  ctx.sync();
  int buf = 0;
  for (int64_t k0 = 0; k0 < g.K; k0 += Tile::BK) {
    const bool more = k0 + Tile::BK < g.K;
    if (more) regs.fetch(g, ctx, row0, col0, k0 + Tile::BK);
    scalar_t* As = smem_ops + buf * kBuf;
    acc.mma(role, As, As + Tile::BM * Tile::LDA);
    if (more) {
      scalar_t* next = smem_ops + (buf ^ 1) * kBuf;
      regs.store(g, ctx, next, next + Tile::BM * Tile::LDA);
    }
    ctx.sync();
    buf ^= 1;
  }
}

// The program of one block: output tiles block, block + grid, ... (row-major tile order).
template <typename scalar_t, typename acc_t, typename Tile, typename Epi>
SPLINET_HD void blend_gemm_block(const GemmArgs<scalar_t, acc_t>& g, const Epi& epi, int64_t block, int64_t grid,
                                 BlockCtx ctx, acc_t* smem) {
  unsigned char* raw = reinterpret_cast<unsigned char*>(smem);
  scalar_t* ops = reinterpret_cast<scalar_t*>(raw);
  const WarpRole role = warp_role(ctx);
  const int64_t tiles_n = (g.N + Tile::BN - 1) / Tile::BN, tiles = ((g.M + Tile::BM - 1) / Tile::BM) * tiles_n;
#ifdef __CUDA_ARCH__
  if constexpr (Tile::kHalf) {
    if constexpr (__CUDA_ARCH__ >= 10 * wmma_min_arch<scalar_t>()) {
      float* scratch = reinterpret_cast<float*>(raw + Tile::kScratchOffset);
      for (int64_t t = block; t < tiles; t += grid) {
        const int64_t row0 = (t / tiles_n) * Tile::BM, col0 = (t % tiles_n) * Tile::BN;
        WmmaAcc<scalar_t, Tile> acc;
        acc.zero();
        gemm_k_loop<Tile>(g, ctx, role, row0, col0, ops, acc);
        acc.epilogue(role, row0, col0, g.M, g.N, epi, scratch);
      }
    } else {
      __trap();  // no wmma fragments of this dtype here: never launched (dense_use_fused)
    }
  } else  // (the scalar path is not compiled for 16-bit dtypes on the GPU)
#endif
  {
    for (int64_t t = block; t < tiles; t += grid) {
      const int64_t row0 = (t / tiles_n) * Tile::BM, col0 = (t % tiles_n) * Tile::BN;
      ScalarAcc<acc_t, Tile> acc;
      acc.zero();
      gemm_k_loop<Tile>(g, ctx, role, row0, col0, ops, acc);
      acc.epilogue(role, row0, col0, g.M, g.N, epi);
    }
  }
}

// Split-K: the partial product of one K-slice goes to its own (M x N) slab of partials.
template <typename acc_t>
struct PartialEpi {
  acc_t* out;
  int64_t N;
  SPLINET_HD void operator()(int64_t i, int64_t j, acc_t v) const { out[i * N + j] = v; }
};

// A GEMM whose output has fewer tiles than the device has multiprocessors (the weight
// gradients, M = N = m, K = B: 4 tiles at m = 128) split along K: work item t multiplies
// output tile t % tiles over K-slice t / tiles (k_chunk rows of K, a multiple of the tile's
// BK) into that slice's slab of partials; SplitSumFn then adds the slabs in slice order and
// applies the epilogue, so the result does not depend on the grid (deterministic, no
// atomics). Plain operands only (kRows / kCols), whose K-slice is a pointer offset.
template <typename scalar_t, typename acc_t, typename Tile>
struct SplitKGemmBody {
  using acc_type = acc_t;
  GemmArgs<scalar_t, acc_t> g;
  int64_t splits, k_chunk;
  acc_t* partials;  // (splits, M, N)
  SPLINET_HD void operator()(int64_t block, int64_t grid, BlockCtx ctx, acc_t* smem) const {
    const int64_t tiles = ((g.M + Tile::BM - 1) / Tile::BM) * ((g.N + Tile::BN - 1) / Tile::BN);
    for (int64_t t = block; t < tiles * splits; t += grid) {
      const int64_t split = t / tiles, k0 = split * k_chunk;
      GemmArgs<scalar_t, acc_t> slice = g;
      slice.K = g.K - k0 < k_chunk ? g.K - k0 : k_chunk;
      slice.a += g.a_mode == kRows ? k0 : k0 * g.lda;
      slice.b += g.b_mode == kCols ? k0 : k0 * g.ldb;
      // block = the tile, grid = tiles: exactly that one tile.
      blend_gemm_block<scalar_t, acc_t, Tile>(slice, PartialEpi<acc_t>{partials + split * g.M * g.N, g.N},
                                              t % tiles, tiles, ctx, smem);
    }
  }
};

// The sum of the split-K slabs in slice order, then the epilogue, for entry e = i N + j.
template <typename acc_t, typename Epi>
struct SplitSumFn {
  const acc_t* partials;
  int64_t splits, MN, N;
  Epi epi;
  SPLINET_HD void operator()(int64_t e) const {
    acc_t v = partials[e];
    for (int64_t s = 1; s < splits; ++s) v += partials[s * MN + e];
    epi(e / N, e % N, v);
  }
};

template <typename scalar_t, typename acc_t, typename Tile, typename Epi>
struct BlendGemmBody {
  using acc_type = acc_t;
  GemmArgs<scalar_t, acc_t> g;
  Epi epi;
  SPLINET_HD void operator()(int64_t block, int64_t grid, BlockCtx ctx, acc_t* smem) const {
    blend_gemm_block<scalar_t, acc_t, Tile>(g, epi, block, grid, ctx, smem);
  }
};

}  // namespace splinet
