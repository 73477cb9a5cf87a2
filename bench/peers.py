"""What users would otherwise reach for, as benchmark implementations: torchdiffeq's
fixed-step ``odeint`` (backprop through the solver) and ``odeint_adjoint`` (its continuous
adjoint), each with a spline-weighted right-hand side that evaluates the B-spline basis
at every solver time, the way a user would write it. Optional: skipped with a note when
torchdiffeq is not installed (``pip install torchdiffeq``).

Legend: B batch, m width, C channels, n = L + d coefficients, N steps.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch

import splinet_cuda as sc

from bench.cases import Case, Impl

# splinet_cuda's schemes -> torchdiffeq's fixed-grid methods. torchdiffeq's "rk4" is
# Kutta's 3/8 rule (rk4_alt_step_func); it has no classic RK4 on a fixed grid.
_METHODS = {"euler": "euler", "midpoint": "midpoint", "rk4_38": "rk4"}


class SplineRHS(torch.nn.Module):
    """dx/dt = scale * f(x, W(t), b(t)) with W, b blended from the coefficients at t."""

    def __init__(self, case: Case, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.case, self.weight, self.bias = case, weight, bias
        if case.kind == "dense":
            self.f = sc.reference.dense_rhs(case.activation, case.variant)
        else:
            self.f = sc.reference.conv_rhs(case.activation, case.variant, len(case.spatial))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k, w = sc.bspline_basis(min(max(float(t.detach()), 0.0), 1.0), self.case.L, self.case.d)
        w = w.to(dtype=x.dtype, device=x.device)
        blend = lambda c: None if c is None else sum(w[r] * c[k + r] for r in range(self.case.d + 1))
        return self.case.scale * self.f(x, blend(self.weight), blend(self.bias))


def torchdiffeq_impl(adjoint: bool = False) -> Impl:
    """torchdiffeq.odeint (or odeint_adjoint) on the fixed grid t_i = i / N."""
    name = "torchdiffeq_adjoint" if adjoint else "torchdiffeq"

    def build(case: Case) -> Callable:
        import torchdiffeq

        solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint

        def fn(x, weight, bias):
            t = torch.linspace(0.0, 1.0, case.N + 1, dtype=torch.float64)
            func = SplineRHS(case, weight, bias)
            kwargs = {"adjoint_params": tuple(p for p in (weight, bias) if p is not None)} if adjoint else {}
            return solve(func, x, t.to(x.dtype), method=_METHODS[case.scheme], **kwargs)[-1]

        return fn

    def skip(case: Case, device: torch.device) -> Optional[str]:
        if importlib.util.find_spec("torchdiffeq") is None:
            return "torchdiffeq is not installed (pip install torchdiffeq)"
        if case.scheme not in _METHODS:
            return f"torchdiffeq has no fixed-grid {case.scheme!r}"
        return None

    return Impl(name, build, skip, exact_grads=not adjoint)
