"""The C++ basis (csrc/common/bspline.h, through the registered basis_table op) against
the Python basis, on every device the extension is built for (its opcheck and torch.compile
checks are in test_contract.py)."""
import pytest
import torch

import splinet_cuda as sc
from helpers import requires

pytestmark = requires("cpu", "basis_table")


def _times(knots):
    on_knots = torch.arange(knots + 1, dtype=torch.float64) / knots
    return torch.cat([torch.tensor([0.0, 1.0]), on_knots, torch.rand(50, dtype=torch.float64)])


@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)
@pytest.mark.parametrize("degree", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("knots", [1, 3, 8])
@pytest.mark.backend_op("basis_table")
def test_basis_op_matches_python(backend, device, degree, knots):
    t = _times(knots)
    k, w = torch.ops.splinet_cuda.basis_table(t.to(device), knots, degree)
    assert k.dtype == torch.int64 and w.shape == (t.numel(), degree + 1)
    for i, ti in enumerate(t.tolist()):
        k_py, w_py = sc.bspline_basis(ti, knots, degree)
        assert int(k[i]) == k_py, f"t={ti}"
        torch.testing.assert_close(w[i].cpu(), w_py, rtol=0, atol=1e-15)


@pytest.mark.parametrize("scheme", ["euler", "midpoint", "rk4", "rk4_38"])
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_basis_op_float32_and_grid(scheme, degree):
    knots, steps = 5, 7
    k_grid, w_grid = sc.basis_grid(steps, knots, degree, scheme)
    c = torch.tensor(_stage_fractions(scheme), dtype=torch.float64)
    t = ((torch.arange(steps, dtype=torch.float64)[:, None] + c) / steps).reshape(-1)
    k, w = torch.ops.splinet_cuda.basis_table(t.float(), knots, degree)
    assert w.dtype == torch.float32
    # The grid positions are ((i + c) L) / N, the op's are float(t) * L: equal up to rounding,
    # except that a position a rounding error below a knot may fall into the interval before.
    blended_grid = torch.zeros(steps * len(c), knots + degree, dtype=torch.float64)
    blended_op = torch.zeros_like(blended_grid)
    for row in range(t.numel()):
        i, s = divmod(row, len(c))
        blended_grid[row, k_grid[i, s]:k_grid[i, s] + degree + 1] = w_grid[i, s]
        blended_op[row, k[row]:k[row] + degree + 1] = w[row].double()
    torch.testing.assert_close(blended_op, blended_grid, rtol=0, atol=1e-6)


def _stage_fractions(scheme):
    from splinet_cuda._schemes import get_tableau

    return get_tableau(scheme).c


@pytest.mark.parametrize("bad", [-0.1, 1.0 + 1e-9, float("nan")])
def test_basis_op_rejects_t_outside(bad):
    with pytest.raises(ValueError, match="t must lie in"):
        torch.ops.splinet_cuda.basis_table(torch.tensor([0.5, bad], dtype=torch.float64), 4, 2)


def test_basis_op_rejects_bad_args():
    t = torch.tensor([0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="knots"):
        torch.ops.splinet_cuda.basis_table(t, 0, 2)
    with pytest.raises(ValueError, match="degree"):
        torch.ops.splinet_cuda.basis_table(t, 3, -1)
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.splinet_cuda.basis_table(torch.tensor([0], dtype=torch.int64), 3, 1)


def test_header_host_build(tmp_path):
    """csrc/common/bspline.h compiles as plain C++ and passes its own host test."""
    import os
    import shutil
    import subprocess

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = tmp_path / "test_bspline"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{root}/csrc", f"{root}/tests/cpp/test_bspline.cpp", "-o", str(exe)],
                   check=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
