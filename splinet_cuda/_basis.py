"""The uniform B-spline basis of the SpliNet paper (eqs. 9-10, blended as in eqs. 14-15) in
Python (the C++ twin is csrc/common/bspline.h).

Legend: L knot intervals on [0, 1] (``knots``), d degree, n = L + d coefficients,
N time steps, S stages of a time-stepping scheme.
"""
from __future__ import annotations

import math
from typing import List, Tuple, Union

import torch

from ._schemes import get_tableau

__all__ = ["bspline_weights", "bspline_basis", "basis_grid"]


def bspline_weights(u: torch.Tensor, degree: int) -> torch.Tensor:
    """Nonzero uniform B-spline weights b_r(u), r = 0..degree, for u in [0, 1].

    Cox-de Boor's triangular scheme (paper eqs. 9-10) on unit-spaced knots, where every
    denominator is the current degree j. Vectorised over ``u``: returns ``u.shape + (d+1,)``.
    """
    w = [torch.ones_like(u)]
    for j in range(1, degree + 1):
        saved = torch.zeros_like(u)
        new = []
        for r in range(j):
            temp = w[r] / j
            new.append(saved + (r + 1 - u) * temp)
            saved = (u + (j - r - 1)) * temp
        new.append(saved)
        w = new
    return torch.stack(w, dim=-1)


def _interval(x: torch.Tensor, knots: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Knot-unit positions x = t L -> (k, u); t = 1 belongs to the last interval."""
    k = torch.clamp(torch.floor(x), 0, knots - 1)
    return k.to(torch.int64), x - k


def _check_knots_degree(knots, degree) -> None:
    if isinstance(knots, bool) or not isinstance(knots, int):
        raise TypeError(f"knots must be an int (the number L of knot intervals), got {type(knots).__name__}")
    if knots < 1:
        raise ValueError(f"knots must be >= 1, got {knots}")
    if isinstance(degree, bool) or not isinstance(degree, int):
        raise TypeError(f"degree must be an int, got {type(degree).__name__}")
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")


def bspline_basis(t: Union[float, torch.Tensor], knots: int, degree: int) -> Tuple[int, torch.Tensor]:
    """B-spline basis at one time ``t`` in [0, 1] (SpliNet paper, eqs. 9-10, on uniform knots).

    Args:
        t: the time, a float or a 0-dim tensor, 0 <= t <= 1.
        knots: L, the number of uniform knot intervals on [0, 1].
        degree: d >= 0.

    Returns:
        ``(k, weights)``: the index of the first nonzero coefficient,
        ``k = min(floor(t L), L - 1)``, and the float64 tensor of the d + 1 weights of
        coefficients ``k .. k + d`` (they sum to one).
    """
    _check_knots_degree(knots, degree)
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"t must be a scalar, got a tensor of shape {tuple(t.shape)}")
        t = float(t.item())
    t = float(t)
    if not (0.0 <= t <= 1.0):  # also rejects nan
        raise ValueError(f"t must lie in [0, 1] (the spline is not evaluated outside), got {t}")
    k, u = _interval(torch.tensor(t * knots, dtype=torch.float64), knots)
    return int(k), bspline_weights(u, degree)


def first_coefficients(steps: int, knots: int, scheme: str = "euler") -> List[List[int]]:
    """``basis_grid``'s ``k`` as Python ints, computed without tensors (the same float64
    arithmetic), so that code traced by torch.compile indexes the coefficients with constants
    instead of reading a tensor's values (a graph break)."""
    c = get_tableau(scheme).c
    out = []
    for i in range(steps):
        row = []
        for cs in c:
            x = ((float(i) + float(cs)) * float(knots)) / float(steps)
            row.append(int(min(max(math.floor(x), 0), knots - 1)))
        out.append(row)
    return out


def basis_grid(steps: int, knots: int, degree: int, scheme: str = "euler") -> Tuple[torch.Tensor, torch.Tensor]:
    """Basis table of a whole time grid: every step i and every stage s of ``scheme``.

    The stage times are t_i + c_s h with h = 1 / steps; positions in knot units are
    computed as ((i + c_s) L) / N, exactly like ``grid_position`` in bspline.h.

    Returns:
        ``k`` (N, S) int64, first nonzero coefficient per step and stage, and
        ``w`` (N, S, d + 1) float64, the weights.
    """
    _check_knots_degree(knots, degree)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    c = torch.tensor(get_tableau(scheme).c, dtype=torch.float64)
    i = torch.arange(steps, dtype=torch.float64)
    x = ((i[:, None] + c[None, :]) * float(knots)) / float(steps)
    k, u = _interval(x, knots)
    return k, bspline_weights(u, degree)
