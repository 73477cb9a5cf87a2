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

// The checks every layer op shares: one-value scale, steps, degree, n = L + degree > degree
// coefficients (weight.size(0) = n), checkpoint interval.
inline void check_layer_common_args(const char* op, const at::Tensor& weight, const at::Tensor& scale,
                                    int64_t steps, int64_t degree, int64_t checkpoint) {
  TORCH_CHECK_VALUE(scale.numel() == 1, op, ": scale must hold one value, got shape ", scale.sizes());
  // Any floating dtype: every backend computes with the scale in x's dtype and returns its
  // gradient in the scale's own dtype.
  TORCH_CHECK_TYPE(scale.is_floating_point(), op, ": scale must be a floating tensor, got ", scale.scalar_type());
  TORCH_CHECK_VALUE(steps >= 1, op, ": steps must be >= 1, got ", steps);
  TORCH_CHECK_VALUE(degree >= 0 && degree <= 15, op, ": degree must be in [0, 15], got ", degree);
  TORCH_CHECK_VALUE(weight.size(0) > degree, op, ": need n = L + degree > degree coefficients, got n = ",
                    weight.size(0), ", degree = ", degree);
  TORCH_CHECK_VALUE(checkpoint >= 1, op, ": checkpoint must be >= 1, got ", checkpoint);
}

// A tensor a *_fwd_saved op returned and its *_bwd_saved op takes back (`name`, of
// `layout`): the shape its forward gives it, the states' dtype and device.
inline void check_kept_tensor(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want,
                              const char* layout, const at::Tensor& states) {
  TORCH_CHECK_VALUE(t.sizes() == want, op, ": ", name, " must have shape ", want, " ", layout, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == states.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                   " but states has dtype ", states.scalar_type());
  TORCH_CHECK_VALUE(t.device() == states.device(), op, ": ", name, " is on ", t.device(), " but states is on ",
                    states.device());
}

// Dense layer ops: x (B, m), weight (n, m, m), bias (n, m) or none, one-value scale.
// `half_types`: bfloat16 and float16 are accepted too (the CUDA kernels).
inline void check_dense_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, const at::Tensor& scale, int64_t steps,
                             int64_t degree, int64_t checkpoint, bool half_types) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must have shape (B, m), got ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(1) == x.size(1) && weight.size(2) == x.size(1), op,
                    ": weight must have shape (n, m, m) with m = ", x.size(1), ", got ", weight.sizes());
  const auto dt = x.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kDouble || (half_types && (dt == at::kHalf || dt == at::kBFloat16));
  TORCH_CHECK_TYPE(ok, op, ": x must be float32 or float64", half_types ? ", bfloat16 or float16" : "", ", got ", dt);
  TORCH_CHECK_TYPE(weight.scalar_type() == dt, op, ": weight dtype ", weight.scalar_type(), " differs from x dtype ",
                   dt);
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but x is on ",
                    x.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == weight.size(0) && bias->size(1) == x.size(1), op,
                      ": bias must have shape (n, m), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == dt, op, ": bias dtype differs from x dtype");
    TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": bias is on ", bias->device(), " but x is on ", x.device());
  }
  check_layer_common_args(op, weight, scale, steps, degree, checkpoint);
}

// Conv layer ops: x (B, C, *spatial) with 1-3 spatial dims, weight (n, C, C, *kernel) with odd
// kernel sizes, bias (n, C) or none, one-value scale. `half_types` as for check_dense_args.
inline void check_conv_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& scale, int64_t steps, int64_t degree,
                     int64_t checkpoint, bool half_types) {
  TORCH_CHECK_VALUE(x.dim() >= 3 && x.dim() <= 5, op, ": x must have shape (B, C, *spatial) with 1 to 3 spatial dims, got ",
                    x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == x.dim() + 1 && weight.size(1) == C && weight.size(2) == C, op,
                    ": weight must have shape (n, C, C, *kernel) with C = ", C, " and ", x.dim() - 2,
                    " kernel dims, got ", weight.sizes());
  for (int64_t j = 3; j < weight.dim(); ++j)
    TORCH_CHECK_VALUE(weight.size(j) % 2 == 1, op, ": kernel sizes must be odd for 'same' padding, got weight ",
                      weight.sizes());
  const auto dt = x.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kDouble || (half_types && (dt == at::kHalf || dt == at::kBFloat16));
  TORCH_CHECK_TYPE(ok, op, half_types ? "" : " (cpu)", ": x must be float32 or float64",
                   half_types ? ", bfloat16 or float16" : "", ", got ", dt);
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
                   " differs from x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but x is on ",
                    x.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == weight.size(0) && bias->size(1) == C, op,
                      ": bias must have shape (n, C) = (", weight.size(0), ", ", C, "), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                     " differs from x dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": bias is on ", bias->device(), " but x is on ", x.device());
  }
  check_layer_common_args(op, weight, scale, steps, degree, checkpoint);
}

}  // namespace splinet
