"""Continuous-depth features: re-discretisation, weights_at / bias_at, knot
refinement and L2 projection, eq. 16 spectra and stability reports, regularisers, and
the Hamiltonian (Verlet) layer."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import splinet_cuda as sc
from helpers import randomize_layer
from splinet_cuda import continuous as C
from splinet_cuda import reference

DT = torch.float64


def _f(t):
    return float(t.detach())


_randomize = randomize_layer


def _times(count=257):
    t = torch.rand(count, dtype=DT)
    return torch.cat([t, torch.tensor([0.0, 1.0, 0.5, 1.0 / 3.0], dtype=DT)])


# --------------------------------------------------------------------------- re-discretisation


@pytest.mark.parametrize("steps,scheme", [(7, None), (None, "rk4"), (13, "midpoint"), (3, "rk4_38")])
@pytest.mark.parametrize("variant", ["standard", "antisymmetric"])
def test_dense_rediscretisation_equals_spline_ode(steps, scheme, variant):
    layer = _randomize(sc.SplineODE(3, 4, 2, 5, activation="tanh", variant=variant, scale=1.5, gamma=0.1).to(DT))
    x = torch.randn(6, 3, dtype=DT)
    y = layer(x, steps=steps, scheme=scheme)
    want = reference.spline_ode(x, layer.weight, layer.bias, layer.scale, steps=steps or 5, degree=2,
                                activation="tanh", scheme=scheme or "euler", variant=variant, gamma=0.1)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-11)
    assert layer.steps == 5 and layer.scheme == "euler"  # the layer itself is unchanged
    torch.testing.assert_close(layer(x), reference.spline_ode(x, layer.weight, layer.bias, layer.scale, steps=5,
                                                             degree=2, activation="tanh", variant=variant,
                                                             gamma=0.1), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("cls,shape", [(sc.SplineODEConv1d, (2, 3, 8)), (sc.SplineODEConv2d, (2, 3, 5, 4))])
def test_conv_rediscretisation_equals_spline_ode_conv(cls, shape):
    layer = _randomize(cls(3, 3, 3, 1, 4, activation="relu").to(DT), wscale=0.2)
    x = torch.randn(*shape, dtype=DT)
    y = layer(x, steps=9, scheme="rk4")
    want = reference.spline_ode_conv(x, layer.weight, layer.bias, layer.scale, steps=9, degree=1,
                                     activation="relu", scheme="rk4")
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-11)


def test_rediscretisation_bad_arguments():
    layer = sc.SplineODE(3, 2, 1, 4)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="steps"):
        layer(x, steps=0)
    with pytest.raises(ValueError, match="scheme"):
        layer(x, scheme="heun")


# --------------------------------------------------------------------------- weights_at / bias_at


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_weights_at_matches_blend(degree):
    L = 3
    layer = _randomize(sc.SplineODE(2, L, degree, 4).to(DT))
    t = _times(40)
    W = layer.weights_at(t)
    b = layer.bias_at(t)
    assert W.shape == (t.numel(), 2, 2) and b.shape == (t.numel(), 2)
    for p, ti in enumerate(t.tolist()):
        k, w = sc.bspline_basis(ti, L, degree)
        want_W = sum(w[r] * layer.weight[k + r] for r in range(degree + 1))
        want_b = sum(w[r] * layer.bias[k + r] for r in range(degree + 1))
        torch.testing.assert_close(W[p], want_W, rtol=0, atol=1e-14)
        torch.testing.assert_close(b[p], want_b, rtol=0, atol=1e-14)
        torch.testing.assert_close(layer.weights_at(ti), want_W, rtol=0, atol=1e-14)
    assert layer.weights_at(0.25).shape == (2, 2) and layer.bias_at(torch.tensor(0.25)).shape == (2,)


def test_weights_at_remark1_differentiable_and_checked():
    N = 6
    layer = _randomize(sc.SplineODE(3, N, 1, N).to(DT))  # d = 1, L = N: W(t_i) = weight[i]
    t = torch.arange(N + 1, dtype=DT) / N
    torch.testing.assert_close(layer.weights_at(t), layer.weight.detach(), rtol=0, atol=1e-15)
    layer.weights_at(torch.tensor([0.1, 0.7], dtype=DT)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            layer.weights_at(bad)
    conv = sc.SplineODEConv2d(2, 3, 2, 2, 3)
    assert conv.weights_at(0.3).shape == (2, 2, 3, 3)
    assert conv.weights_at(torch.tensor([0.1, 0.2])).shape == (2, 2, 2, 3, 3)
    assert sc.SplineODE(2, 2, 1, 3, bias=False).bias_at(0.5) is None


# --------------------------------------------------------------------------- refinement


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("knots", [1, 3])
def test_refine_is_exact(degree, factor, knots):
    layer = _randomize(sc.SplineODE(3, knots, degree, 7, activation="tanh", learn_scale=True).to(DT))
    x = torch.randn(5, 3, dtype=DT)
    t = _times()
    W0, b0, y0 = layer.weights_at(t).detach(), layer.bias_at(t).detach(), layer(x).detach()
    y_rk4 = layer(x, steps=5, scheme="rk4").detach()
    out = layer.refine(knots * factor)
    assert out is layer and layer.knots == knots * factor and layer.degree == degree
    assert layer.weight.shape == (knots * factor + degree, 3, 3) and layer.bias.shape == (knots * factor + degree, 3)
    assert isinstance(layer.weight, torch.nn.Parameter) and layer.weight.requires_grad
    assert layer.weight.dtype == DT and "weight" in dict(layer.named_parameters())
    torch.testing.assert_close(layer.weights_at(t), W0, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.bias_at(t), b0, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x), y0, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x, steps=5, scheme="rk4"), y_rk4, rtol=0, atol=1e-12)
    # coefficient-level function agrees with L2 projection (the old spline lies in the new space)
    c = torch.randn(knots + degree, 2, dtype=DT)
    torch.testing.assert_close(C.refine_coefficients(c, knots, degree, knots * factor),
                               C.project_coefficients(c, knots, degree, knots * factor), rtol=0, atol=1e-11)


def test_refine_conv_hamiltonian_and_errors():
    conv = _randomize(sc.SplineODEConv1d(2, 3, 2, 2, 4).to(DT), wscale=0.2)
    x = torch.randn(2, 2, 6, dtype=DT)
    y0 = conv(x).detach()
    conv.refine(6)
    torch.testing.assert_close(conv(x), y0, rtol=0, atol=1e-12)
    ham = _randomize(sc.SplineODEHamiltonian(4, 2, 3, 5).to(DT))
    xh = torch.randn(3, 4, dtype=DT)
    yh = ham(xh).detach()
    ham.refine(4)
    torch.testing.assert_close(ham(xh), yh, rtol=0, atol=1e-12)
    layer = sc.SplineODE(2, 3, 1, 4)
    with pytest.raises(ValueError, match="project"):
        layer.refine(4)
    with pytest.raises(ValueError, match="project"):
        C.refine_coefficients(torch.zeros(4, 2), 3, 1, 5)
    layer.weight.requires_grad_(False)
    layer.refine(6)
    assert not layer.weight.requires_grad and layer.bias.requires_grad and layer.weight.dtype == torch.float32


# --------------------------------------------------------------------------- projection


def _l2_error(c_a, L_a, d_a, c_b, L_b, d_b, points=4000):
    t = (torch.arange(points, dtype=DT) + 0.5) / points  # midpoint rule, smooth enough for comparisons
    diff = C.evaluate(c_a, t, d_a) - C.evaluate(c_b, t, d_b)
    return float(diff.square().mean().sqrt())


@pytest.mark.parametrize("degree,new_degree", [(1, 1), (2, 2), (3, 1), (1, 3), (0, 2)])
def test_project_exact_in_target_space(degree, new_degree):
    # a spline that lies in the target space: built there on a coarser nested grid, then refined
    L = 2
    c_target_coarse = torch.randn(L + new_degree, 3, dtype=DT)
    c_target = C.refine_coefficients(c_target_coarse, L, new_degree, 2 * L)
    layer = sc.SplineODE(3, 2 * L, new_degree, 5).to(DT)
    with torch.no_grad():
        layer.bias.copy_(c_target)
        layer.weight.copy_(torch.randn(layer.weight.shape, dtype=DT))
    t = _times()
    b0 = layer.bias_at(t).detach()
    layer.project(6 * L)  # L'' a multiple: exact
    torch.testing.assert_close(layer.bias_at(t), b0, rtol=0, atol=1e-11)
    # projecting back to the space it came from recovers the coefficients
    back = C.project_coefficients(layer.bias.detach(), 6 * L, new_degree, L, new_degree)
    torch.testing.assert_close(back, c_target_coarse, rtol=0, atol=1e-10)
    # any degree -> polynomial of degree <= min(d, d''): a global line lies in every space with d >= 1
    if min(degree, new_degree) >= 1:
        L1 = 3
        line = (torch.arange(L1 + degree, dtype=DT) - (degree - 1) / 2.0) / L1  # Greville abscissae: W(t) = t
        line = torch.stack([2.0 * line - 1.0, -line], dim=1)
        p = C.project_coefficients(line, L1, degree, 5, new_degree)
        tt = _times()
        torch.testing.assert_close(C.evaluate(p, tt, new_degree),
                                   torch.stack([2 * tt - 1, -tt], 1), rtol=0, atol=1e-11)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_project_is_best_approximation(degree):
    L_fine = 24
    c = torch.randn(L_fine + degree, 2, dtype=DT)
    errs = []
    for L in (2, 4, 8):  # nested spaces: the L2 error can only decrease
        p = C.project_coefficients(c, L_fine, degree, L)
        errs.append(_l2_error(c, L_fine, degree, p, L, degree))
        # optimality: the residual is orthogonal to the target space, so perturbing p increases the error
        for _ in range(3):
            q = p + 1e-2 * torch.randn_like(p)
            assert _l2_error(c, L_fine, degree, q, L, degree) > errs[-1]
    assert errs[0] > errs[1] > errs[2] > 0
    # coarsening a layer changes knots/degree and keeps the Parameters trainable
    layer = sc.SplineODE(2, 6, degree, 4).to(DT)
    layer.project(3, degree=min(degree + 1, 3))
    assert layer.knots == 3 and layer.degree == min(degree + 1, 3)
    assert layer.weight.shape == (3 + layer.degree, 2, 2) and layer.weight.requires_grad


def test_project_differentiable():
    c = torch.randn(5, 2, dtype=DT, requires_grad=True)
    torch.autograd.gradcheck(lambda c: C.project_coefficients(c, 3, 2, 4, 1), (c,))
    torch.autograd.gradcheck(lambda c: C.refine_coefficients(c, 3, 2, 6), (c,))


# --------------------------------------------------------------------------- spectra / stability


@pytest.mark.parametrize("variant", ["standard", "symmetric", "antisymmetric"])
def test_step_spectra_shape(variant):
    layer = _randomize(sc.SplineODE(4, 3, 2, 6, activation="tanh", variant=variant, gamma=0.2).to(DT))
    x = torch.randn(5, 4, dtype=DT)
    ev = sc.step_spectra(layer, x)
    assert ev.shape == (6, 5, 4) and ev.dtype == torch.complex128
    assert sc.step_spectra(layer, x, steps=10).shape == (10, 5, 4)
    assert sc.step_spectra(copy.deepcopy(layer).float(), x.float()).dtype == torch.complex64
    if variant == "symmetric":  # -W^T D W is symmetric negative semidefinite
        assert ev.imag.abs().max() < 1e-10 and ev.real.max() < 1e-12
    rep = sc.stability_report(layer, x)
    assert 0.0 <= rep["fraction_outside"] <= 1.0 and rep["fraction_outside_per_step"].shape == (6,)


def test_step_spectra_hand_computed_1x1():
    w, b, lam, N, x0 = -1.7, 0.3, 2.0, 5, 0.8
    weight = torch.full((1, 1, 1), w, dtype=DT)  # d = 0, L = 1: constant W
    bias = torch.full((1, 1), b, dtype=DT)
    ev = sc.step_spectra((weight, bias, lam), torch.tensor([[x0]], dtype=DT), steps=N, degree=0, activation="tanh")
    x, want = x0, []
    for _ in range(N):
        a = w * x + b
        want.append((lam / N) * (1.0 - math.tanh(a) ** 2) * w)
        x = x + (lam / N) * math.tanh(a)
    torch.testing.assert_close(ev.real.reshape(-1), torch.tensor(want, dtype=DT), rtol=1e-13, atol=1e-14)
    assert ev.imag.abs().max() == 0
    rep = sc.stability_report((weight, bias, lam), torch.tensor([[x0]], dtype=DT), steps=N, degree=0)
    assert rep["fraction_outside"] == 0.0  # -2 < z < 0 inside |1 + z| <= 1
    rep = sc.stability_report((weight, bias, 40.0), torch.tensor([[x0]], dtype=DT), steps=N, degree=0)
    assert rep["fraction_outside"] > 0.0
    with pytest.raises(ValueError, match="steps and degree"):
        sc.step_spectra((weight, bias, lam), torch.tensor([[x0]], dtype=DT))


def test_stability_polynomials_and_regions():
    assert C.stability_polynomial("euler").tolist() == [1.0, 1.0]
    torch.testing.assert_close(torch.tensor(C.stability_polynomial("midpoint")), torch.tensor([1.0, 1.0, 0.5], dtype=DT))
    for s in ("rk4", "rk4_38"):
        torch.testing.assert_close(torch.tensor(C.stability_polynomial(s)),
                                   torch.tensor([1.0, 1.0, 0.5, 1 / 6, 1 / 24], dtype=DT), rtol=1e-15, atol=1e-15)
    # z = -2.5 is outside euler's and midpoint's regions but inside rk4's (real interval ~ [-2.785, 0])
    z = torch.tensor([[[-2.5 + 0j]]], dtype=torch.complex128)
    assert float(C._amplification(z, "euler").max()) > 1 and float(C._amplification(z, "rk4").max()) <= 1
    # antisymmetric weights, gamma = 0: purely imaginary spectra, never inside euler's closed disk except 0
    layer = _randomize(sc.SplineODE(4, 2, 1, 4, activation="identity", variant="antisymmetric").to(DT))
    rep = sc.stability_report(layer, torch.randn(3, 4, dtype=DT), scheme="euler")
    assert rep["max_real"] < 1e-12 and rep["fraction_outside"] > 0.0
    rep4 = sc.stability_report(layer, torch.randn(3, 4, dtype=DT), scheme="rk4")
    assert rep4["scheme"] == "rk4" and rep4["fraction_outside"] <= rep["fraction_outside"]


def test_plot_spectra_writes_png(tmp_path):
    layer = _randomize(sc.SplineODE(3, 2, 1, 5, variant="antisymmetric", gamma=0.5).to(DT))
    x = torch.randn(4, 3, dtype=DT)
    p1 = sc.plot_spectra(sc.step_spectra(layer, x), str(tmp_path / "one.png"))
    p2 = sc.plot_spectra({f"h=1/{N}": sc.step_spectra(layer, x, steps=N) for N in (2, 8)},
                         str(tmp_path / "many.png"), scheme="rk4")
    for p in (p1, p2):
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- regularisers


def test_tikhonov_values_and_grad():
    layer = sc.SplineODE(2, 2, 1, 3).to(DT)
    with torch.no_grad():
        layer.weight.fill_(0.5)
        layer.bias.fill_(2.0)
    n = 3
    assert _f(sc.tikhonov(layer)) == pytest.approx(n * 4 * 0.25 + n * 2 * 4.0)
    assert _f(sc.tikhonov(layer, include_bias=False)) == pytest.approx(n * 4 * 0.25)
    model = torch.nn.Sequential(layer, torch.nn.Linear(2, 2), sc.SplineODE(2, 1, 0, 2, bias=False).to(DT))
    with torch.no_grad():
        model[2].weight.fill_(1.0)
    assert _f(sc.tikhonov(model)) == pytest.approx(n * 4 * 0.25 + n * 2 * 4.0 + 4.0)
    c = torch.randn(4, 3, dtype=DT, requires_grad=True)
    torch.autograd.gradcheck(lambda c: sc.tikhonov(c), (c,))
    assert _f(sc.tikhonov([torch.ones(2), torch.full((3,), 2.0)])) == 14.0


def test_smoothness_exact_hand_values():
    c0, c1, c2 = 0.3, -1.1, 2.0
    # d = 1, L = 1: W(t) = c0 (1 - t) + c1 t, W' = c1 - c0
    assert _f(sc.smoothness_in_time(torch.tensor([c0, c1], dtype=DT), degree=1)) == pytest.approx((c1 - c0) ** 2)
    # d = 1, L = 2: slope 2 (c1 - c0) on [0, 1/2], 2 (c2 - c1) on [1/2, 1]
    want = 2 * ((c1 - c0) ** 2 + (c2 - c1) ** 2)
    assert _f(sc.smoothness_in_time(torch.tensor([c0, c1, c2], dtype=DT), degree=1)) == pytest.approx(want)
    # d = 2, L = 1, c = (0, 0, 1): W = u^2 / 2, W' = u, integral 1/3
    assert _f(sc.smoothness_in_time(torch.tensor([0.0, 0.0, 1.0], dtype=DT), degree=2)) == pytest.approx(1 / 3)
    # d = 0: zero inside the intervals (exact); the difference mode sees the jump
    c = torch.tensor([c0, c1], dtype=DT)
    assert _f(sc.smoothness_in_time(c, degree=0)) == 0.0
    assert _f(sc.smoothness_in_time(c, degree=0, mode="difference", steps=4)) == pytest.approx(4 * (c1 - c0) ** 2)
    # matrix-valued, a layer: sums over entries; the difference mode converges to the exact integral
    layer = _randomize(sc.SplineODE(2, 3, 3, 400).to(DT))
    exact = _f(sc.smoothness_in_time(layer))
    manual = sum(_f(sc.smoothness_in_time(p.detach(), degree=3)) for p in (layer.weight, layer.bias))
    assert exact == pytest.approx(manual, rel=1e-12)
    assert _f(sc.smoothness_in_time(layer, mode="difference")) == pytest.approx(exact, rel=1e-3)
    with pytest.raises(ValueError, match="mode"):
        sc.smoothness_in_time(layer, mode="tv")


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
@pytest.mark.parametrize("mode", ["exact", "difference"])
def test_smoothness_gradcheck_and_training_step(degree, mode):
    c = torch.randn(3 + degree, 2, 2, dtype=DT, requires_grad=True)
    torch.autograd.gradcheck(lambda c: sc.smoothness_in_time(c, degree=degree, mode=mode, steps=7), (c,))
    layer = _randomize(sc.SplineODE(2, 3, degree, 5).to(DT))
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    x = torch.randn(4, 2, dtype=DT)
    loss = layer(x).square().mean() + 1e-2 * sc.tikhonov(layer) + 1e-2 * sc.smoothness_in_time(layer, mode=mode)
    loss.backward()
    opt.step()
    assert layer.weight.grad is not None


# --------------------------------------------------------------------------- Hamiltonian layer


def _verlet_loop(y, z, K, bb, lam, N, degree, act=torch.tanh):
    """Independent loop: blend via weights_at-like evaluation of the splines."""
    h = 1.0 / N
    for j in range(N):
        t = j / N
        Kt, bt = C.evaluate(K, t, degree), C.evaluate(bb, t, degree)
        y = y - h * lam * act(z @ Kt[0].T + bt[0]) @ Kt[0]
        z = z + h * lam * act(y @ Kt[1].T + bt[1]) @ Kt[1]
    return y, z


@pytest.mark.parametrize("degree", [0, 1, 3])
@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
def test_hamiltonian_matches_loop_and_is_reversible(degree, activation):
    B, m, L, N, lam = 4, 3, 3, 11, 1.7
    K = 0.6 * torch.randn(L + degree, 2, m, m, dtype=DT)
    bb = 0.4 * torch.randn(L + degree, 2, m, dtype=DT)
    y0, z0 = torch.randn(B, m, dtype=DT), torch.randn(B, m, dtype=DT)
    yN, zN = sc.spline_ode_hamiltonian(y0, z0, K, bb, lam, steps=N, degree=degree, activation=activation)
    want = _verlet_loop(y0, z0, K, bb, lam, N, degree, reference.ACTIVATION_FNS[activation])
    torch.testing.assert_close(yN, want[0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(zN, want[1], rtol=1e-12, atol=1e-13)
    y_back, z_back = sc.spline_ode_hamiltonian(yN, zN, K, bb, lam, steps=N, degree=degree, activation=activation,
                                               reverse=True)
    torch.testing.assert_close(y_back, y0, rtol=0, atol=1e-10)
    torch.testing.assert_close(z_back, z0, rtol=0, atol=1e-10)
    ty, tz = sc.spline_ode_hamiltonian(y0, z0, K, bb, lam, steps=N, degree=degree, activation=activation,
                                       return_trajectory=True)
    assert ty.shape == (N + 1, B, m) and tz.shape == (N + 1, B, m)
    torch.testing.assert_close(ty[-1], yN, rtol=0, atol=0)


def test_hamiltonian_linear_energy_bounded():
    # identity activation, constant K: y' = -K^T K z, z' = K^T K y, a harmonic oscillator;
    # symplectic Verlet keeps y^2 + z^2 bounded (no drift) where forward Euler would grow.
    m = 3
    K = torch.randn(1, 2, m, m, dtype=DT) * 0.5
    K[:, 1] = K[:, 0]
    y0, z0 = torch.randn(2, m, dtype=DT), torch.randn(2, m, dtype=DT)
    ty, tz = sc.spline_ode_hamiltonian(y0, z0, K, None, 20.0, steps=2000, degree=0, activation="identity",
                                       return_trajectory=True)
    energy = ty.square().sum((1, 2)) + tz.square().sum((1, 2))
    assert float(energy.max() / energy[0]) < 1.5 and float(energy.min() / energy[0]) > 0.5


def test_hamiltonian_layer_gradcheck_inverse_and_errors():
    layer = _randomize(sc.SplineODEHamiltonian(4, 2, 2, 4, activation="tanh", learn_scale=True).to(DT))
    assert layer.weight.shape == (4, 2, 2, 2) and layer.bias.shape == (4, 2, 2)
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 4)
    torch.testing.assert_close(layer.inverse(y), x.detach(), rtol=0, atol=1e-10)
    assert layer(x, steps=9).shape == (3, 4)
    params = (x, layer.weight, layer.bias, layer.scale)

    def f(x, w, b, s):
        return sc.spline_ode_hamiltonian(x[:, :2], x[:, 2:], w, b, s, steps=4, degree=2)

    torch.autograd.gradcheck(f, params)
    assert "verlet" in repr(layer)
    with pytest.raises(ValueError, match="even"):
        sc.SplineODEHamiltonian(3, 2, 1, 4)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(3, 5, dtype=DT))
    with pytest.raises(ValueError, match="verlet"):
        layer(x, scheme="rk4")
    with pytest.raises(ValueError, match="weight"):
        sc.spline_ode_hamiltonian(x[:, :2], x[:, 2:], torch.randn(4, 2, 3, 3, dtype=DT), None, 1.0,
                                  steps=2, degree=1)
    with pytest.raises(ValueError, match="reference"):
        sc.SplineODEHamiltonian(4, 2, 1, 4, backend="cuda")
    assert _f(sc.smoothness_in_time(layer)) > 0 and _f(sc.tikhonov(layer)) > 0
