// Host memory of the CPU kernels: working arrays, kept tensors, tensor views of raw arrays.
//
// Working arrays are aligned and left uninitialised; the large tensors a forward keeps for its
// backward come from a bounded cache of freed blocks, visible and releasable from Python.
//
// Legend: m width.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <deque>
#include <iterator>
#include <utility>
#include <vector>

// Kept blocks come from mmap on POSIX systems, from operator new elsewhere and under
// AddressSanitizer (see KeptCache).
#if defined(__SANITIZE_ADDRESS__)
#define SPLINET_KEPT_MMAP 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SPLINET_KEPT_MMAP 0
#endif
#endif
#if !defined(SPLINET_KEPT_MMAP) && (defined(__unix__) || defined(__APPLE__))
#include <sys/mman.h>
#define SPLINET_KEPT_MMAP 1
#endif
#ifndef SPLINET_KEPT_MMAP
#define SPLINET_KEPT_MMAP 0
#endif

namespace splinet {
namespace cpu {

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
// by the kernel (bench case dense1024_b256, B = 256, m = 1024, N = 10, keeps 61 MiB a forward
// in three blocks: with the cache the forward took 41 ms instead of 49 on 2 cores of an x86
// machine). Blocks smaller than kKeptMinBytes go to ATen's allocator, whose malloc reuses them.
//
// The freed blocks held are bounded by a limit: kKeptCacheDefaultBytes (64 MiB), or
// SPLINET_KEPT_CACHE_MB read once, at the cache's first use (0: no block is kept), or
// set_limit() (splinet_cuda.set_kept_cache_limit). 64 MiB holds one training step's kept
// blocks of every CPU bench case (dense1024_b256: 61 MiB; dense256_b512: 26 MiB; dense64:
// 13 MiB; the paper's sin and Peaks layers keep blocks under 1 MiB or 4 MiB in all) without
// holding hundreds of MB after the calls that used them. A freed block that does not fit under
// the limit evicts the blocks freed longest ago (a block larger than the limit is released):
// when calls of other shapes come in between, as in a model whose layers differ or in the
// interleaved benchmark, the newest shape's blocks are the ones kept. Keeping the first blocks
// instead made the dense1024_b256 forward (cpu, interleaved with cpu+ckpt) 31-34 ms instead
// of 19: every call faulted its 61 MiB in anew. Blocks are mapped and unmapped directly (mmap) where the platform has
// it, so that a released block leaves the resident set at once: malloc would keep it in its
// heap after glibc has raised its mmap threshold to the size of an earlier freed block. Under
// AddressSanitizer they come from operator new, so that ASan checks accesses to them.
class KeptCache {
 public:
  static constexpr std::size_t kKeptCacheDefaultBytes = std::size_t(64) << 20;
  static constexpr std::size_t kKeptMinBytes = std::size_t(1) << 20;

  struct Stats {
    std::size_t bytes;   // held in freed blocks
    std::size_t blocks;  // freed blocks held
    std::size_t limit;   // the bound on bytes
  };

  // Never destroyed: tensors freed during interpreter shutdown still return their blocks.
  static KeptCache& get() {
    static KeptCache* cache = new KeptCache(limit_from_env());
    return *cache;
  }

  void* take(std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      // The most recently freed block of that size (a handful of blocks are held: a scan).
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
        if (it->first != bytes) continue;
        void* p = it->second;
        free_.erase(std::next(it).base());
        cached_ -= bytes;
        return p;
      }
    }
    void* p = allocate(bytes);
    TORCH_CHECK(p != nullptr, "splinet_cuda: out of memory allocating ", bytes, " bytes for the kept tensors");
    return p;
  }

  void give(void* p, std::size_t bytes) {
    std::vector<std::pair<std::size_t, void*>> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes <= limit_) {
        while (cached_ + bytes > limit_) {  // evict the blocks freed longest ago
          cached_ -= free_.front().first;
          out.push_back(free_.front());
          free_.pop_front();
        }
        free_.emplace_back(bytes, p);
        cached_ += bytes;
      } else {
        out.emplace_back(bytes, p);
      }
    }
    for (auto& [size, q] : out) release(q, size);
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {cached_, free_.size(), limit_};
  }

  // A new bound; the blocks held beyond it are released (all of them at 0).
  void set_limit(std::size_t limit) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_ = limit;
    }
    trim(limit);
  }

  // Releases every block held, keeping the bound (splinet_cuda.empty_kept_cache).
  void empty() { trim(0); }

  // SPLINET_KEPT_CACHE_MB: a whole number of MiB, 0 for no cache; unset: the default.
  static std::size_t limit_from_env() {
    const char* text = std::getenv("SPLINET_KEPT_CACHE_MB");
    if (text == nullptr || *text == '\0') return kKeptCacheDefaultBytes;
    char* end = nullptr;
    errno = 0;
    const unsigned long long mb = std::strtoull(text, &end, 10);
    TORCH_CHECK(*text >= '0' && *text <= '9' && *end == '\0' && errno == 0 &&
                    mb <= (std::numeric_limits<std::size_t>::max() >> 20),
                "SPLINET_KEPT_CACHE_MB must be a whole number of MiB (0 turns the kept-tensor cache off), got '",
                text, "'");
    return static_cast<std::size_t>(mb) << 20;
  }

 private:
  explicit KeptCache(std::size_t limit) : limit_(limit) {}

  // Releases blocks until at most `bytes` are held (unmapping outside the lock).
  void trim(std::size_t bytes) {
    std::vector<std::pair<std::size_t, void*>> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (cached_ > bytes) {  // the blocks freed longest ago first
        cached_ -= free_.front().first;
        out.push_back(free_.front());
        free_.pop_front();
      }
    }
    for (auto& [size, p] : out) release(p, size);
  }

  static void* allocate(std::size_t bytes) {
#if SPLINET_KEPT_MMAP
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;  // page-aligned, so kScratchAlign-aligned
#else
    return ::operator new(bytes, std::align_val_t(kScratchAlign), std::nothrow);
#endif
  }

  static void release(void* p, std::size_t bytes) {
#if SPLINET_KEPT_MMAP
    ::munmap(p, bytes);
#else
    (void)bytes;
    ::operator delete(p, std::align_val_t(kScratchAlign));
#endif
  }

  std::mutex mu_;  // guards free_, cached_, limit_
  std::deque<std::pair<std::size_t, void*>> free_;  // (bytes, block), oldest first
  std::size_t cached_ = 0;
  std::size_t limit_;
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

// Tensor views of raw arrays (rows x cols, or n), for ATen's kernels to write in place.
template <typename T>
at::Tensor wrap(const T* p, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename T>
at::Tensor wrap1d(const T* p, int64_t n) {
  return at::from_blob(const_cast<T*>(p), {n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

}  // namespace cpu
}  // namespace splinet
