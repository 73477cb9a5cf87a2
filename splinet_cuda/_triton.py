"""The ``triton`` backend: registers the Triton kernels (``splinet_cuda.triton_kernels``, the
repository's ``triton_kernels/``) as torch ops
with autograd, and as the ``"triton"`` backend of :func:`splinet_cuda.spline_ode` /
:func:`splinet_cuda.spline_ode_conv`.

Every layer kind has an op pair (forward: all N steps, returns the saved states;
backward: the adjoint sweep with the eq. 23 accumulation), registered twice over the
same launchers:

* ``splinet_triton::<kind>_fwd`` / ``_bwd``: ``torch.library.triton_op`` whose kernels
  are launched through ``wrap_triton``, so torch.compile sees the kernels. Used on CUDA.
* ``splinet_triton::<kind>_fwd_interp`` / ``_bwd_interp``: ``torch.library.custom_op``
  with an explicit fake; used under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter,
  where the fake pass of ``triton_op`` would touch data pointers).

Importing this module never fails: without triton the backend is simply not registered
(``IMPORT_ERROR`` says why).

Legend: B batch, m width, C channels, n = L + d coefficients, N steps, K checkpoint interval.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, Optional, Tuple

import torch

from . import _basis, _cuda_archs
from ._autograd import layer_function, register_autocast_float32, run_layer
from ._dispatch import register_backend
from ._ops import layer_bwd_fake, layer_fwd_fake, num_saved_states
from ._validate import ACTIVATIONS, CONV_VARIANTS, VARIANTS
from ._schemes import TABLEAUS, get_tableau

__all__ = ["IMPORT_ERROR", "INTERPRET", "spline_ode_triton", "spline_ode_conv_triton"]

try:
    import triton  # noqa: F401
    from .triton_kernels import _common as _tk_common
    from .triton_kernels import dense as _tk_dense

    IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # triton missing or unusable: the backend is not registered
    IMPORT_ERROR = exc
    _tk_common = _tk_dense = None

try:
    from .triton_kernels import conv as _tk_conv
except Exception:  # conv kernels are optional
    _tk_conv = None

INTERPRET = bool(_tk_common is not None and _tk_common.INTERPRET)

Tensor = torch.Tensor


def _check_op_args(kind: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, steps: int,
                   degree: int, activation: str, scheme: str, variant: str, checkpoint: int) -> None:
    """Input checks of the raw ops (the public API validates more, and earlier)."""
    op = f"splinet_triton::{kind}"
    if kind == "dense":
        if x.dim() != 2:
            raise ValueError(f"{op}: x must have shape (B, m), got {tuple(x.shape)}")
        m = x.shape[1]
        if weight.dim() != 3 or tuple(weight.shape[1:]) != (m, m):
            raise ValueError(f"{op}: weight must have shape (n, m, m) with m = {m}, got {tuple(weight.shape)}")
    else:
        if x.dim() != 4:
            raise ValueError(f"{op}: x must have shape (B, C, H, W), got {tuple(x.shape)}")
        C = x.shape[1]
        if weight.dim() != 5 or tuple(weight.shape[1:3]) != (C, C) or any(k % 2 == 0 for k in weight.shape[3:]):
            raise ValueError(f"{op}: weight must have shape (n, C, C, kh, kw) with C = {C} and odd kernel sizes, "
                             f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0], x.shape[1]):
        raise ValueError(f"{op}: bias must have shape (n, {x.shape[1]}), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} differs from x dtype {x.dtype}")
    if scale.numel() != 1:
        raise ValueError(f"{op}: scale must hold one value, got shape {tuple(scale.shape)}")
    if steps < 1:
        raise ValueError(f"{op}: steps must be >= 1, got {steps}")
    if degree < 0 or weight.shape[0] <= degree:
        raise ValueError(f"{op}: degree must be >= 0 with n = L + degree > degree, got degree = {degree}, "
                         f"n = {weight.shape[0]}")
    if checkpoint < 1:
        raise ValueError(f"{op}: checkpoint must be >= 1, got {checkpoint}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; expected one of {list(ACTIVATIONS)}")
    if scheme not in TABLEAUS:
        raise ValueError(f"{op}: unknown scheme {scheme!r}; expected one of {list(TABLEAUS)}")
    if variant not in (VARIANTS if kind == "dense" else CONV_VARIANTS):
        raise ValueError(f"{op}: unknown variant {variant!r}")


@functools.lru_cache(maxsize=256)
def time_grid(steps: int, n: int, degree: int, scheme: str):
    """What the Triton kernels take of the time discretisation (triton_kernels TimeGrid): the
    scheme's tableau and the basis at every step and stage, on the host, made once per
    configuration (the kernels copy it to each device once)."""
    k, w = _basis.basis_grid(steps, n - degree, degree, scheme)
    return _tk_common.TimeGrid(get_tableau(scheme), k, w)


def _define_ops(kind: str, forward: Callable, backward: Callable) -> dict:
    """Registers the op pairs of one layer kind over the launchers ``forward(..., wrap=)`` and
    ``backward(..., wrap=)``; returns {"native": (fwd, bwd), "interp": (fwd, bwd)} as OpOverloadPackets."""
    from torch.library import custom_op, register_autograd, triton_op, wrap_triton

    def make_pair(suffix: str, decorator: Callable, wrap: Optional[Callable]):
        wrap_kw = {} if wrap is None else {"wrap": wrap}

        def fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, steps: int, degree: int,
                activation: str, scheme: str, variant: str, gamma: float, checkpoint: int) -> Tensor:
            _check_op_args(kind, x, weight, bias, scale, steps, degree, activation, scheme, variant, checkpoint)
            return forward(x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma, checkpoint,
                           grid=time_grid(steps, weight.shape[0], degree, scheme), **wrap_kw)

        def bwd(grad_states: Tensor, states: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor,
                steps: int, degree: int, activation: str, scheme: str, variant: str, gamma: float,
                checkpoint: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
            if states.dim() < 1 or states.shape[0] != num_saved_states(steps, checkpoint):
                raise ValueError(f"splinet_triton::{kind}_bwd: states holds {states.shape[0] if states.dim() else 0} "
                                 f"states, expected {num_saved_states(steps, checkpoint)} for steps = {steps}, "
                                 f"checkpoint = {checkpoint}")
            # dLoss/dx_N alone (the C++ ops' short form) goes to the launchers as it is.
            if grad_states.shape != states.shape and grad_states.shape != states.shape[1:]:
                raise ValueError(f"splinet_triton::{kind}_bwd: grad_states must have the shape of states "
                                 f"{tuple(states.shape)} or of one state, got {tuple(grad_states.shape)}")
            _check_op_args(kind, states[0], weight, bias, scale, steps, degree, activation, scheme, variant,
                           checkpoint)
            return backward(grad_states, states, weight, bias, scale, steps, degree, activation, scheme, variant,
                            gamma, checkpoint, grid=time_grid(steps, weight.shape[0], degree, scheme), **wrap_kw)

        fwd_op = decorator(f"splinet_triton::{kind}_fwd{suffix}", fwd, mutates_args=())
        bwd_op = decorator(f"splinet_triton::{kind}_bwd{suffix}", bwd, mutates_args=())
        if decorator is custom_op:
            fwd_op.register_fake(layer_fwd_fake)
            bwd_op.register_fake(layer_bwd_fake)
        fwd_packet = getattr(torch.ops.splinet_triton, f"{kind}_fwd{suffix}")
        bwd_packet = getattr(torch.ops.splinet_triton, f"{kind}_bwd{suffix}")

        fn = layer_function(f"Triton{kind.title()}{suffix}Function", lambda: fwd_packet, lambda: bwd_packet)
        register_autograd(f"splinet_triton::{kind}_fwd{suffix}", fn.op_backward, setup_context=fn.op_setup_context)
        register_autocast_float32(f"splinet_triton::{kind}_fwd{suffix}")
        FUNCTIONS[(kind, suffix or "_native")] = fn
        return fwd_packet, bwd_packet

    return {"native": make_pair("", triton_op, wrap_triton), "interp": make_pair("_interp", custom_op, None)}


OPS: dict = {}  # kind -> {"native": (fwd, bwd), "interp": (fwd, bwd)} op packets
FUNCTIONS: dict = {}  # (kind, "_native" | "_interp") -> autograd.Function over that pair


def _function(kind: str) -> type:
    """The autograd.Function a call uses: over the custom_op pair under the interpreter,
    the triton_op pair on compiled Triton (``SPLINET_TRITON_OPS=interp`` forces the former)."""
    use = "_interp" if INTERPRET or os.environ.get("SPLINET_TRITON_OPS") == "interp" else "_native"
    return FUNCTIONS[(kind, use)]


def _device_scale(scale, x: Tensor):
    """A Python-number scale as a cached device scalar: no host-to-device copy per call."""
    if isinstance(scale, Tensor) or torch.compiler.is_compiling():
        return scale
    return _tk_common.device_scalar(float(scale), x.dtype, x.device)


def spline_ode_triton(x, weight, bias, scale, *, steps, degree, activation="tanh", scheme="euler",
                      variant="standard", gamma=0.0, return_trajectory=False, checkpoint=None):
    """The dense layer on the Triton kernels (arguments validated by splinet_cuda.spline_ode)."""
    scale = _device_scale(scale, x)
    return run_layer(_function("dense"), x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma,
                     return_trajectory, checkpoint)


def spline_ode_conv_triton(x, weight, bias, scale, *, steps, degree, activation="relu", scheme="euler",
                           variant="standard", gamma=0.0, return_trajectory=False, checkpoint=None):
    """The conv2d layer on the Triton kernels (arguments validated by splinet_cuda.spline_ode_conv)."""
    scale = _device_scale(scale, x)
    return run_layer(_function("conv"), x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma,
                     return_trajectory, checkpoint)


def _register() -> None:
    # Compiled Triton needs a GPU; without one the backend is usable only under the interpreter.
    if IMPORT_ERROR is not None or not (INTERPRET or torch.cuda.is_available()):
        return
    OPS["dense"] = _define_ops("dense", _tk_dense.dense_forward, _tk_dense.dense_backward)
    conv = None
    if _tk_conv is not None:
        OPS["conv"] = _define_ops("conv", _tk_conv.conv_forward, _tk_conv.conv_backward)
        conv = spline_ode_conv_triton
    # Compiled Triton runs on CUDA tensors; the interpreter runs CPU tensors (tests only:
    # "auto" never picks triton for CPU tensors, see _dispatch._select).
    device_types = ("cuda", "cpu") if INTERPRET else ("cuda",)
    dtypes = (torch.float32, torch.float64) if INTERPRET else (
        torch.float32, torch.float64, torch.bfloat16, torch.float16)
    register_backend("triton", dense=spline_ode_triton, conv=conv, device_types=device_types, dtypes=dtypes,
                     conv_dims=(2,), auto_device_types=("cuda",), device_check=_cuda_archs.triton_backend_error)


_register()
