// The GPU executor of the CUDA layer drivers: launches block programs and elementwise functors.
//
// CudaExec implements the executor interface of driver_common.h for dense_driver.h and
// conv_driver.h: the block programs and elementwise functors run on the current stream, with
// dynamic shared memory above 48 KB, a persistent grid sized by the occupancy calculator, and
// a launch check after every kernel. The caller holds a device guard for the tensors' device.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "block_runtime.h"

namespace splinet {

// Threads of every block program (the small-width and conv programs and the fused GEMM's
// 8 warps): the register allocation is planned for it.
constexpr int kBlockThreads = 256;

template <typename Body, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads) block_kernel(const Body body) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  body(blockIdx.x, gridDim.x, BlockCtx{threadIdx.x, blockDim.x}, reinterpret_cast<acc_t*>(smem_raw));
}

template <typename F>
__global__ void for_each_kernel(int64_t n, const F f) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    f(e);
}

// Blocks of `kernel` resident on one multiprocessor of `device` with `threads` threads and
// `smem` bytes of dynamic shared memory. The opt-in above 48 KB (cudaFuncSetAttribute) and the
// occupancy query are made once per (kernel, device, threads, smem), not on every launch; the
// opt-in is only ever raised, so a later launch with less shared memory stays valid.
template <typename Kernel>
int resident_blocks_per_sm(Kernel kernel, int device, int64_t threads, int64_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<int, int64_t, int64_t>, int> per_sm;
  static std::map<int, int64_t> opted_in;  // device -> bytes allowed so far
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(device, threads, smem);
  const auto hit = per_sm.find(key);
  if (hit != per_sm.end()) return hit->second;
  int64_t& allowed = opted_in[device];
  if (smem > 48 * 1024 && smem > allowed) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    allowed = smem;
  }
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, static_cast<int>(threads),
                                                               static_cast<size_t>(smem)));
  per_sm.emplace(key, blocks);
  return blocks;
}

// The properties of a device, queried once per device and process (the query costs more
// than a small launch). Entries of a std::map stay where they are, so the reference is stable.
inline const cudaDeviceProp& device_properties(int device) {
  static std::mutex mu;
  static std::map<int, cudaDeviceProp> cache;
  const std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it == cache.end()) {
    cudaDeviceProp props;
    C10_CUDA_CHECK(cudaGetDeviceProperties(&props, device));
    it = cache.emplace(device, props).first;
  }
  return it->second;
}

// An empty kernel whose attributes tell which of the build's images the driver loaded.
template <int>
__global__ void image_probe_kernel() {}

// The virtual architecture (75, 80, 90, ...) of the code this library runs on `device`: the
// image the driver picked among those the build holds (SASS, or PTX it JIT-compiled), queried
// once per device. Features the image lacks are not launched (dense_use_fused). The caller
// holds a device guard for `device`.
inline int image_arch(int device) {
  static std::mutex mu;
  static std::map<int, int> cache;
  const std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it == cache.end()) {
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, image_probe_kernel<0>));
    it = cache.emplace(device, attr.ptxVersion).first;
  }
  return it->second;
}

struct CudaExec {
  static constexpr bool kHalfTypes = true;
  static constexpr bool kTensorCores = true;  // the fused GEMM takes wmma for bfloat16 / float16
  int device;
  const cudaDeviceProp* props;

  explicit CudaExec(int device_) : device(device_), props(&device_properties(device_)) {}

  int64_t threads() const { return kBlockThreads; }
  int64_t multiprocessors() const { return props->multiProcessorCount; }
  int image_arch() const { return splinet::image_arch(device); }
  // bfloat16 needs sm_80 (its tensor-core fragments and cuBLAS's bfloat16 GEMMs); Python's
  // dispatch says so first (splinet_cuda/_cuda_archs.py), this guards direct op calls.
  void check_dtype(at::ScalarType dtype, const char* op) const {
    TORCH_CHECK_TYPE(dtype != at::kBFloat16 || props->major >= 8, op, ": bfloat16 needs a GPU of compute "
                     "capability >= 8.0, this one has ", props->major, ".", props->minor);
  }
  // Shared memory a block may take: the opt-in maximum, capped so that two blocks share an SM.
  int64_t max_smem_bytes() const {
    return std::min<int64_t>(static_cast<int64_t>(props->sharedMemPerBlockOptin), 100 * 1024);
  }

  template <typename Body>
  static auto kernel_of() {
    return &block_kernel<Body, typename Body::acc_type>;
  }

  // Persistent grid: as many blocks as are resident on the device at once, at most one per tile.
  template <typename Body>
  int64_t grid(int64_t tiles, int64_t threads, int64_t smem) {
    const int per_sm = resident_blocks_per_sm(kernel_of<Body>(), device, threads, smem);
    const int64_t resident = std::max<int64_t>(1, static_cast<int64_t>(per_sm) * props->multiProcessorCount);
    return std::max<int64_t>(1, std::min<int64_t>(tiles, resident));
  }

  // After grid<Body>() with the same shared memory (which opted the kernel in above 48 KB).
  template <typename Body>
  void launch(const Body& body, int64_t grid, int64_t threads, int64_t smem) {
    auto kernel = kernel_of<Body>();
    kernel<<<static_cast<unsigned>(grid), static_cast<unsigned>(threads), static_cast<size_t>(smem),
             c10::cuda::getCurrentCUDAStream()>>>(body);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename F>
  void for_each(int64_t n, const F& f) {
    if (n <= 0) return;
    const int64_t block = 256;
    const int64_t blocks = std::min<int64_t>((n + block - 1) / block, 16 * props->multiProcessorCount);
    for_each_kernel<F><<<static_cast<unsigned>(blocks), block, 0, c10::cuda::getCurrentCUDAStream()>>>(n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace splinet
