// Host memory of the CPU kernels: working arrays, kept tensors, tensor views of raw arrays.
//
// Working arrays are aligned and left uninitialised; the large tensors a forward keeps for its
// backward come from a cache of freed blocks.
//
// Legend: m width.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <unordered_map>

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
// by the kernel (bench case dense1024_b256, B = 256, m = 1024, N = 10, keeps 60 MB a forward:
// with the cache the forward took 41 ms instead of 49 on 2 cores of an x86 machine). At most
// kKeptCacheBytes stay cached; blocks smaller than kKeptMinBytes go to ATen's allocator, whose
// malloc reuses them.
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
