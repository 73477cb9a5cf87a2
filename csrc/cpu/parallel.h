// How the CPU kernels split their work across ATen's threads.
//
// Element-wise loops are split over ranges, the batch over row chunks, so that every sum runs
// in an order that depends on the sizes and the thread count alone.
//
// Legend: B batch, m width, n = L + d coefficients.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

namespace splinet {
namespace cpu {

// Rows x width of one chunk's working arrays on the raw-loop path, so that they stay in L2
// (the GEMM path takes one chunk per thread: its products want many rows).
constexpr int64_t kChunkElements = 16384;
// Cap on the elements of all per-chunk partial weight gradients (n m^2 each).
constexpr int64_t kPartialElements = int64_t(1) << 27;
// Element-wise loops shorter than this stay on the calling thread.
constexpr int64_t kParallelElements = 32768;

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

// Row chunks, one thread each: at least one per thread, small enough for L2, few enough
// for the partial gradients' memory. `row_elements` is the working width of one row (m for
// the dense layer), `partial_elements` the size of one chunk's partial weight gradient.
// The count depends only on the sizes and the thread count, so the reduction order (and
// the gradients) are reproducible. `one_threaded_chunk` (the dense layer at large widths):
// the whole batch as one chunk whose GEMMs use every thread.
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

// fn(c) for every chunk c, in parallel.
inline void run_chunks(int64_t chunks, const std::function<void(int64_t)>& fn) {
  if (chunks == 1) {
    fn(0);  // outside a parallel region, so ATen's kernels may use every thread
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(c);
  });
}

}  // namespace cpu
}  // namespace splinet
