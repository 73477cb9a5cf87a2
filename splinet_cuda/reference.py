"""Pure-PyTorch SpliNet layers: the oracle for the fused backends and the baseline of
every benchmark. Written for clarity, the way a user would write it: at every stage
time blend the d + 1 nonzero coefficients (paper eq. 14), apply the layer, and let
autograd do the backward.

Legend: B batch, m width, C channels, n = L + d coefficients, d degree, N steps.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ._basis import basis_grid, first_coefficients
from ._schemes import get_tableau
from ._validate import Config, Scale, check_conv, check_dense, check_hamiltonian

__all__ = ["spline_ode", "spline_ode_conv", "spline_ode_hamiltonian", "dense_rhs", "conv_rhs", "ACTIVATION_FNS"]

ACTIVATION_FNS = {
    "identity": lambda a: a,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
}

_CONV = {1: (F.conv1d, F.conv_transpose1d), 2: (F.conv2d, F.conv_transpose2d), 3: (F.conv3d, F.conv_transpose3d)}


def dense_rhs(activation: str, variant: str, gamma: float = 0.0) -> Callable:
    """f(x, W, b) of the dense layer (SpliNet paper eq. 12, or a variant), W and b already blended at one time."""
    act = ACTIVATION_FNS[activation]

    def rhs(xs, W, b):
        if variant == "antisymmetric":
            W = W - W.T - gamma * torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
        a = F.linear(xs, W, b)
        return -act(a) @ W if variant == "symmetric" else act(a)

    return rhs


def conv_rhs(activation: str, variant: str, spatial_dims: int) -> Callable:
    """f(x, K, b) of the conv layer (SpliNet paper eq. 12, or a variant): stride 1, "same" zero padding."""
    act = ACTIVATION_FNS[activation]
    conv, conv_t = _CONV[spatial_dims]

    def rhs(xs, K, b):
        padding = tuple(k // 2 for k in K.shape[2:])
        y = act(conv(xs, K, b, padding=padding))
        return -conv_t(y, K, padding=padding) if variant == "symmetric" else y

    return rhs


def _check_backend(backend) -> None:
    if backend not in ("reference", "auto"):
        raise ValueError(f"splinet_cuda.reference takes backend='reference' (or 'auto'), got {backend!r}")


def _integrate(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: Scale,
               cfg: Config, rhs: Callable, return_trajectory: bool) -> torch.Tensor:
    """Explicit Runge-Kutta integration of dx/dt = scale * rhs(x, W(t), b(t)) on [0, 1]
    (paper eq. 24), N steps of h = 1 / N; W(t), b(t) are B-splines (eqs. 12, 14, 15)."""
    tab = get_tableau(cfg.scheme)
    h = 1.0 / cfg.steps
    _, w = basis_grid(cfg.steps, cfg.knots, cfg.degree, cfg.scheme)
    k_idx = first_coefficients(cfg.steps, cfg.knots, cfg.scheme)  # Python ints: no tensor read when traced
    w = w.to(dtype=x.dtype, device=x.device)

    def blend(coef: Optional[torch.Tensor], i: int, s: int) -> Optional[torch.Tensor]:
        # W(t) = sum_r b_r(u) * weight[k + r]: only the d + 1 nonzero terms.
        if coef is None:
            return None
        k = k_idx[i][s]
        return sum(w[i, s, r] * coef[k + r] for r in range(cfg.degree + 1))

    trajectory = [x]
    for i in range(cfg.steps):
        stages = []
        for s in range(tab.stages):
            xs = x
            for j, a in enumerate(tab.a[s]):
                if a != 0.0:
                    xs = xs + (h * a) * stages[j]
            stages.append(scale * rhs(xs, blend(weight, i, s), blend(bias, i, s)))
        x = x + h * sum(b * k for b, k in zip(tab.b, stages) if b != 0.0)
        trajectory.append(x)
    return torch.stack(trajectory) if return_trajectory else x


def spline_ode(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: Scale, *,
               steps: int, degree: int, activation: str = "tanh", scheme: str = "euler",
               variant: str = "standard", gamma: float = 0.0, backend: str = "reference",
               return_trajectory: bool = False, checkpoint: Optional[int] = None) -> torch.Tensor:
    """Dense SpliNet layer, pure PyTorch. Same signature as :func:`splinet_cuda.spline_ode`.

    Right-hand sides, W = W(t) and b = b(t) blended from the coefficients:
    ``standard`` act(x W^T + b) (SpliNet paper, eq. 12); ``symmetric`` -act(x W^T + b) W
    (the parabolic layer of Ruthotto & Haber); ``antisymmetric`` act(x A^T + b) with
    A = W - W^T - gamma I (SpliNet paper, section 2.2; Ruthotto & Haber).

    Args:
        x: (B, m) initial state.
        weight: (n, m, m) coefficients, n = L + degree.
        bias: (n, m) coefficients or None.
        scale: lam, a float or a 0-dim tensor (paper eq. 24).
        steps: N >= 1.
        degree: d >= 0, with n > d.
        activation: as in :func:`splinet_cuda.spline_ode`.
        scheme: as in :func:`splinet_cuda.spline_ode`.
        variant: as in :func:`splinet_cuda.spline_ode`.
        gamma: the diagonal shift of the "antisymmetric" variant.
        backend: must be "reference" (accepted for signature compatibility).
        return_trajectory: return all N + 1 states.
        checkpoint: accepted for signature compatibility; autograd keeps what it needs.

    Returns:
        x_N (B, m), or the trajectory (N + 1, B, m) with ``return_trajectory=True``.
    """
    cfg = check_dense(x, weight, bias, scale, steps=steps, degree=degree, activation=activation,
                      scheme=scheme, variant=variant, gamma=gamma)
    _check_backend(backend)
    rhs = dense_rhs(activation, variant, cfg.gamma)
    return _integrate(x, weight, bias, scale, cfg, rhs, return_trajectory)


def spline_ode_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: Scale, *,
                    steps: int, degree: int, activation: str = "relu", scheme: str = "euler",
                    variant: str = "standard", gamma: float = 0.0, backend: str = "reference",
                    return_trajectory: bool = False, checkpoint: Optional[int] = None) -> torch.Tensor:
    """Convolutional SpliNet layer, pure PyTorch. Same signature as :func:`splinet_cuda.spline_ode_conv`.

    Right-hand sides, stride 1 and "same" zero padding: ``standard`` act(conv(x, K) + b)
    (SpliNet paper, eq. 12); ``symmetric`` -conv_transpose(act(conv(x, K) + b), K) (the
    parabolic layer of Ruthotto & Haber).

    Args:
        x: ``(B, C, *spatial)``, 1 to 3 spatial dims.
        weight: ``(n, C, C, *kernel)``, odd kernel sizes.
        bias: (n, C) or None.
        scale: lam, a float or a 0-dim tensor.
        steps: N >= 1.
        degree: d >= 0, with n > d.
        activation: as in :func:`splinet_cuda.spline_ode`.
        scheme: as in :func:`splinet_cuda.spline_ode`.
        variant: "standard" or "symmetric".
        gamma: unused.
        backend: must be "reference".
        return_trajectory: return all N + 1 states.
        checkpoint: unused.

    Returns:
        x_N like x, or the trajectory ``(N + 1, *x.shape)`` with ``return_trajectory=True``.
    """
    cfg = check_conv(x, weight, bias, scale, steps=steps, degree=degree, activation=activation,
                     scheme=scheme, variant=variant, gamma=gamma)
    _check_backend(backend)
    rhs = conv_rhs(activation, variant, x.dim() - 2)
    return _integrate(x, weight, bias, scale, cfg, rhs, return_trajectory)


def spline_ode_hamiltonian(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           scale: Scale, *, steps: int, degree: int, activation: str = "tanh",
                           reverse: bool = False, return_trajectory: bool = False):
    """Hamiltonian SpliNet layer (Ruthotto & Haber, "Deep neural networks motivated by partial
    differential equations", section "Hamiltonian CNNs"), pure PyTorch.

    Two coupled states y, z of equal width m and two B-spline controls
    theta1(t) = (K1(t), b1(t)) = (weight[:, 0], bias[:, 0]) and theta2(t) = (weight[:, 1], bias[:, 1]).
    With F_sym(x; K, b) = -K^T act(K x + b) (row vectors: -act(x K^T + b) K), their
    symplectic Verlet step, h = 1/N, t_j = j h, lam = scale:

        y_{j+1} = y_j + h lam F_sym(z_j;     K1(t_j), b1(t_j))
        z_{j+1} = z_j - h lam F_sym(y_{j+1}; K2(t_j), b2(t_j))        j = 0 .. N-1

    It is reversible: ``reverse=True`` takes (y_N, z_N) and runs the steps backwards,
    z_j = z_{j+1} + h lam F_sym(y_{j+1}; theta2(t_j)), y_j = y_{j+1} - h lam F_sym(z_j; theta1(t_j)),
    j = N-1 .. 0, recovering (y_0, z_0) up to rounding.

    This is the pure-PyTorch oracle (autograd does the backward). The public
    :func:`splinet_cuda.spline_ode_hamiltonian` takes the same arguments plus ``backend``
    and ``checkpoint`` and runs the forward direction on the fused CPU kernels when built.

    Args:
        y: (B, m) first state.
        z: (B, m) second state.
        weight: (n, 2, m, m) coefficients.
        bias: (n, 2, m) coefficients or None.
        scale: lam, a float or a 0-dim tensor.
        steps: N >= 1.
        degree: d >= 0 (n = L + d).
        activation: as in :func:`splinet_cuda.spline_ode`.
        reverse: run the steps backwards from (y_N, z_N).
        return_trajectory: return all N + 1 states of each.

    Returns:
        (y_N, z_N), or with ``return_trajectory`` the trajectories ((N+1, B, m), (N+1, B, m))
        in the order computed (from t = 1 down to 0 when ``reverse``).
    """
    check_hamiltonian(y, z, weight, bias, scale, steps=steps, degree=degree, activation=activation)
    n = weight.shape[0]

    act = ACTIVATION_FNS[activation]
    h = 1.0 / steps
    _, w = basis_grid(steps, n - degree, degree, "euler")
    k_idx = [row[0] for row in first_coefficients(steps, n - degree, "euler")]
    w = w[:, 0].to(dtype=y.dtype, device=y.device)

    def blend(coef, i):
        if coef is None:
            return None
        k = k_idx[i]
        return sum(w[i, r] * coef[k + r] for r in range(degree + 1))

    def f_sym(x, K, b):
        return -act(F.linear(x, K, b)) @ K

    def both(i):
        Wi, bi = blend(weight, i), blend(bias, i)
        return (Wi[0], None if bi is None else bi[0]), (Wi[1], None if bi is None else bi[1])

    ys, zs = [y], [z]
    for i in (range(steps - 1, -1, -1) if reverse else range(steps)):
        (K1, b1), (K2, b2) = both(i)
        if reverse:
            z = z + (h * scale) * f_sym(y, K2, b2)
            y = y - (h * scale) * f_sym(z, K1, b1)
        else:
            y = y + (h * scale) * f_sym(z, K1, b1)
            z = z - (h * scale) * f_sym(y, K2, b2)
        ys.append(y)
        zs.append(z)
    if return_trajectory:
        return torch.stack(ys), torch.stack(zs)
    return y, z
