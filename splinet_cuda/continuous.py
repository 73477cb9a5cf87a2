"""Continuous-depth tools for SpliNet layers: the weights are functions of time, so a
trained layer can be evaluated at any t, re-discretised, refined, projected, checked
for stability and regularised in time (after the SpliNet paper of Guenther, Pazner and Qi;
the continuous-in-depth networks, ContinuousNet, of Queiruga, Erichson, Taylor and Mahoney;
and the PDE-motivated networks of Ruthotto and Haber).

Every function here works on coefficient tensors ``coef`` of shape ``(n, ...)``
(n = L + d along axis 0, anything after it: (n, m, m) weights, (n, m) biases,
``(n, C, C, *kernel)`` filters); the layer methods (:meth:`~splinet_cuda.SplineODE.refine`, ...) call them.

Legend: L knot intervals on [0, 1] (``knots``), d degree, n = L + d coefficients,
N time steps, B batch, m width.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Dict, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ._basis import _check_knots_degree, _interval, bspline_weights
from ._schemes import get_tableau
from ._validate import ACTIVATIONS, VARIANTS, _choice, _int_arg

__all__ = [
    "basis_matrix",
    "evaluate",
    "refine_coefficients",
    "refinement_matrix",
    "project_coefficients",
    "projection_matrix",
    "step_spectra",
    "stability_polynomial",
    "stability_report",
    "plot_spectra",
    "tikhonov",
    "smoothness_in_time",
]

_F64 = torch.float64


# --------------------------------------------------------------------------- basis


def _times(t, name: str = "t") -> torch.Tensor:
    """t as a float64 1-D tensor, every entry checked to lie in [0, 1]."""
    tt = torch.as_tensor(t, dtype=_F64).detach().cpu()
    if tt.dim() > 1:
        raise ValueError(f"{name} must be a float or a 1-D tensor of times, got shape {tuple(tt.shape)}")
    tt = tt.reshape(-1)
    if not bool(((tt >= 0.0) & (tt <= 1.0)).all()):  # also rejects nan
        raise ValueError(f"{name} must lie in [0, 1] (the spline is not evaluated outside), got {tt.tolist()}")
    return tt


def basis_matrix(t, knots: int, degree: int, *, derivative: int = 0) -> torch.Tensor:
    """Dense basis matrix ``M[p, j] = B_j(t_p)`` (or ``dB_j/dt`` with ``derivative=1``).

    Vectorised twin of :func:`splinet_cuda.bspline_basis` (same (k, u) convention:
    t = 1 belongs to the last interval); built from ``bspline_weights`` and ``_interval``.

    Args:
        t: a float or a 1-D tensor of times in [0, 1].
        knots: L, the number of uniform knot intervals.
        degree: d.
        derivative: 0 (the basis) or 1 (its time derivative).

    Returns:
        float64 tensor (T, n), n = L + d.
    """
    _check_knots_degree(knots, degree)
    if derivative not in (0, 1):
        raise ValueError(f"derivative must be 0 or 1, got {derivative!r}")
    tt = _times(t)
    k, u = _interval(tt * knots, knots)
    if derivative == 0:
        w = bspline_weights(u, degree)
    else:
        # d/du b^d_r(u) = b^{d-1}_{r-1}(u) - b^{d-1}_r(u); dt = du / L. Zero for d = 0.
        w = torch.zeros(tt.shape + (degree + 1,), dtype=_F64)
        if degree > 0:
            lower = bspline_weights(u, degree - 1)
            w[:, 1:] += lower
            w[:, :-1] -= lower
            w = w * knots
    n = knots + degree
    out = torch.zeros(tt.shape[0], n, dtype=_F64)
    cols = k[:, None] + torch.arange(degree + 1)[None, :]
    out.scatter_(1, cols, w)
    return out


def _apply(matrix: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """matrix (P, n) applied along axis 0 of coef (n, ...), differentiable, in coef's dtype
    (float64 arithmetic for float32/float64 inputs)."""
    work = coef.dtype if coef.dtype == _F64 else _F64
    out = torch.tensordot(matrix.to(device=coef.device, dtype=work), coef.to(work), dims=1)
    return out.to(coef.dtype)


def _check_coef(coef, knots: int, degree: int, name: str = "coef") -> None:
    if not isinstance(coef, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, ...), got {type(coef).__name__}")
    _check_knots_degree(knots, degree)
    if coef.dim() < 1 or coef.shape[0] != knots + degree:
        raise ValueError(f"{name} must have n = knots + degree = {knots + degree} rows along axis 0, "
                         f"got shape {tuple(coef.shape)}")


def evaluate(coef: torch.Tensor, t, degree: int) -> torch.Tensor:
    """The spline ``sum_j B_j(t) coef[j]`` at t (float -> coef.shape[1:], 1-D tensor of T
    times -> (T,) + coef.shape[1:]). L = n - degree. Differentiable in coef."""
    if not isinstance(coef, torch.Tensor) or coef.dim() < 1:
        raise TypeError("coef must be a torch.Tensor of shape (n, ...)")
    knots = coef.shape[0] - degree
    if knots < 1:
        raise ValueError(f"coef has n = {coef.shape[0]} rows but degree = {degree}: need n > degree")
    scalar = not (isinstance(t, torch.Tensor) and t.dim() == 1) and not isinstance(t, (list, tuple, np.ndarray))
    out = _apply(basis_matrix(t, knots, degree), coef)
    return out[0] if scalar else out


# --------------------------------------------------------------------------- refinement / projection


def refinement_matrix(knots: int, degree: int, new_knots: int) -> torch.Tensor:
    """Exact knot-insertion matrix R (n', n), new coef = R @ coef, for L' = r L.

    Uniform r-adic subdivision (the Oslo algorithm on uniform knots): the cardinal
    B-spline of degree d satisfies ``B(x) = r^-d sum_k a_k B(r x - k)`` with
    ``sum_k a_k z^k = (1 + z + ... + z^(r-1))^(d+1)``, so old coefficient j feeds new
    coefficient ``J = r (j - d) + k + d``. New basis functions whose support misses
    [0, 1] are dropped; they are not needed there.
    """
    _check_knots_degree(knots, degree)
    _check_knots_degree(new_knots, degree)
    if new_knots % knots != 0:
        raise ValueError(
            f"exact refinement needs new knots L' to be a multiple of L = {knots}, got {new_knots}; "
            f"use project() / project_coefficients() for an L2 projection onto another basis")
    r = new_knots // knots
    mask = np.ones(1)
    for _ in range(degree + 1):
        mask = np.convolve(mask, np.ones(r))
    mask = mask / float(r) ** degree
    n, n_new = knots + degree, new_knots + degree
    R = np.zeros((n_new, n))
    for j in range(n):
        for k, a in enumerate(mask):
            J = r * (j - degree) + k + degree
            if 0 <= J < n_new:
                R[J, j] += a
    return torch.from_numpy(R)


def refine_coefficients(coef: torch.Tensor, knots: int, degree: int, new_knots: int) -> torch.Tensor:
    """Coefficients of the same spline on L' = new_knots uniform intervals (exact; L' a
    multiple of L, else ValueError pointing to :func:`project_coefficients`).

    coef (n, ...) -> (L' + d, ...), differentiable, same dtype/device."""
    _check_coef(coef, knots, degree)
    return _apply(refinement_matrix(knots, degree, new_knots), coef)


def _gauss_grid(knot_counts: Sequence[int], points: int):
    """Gauss-Legendre nodes/weights on every interval of the union of the grids {k / L}."""
    breaks = sorted({Fraction(k, L) for L in knot_counts for k in range(L + 1)})
    x, w = np.polynomial.legendre.leggauss(points)
    a = np.array([float(b) for b in breaks[:-1]])
    b = np.array([float(b) for b in breaks[1:]])
    nodes = (a[:, None] + (b - a)[:, None] * (x[None, :] + 1.0) / 2.0).reshape(-1)
    weights = ((b - a)[:, None] * w[None, :] / 2.0).reshape(-1)
    return torch.from_numpy(nodes), torch.from_numpy(weights)


def projection_matrix(knots: int, degree: int, new_knots: int, new_degree: Optional[int] = None) -> torch.Tensor:
    """L2 projection matrix P (n'', n) onto the uniform basis (new_knots, new_degree):
    ``P = G^-1 M`` with the Gram matrix ``G = int B''_I B''_J dt`` of the new basis and
    ``M = int B''_I B_j dt``, both exact by Gauss-Legendre quadrature with
    max(d, d'') + 1 points on every interval of the union knot grid."""
    new_degree = degree if new_degree is None else new_degree
    _check_knots_degree(knots, degree)
    _check_knots_degree(new_knots, new_degree)
    nodes, wq = _gauss_grid((knots, new_knots), max(degree, new_degree) + 1)
    Bo = basis_matrix(nodes, knots, degree)
    Bn = basis_matrix(nodes, new_knots, new_degree)
    G = Bn.T @ (wq[:, None] * Bn)
    M = Bn.T @ (wq[:, None] * Bo)
    return torch.linalg.solve(G, M)


def project_coefficients(coef: torch.Tensor, knots: int, degree: int, new_knots: int,
                         new_degree: Optional[int] = None) -> torch.Tensor:
    """L2 projection (on [0, 1]) of the spline ``coef`` (L = knots, d = degree) onto the
    uniform B-spline space (new_knots, new_degree; default the same degree).

    Exact (up to rounding) when the spline already lies in the new space, e.g. L' = r L
    with the same degree. coef (n, ...) -> (new_knots + new_degree, ...), differentiable."""
    _check_coef(coef, knots, degree)
    return _apply(projection_matrix(knots, degree, new_knots, new_degree), coef)


# --------------------------------------------------------------------------- stability (paper eq. 16)


def _act_prime(activation: str, a: torch.Tensor) -> torch.Tensor:
    if activation == "identity":
        return torch.ones_like(a)
    if activation == "relu":
        return (a > 0).to(a.dtype)  # ReLU'(0) = 0 like PyTorch
    if activation == "tanh":
        return 1.0 - torch.tanh(a) ** 2
    if activation == "sigmoid":
        s = torch.sigmoid(a)
        return s * (1.0 - s)
    if activation == "softplus":
        # torch's softplus is linear above threshold 20
        return torch.where(a > 20.0, torch.ones_like(a), torch.sigmoid(a))
    raise ValueError(f"unknown activation {activation!r}")


def _dense_setup(layer_or_tensors, steps, degree, activation, variant, gamma, scheme):
    """(weight, bias, scale, steps, degree, activation, variant, gamma, scheme) from a
    dense SpliNet layer or a (weight, bias, scale) tuple plus keywords."""
    if isinstance(layer_or_tensors, torch.nn.Module):
        layer = layer_or_tensors
        if getattr(layer, "variant", None) not in VARIANTS or not hasattr(layer, "width"):
            raise TypeError(f"step_spectra takes a dense SplineODE layer (or (weight, bias, scale) tensors), "
                            f"got {type(layer).__name__}")
        weight, bias, scale = layer.weight, layer.bias, layer.scale
        steps = layer.steps if steps is None else steps
        degree = layer.degree if degree is None else degree
        activation = layer.activation if activation is None else activation
        variant = layer.variant if variant is None else variant
        gamma = layer.gamma if gamma is None else gamma
        scheme = layer.scheme if scheme is None else scheme
    else:
        try:
            weight, bias, scale = layer_or_tensors
        except (TypeError, ValueError):
            raise TypeError("layer_or_tensors must be a SplineODE layer or a (weight, bias, scale) tuple") from None
        if steps is None or degree is None:
            raise ValueError("with (weight, bias, scale) tensors, steps and degree must be given")
        activation = "tanh" if activation is None else activation
        variant = "standard" if variant is None else variant
        gamma = 0.0 if gamma is None else gamma
        scheme = "euler" if scheme is None else scheme
    steps = _int_arg("steps", steps, 1)
    _choice("activation", activation, ACTIVATIONS)
    _choice("variant", variant, VARIANTS)
    get_tableau(scheme)
    return weight, bias, scale, steps, degree, activation, variant, float(gamma), scheme


def step_spectra(layer_or_tensors, x: torch.Tensor, *, steps: Optional[int] = None, scheme: str = "euler",
                 degree: Optional[int] = None, activation: Optional[str] = None,
                 variant: Optional[str] = None, gamma: Optional[float] = None) -> torch.Tensor:
    """Per-step spectra of paper eq. 16: eigenvalues of ``h * scale * J_i(x_i)`` for every
    step i = 0..N-1 and every sample of the batch ``x``.

    ``J_i`` is the Jacobian of f at (x_i, t_i): ``diag(act'(a_i)) W_i`` for "standard"
    (the paper's), ``diag(act'(a_i)) A_i`` with ``A = W - W^T - gamma I`` for
    "antisymmetric", and ``-W_i^T diag(act'(a_i)) W_i`` for "symmetric";
    ``a_i = W_i x_i + b_i``. The states x_i come from integrating with ``scheme``
    (default "euler", the paper's; its step states only, not the inner stages).

    Args:
        layer_or_tensors: a dense :class:`~splinet_cuda.SplineODE`, or ``(weight, bias, scale)`` with
            ``steps`` and ``degree`` given (activation "tanh", variant "standard" default).
        x: (B, m) batch of inputs.
        steps: N (default the layer's).
        scheme: the integrator of the trajectory.
        degree: d (default the layer's).
        activation: default the layer's, else "tanh".
        variant: default the layer's, else "standard".
        gamma: default the layer's, else 0.

    Returns:
        complex tensor (N, B, m) (complex128 for float64 inputs, complex64 otherwise). No grad.
    """
    from . import reference

    weight, bias, scale, steps, degree, activation, variant, gamma, scheme = _dense_setup(
        layer_or_tensors, steps, degree, activation, variant, gamma, scheme)
    with torch.no_grad():
        weight = weight.detach()
        bias = None if bias is None else bias.detach()
        scale_f = float(scale.detach()) if isinstance(scale, torch.Tensor) else float(scale)
        traj = reference.spline_ode(x.detach(), weight, bias, scale_f, steps=steps, degree=degree,
                                    activation=activation, scheme=scheme, variant=variant, gamma=gamma,
                                    return_trajectory=True)
        xs = traj[:-1].to(_F64)                                          # (N, B, m)
        t = torch.arange(steps, dtype=_F64) / steps
        W = evaluate(weight.to(_F64), t, degree)                         # (N, m, m)
        b = (evaluate(bias.to(_F64), t, degree) if bias is not None
             else torch.zeros(W.shape[:2], dtype=_F64, device=W.device))
        if variant == "antisymmetric":
            W = W - W.transpose(1, 2) - gamma * torch.eye(W.shape[1], dtype=_F64, device=W.device)
        a = torch.einsum("nbj,nij->nbi", xs, W) + b[:, None, :]
        D = _act_prime(activation, a)                                     # (N, B, m)
        if variant == "symmetric":
            J = -torch.einsum("nki,nbk,nkj->nbij", W, D, W)
        else:
            J = D[..., :, None] * W[:, None, :, :]
        ev = torch.linalg.eigvals((scale_f / steps) * J)
    return ev if x.dtype == _F64 else ev.to(torch.complex64)


def stability_polynomial(scheme: str) -> np.ndarray:
    """Coefficients c_0..c_s of the stability function R(z) = sum_k c_k z^k of an explicit
    Runge-Kutta scheme, c_0 = 1, c_k = b^T A^(k-1) 1 (euler: 1 + z; midpoint:
    1 + z + z^2/2; rk4 and rk4_38: 1 + z + z^2/2 + z^3/6 + z^4/24)."""
    tab = get_tableau(scheme)
    s = tab.stages
    A = np.zeros((s, s))
    for i, row in enumerate(tab.a):
        A[i, :len(row)] = row
    b = np.array(tab.b)
    coeffs, v = [1.0], np.ones(s)
    for _ in range(s):
        coeffs.append(float(b @ v))
        v = A @ v
    return np.array(coeffs)


def _amplification(z: torch.Tensor, scheme: str) -> torch.Tensor:
    c = stability_polynomial(scheme)
    R = torch.zeros_like(z)
    for ck in c[::-1]:  # Horner
        R = R * z + float(ck)
    return R.abs()


def stability_report(layer_or_tensors, x: torch.Tensor, *, steps: Optional[int] = None,
                     scheme: Optional[str] = None, tol: float = 1e-12, **kwargs) -> Dict[str, object]:
    """How much of the eq. 16 spectrum lies outside the stability region of ``scheme``
    (default the layer's scheme, else "euler"): ``|R(z)| > 1 + tol``, R the scheme's
    stability polynomial (see :func:`stability_polynomial`). The spectra are taken along
    that scheme's trajectory (:func:`step_spectra`).

    Args:
        layer_or_tensors: as in :func:`step_spectra`.
        x: (B, m) batch of inputs.
        steps: N (default the layer's).
        scheme: the integrator (default the layer's, else "euler").
        tol: how far above 1 an amplification counts as unstable.
        **kwargs: passed on to :func:`step_spectra` (degree, activation, variant, gamma).

    Returns a dict: ``scheme``, ``steps``, ``h``, ``fraction_outside`` (float),
    ``fraction_outside_per_step`` (N,), ``max_amplification`` (max ``|R(z)|``),
    ``max_real`` (largest real part of z), ``spectra`` (N, B, m) complex.
    """
    if scheme is None:
        scheme = getattr(layer_or_tensors, "scheme", "euler")
    ev = step_spectra(layer_or_tensors, x, steps=steps, scheme=scheme, **kwargs)
    amp = _amplification(ev.to(torch.complex128), scheme)
    outside = amp > 1.0 + tol
    N = ev.shape[0]
    return {
        "scheme": scheme,
        "steps": N,
        "h": 1.0 / N,
        "fraction_outside": float(outside.double().mean()),
        "fraction_outside_per_step": outside.double().reshape(N, -1).mean(1),
        "max_amplification": float(amp.max()),
        "max_real": float(ev.real.max()),
        "spectra": ev,
    }


def plot_spectra(spectra, path: str, *, scheme: str = "euler", title: Optional[str] = None,
                 max_points: int = 20000) -> str:
    """Writes a PNG like the paper's Fig. 3: eigenvalues of eq. 16 in the complex plane
    over the shaded stability region ``|R(z)| <= 1`` of ``scheme``.

    Args:
        spectra: a complex tensor from :func:`step_spectra` (coloured by step), or a dict
            ``{label: spectra}`` (one colour per entry, e.g. one per step size h).
        path: the PNG file.
        scheme: whose stability region is shaded.
        title: the plot's title.
        max_points: subsample each entry to at most this many points.

    Returns:
        path.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plot_spectra needs matplotlib: pip install matplotlib "
                          "(or the extra: pip install 'splinet_cuda[plot]')") from exc

    entries = spectra if isinstance(spectra, dict) else {None: spectra}
    fig = Figure(figsize=(6, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pts = []
    for ev in entries.values():
        e = torch.as_tensor(ev).reshape(-1).to(torch.complex128).numpy()
        pts.append(e)
    allp = np.concatenate(pts) if pts else np.zeros(0, complex)
    c = stability_polynomial(scheme)
    # view: the stability region's bounding box (found on a coarse grid) and every eigenvalue
    Xc, Yc = np.meshgrid(np.linspace(-6, 3, 361), np.linspace(-6, 6, 481))
    inside = np.abs(np.polyval(c[::-1], Xc + 1j * Yc)) <= 1.0
    xs = np.concatenate([Xc[inside], allp.real, [0.0]])
    ys = np.concatenate([Yc[inside], allp.imag, [0.0]])
    pad = 0.08 * max(xs.max() - xs.min(), ys.max() - ys.min(), 1e-3)
    lo_x, hi_x = xs.min() - pad, xs.max() + pad
    lo_y, hi_y = ys.min() - pad, ys.max() + pad
    X, Y = np.meshgrid(np.linspace(lo_x, hi_x, 500), np.linspace(lo_y, hi_y, 500))
    R = np.abs(np.polyval(c[::-1], X + 1j * Y))
    ax.contourf(X, Y, R, levels=[0.0, 1.0], colors=["#9ecae1"], alpha=0.5)
    ax.contour(X, Y, R, levels=[1.0], colors=["#08519c"], linewidths=1.0)
    rng = np.random.default_rng(0)
    for (label, ev), e in zip(entries.items(), pts):
        steps_idx = None
        if label is None and torch.as_tensor(ev).dim() >= 2:
            N = torch.as_tensor(ev).shape[0]
            steps_idx = np.repeat(np.arange(N), e.size // max(N, 1))
        if e.size > max_points:
            keep = rng.choice(e.size, max_points, replace=False)
            e = e[keep]
            steps_idx = steps_idx[keep] if steps_idx is not None else None
        if steps_idx is not None:
            sc_ = ax.scatter(e.real, e.imag, c=steps_idx, s=6, cmap="viridis")
            fig.colorbar(sc_, ax=ax, label="step i")
        else:
            ax.scatter(e.real, e.imag, s=6, label=str(label))
    if not (len(entries) == 1 and None in entries):
        ax.legend(loc="best", fontsize=8)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.axvline(0.0, color="k", lw=0.5)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlim(lo_x, hi_x)
    ax.set_ylim(lo_y, hi_y)
    ax.set_xlabel("Re z")
    ax.set_ylabel("Im z")
    ax.set_title(title or f"eq. 16 spectra, {scheme} stability region |R(z)| <= 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------- regularisers


def _spline_layers(module: torch.nn.Module):
    return [m for m in module.modules() if hasattr(m, "degree") and hasattr(m, "knots")
            and isinstance(getattr(m, "weight", None), torch.Tensor)]


def _coef_groups(layer_or_coefs, include_bias: bool):
    """[(coef, knots, degree)] from a module (every SpliNet layer inside it), a tensor or
    an iterable of tensors (knots/degree None)."""
    if isinstance(layer_or_coefs, torch.nn.Module):
        layers = _spline_layers(layer_or_coefs)
        if not layers:
            raise TypeError(f"{type(layer_or_coefs).__name__} contains no SpliNet layer")
        out = []
        for m in layers:
            out.append((m.weight, m.knots, m.degree, getattr(m, "steps", None)))
            if include_bias and m.bias is not None:
                out.append((m.bias, m.knots, m.degree, getattr(m, "steps", None)))
        return out
    if isinstance(layer_or_coefs, torch.Tensor):
        return [(layer_or_coefs, None, None, None)]
    if isinstance(layer_or_coefs, Iterable):
        coefs = list(layer_or_coefs)
        if not all(isinstance(c, torch.Tensor) for c in coefs):
            raise TypeError("layer_or_coefs must be a module, a tensor or an iterable of tensors")
        return [(c, None, None, None) for c in coefs]
    raise TypeError(f"layer_or_coefs must be a module, a tensor or an iterable of tensors, "
                    f"got {type(layer_or_coefs).__name__}")


def tikhonov(layer_or_coefs, *, include_bias: bool = True) -> torch.Tensor:
    """The paper's Tikhonov term: the sum of squared spline coefficients (weights and,
    with ``include_bias``, biases; not the scale) of every SpliNet layer in a module, or
    of the given tensor(s). Differentiable; multiply by the regularisation parameter.

    Args:
        layer_or_coefs: a module (every SpliNet layer in it), or a coefficient tensor
            (n, ...) or an iterable of them.
        include_bias: count the bias coefficients too.

    Returns:
        a 0-dim tensor.
    """
    groups = _coef_groups(layer_or_coefs, include_bias)
    return sum(g[0].square().sum() for g in groups)


def _derivative_gram(knots: int, degree: int) -> torch.Tensor:
    """G[i, j] = int_0^1 B_i'(t) B_j'(t) dt, exact by Gauss-Legendre (degree + 1 points per interval)."""
    nodes, wq = _gauss_grid((knots,), degree + 1)
    D = basis_matrix(nodes, knots, degree, derivative=1)
    return D.T @ (wq[:, None] * D)


def smoothness_in_time(layer_or_coefs, *, degree: Optional[int] = None, mode: str = "exact",
                       steps: Optional[int] = None, include_bias: bool = True) -> torch.Tensor:
    """Smoothness-in-time penalty on W(t) (and b(t)), the regularisation in time of Ruthotto &
    Haber ("Deep neural networks motivated by partial differential equations"), in the
    H^1-seminorm form they cite.

    ``mode="exact"`` (default): the exact integral ``int_0^1 ||dW/dt||_F^2 dt`` of the
    spline, ``sum c^T G c`` with G the Gram matrix of the basis derivatives (exact
    Gauss-Legendre quadrature). For degree 0 the derivative is zero inside every interval
    and the jumps are not counted, so the penalty is 0: use ``mode="difference"`` there.

    ``mode="difference"``: ``(1/h) sum_i ||W(t_{i+1}) - W(t_i)||_F^2`` on t_i = i h,
    h = 1/steps (steps default the layer's), the discrete H^1 seminorm; it sees the
    jumps of degree-0 splines.

    Args:
        layer_or_coefs: a module (every SpliNet layer in it) or a coefficient tensor /
            iterable of tensors (n, ...) with ``degree`` given (and ``steps`` for "difference").
        degree: d, needed with coefficient tensors.
        mode: "exact" or "difference".
        steps: N for "difference" (default the layer's).
        include_bias: penalise b(t) too.

    Returns:
        a 0-dim tensor, differentiable in the coefficients.
    """
    if mode not in ("exact", "difference"):
        raise ValueError(f"mode must be 'exact' or 'difference', got {mode!r}")
    groups = _coef_groups(layer_or_coefs, include_bias)
    total = 0.0
    for coef, knots, deg, layer_steps in groups:
        if knots is None:
            if degree is None:
                raise ValueError("degree must be given with coefficient tensors")
            deg, knots = degree, coef.shape[0] - degree
            _check_coef(coef, knots, deg)
        flat = coef.reshape(coef.shape[0], -1)
        if mode == "exact":
            G = _derivative_gram(knots, deg).to(device=coef.device, dtype=coef.dtype)
            total = total + (flat * (G @ flat)).sum()
        else:
            N = layer_steps if steps is None else steps
            if N is None:
                raise ValueError("steps must be given for mode='difference'")
            N = _int_arg("steps", N, 1)
            Wt = _apply(basis_matrix(torch.arange(N + 1, dtype=_F64) / N, knots, deg), flat)
            total = total + N * (Wt[1:] - Wt[:-1]).square().sum()
    return total if isinstance(total, torch.Tensor) else torch.zeros(())
