"""Shared @triton.jit helpers of the SpliNet kernels: activations and their derivatives
(matching PyTorch: ReLU'(0) = 0, softplus with threshold 20, tanh' = 1 - y^2,
sigmoid' = y (1 - y)), and launch-side helpers (Butcher tableaus as constexprs, dtypes).

Under ``TRITON_INTERPRET=1`` (the CPU interpreter) ``libdevice`` is not available, so
tanh and log1p use exp-based forms whose absolute error is a few ulp; compiled kernels
use libdevice.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Activation ids (constexpr in the kernels).
ACT_IDS = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3, "softplus": 4}
VARIANT_IDS = {"standard": 0, "symmetric": 1, "antisymmetric": 2}

if INTERPRET:
    @triton.jit
    def _tanh(a):
        # sign(a) (1 - e^{-2|a|}) / (1 + e^{-2|a|}): no overflow, absolute error ~ eps.
        t = tl.exp(-2.0 * tl.abs(a))
        r = (1.0 - t) / (1.0 + t)
        return tl.where(a < 0, -r, r)

    @triton.jit
    def _log1p(a):
        return tl.log(1.0 + a)
else:  # pragma: no cover - needs a GPU
    from triton.language.extra import libdevice

    @triton.jit
    def _tanh(a):
        return libdevice.tanh(a)

    @triton.jit
    def _log1p(a):
        return libdevice.log1p(a)


@triton.jit
def act_fwd(a, ACT: tl.constexpr):
    """y = act(a); ACT: 0 identity, 1 relu, 2 tanh, 3 sigmoid, 4 softplus."""
    if ACT == 0:
        y = a
    elif ACT == 1:
        y = tl.where(a > 0, a, 0.0)
    elif ACT == 2:
        y = _tanh(a)
    elif ACT == 3:
        y = 1.0 / (1.0 + tl.exp(-a))
    else:
        # PyTorch: a > 20 ? a : log1p(exp(a)); exp is clamped so the unused branch stays finite.
        y = tl.where(a > 20.0, a, _log1p(tl.exp(tl.minimum(a, 20.0))))
    return y.to(a.dtype)


@triton.jit
def act_bwd(a, y, ACT: tl.constexpr):
    """act'(a), from the output y where PyTorch's backward uses it."""
    if ACT == 0:
        d = tl.full(a.shape, 1.0, a.dtype)
    elif ACT == 1:
        d = tl.where(a > 0, 1.0, 0.0)
    elif ACT == 2:
        d = 1.0 - y * y
    elif ACT == 3:
        d = y * (1.0 - y)
    else:
        e = tl.exp(tl.minimum(a, 20.0))
        d = tl.where(a > 20.0, 1.0, e / (e + 1.0))
    return d.to(a.dtype)


class TimeGrid(NamedTuple):
    """The time discretisation of one layer call, given by the caller (this package imports
    nothing of splinet_cuda): ``tableau``, the explicit Runge-Kutta tableau (``stages``, ``a``,
    ``b``, ``c``), and the B-spline basis at every step i and stage s on the host, ``k`` (N, S)
    first nonzero coefficient and ``w`` (N, S, d + 1) weights (``splinet_cuda.basis_grid``)."""
    tableau: Any
    k: torch.Tensor
    w: torch.Tensor


def tableau_constexprs(tab) -> dict:
    """The explicit RK tableau as kernel constexprs: S, A10 .. A32, B0 .. B3 (c is in the basis table)."""
    S = tab.stages
    if S > 4:
        raise ValueError(f"a {S}-stage scheme: the Triton kernels take at most 4 stages")
    out = {"S": S}
    for s in range(4):
        for j in range(s):
            out[f"A{s}{j}"] = float(tab.a[s][j]) if s < S and j < len(tab.a[s]) else 0.0
        out[f"B{s}"] = float(tab.b[s]) if s < S else 0.0
    return out


def compute_dtype(dtype: torch.dtype):
    """Triton dtype of the in-kernel arithmetic: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32/fp64 inputs; tf32 for bf16/fp16 inputs,
    whose own precision is no better."""
    return "tf32" if dtype in (torch.float16, torch.bfloat16) and not INTERPRET else "ieee"


def num_saved_states(steps: int, checkpoint: int) -> int:
    """x_0, x_K, x_2K, ... below N, and x_N (same as the C++ ops)."""
    return (steps + checkpoint - 1) // checkpoint + 1


# --------------------------------------------------------------------------------------
# launch-side state: per-device tables, device guard
# --------------------------------------------------------------------------------------

_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLES_MAX = 64
TABLE_STATS = {"hits": 0, "misses": 0}


def _cacheable() -> bool:
    # Tensors made while torch.compile / make_fx trace the launchers are fake or functional:
    # they must not outlive the trace, so tracing builds its tables afresh (as constants).
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None


def _cached(key: tuple, build):
    """``build()``, made once per ``key`` outside tracing and kept in a small LRU cache."""
    if not _cacheable():
        return build()
    if key in _TABLES:
        TABLE_STATS["hits"] += 1
        _TABLES.move_to_end(key)
        return _TABLES[key]
    TABLE_STATS["misses"] += 1
    value = _TABLES[key] = build()
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return value


def basis_tables(steps: int, n: int, degree: int, scheme: str, gamma: float, dtype: torch.dtype,
                 device: torch.device, grid: TimeGrid):
    """Device tables of one layer configuration: ``kt`` (N S,) int32 first coefficient and ``wt``
    (N S (d + 1),) weights per step and stage (``grid.k``, ``grid.w``), and ``par`` =
    [gamma, h = 1 / N] in ``dtype``.

    Built on the host and copied once per (steps, n, degree, scheme, gamma, dtype, device),
    then reused: a copy from pageable host memory synchronises the host with the device (and
    cannot be captured in a CUDA graph), so doing it at every forward and backward would stall
    every call. The tables are read-only for the kernels.
    """
    device = torch.device(device)

    def build():
        k, w = grid.k, grid.w
        return (k.reshape(-1).to(device=device, dtype=torch.int32),
                w.reshape(-1).to(device=device, dtype=dtype),
                torch.tensor([float(gamma), 1.0 / steps], dtype=dtype).to(device))

    return _cached((steps, n, degree, scheme, float(gamma), dtype, device), build)


def device_scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim device tensor holding ``value`` (a Python-number scale), made once per
    (value, dtype, device) for the reason ``basis_tables`` gives. Read-only."""
    device = torch.device(device)
    return _cached(("scalar", float(value), dtype, device),
                   lambda: torch.tensor(float(value), dtype=dtype).to(device))


def device_guard(t: torch.Tensor):
    """Launches on ``t``'s device: Triton launches on the current CUDA device, which need not be
    the one holding the tensors (cuda:1 while the current device is cuda:0)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
