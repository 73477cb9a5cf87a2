"""Butcher tableaus of the explicit Runge-Kutta time-stepping schemes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Tableau:
    """Explicit Runge-Kutta scheme: stage s evaluates f at x + h * sum_j a[s][j] k_j and
    time t + c[s] h; the step is x + h * sum_s b[s] k_s."""

    a: Tuple[Tuple[float, ...], ...]
    b: Tuple[float, ...]
    c: Tuple[float, ...]

    @property
    def stages(self) -> int:
        return len(self.b)


TABLEAUS = {
    # x_{i+1} = x_i + h f(x_i, t_i): the paper's scheme.
    "euler": Tableau(a=((),), b=(1.0,), c=(0.0,)),
    # Explicit midpoint rule (RK2).
    "midpoint": Tableau(a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.5)),
    # The classic fourth-order Runge-Kutta method.
    "rk4": Tableau(
        a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
        c=(0.0, 0.5, 0.5, 1.0),
    ),
    # Kutta's 3/8 rule.
    "rk4_38": Tableau(
        a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
        b=(1 / 8, 3 / 8, 3 / 8, 1 / 8),
        c=(0.0, 1 / 3, 2 / 3, 1.0),
    ),
}

SCHEMES = tuple(TABLEAUS)


def get_tableau(scheme: str) -> Tableau:
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a str, got {type(scheme).__name__}")
    try:
        return TABLEAUS[scheme]
    except KeyError:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {list(TABLEAUS)}") from None
