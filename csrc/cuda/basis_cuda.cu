// CUDA implementation of splinet_cuda::basis_table (schema in csrc/splinet_ops.cpp).
// Legend: T number of times, d degree.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/bspline.h"
#include "../common/checks.h"

namespace splinet {
namespace {

template <typename scalar_t>
__global__ void basis_table_kernel(const scalar_t* __restrict__ t, int64_t T, int64_t knots,
                                   int degree, int64_t* __restrict__ k,
                                   scalar_t* __restrict__ w) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= T) return;
  double u;
  k[i] = knot_interval(static_cast<double>(t[i]) * static_cast<double>(knots), knots, &u);
  double wd[16];
  bspline_weights<double>(u, degree, wd);
  for (int r = 0; r <= degree; ++r) w[i * (degree + 1) + r] = static_cast<scalar_t>(wd[r]);
}

std::tuple<at::Tensor, at::Tensor> basis_table_cuda(const at::Tensor& t_in, int64_t knots,
                                                    int64_t degree) {
  check_basis_args(t_in, knots, degree);
  const c10::cuda::CUDAGuard guard(t_in.device());
  const at::Tensor t = t_in.contiguous();
  // The range check needs the values on the host; it runs before any kernel.
  TORCH_CHECK_VALUE(t.numel() == 0 || (t.min().item<double>() >= 0.0 && t.max().item<double>() <= 1.0),
                    "basis_table: t must lie in [0, 1]");
  const int64_t T = t.size(0);
  at::Tensor k = at::empty({T}, t.options().dtype(at::kLong));
  at::Tensor w = at::empty({T, degree + 1}, t.options());
  if (T == 0) return {k, w};
  const int threads = 128;
  const int64_t blocks = (T + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "basis_table_cuda", [&] {
    basis_table_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        t.const_data_ptr<scalar_t>(), T, knots, static_cast<int>(degree),
        k.data_ptr<int64_t>(), w.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {k, w};
}

}  // namespace

TORCH_LIBRARY_IMPL(splinet_cuda, CUDA, m) { m.impl("basis_table", &basis_table_cuda); }

}  // namespace splinet
