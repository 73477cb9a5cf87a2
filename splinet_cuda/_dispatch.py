"""The public functional API and the one place where a backend is chosen.

Legend: B batch, m width, C channels, n = L + d coefficients, d degree, N steps.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from . import _ext, reference
from ._validate import Scale, as_number, check_checkpoint, check_flag, check_conv, check_dense, check_hamiltonian

__all__ = ["spline_ode", "spline_ode_conv", "spline_ode_hamiltonian", "available_backends", "register_backend"]

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

# How to get each fused backend, for the error raised when it is named but not built.
_BUILD_HINTS = {
    "cpu": "the fused C++ kernels of splinet_cuda._C; build them with `pip install --no-build-isolation .` "
    "(or `make build`)",
    "cuda": "the CUDA extension; build it on a machine with a CUDA toolkit and a CUDA build of PyTorch with "
    "`FORCE_CUDA=1 pip install --no-build-isolation .`",
    "triton": "Triton kernels on CUDA tensors; `pip install 'triton>=3.6'` with a CUDA build of PyTorch",
}


class Backend(NamedTuple):
    spline_ode: Optional[Callable]
    spline_ode_conv: Optional[Callable]
    device_types: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    conv_dims: Tuple[int, ...]  # spatial dims its conv kernels take
    auto_device_types: Tuple[str, ...]  # where "auto" may pick it
    spline_ode_hamiltonian: Optional[Callable] = None
    # device_check(device, dtype): why the backend cannot run on that device in that dtype (an
    # exception to raise), or None; e.g. a GPU the CUDA build has no kernels for. It reads
    # device properties only, never tensor values.
    device_check: Optional[Callable[[torch.device, torch.dtype], Optional[Exception]]] = None


# Fused backends register themselves here when their kernels are importable;
# "auto" prefers them in this order on the tensors' device.
_REGISTRY: Dict[str, Backend] = {}
_AUTO_ORDER = ("cuda", "triton", "cpu")
# The backends with a Hamiltonian (Verlet) layer; the others have no kernel for it in any build.
HAMILTONIAN_BACKENDS = ("auto", "reference", "cpu")


def register_backend(name: str, *, dense: Optional[Callable], conv: Optional[Callable],
                     device_types: Tuple[str, ...], dtypes: Tuple[torch.dtype, ...],
                     conv_dims: Tuple[int, ...] = (1, 2, 3),
                     auto_device_types: Optional[Tuple[str, ...]] = None,
                     hamiltonian: Optional[Callable] = None,
                     device_check: Optional[Callable[[torch.device, torch.dtype], Optional[Exception]]] = None) -> None:
    """Makes a fused backend selectable (called by the backend modules at import)."""
    if name not in BACKENDS or name in ("auto", "reference"):
        raise ValueError(f"cannot register backend {name!r}")
    auto = device_types if auto_device_types is None else auto_device_types
    _REGISTRY[name] = Backend(dense, conv, device_types, dtypes, conv_dims, auto, hamiltonian, device_check)


def available_backends(device: Optional[torch.device] = None) -> List[str]:
    """The backends usable in this installation, e.g. ``["reference", "cpu"]``.

    With ``device`` (a torch.device or string such as ``"cuda:0"``), those that run on it:
    a CUDA build whose architectures do not cover that GPU is left out.
    """
    names = [name for name in ("cpu", "triton", "cuda") if name in _REGISTRY]
    if device is not None:
        device = torch.device(device)
        names = [name for name in names if device.type in _REGISTRY[name].device_types
                 and (_REGISTRY[name].device_check is None
                      or _REGISTRY[name].device_check(device, torch.float32) is None)]
    return ["reference"] + names


def _unsupported(name: str, impl: Backend, kind: str, x: torch.Tensor, device_check: bool = True) -> Optional[Exception]:
    """Why backend ``name`` cannot run ``kind`` on ``x``, as the error to raise; None if it can."""
    if x.device.type not in impl.device_types:
        return ValueError(f"backend {name!r} runs on {list(impl.device_types)} tensors, but x is on {x.device}")
    if x.dtype not in impl.dtypes:
        return TypeError(f"backend {name!r} takes dtypes {[str(d) for d in impl.dtypes]}, but x has dtype {x.dtype}")
    if kind == "spline_ode_conv" and x.dim() - 2 not in impl.conv_dims:
        return ValueError(f"backend {name!r} implements convolutions over {list(impl.conv_dims)} spatial dims, "
                          f"but x has {x.dim() - 2}")
    if device_check and impl.device_check is not None:
        return impl.device_check(x.device, x.dtype)
    return None


_WARNED: set = set()  # what backend="auto" has said already


def _warn_once(key: tuple, message: str, stacklevel: int = 4) -> None:
    """One RuntimeWarning per ``key``: why backend="auto" did not take a fused backend
    (``stacklevel`` counts from here to the caller of the public function)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"splinet_cuda: backend='auto' {message}", RuntimeWarning, stacklevel=stacklevel)


def _warn_unfused_dtype(x: torch.Tensor) -> None:
    """backend="auto" runs the reference for a dtype that the fused backend of x's device does
    not take (bfloat16 / float16 on the CPU): said once per (device type, dtype), not silently."""
    fused = [n for n, b in _REGISTRY.items() if x.device.type in b.auto_device_types]
    if fused and x.is_floating_point() and all(x.dtype not in _REGISTRY[n].dtypes for n in fused):
        _warn_once((x.device.type, x.dtype),
                   f"has no fused kernel for {x.dtype} on {x.device.type} (the {fused} backend takes "
                   f"{[str(d) for d in _REGISTRY[fused[0]].dtypes]}); running the pure-PyTorch reference", stacklevel=5)


def _select(backend, kind: str, x: torch.Tensor) -> Callable:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "reference":
        return getattr(reference, kind)
    if backend == "auto":
        for name in _AUTO_ORDER:
            impl = _REGISTRY.get(name)
            if impl is None or getattr(impl, kind) is None or x.device.type not in impl.auto_device_types:
                continue
            if _unsupported(name, impl, kind, x, device_check=False) is not None:
                continue
            err = impl.device_check(x.device, x.dtype) if impl.device_check is not None else None
            if err is None:
                return getattr(impl, kind)
            _warn_once((name, str(err)), f"skips {name!r}: {err}")  # a GPU this build (or dtype) cannot use
        _warn_unfused_dtype(x)
        return getattr(reference, kind)
    impl = _REGISTRY.get(backend)
    if impl is None or getattr(impl, kind) is None:
        why = f"backend {backend!r} is not available for {kind} in this installation"
        load = f" (splinet_cuda._C failed to load: {_ext.LOAD_ERROR})" if _ext.LOAD_ERROR is not None else ""
        raise RuntimeError(f"{why}{load}; it needs {_BUILD_HINTS[backend]}. Available: {available_backends()}")
    err = _unsupported(backend, impl, kind, x)
    if err is not None:
        raise err
    return getattr(impl, kind)


def _autocast_device(x) -> Optional[str]:
    """x's device type when torch.autocast is enabled for it, else None."""
    if isinstance(x, torch.Tensor) and x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        return x.device.type
    return None


def _to_float32(t):
    """Autocast's cast for the layers: bfloat16 / float16 tensors to float32; float32, float64
    and anything else unchanged (as torch.library.register_autocast casts an op's inputs)."""
    if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def _flatten_leading(x):
    """x ``(*, m)`` as (B, m), as nn.Linear takes any leading dims: (x, leading shape or None)."""
    if isinstance(x, torch.Tensor) and x.dim() not in (0, 2):
        lead = tuple(x.shape[:-1])
        return x.reshape(math.prod(lead), x.shape[-1]), lead
    return x, None


def _unflatten_leading(out: torch.Tensor, lead, trajectory: bool) -> torch.Tensor:
    if lead is None:
        return out
    return out.reshape(*((out.shape[0],) if trajectory else ()), *lead, out.shape[-1])


def _run(device_type: Optional[str], fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs); under torch.autocast on ``device_type`` with autocast disabled inside,
    so that the reference's products are not cast again."""
    if device_type is None:
        return fn(*args, **kwargs)
    with torch.autocast(device_type, enabled=False):
        return fn(*args, **kwargs)


def spline_ode(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: Scale, *,
               steps: int, degree: int, activation: str = "tanh", scheme: str = "euler",
               variant: str = "standard", gamma: float = 0.0, backend: str = "auto",
               return_trajectory: bool = False, checkpoint: Optional[int] = None) -> torch.Tensor:
    """Integrates a dense SpliNet layer, dx/dt = scale * f(x, W(t), b(t)) on t in [0, 1].

    W(t) = sum_j B_j(t) weight[j] and b(t) = sum_j B_j(t) bias[j] are B-splines of degree
    ``degree`` on L = n - degree uniform knot intervals (paper eqs. 12-15); the ODE
    (paper eq. 24, T = scale) is discretised with ``steps`` steps of ``scheme``.
    Gradients are exact for the discrete forward pass (paper eqs. 17-23).

    Under ``torch.autocast`` (CPU or CUDA) the layer runs like PyTorch's float32-policy ops
    (softmax, norms): bfloat16 / float16 inputs are cast to float32 and the output is float32,
    because an N-step integration accumulates rounding that a 16-bit state would amplify.
    Pass 16-bit tensors outside autocast to run the cuda / triton backends in them.

    Args:
        x: (B, m) initial state, or ``(*, m)`` with any leading dims (as nn.Linear takes them).
        weight: (n, m, m) coefficient matrices, (out, in) like nn.Linear.
        bias: (n, m) coefficient vectors, or None.
        scale: lam, the time scale of paper eq. 24: a float or a 0-dim tensor (learned
            when it requires grad).
        steps: N >= 1, the number of time steps (h = 1 / N).
        degree: d >= 0, the B-spline degree, with n > d (L = n - d knot intervals).
        activation: "identity", "relu", "tanh", "sigmoid" or "softplus".
        scheme: "euler", "midpoint", "rk4" or "rk4_38".
        variant: "standard" act(x W^T + b), "symmetric" -act(x W^T + b) W, or
            "antisymmetric" act(x A^T + b) with A = W - W^T - gamma I.
        gamma: the diagonal shift of the "antisymmetric" variant (unused by the others).
        backend: "auto" (fastest built backend for x's device), "reference", "cpu",
            "triton" or "cuda".
        return_trajectory: return all N + 1 states instead of the last one.
        checkpoint: fused backends keep only every ``checkpoint``-th state for the
            backward and recompute the others (None or 1: keep all; ignored with
            ``return_trajectory`` and by the reference).

    Returns:
        x_N (B, m), or the trajectory (N + 1, B, m) (x's leading dims in place of B).
    """
    steps, degree, gamma, checkpoint, scale = map(as_number, (steps, degree, gamma, checkpoint, scale))
    x, lead = _flatten_leading(x)
    autocast = _autocast_device(x)
    if autocast is not None:
        x, weight, bias, scale = map(_to_float32, (x, weight, bias, scale))
    check_dense(x, weight, bias, scale, steps=steps, degree=degree, activation=activation,
                scheme=scheme, variant=variant, gamma=gamma)
    check_checkpoint(checkpoint)
    check_flag("return_trajectory", return_trajectory)
    fn = _select(backend, "spline_ode", x)
    out = _run(autocast, fn, x, weight, bias, scale, steps=steps, degree=degree, activation=activation,
               scheme=scheme, variant=variant, gamma=gamma, return_trajectory=return_trajectory,
               checkpoint=checkpoint)
    return _unflatten_leading(out, lead, return_trajectory)


def spline_ode_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: Scale, *,
                    steps: int, degree: int, activation: str = "relu", scheme: str = "euler",
                    variant: str = "standard", gamma: float = 0.0, backend: str = "auto",
                    return_trajectory: bool = False, checkpoint: Optional[int] = None) -> torch.Tensor:
    """Integrates a convolutional SpliNet layer (1 to 3 spatial dims), like :func:`spline_ode`.

    f is act(conv(x, K(t)) + b(t)) ("standard") or -conv_transpose(act(conv(x, K(t)) + b(t)), K(t))
    ("symmetric", Ruthotto-Haber's parabolic layer), stride 1 and "same" zero padding.
    Under ``torch.autocast`` it runs in float32, as :func:`spline_ode` says.

    Args:
        x: ``(B, C, *spatial)`` initial state, 1 to 3 spatial dims.
        weight: ``(n, C, C, *kernel)`` coefficient filters, odd kernel sizes.
        bias: (n, C) coefficient vectors, or None.
        scale: lam, as in :func:`spline_ode`.
        steps: N >= 1.
        degree: d >= 0, with n > d.
        activation: as in :func:`spline_ode` (default "relu").
        scheme: as in :func:`spline_ode`.
        variant: "standard" or "symmetric" (no antisymmetric convolution).
        gamma: unused (accepted for a uniform signature).
        backend: as in :func:`spline_ode`; the "triton" backend takes 2-D convolutions only.
        return_trajectory: return all N + 1 states instead of the last one.
        checkpoint: as in :func:`spline_ode`.

    Returns:
        x_N like x, or the trajectory ``(N + 1, *x.shape)``.
    """
    steps, degree, gamma, checkpoint, scale = map(as_number, (steps, degree, gamma, checkpoint, scale))
    autocast = _autocast_device(x)
    if autocast is not None:
        x, weight, bias, scale = map(_to_float32, (x, weight, bias, scale))
    check_conv(x, weight, bias, scale, steps=steps, degree=degree, activation=activation,
               scheme=scheme, variant=variant, gamma=gamma)
    check_checkpoint(checkpoint)
    check_flag("return_trajectory", return_trajectory)
    fn = _select(backend, "spline_ode_conv", x)
    out = _run(autocast, fn, x, weight, bias, scale, steps=steps, degree=degree, activation=activation,
               scheme=scheme, variant=variant, gamma=gamma, return_trajectory=return_trajectory,
               checkpoint=checkpoint)
    # x_N in x's memory format, as nn.Conv2d / Conv3d return it (the kernels compute in the
    # contiguous layout); a trajectory has one more dim and stays contiguous.
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if (fmt is not None and not return_trajectory and not x.is_contiguous()
            and x.is_contiguous(memory_format=fmt)):
        out = out.contiguous(memory_format=fmt)
    return out


def spline_ode_hamiltonian(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           scale: Scale, *, steps: int, degree: int, activation: str = "tanh", reverse: bool = False,
                           return_trajectory: bool = False, backend: str = "auto",
                           checkpoint: Optional[int] = None):
    """Integrates the Hamiltonian SpliNet layer (Ruthotto & Haber, "Hamiltonian CNNs") with N symplectic
    Verlet steps, h = 1/N, t_j = j h, lam = scale, F_sym(x; K, b) = -act(x K^T + b) K::

        y_{j+1} = y_j + h lam F_sym(z_j;     K1(t_j), b1(t_j))
        z_{j+1} = z_j - h lam F_sym(y_{j+1}; K2(t_j), b2(t_j))

    K1, b1 = weight[:, 0], bias[:, 0] and K2, b2 = weight[:, 1], bias[:, 1] are B-spline
    coefficients (paper eqs. 12-15); see :func:`splinet_cuda.reference.spline_ode_hamiltonian`.
    Gradients are exact for the discrete steps.

    Args:
        y: (B, m) first state.
        z: (B, m) second state.
        weight: (n, 2, m, m) coefficient matrices; ``weight[:, 0]`` is K1, ``weight[:, 1]`` K2.
        bias: (n, 2, m) coefficient vectors, or None.
        scale: lam, a float or a 0-dim tensor (learned when it requires grad).
        steps: N >= 1.
        degree: d >= 0, with n > d (L = n - d knot intervals).
        activation: as in :func:`spline_ode`.
        reverse: run the steps backwards from (y_N, z_N) (the layer is reversible); reference only.
        return_trajectory: return all N + 1 states of each.
        backend: "auto" (the fused CPU kernels for float32/float64 CPU tensors when built,
            else the reference), "reference" or "cpu"; "triton" and "cuda" have no
            Hamiltonian kernel (ValueError).
        checkpoint: the fused backend keeps only every ``checkpoint``-th state for the
            backward and recomputes the others (None or 1: keep all; ignored with
            ``return_trajectory`` and by the reference).

    Returns:
        (y_N, z_N), each (B, m), or the trajectories ((N+1, B, m), (N+1, B, m)) (from t = 1
        down to 0 when ``reverse``).
    """
    steps, degree, checkpoint, scale = map(as_number, (steps, degree, checkpoint, scale))
    autocast = _autocast_device(y)
    if autocast is not None:
        y, z, weight, bias, scale = map(_to_float32, (y, z, weight, bias, scale))
    check_hamiltonian(y, z, weight, bias, scale, steps=steps, degree=degree, activation=activation)
    check_checkpoint(checkpoint)
    check_flag("return_trajectory", return_trajectory)
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")
    if isinstance(backend, str) and backend in BACKENDS and backend not in HAMILTONIAN_BACKENDS:
        raise ValueError(f"backend {backend!r} has no Hamiltonian layer; spline_ode_hamiltonian runs on "
                         f"{list(HAMILTONIAN_BACKENDS)}")
    if reverse:
        if backend not in ("auto", "reference"):
            _select(backend, "spline_ode_hamiltonian", y)  # the usual errors for a bad or unbuilt backend
            raise ValueError(f"reverse=True runs on the reference only (no fused kernel for the reversed steps); "
                             f"use backend='auto' or 'reference', got {backend!r}")
        backend = "reference"
    fn = _select(backend, "spline_ode_hamiltonian", y)
    if fn is reference.spline_ode_hamiltonian:
        return _run(autocast, fn, y, z, weight, bias, scale, steps=steps, degree=degree, activation=activation,
                    reverse=reverse, return_trajectory=return_trajectory)
    return _run(autocast, fn, y, z, weight, bias, scale, steps=steps, degree=degree, activation=activation,
                return_trajectory=return_trajectory, checkpoint=checkpoint)
