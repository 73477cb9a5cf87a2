// CPU implementation of splinet_cuda::basis_table (schema in csrc/splinet_ops.cpp).
// Legend: T number of times, d degree.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/bspline.h"
#include "../common/checks.h"

namespace splinet {
namespace {

std::tuple<at::Tensor, at::Tensor> basis_table_cpu(const at::Tensor& t_in, int64_t knots,
                                                   int64_t degree) {
  check_basis_args(t_in, knots, degree);
  const at::Tensor t = t_in.contiguous();
  const int64_t T = t.size(0);
  at::Tensor k = at::empty({T}, t.options().dtype(at::kLong));
  at::Tensor w = at::empty({T, degree + 1}, t.options());
  int64_t* kp = k.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "basis_table_cpu", [&] {
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* wp = w.data_ptr<scalar_t>();
    for (int64_t i = 0; i < T; ++i) {
      const double ti = static_cast<double>(tp[i]);
      TORCH_CHECK_VALUE(ti >= 0.0 && ti <= 1.0,
                        "basis_table: t must lie in [0, 1], got t[", i, "] = ", ti);
      double u;
      kp[i] = knot_interval(ti * static_cast<double>(knots), knots, &u);
      double wd[16];
      bspline_weights<double>(u, static_cast<int>(degree), wd);
      for (int64_t r = 0; r <= degree; ++r) wp[i * (degree + 1) + r] = static_cast<scalar_t>(wd[r]);
    }
  });
  return {k, w};
}

}  // namespace

TORCH_LIBRARY_IMPL(splinet_cuda, CPU, m) { m.impl("basis_table", &basis_table_cpu); }

}  // namespace splinet
