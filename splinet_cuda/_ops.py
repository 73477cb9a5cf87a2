"""Fake (meta) implementations of every splinet_cuda op, so torch.compile and
torch.library.opcheck can trace them without running a kernel. The C++ schemas are
defined in csrc/splinet_ops.cpp; the Triton ops (splinet_cuda/_triton.py) use the same
layer fakes.

Legend: B batch, n = L + d coefficients, N steps, K checkpoint interval.
"""
from __future__ import annotations

import torch

from ._schemes import get_tableau


def num_saved_states(steps: int, checkpoint: int) -> int:
    """States kept by a forward pass with checkpoint interval K: x_0, x_K, ... below N, and x_N."""
    return (steps + checkpoint - 1) // checkpoint + 1


def layer_fwd_fake(x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma, checkpoint):
    """Any layer's forward op: the saved states, (num_saved, *x.shape)."""
    return x.new_empty((num_saved_states(steps, checkpoint), *x.shape))


def layer_bwd_fake(grad_states, states, weight, bias, scale, steps, degree, activation, scheme, variant, gamma,
                   checkpoint):
    """Any layer's backward op: (grad_x, grad_weight, grad_bias or empty, grad_scale)."""
    grad_bias = bias.new_empty(bias.shape) if bias is not None else states.new_empty((0,))
    return (states.new_empty(states.shape[1:]), weight.new_empty(weight.shape), grad_bias,
            scale.new_empty(scale.shape))


def conv_fwd_saved_fake(x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma):
    """A forward that keeps a value of every stage: (all steps + 1 states,
    (steps, stages, *x.shape) kept (pre-)activations)."""
    stages = get_tableau(scheme).stages
    return x.new_empty((steps + 1, *x.shape)), x.new_empty((steps, stages, *x.shape))


def dense_fwd_saved_fake(x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma):
    """The dense one also keeps every stage's blended weight, (steps, stages, m * m padded to
    a multiple of 64 bytes)."""
    states, kept = conv_fwd_saved_fake(x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma)
    per = 64 // x.element_size()
    padded = (x.shape[1] * x.shape[1] + per - 1) // per * per
    return states, kept, x.new_empty((steps, kept.shape[1], padded))


def conv_bwd_saved_fake(grad_states, states, preact, weight, bias, scale, steps, degree, activation, scheme,
                        variant, gamma):
    """Its backward: the layer backward's outputs."""
    return layer_bwd_fake(grad_states, states, weight, bias, scale, steps, degree, activation, scheme, variant,
                          gamma, 1)


def dense_bwd_saved_fake(grad_states, states, preact, blended, weight, bias, scale, steps, degree, activation,
                         scheme, variant, gamma):
    return conv_bwd_saved_fake(grad_states, states, preact, weight, bias, scale, steps, degree, activation,
                               scheme, variant, gamma)


def _model_count(*tensors):
    """The leading model dimension of the model-dim ops' tensors (each M or 1: shared)."""
    M = 1
    for t in tensors:
        if t is not None:
            M = torch.sym_max(M, t.shape[0])
    return M


def dense_fwd_models_fake(x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma, checkpoint):
    """The model-dim forward: every model's saved states, (M, num_saved, B, m)."""
    M = _model_count(x, weight, bias, scale)
    return x.new_empty((M, num_saved_states(steps, checkpoint), *x.shape[1:]))


def dense_bwd_models_fake(grad_states, states, weight, bias, scale, steps, degree, activation, scheme, variant,
                          gamma, checkpoint):
    """The model-dim backward: per-model (grad_x, grad_weight, grad_bias or empty, grad_scale)."""
    M = _model_count(grad_states, states, weight, bias, scale)
    grad_bias = bias.new_empty((M, *bias.shape[1:])) if bias is not None else states.new_empty((0,))
    return (states.new_empty((M, *states.shape[2:])), weight.new_empty((M, *weight.shape[1:])), grad_bias,
            scale.new_empty((M,)))


def _basis_table_fake(t: torch.Tensor, knots: int, degree: int):
    torch._check(t.dim() == 1, lambda: f"basis_table: t must be 1-D, got {t.dim()}-D")
    return t.new_empty(t.shape, dtype=torch.int64), t.new_empty((t.shape[0], degree + 1))


def register_cpp_fakes() -> None:
    """Called once splinet_cuda._C (which defines the schemas) has loaded."""
    torch.library.register_fake("splinet_cuda::basis_table", _basis_table_fake)
    for layer in ("dense", "conv", "hamiltonian"):
        torch.library.register_fake(f"splinet_cuda::spline_{layer}_fwd", layer_fwd_fake)
        torch.library.register_fake(f"splinet_cuda::spline_{layer}_bwd", layer_bwd_fake)
    torch.library.register_fake("splinet_cuda::spline_dense_fwd_saved", dense_fwd_saved_fake)
    torch.library.register_fake("splinet_cuda::spline_dense_bwd_saved", dense_bwd_saved_fake)
    torch.library.register_fake("splinet_cuda::spline_dense_fwd_models", dense_fwd_models_fake)
    torch.library.register_fake("splinet_cuda::spline_dense_bwd_models", dense_bwd_models_fake)
    torch.library.register_fake("splinet_cuda::spline_conv_fwd_saved", conv_fwd_saved_fake)
    torch.library.register_fake("splinet_cuda::spline_conv_bwd_saved", conv_bwd_saved_fake)
