"""The Python B-spline basis: splinet_cuda.bspline_basis and splinet_cuda.basis_grid (SpliNet paper, eqs. 9-10)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline

import splinet_cuda as sc

DEGREES = [0, 1, 2, 3]
KNOTS = [1, 3, 7]
STAGE_C = {
    "euler": [0.0],
    "midpoint": [0.0, 0.5],
    "rk4": [0.0, 0.5, 0.5, 1.0],
    "rk4_38": [0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0],
}


def scipy_vector(t: float, L: int, d: int) -> np.ndarray:
    tau = np.arange(-d, L + d + 1, dtype=np.float64) / L
    v = BSpline(tau, np.eye(L + d), d, extrapolate=False)(float(t))
    assert not np.any(np.isnan(v))
    return v


def dense(k: int, w: torch.Tensor, L: int, d: int) -> np.ndarray:
    out = np.zeros(L + d)
    out[k:k + d + 1] = w.numpy()
    return out


def _times(L):
    rng = np.random.default_rng(L)
    knots_t = [j / L for j in range(L + 1)]
    return [0.0, 1.0] + knots_t + list(rng.uniform(0.0, 1.0, size=8)) + [1e-300, 1.0 - 1e-16]


@pytest.mark.parametrize("L", KNOTS, ids=[f"L{L}" for L in KNOTS])
@pytest.mark.parametrize("d", DEGREES, ids=[f"d{d}" for d in DEGREES])
def test_bspline_basis_matches_scipy(d, L):
    for t in _times(L):
        k, w = sc.bspline_basis(t, L, d)
        assert isinstance(k, int), type(k)
        assert k == min(math.floor(t * L), L - 1), (t, k)
        assert isinstance(w, torch.Tensor) and w.dtype == torch.float64 and w.shape == (d + 1,)
        np.testing.assert_allclose(dense(k, w, L, d), scipy_vector(t, L, d), rtol=0, atol=1e-14,
                                   err_msg=f"t={t!r}")
        assert torch.all(w >= 0)
        torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("d", DEGREES, ids=[f"d{d}" for d in DEGREES])
def test_bspline_basis_accepts_tensor_t(d):
    k, w = sc.bspline_basis(torch.tensor(0.4, dtype=torch.float64), 3, d)
    k2, w2 = sc.bspline_basis(0.4, 3, d)
    assert int(k) == k2
    torch.testing.assert_close(w, w2, rtol=0, atol=0)


CLOSED = {
    0: lambda u: [1.0],
    1: lambda u: [1 - u, u],
    2: lambda u: [(1 - u) ** 2 / 2, (-2 * u ** 2 + 2 * u + 1) / 2, u ** 2 / 2],
    3: lambda u: [(1 - u) ** 3 / 6, (3 * u ** 3 - 6 * u ** 2 + 4) / 6,
                  (-3 * u ** 3 + 3 * u ** 2 + 3 * u + 1) / 6, u ** 3 / 6],
}


@pytest.mark.parametrize("d", DEGREES, ids=[f"d{d}" for d in DEGREES])
@pytest.mark.parametrize("u", [0.0, 0.125, 0.3, 0.5, 0.75, 0.9])
def test_closed_forms(d, u):
    L = 4
    k0 = 2
    t = (k0 + u) / L
    k, w = sc.bspline_basis(t, L, d)
    assert k == k0
    torch.testing.assert_close(w, torch.tensor(CLOSED[d](u), dtype=torch.float64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("d", DEGREES, ids=[f"d{d}" for d in DEGREES])
def test_t_equal_one_uses_last_interval(d):
    k, w = sc.bspline_basis(1.0, 5, d)
    assert k == 4
    torch.testing.assert_close(w, torch.tensor(CLOSED[d](1.0), dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("t", [-1e-12, -0.5, 1.0 + 1e-12, 2.0, float("nan"), float("inf"), float("-inf")],
                         ids=["tiny-neg", "neg", "tiny-above-1", "two", "nan", "inf", "-inf"])
def test_t_outside_unit_interval_raises(t):
    with pytest.raises(ValueError, match=r"\bt\b"):
        sc.bspline_basis(t, 3, 2)
    with pytest.raises(ValueError, match=r"\bt\b"):
        sc.bspline_basis(torch.tensor(t, dtype=torch.float64), 3, 2)


def test_bad_knots_or_degree_raise():
    with pytest.raises(ValueError, match="degree"):
        sc.bspline_basis(0.5, 3, -1)
    with pytest.raises(ValueError, match="knots"):
        sc.bspline_basis(0.5, 0, 1)


# --------------------------------------------------------------------------------------
# basis_grid
# --------------------------------------------------------------------------------------

GRID_CASES = [
    (N, L, d, s)
    for (N, L) in [(1, 1), (4, 2), (5, 3), (6, 6), (7, 3), (16, 4)]
    for d in DEGREES
    for s in STAGE_C
    if (N + L + d) % 2 == 0 or s in ("euler", "rk4_38")
]


@pytest.mark.parametrize("N,L,d,scheme", GRID_CASES, ids=[f"N{N}-L{L}-d{d}-{s}" for N, L, d, s in GRID_CASES])
def test_basis_grid_matches_bspline_basis(N, L, d, scheme):
    k, w = sc.basis_grid(N, L, d, scheme)
    S = len(STAGE_C[scheme])
    assert k.dtype == torch.int64 and k.shape == (N, S)
    assert w.dtype == torch.float64 and w.shape == (N, S, d + 1)
    for i in range(N):
        for s, c in enumerate(STAGE_C[scheme]):
            t = min((i + c) / N, 1.0)
            kk, ww = sc.bspline_basis(t, L, d)
            x = (i + c) * L / N
            near_knot = abs(x - round(x)) < 1e-9
            if not near_knot or d == 0:
                # off a knot the entries must agree exactly; on one, only for d=0 where
                # the choice of interval changes the value (t = j/L lies in interval j).
                assert int(k[i, s]) == kk, (i, s, t)
                torch.testing.assert_close(w[i, s], ww, rtol=0, atol=1e-14)
            got = dense(int(k[i, s]), w[i, s], L, d)
            np.testing.assert_allclose(got, dense(kk, ww, L, d), rtol=0, atol=1e-14)
            np.testing.assert_allclose(got, scipy_vector(t, L, d), rtol=0, atol=1e-14)


@pytest.mark.parametrize("N", [1, 2, 5, 9])
def test_basis_grid_remark1_degree1(N):
    k, w = sc.basis_grid(N, N, 1, "euler")
    assert k.shape == (N, 1)
    assert k[:, 0].tolist() == list(range(N))
    expect = torch.zeros(N, 1, 2, dtype=torch.float64)
    expect[:, :, 0] = 1.0
    torch.testing.assert_close(w, expect, rtol=0, atol=0)


def test_basis_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scheme|rk45"):
        sc.basis_grid(4, 2, 1, "rk45")
    with pytest.raises(ValueError, match="steps"):
        sc.basis_grid(0, 2, 1, "euler")
    with pytest.raises(ValueError, match="degree"):
        sc.basis_grid(4, 2, -1, "euler")


@pytest.mark.parametrize("scheme", ["euler", "midpoint", "rk4", "rk4_38"])
def test_first_coefficients_match_basis_grid(scheme):
    """The pure-Python first coefficients (what the reference indexes with when traced) are
    basis_grid's k exactly, at grids where t L / N lands on knots and just beside them."""
    from splinet_cuda._basis import first_coefficients

    for steps, knots in [(1, 1), (3, 7), (10, 10), (100, 8), (7, 3), (97, 13), (64, 64)]:
        k, _ = sc.basis_grid(steps, knots, 2, scheme)
        assert first_coefficients(steps, knots, scheme) == k.tolist()
