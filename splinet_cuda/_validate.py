"""Argument checks shared by every backend: bad input gets a ValueError/TypeError that
names the argument, before any kernel runs.

Legend: B batch, m width, C channels, n = L + d coefficients, d degree, N steps.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ._schemes import TABLEAUS

ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid", "softplus")
VARIANTS = ("standard", "symmetric", "antisymmetric")
CONV_VARIANTS = ("standard", "symmetric")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

Scale = Union[float, torch.Tensor]


@dataclass(frozen=True)
class Config:
    """The non-tensor arguments of a SpliNet layer call, validated."""

    steps: int
    degree: int
    knots: int  # L = n - degree
    activation: str
    scheme: str
    variant: str
    gamma: float


def as_number(value):
    """A numpy (or other numbers.Integral / numbers.Real) scalar as a Python int / float, as
    PyTorch's own functions take them; bools, tensors and anything else unchanged, for the
    checks to judge."""
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value
    if type(value).__name__ == "bool_":  # numpy's bool is no Integral, but keep it out explicitly
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _int_arg(name: str, value, minimum: int) -> int:
    value = as_number(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _choice(name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")
    return value


def _tensor_arg(name: str, value, dim_desc: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {dim_desc}, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float32, float64, float16, bfloat16), got {value.dtype}")
    return value


def _is_wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a torch.func wrapper (vmap's BatchedTensor, grad's or jvp's wrapper),
    whose values validation must not read."""
    return _IS_FUNCTORCH_WRAPPED is not None and _IS_FUNCTORCH_WRAPPED(t)


# torch._C._functorch.is_functorch_wrapped_tensor (every torch since torch.func's; a torch
# without it has no torch.func wrappers to spare).
_IS_FUNCTORCH_WRAPPED = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def _check_scale(scale, x: torch.Tensor) -> None:
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0:
            raise ValueError(f"scale must be a float or a 0-dim tensor, got a tensor of shape {tuple(scale.shape)}")
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a floating tensor, got {scale.dtype}")
        if scale.device != x.device:
            raise ValueError(f"scale is on {scale.device} but x is on {x.device}")
        # A data-dependent check, made only where it costs no device-to-host sync (a CPU
        # tensor; not on a GPU, where it would stall every forward and break CUDA-graph
        # capture, nor on meta tensors), skipped while torch.compile traces (no graph break)
        # and on a torch.func-wrapped tensor (a vmapped scale holds one value per slice and
        # cannot be read as one number; grad and jvp wrappers are left alone alike).
        if (scale.device.type == "cpu" and not torch.compiler.is_compiling() and not _is_wrapped(scale)
                and not math.isfinite(scale.detach().item())):
            raise ValueError(f"scale must be finite, got {scale.item()}")
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    else:
        raise TypeError(f"scale must be a float or a 0-dim tensor, got {type(scale).__name__}")


def _common(x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma, variants) -> Config:
    steps = _int_arg("steps", steps, 1)
    degree = _int_arg("degree", degree, 0)
    _choice("activation", activation, ACTIVATIONS)
    _choice("scheme", scheme, TABLEAUS)
    _choice("variant", variant, variants)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise ValueError(f"gamma must be a finite float, got {gamma!r}")
    # Under torch.compile(dynamic=True) a float argument is symbolic: its value is not checked
    # while tracing (no graph break); eager calls check it.
    if not torch.compiler.is_compiling() and not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite float, got {gamma!r}")
    n = weight.shape[0]
    if n <= degree:
        raise ValueError(
            f"weight has n = {n} coefficients but degree = {degree}: need n = L + degree with L >= 1 knot intervals"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}: all tensors must share one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must be on one device")
    _check_scale(scale, x)
    return Config(steps, degree, n - degree, activation, scheme, variant, float(gamma))


def check_dense(x, weight, bias, scale, *, steps, degree, activation, scheme, variant, gamma) -> Config:
    """Validates the arguments of spline_ode: x (B, m), weight (n, m, m), bias (n, m) or None."""
    x = _tensor_arg("x", x, "of shape (B, m)")
    weight = _tensor_arg("weight", weight, "of shape (n, m, m)")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (B, m), got {tuple(x.shape)}")
    m = x.shape[1]
    if weight.dim() != 3 or weight.shape[1] != weight.shape[2]:
        raise ValueError(f"weight must have shape (n, m, m), got {tuple(weight.shape)}")
    if weight.shape[1] != m:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but x has width m = {m}: expected (n, {m}, {m})")
    if bias is not None:
        bias = _tensor_arg("bias", bias, "of shape (n, m)")
        if tuple(bias.shape) != (weight.shape[0], m):
            raise ValueError(f"bias must have shape (n, m) = {(weight.shape[0], m)}, got {tuple(bias.shape)}")
    return _common(x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma, VARIANTS)


def check_conv(x, weight, bias, scale, *, steps, degree, activation, scheme, variant, gamma) -> Config:
    """Validates the arguments of spline_ode_conv: x (B, C, *spatial) with 1-3 spatial
    dims, weight (n, C, C, *kernel) with odd kernel sizes, bias (n, C) or None."""
    x = _tensor_arg("x", x, "of shape (B, C, *spatial)")
    weight = _tensor_arg("weight", weight, "of shape (n, C, C, *kernel)")
    if not 3 <= x.dim() <= 5:
        raise ValueError(f"x must have shape (B, C, *spatial) with 1 to 3 spatial dims, got {tuple(x.shape)}")
    C, sd = x.shape[1], x.dim() - 2
    if weight.dim() != sd + 3:
        raise ValueError(
            f"weight must have shape (n, C, C, *kernel) with {sd} kernel dims to match x {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[1] != C or weight.shape[2] != C:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but x has C = {C} channels: expected (n, {C}, {C}, ...)")
    kernel = tuple(weight.shape[3:])
    if any(k % 2 == 0 for k in kernel):
        raise ValueError(f"kernel sizes must be odd for 'same' padding, got kernel {kernel} from weight {tuple(weight.shape)}")
    if bias is not None:
        bias = _tensor_arg("bias", bias, "of shape (n, C)")
        if tuple(bias.shape) != (weight.shape[0], C):
            raise ValueError(f"bias must have shape (n, C) = {(weight.shape[0], C)}, got {tuple(bias.shape)}")
    if variant == "antisymmetric":
        raise ValueError("variant 'antisymmetric' is defined for dense layers only; conv layers take 'standard' or 'symmetric'")
    return _common(x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma, CONV_VARIANTS)


def check_hamiltonian(y, z, weight, bias, scale, *, steps, degree, activation) -> Config:
    """Validates the arguments of spline_ode_hamiltonian: y, z (B, m), weight (n, 2, m, m),
    bias (n, 2, m) or None (the scheme is Verlet; there is no variant or gamma)."""
    y = _tensor_arg("y", y, "of shape (B, m)")
    z = _tensor_arg("z", z, "of shape (B, m)")
    weight = _tensor_arg("weight", weight, "of shape (n, 2, m, m)")
    steps = _int_arg("steps", steps, 1)
    degree = _int_arg("degree", degree, 0)
    _choice("activation", activation, ACTIVATIONS)
    if y.dim() != 2 or tuple(z.shape) != tuple(y.shape):
        raise ValueError(f"y and z must both have shape (B, m), got {tuple(y.shape)} and {tuple(z.shape)}")
    m = y.shape[1]
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (2, m, m):
        raise ValueError(f"weight must have shape (n, 2, m, m) = (n, 2, {m}, {m}), got {tuple(weight.shape)}")
    n = weight.shape[0]
    if n <= degree:
        raise ValueError(f"weight has n = {n} coefficients but degree = {degree}: need n = L + degree, L >= 1")
    if bias is not None:
        bias = _tensor_arg("bias", bias, "of shape (n, 2, m)")
        if tuple(bias.shape) != (n, 2, m):
            raise ValueError(f"bias must have shape (n, 2, m) = {(n, 2, m)}, got {tuple(bias.shape)}")
    for name, t in (("z", z), ("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != y.dtype or t.device != y.device):
            raise TypeError(f"{name} has dtype {t.dtype} on {t.device} but y has dtype {y.dtype} on {y.device}: "
                            f"all tensors must share one dtype and device")
    _check_scale(scale, y)
    return Config(steps, degree, n - degree, activation, "verlet", "hamiltonian", 0.0)


def check_flag(name: str, value) -> None:
    """A bool argument (``return_trajectory``): TypeError otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_checkpoint(checkpoint) -> None:
    """checkpoint: None, or the interval K >= 1 of the states kept for the backward."""
    if checkpoint is not None:
        _int_arg("checkpoint", checkpoint, 1)
