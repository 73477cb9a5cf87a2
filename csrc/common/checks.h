// Argument checks shared by the CPU and CUDA op implementations. The Python layer
// validates first with argument-naming errors; these keep direct op calls safe.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace splinet {

inline void check_basis_args(const at::Tensor& t, int64_t knots, int64_t degree) {
  TORCH_CHECK_VALUE(t.dim() == 1, "basis_table: t must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                   "basis_table: t must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(knots >= 1, "basis_table: knots must be >= 1, got ", knots);
  TORCH_CHECK_VALUE(degree >= 0 && degree <= 15,
                    "basis_table: degree must be in [0, 15], got ", degree);
}

}  // namespace splinet
