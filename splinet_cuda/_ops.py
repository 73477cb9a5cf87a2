"""Fake (meta) implementations of every splinet_cuda op, so torch.compile and
torch.library.opcheck can trace them without running a kernel. The schemas are defined
in csrc/splinet_ops.cpp."""
from __future__ import annotations

import torch


@torch.library.register_fake("splinet_cuda::basis_table")
def _basis_table_fake(t: torch.Tensor, knots: int, degree: int):
    torch._check(t.dim() == 1, lambda: f"basis_table: t must be 1-D, got {t.dim()}-D")
    return t.new_empty(t.shape, dtype=torch.int64), t.new_empty((t.shape[0], degree + 1))


def num_saved_states(steps: int, checkpoint: int) -> int:
    """States kept by a forward pass with checkpoint interval K: x_0, x_K, ... below N, and x_N."""
    return (steps + checkpoint - 1) // checkpoint + 1


@torch.library.register_fake("splinet_cuda::spline_dense_fwd")
def _spline_dense_fwd_fake(x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma, checkpoint):
    torch._check(x.dim() == 2, lambda: "spline_dense_fwd: x must be 2-D")
    return x.new_empty((num_saved_states(steps, checkpoint), x.shape[0], x.shape[1]))


@torch.library.register_fake("splinet_cuda::spline_dense_bwd")
def _spline_dense_bwd_fake(grad_states, states, weight, bias, scale, steps, degree, activation, scheme, variant,
                           gamma, checkpoint):
    grad_bias = bias.new_empty(bias.shape) if bias is not None else states.new_empty((0,))
    return (states.new_empty(states.shape[1:]), weight.new_empty(weight.shape), grad_bias,
            scale.new_empty(scale.shape))


# --- Conv layer (csrc/cpu/conv_cpu.cpp) -------------------------------------------------

@torch.library.register_fake("splinet_cuda::spline_conv_fwd")
def _spline_conv_fwd_fake(x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma, checkpoint):
    torch._check(3 <= x.dim() <= 5, lambda: "spline_conv_fwd: x must have shape (B, C, *spatial), 1-3 spatial dims")
    return x.new_empty((num_saved_states(steps, checkpoint), *x.shape))


@torch.library.register_fake("splinet_cuda::spline_conv_bwd")
def _spline_conv_bwd_fake(grad_states, states, weight, bias, scale, steps, degree, activation, scheme, variant,
                          gamma, checkpoint):
    grad_bias = bias.new_empty(bias.shape) if bias is not None else states.new_empty((0,))
    return (states.new_empty(states.shape[1:]), weight.new_empty(weight.shape), grad_bias,
            scale.new_empty(scale.shape))
