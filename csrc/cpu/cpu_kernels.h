// CPU building blocks shared by the fused layer kernels (dense_cpu.cpp, hamiltonian_cpu.cpp):
// the row-major products of a chunk of the batch (raw loops for small widths, a GEMM for
// large ones: ATen's, or in float32 on AVX-512 CPUs that are not Intel's sgemm_avx512.cpp),
// the activations and their derivatives over arrays, a fixed-order dot
// product, and the row chunking / parallel loop that keeps the reductions reproducible.
//
// Legend: B batch, R rows of one chunk of the batch, m width, n = L + d coefficients.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/softplus.h>
#include <ATen/ops/tanh.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <unordered_map>
#include <type_traits>
#include <vector>

#include "../common/activations.h"
#include "../common/layer_config.h"

namespace splinet {
namespace cpu {

// Widths from which the products of a chunk go through a GEMM (ATen's or sgemm_avx512, one
// thread per chunk) instead of the raw loops below: at B = 4096 the raw loops lost to it
// from m = 16 on (bench --sizes sweep on a 2-core x86 machine).
constexpr int64_t kGemmMinWidth = 16;
// Rows x width of one chunk's working arrays on the raw-loop path, so that they stay in L2
// (the GEMM path takes one chunk per thread: its products want many rows).
constexpr int64_t kChunkElements = 16384;
// Cap on the elements of all per-chunk partial weight gradients (n m^2 each).
constexpr int64_t kPartialElements = int64_t(1) << 27;
// Widths from which the dense layer's batch is one chunk whose GEMMs ATen threads over every
// core (and whose element-wise loops go through parallel_elements): one blend, one eq. 23
// scatter and no partial gradients (n m^2 each) per step, instead of one per thread.
// Below it, one chunk per thread with a single-threaded GEMM each wins (small products).
constexpr int64_t kThreadedGemmWidth = 128;
// Element-wise loops shorter than this stay on the calling thread.
constexpr int64_t kParallelElements = 32768;
// Elements of one cache-resident tile of a loop that sweeps the same array several times
// (the d + 1 terms of the blend and of the eq. 23 scatter): 16 KB of float32.
constexpr int64_t kCacheTile = 4096;

// fn(begin, end) over [0, n): split across ATen's threads when the array is long and the
// caller is not already inside a parallel region (the one-chunk GEMM path), else one call.
// Every index is computed by one thread with the same arithmetic, so the result does not
// depend on the split.
template <typename F>
void parallel_elements(int64_t n, const F& fn) {
  if (n >= kParallelElements && !at::in_parallel_region() && at::get_num_threads() > 1) {
    at::parallel_for(0, n, kParallelElements / 2, [&](int64_t b, int64_t e) { fn(b, e); });
  } else if (n > 0) {
    fn(0, n);
  }
}

// fn(r0, r1) over rows [0, rows) of row_len elements each, split like parallel_elements.
template <typename F>
void parallel_rows(int64_t rows, int64_t row_len, const F& fn) {
  if (rows * row_len >= kParallelElements && !at::in_parallel_region() && at::get_num_threads() > 1) {
    const int64_t grain = std::max<int64_t>(1, kParallelElements / 2 / std::max<int64_t>(1, row_len));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { fn(r0, r1); });
  } else if (rows > 0) {
    fn(0, rows);
  }
}

// A working array left uninitialised by resize(n): std::vector's resize zero-fills, a pass
// over tens of MB per call at large widths for arrays that are always written before read.
// Aligned like ATen's CPU allocations (kScratchAlign bytes), so that a product reading an
// operand from here and one reading the same values from a tensor take the same GEMM code
// path and round alike (MKL's results may depend on the operands' alignment).
constexpr std::size_t kScratchAlign = 64;

template <typename T>
class Scratch {
 public:
  void resize(int64_t n) {
    static_assert(std::is_trivially_default_constructible_v<T> && alignof(T) <= kScratchAlign);
    data_.reset(static_cast<T*>(::operator new[](std::max<int64_t>(n, 1) * sizeof(T),
                                                 std::align_val_t(kScratchAlign))));
    n_ = n;
  }
  void resize(int64_t n, T value) {
    resize(n);
    std::fill(begin(), end(), value);
  }
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }
  T* begin() { return data_.get(); }
  T* end() { return data_.get() + n_; }
  int64_t size() const { return n_; }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(kScratchAlign)); }
  };
  std::unique_ptr<T[], Free> data_;
  int64_t n_ = 0;
};

// Elements between two kept blended weight matrices (m x m, padded so that every one starts
// kScratchAlign-aligned like the chunk's own W buffer; see Scratch).
inline int64_t kept_weight_stride(int64_t m, int64_t elem_size) {
  const int64_t per = static_cast<int64_t>(kScratchAlign) / elem_size;
  return (m * m + per - 1) / per * per;
}

// Host memory for the tensors the CPU forward keeps for its backward (states, kept stage
// values, blended weights: tens of MB a call at large widths). A freed block is kept for the
// next request of the same size instead of going back to the OS, as a GPU caching allocator
// does: otherwise every training step faults in its kept tensors page by page, zero-filled
// by the kernel (at B = 256, m = 1024, N = 10, 60 MB a forward: with the cache the forward
// took 41 ms instead of 49 on 2 cores of an x86 machine). At most kKeptCacheBytes stay
// cached; blocks smaller than kKeptMinBytes go to ATen's allocator, whose malloc reuses them.
class KeptCache {
 public:
  static constexpr std::size_t kKeptCacheBytes = std::size_t(512) << 20;
  static constexpr std::size_t kKeptMinBytes = std::size_t(1) << 20;

  // Never destroyed: tensors freed during interpreter shutdown still return their blocks.
  static KeptCache& get() {
    static KeptCache* cache = new KeptCache();
    return *cache;
  }

  void* take(std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        cached_ -= bytes;
        return p;
      }
    }
    void* p = ::operator new(bytes, std::align_val_t(kScratchAlign), std::nothrow);
    TORCH_CHECK(p != nullptr, "splinet_cuda: out of memory allocating ", bytes, " bytes for the kept tensors");
    return p;
  }

  void give(void* p, std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + bytes <= kKeptCacheBytes) {
        free_.emplace(bytes, p);
        cached_ += bytes;
        return;
      }
    }
    ::operator delete(p, std::align_val_t(kScratchAlign));
  }

 private:
  std::mutex mu_;
  std::unordered_multimap<std::size_t, void*> free_;
  std::size_t cached_ = 0;
};

// An uninitialised CPU tensor for kept values: from KeptCache when large (see there).
inline at::Tensor kept_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const std::size_t bytes =
      static_cast<std::size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < KeptCache::kKeptMinBytes) return at::empty(sizes, options);
  void* p = KeptCache::get().take(bytes);
  return at::from_blob(p, sizes, [bytes](void* q) { KeptCache::get().give(q, bytes); }, options);
}

template <typename T>
at::Tensor wrap(const T* p, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Partial sums of the fixed-order reductions below (one vector of float32 with AVX2).
constexpr int kLanes = 8;

// sum_r x[r] in kLanes partial sums, lane l taking r = l mod kLanes, added pairwise at the
// end: a fixed order that vectorises without reassociation.
template <typename T>
T lane_sum(const T* __restrict__ x, int64_t n) {
  T acc[kLanes] = {};
  int64_t r = 0;
  for (; r + kLanes <= n; r += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[r + l];
  for (int l = 0; r < n; ++r, ++l) acc[l] += x[r];
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
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
// a row of m = 2-8, which no vector width divides evenly (at Peaks' m = 5, B = 1000 this
// made fwd+bwd 15% faster). to_chunk / from_chunk / add_rows
// convert between a block of R rows of a (B, m) tensor and this layout.
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
  // out (m x m) = G^T X
  void tn(const T* __restrict__ G, const T* __restrict__ X, T* __restrict__ out) const {
    const int64_t m = this->m();
    if constexpr (M > 0) {
      if (soa) {  // out[j][k] = G_j . X_k, in kLanes fixed partial sums each
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
      T acc[M * M] = {};
      for (int64_t r = 0; r < R; ++r)
        for (int j = 0; j < M; ++j) {
          const T g = G[r * M + j];
          for (int k = 0; k < M; ++k) acc[j * M + k] += g * X[r * M + k];
        }
      std::copy(acc, acc + M * M, out);
      return;
    }
    std::fill(out, out + m * m, T(0));
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < m; ++j) {
        const T g = G[r * m + j];
        const T* x = X + r * m;
        T* o = out + j * m;
        for (int64_t k = 0; k < m; ++k) o[k] += g * x[k];
      }
  }
  // out (m) = column sums of G
  void colsum(const T* __restrict__ G, T* __restrict__ out) const {
    const int64_t m = this->m();
    if constexpr (M > 0) {
      if (soa) {
        for (int j = 0; j < M; ++j) out[j] = lane_sum(G + j * R, R);
        return;
      }
      T acc[M] = {};
      for (int64_t r = 0; r < R; ++r)
        for (int j = 0; j < M; ++j) acc[j] += G[r * M + j];
      std::copy(acc, acc + M, out);
      return;
    }
    std::fill(out, out + m, T(0));
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < m; ++j) out[j] += G[r * m + j];
  }
};

template <typename T>
at::Tensor wrap1d(const T* p, int64_t n) {
  return at::from_blob(const_cast<T*>(p), {n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

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

// y = act(a) over an array. float32 tanh is tanh_f32 at every length: ATen's tanh (SLEEF's
// 1-ulp vector tanh) measured 2.3 ns an element on 2 cores of an AMD EPYC, against well
// under 1 ns for tanh_f32, which at widths 64-1024 made the activation cost more than the
// forward's GEMMs. The other transcendental activations (and float64 tanh) go through ATen's
// vectorised kernels; inside a parallel region ATen runs them on the calling thread.
//
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

template <typename T>
void act_backward(Act act, const T* a, const T* y, const T* v, T scale, T* g, int64_t n) {
  parallel_elements(n, [&](int64_t b, int64_t e) { act_backward_part(act, a + b, y + b, v + b, scale, g + b, e - b); });
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

// Row chunks, one thread each: at least one per thread, small enough for L2, few enough
// for the partial gradients' memory. `row_elements` is the working width of one row (m for
// the dense layer), `partial_elements` the size of one chunk's partial weight gradient.
// The count depends only on the sizes and the thread count, so the reduction order (and
// the gradients) are reproducible. `one_threaded_chunk` (the dense layer from
// kThreadedGemmWidth on): the whole batch as one chunk whose GEMMs use every thread.
inline std::vector<int64_t> chunk_bounds(int64_t B, int64_t row_elements, int64_t partial_elements, bool use_gemm,
                                         bool one_threaded_chunk = false) {
  if (one_threaded_chunk) return {0, B};
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunks = threads;
  if (!use_gemm) chunks = std::max<int64_t>(threads, (B * row_elements + kChunkElements - 1) / kChunkElements);
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, kPartialElements / std::max<int64_t>(1, partial_elements)));
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, B));
  std::vector<int64_t> bounds(chunks + 1);
  for (int64_t c = 0; c <= chunks; ++c) bounds[c] = B * c / chunks;
  return bounds;
}

inline void run_chunks(int64_t chunks, const std::function<void(int64_t)>& fn) {
  if (chunks == 1) {
    fn(0);  // outside a parallel region, so ATen's kernels may use every thread
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(c);
  });
}

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

// The adjoint sweep of one chunk of rows (dense and Hamiltonian kernels), from step N - 1
// down to 0: segments [i0, i1) of K steps, last first; each starts from a saved state and
// recomputes the states inside it (all saved when K = 1), then replays steps i1 - 1 .. i0
// and runs their adjoints (chunk.step / chunk.step_adjoint; a replayed step writes no next
// state unless Chunk::kReplayNeedsOutput says it needs one). `load(slot, dst)` writes saved
// state `slot` of the chunk's rows into dst (Rs values); `add_grad(slot, z)` adds the loss's
// direct gradient of saved state `slot` to z, dL/dx_i, after step i's adjoint.
template <typename T, typename Chunk, typename Load, typename AddGrad>
void chunk_adjoint_sweep(Chunk& chunk, int64_t N, int64_t K, int64_t Rs, bool last_only, T* z, T* pW, T* pb,
                         double& plam, const Load& load, const AddGrad& add_grad) {
  std::vector<T> seg(std::min(K, N) * Rs), scratch(Chunk::kReplayNeedsOutput ? Rs : 0);
  T* const replay_out = Chunk::kReplayNeedsOutput ? scratch.data() : nullptr;
  for (int64_t i0 = ((N - 1) / K) * K; i0 >= 0; i0 -= K) {
    const int64_t i1 = std::min(i0 + K, N);
    load(i0 / K, seg.data());
    for (int64_t i = i0; i + 1 < i1; ++i) chunk.step(i, &seg[(i - i0) * Rs], &seg[(i + 1 - i0) * Rs]);
    for (int64_t i = i1 - 1; i >= i0; --i) {
      chunk.step(i, &seg[(i - i0) * Rs], replay_out);
      chunk.step_adjoint(z, pW, pb, plam);
      const int64_t slot = last_only ? -1 : saved_slot(i, N, K);
      if (slot >= 0) add_grad(slot, z);
    }
  }
}

// Per-chunk partial gradients summed in chunk order (so the result depends only on the
// chunking, not on the threads' timing).
template <typename T>
void reduce_partials(const std::vector<std::vector<T>>& pW, const std::vector<std::vector<T>>& pb,
                     const std::vector<double>& plam, T* gw, T* gb, double& glam) {
  for (size_t c = 0; c < pW.size(); ++c) {
    for (size_t e = 0; e < pW[c].size(); ++e) gw[e] += pW[c][e];
    for (size_t e = 0; e < pb[c].size(); ++e) gb[e] += pb[c][e];
    glam += plam[c];
  }
}

}  // namespace cpu
}  // namespace splinet
