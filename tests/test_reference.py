"""The pure-PyTorch reference (splinet_cuda.reference) against an independent float64 model.

The independent model below shares no code with the package: its basis comes from
scipy.interpolate.BSpline on the extended uniform knot vector tau_k = k/L, k = -d..L+d
(coefficient j is scipy's basis element j), its Butcher tableaus are written out here,
and it steps with plain Python loops.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.interpolate import BSpline

import splinet_cuda as sc
from helpers import conv_inputs, dense_inputs, num_threads
from splinet_cuda import reference

DT = torch.float64

# --------------------------------------------------------------------------------------
# Independent model
# --------------------------------------------------------------------------------------

# (c, a, b) of each scheme, written out independently of splinet_cuda._schemes.
TABLEAUS = {
    "euler": ([0.0], [[]], [1.0]),
    "midpoint": ([0.0, 0.5], [[], [0.5]], [0.0, 1.0]),
    "rk4": (
        [0.0, 0.5, 0.5, 1.0],
        [[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]],
        [1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0],
    ),
    "rk4_38": (
        [0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0],
        [[], [1.0 / 3.0], [-1.0 / 3.0, 1.0], [1.0, -1.0, 1.0]],
        [1.0 / 8.0, 3.0 / 8.0, 3.0 / 8.0, 1.0 / 8.0],
    ),
}

ACTS = {
    "identity": lambda a: a,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
}

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def scipy_basis_vector(t: float, L: int, d: int) -> np.ndarray:
    """All n = L + d basis values at t, from scipy on tau_k = k / L, k = -d .. L + d."""
    tau = np.arange(-d, L + d + 1, dtype=np.float64) / L
    n = L + d
    assert len(tau) == n + d + 1
    v = BSpline(tau, np.eye(n), d, extrapolate=False)(float(t))
    assert not np.any(np.isnan(v)), (t, L, d)
    return np.asarray(v, dtype=np.float64)


def blend(coeffs: torch.Tensor | None, v: np.ndarray):
    if coeffs is None:
        return None
    out = torch.zeros_like(coeffs[0])
    for j, vj in enumerate(v):
        if vj != 0.0:
            out = out + float(vj) * coeffs[j]
    return out


def _same_padding(W: torch.Tensor):
    return [k // 2 for k in W.shape[2:]]


def rhs_dense(x, W, b, act, variant, gamma):
    f = ACTS[act]
    if variant == "standard":
        a = x @ W.T
        if b is not None:
            a = a + b
        return f(a)
    if variant == "symmetric":
        a = x @ W.T
        if b is not None:
            a = a + b
        return -(f(a) @ W)
    if variant == "antisymmetric":
        A = W - W.T - gamma * torch.eye(W.shape[0], dtype=W.dtype)
        a = x @ A.T
        if b is not None:
            a = a + b
        return f(a)
    raise AssertionError(variant)


def rhs_conv(x, W, b, act, variant, gamma):
    f = ACTS[act]
    dims = x.dim() - 2
    a = CONV[dims](x, W, padding=_same_padding(W))
    if b is not None:
        a = a + b.reshape((1, -1) + (1,) * dims)
    if variant == "standard":
        return f(a)
    if variant == "symmetric":
        return -CONV_T[dims](f(a), W, padding=_same_padding(W))
    raise AssertionError(variant)


def independent_ode(x, weight, bias, scale, *, steps, degree, activation, scheme,
                    variant="standard", gamma=0.0, conv=False):
    """Returns the whole trajectory (steps + 1, *x.shape)."""
    n = weight.shape[0]
    L = n - degree
    assert L >= 1
    c, a, bw = TABLEAUS[scheme]
    N = steps
    h = 1.0 / N
    rhs = rhs_conv if conv else rhs_dense
    traj = [x]
    xi = x
    for i in range(N):
        ks = []
        for s in range(len(c)):
            t = min((i + c[s]) / N, 1.0)
            v = scipy_basis_vector(t, L, degree)
            W = blend(weight, v)
            b = blend(bias, v)
            xs = xi
            for j, asj in enumerate(a[s]):
                if asj != 0.0:
                    xs = xs + (h * asj) * ks[j]
            ks.append(scale * rhs(xs, W, b, activation, variant, gamma))
        step = torch.zeros_like(xi)
        for s in range(len(c)):
            if bw[s] != 0.0:
                step = step + bw[s] * ks[s]
        xi = xi + h * step
        traj.append(xi)
    return torch.stack(traj)


# --------------------------------------------------------------------------------------
# Configurations (not the full product; every value of every axis appears several times)
# --------------------------------------------------------------------------------------

# variant, scheme, activation, degree, L, N, bias, B, m, scale, gamma
DENSE = [
    ("standard", "euler", "tanh", 1, 3, 5, True, 4, 3, 0.7, 0.0),
    ("standard", "midpoint", "relu", 2, 2, 4, False, 3, 4, 1.5, 0.0),
    ("standard", "rk4", "sigmoid", 3, 4, 3, True, 2, 5, "tensor", 0.0),
    ("standard", "rk4_38", "softplus", 0, 2, 3, True, 3, 3, 2.0, 0.0),
    ("standard", "euler", "identity", 3, 1, 6, False, 2, 3, 1.0, 0.0),
    ("symmetric", "euler", "relu", 0, 4, 8, True, 3, 4, 1.0, 0.0),
    ("symmetric", "midpoint", "tanh", 3, 3, 4, True, 2, 3, "tensor", 0.0),
    ("symmetric", "rk4", "identity", 1, 2, 5, False, 3, 3, 0.5, 0.0),
    ("symmetric", "rk4_38", "sigmoid", 2, 5, 3, True, 4, 2, 1.2, 0.0),
    ("symmetric", "rk4", "softplus", 2, 3, 2, True, 2, 4, 0.9, 0.0),
    ("antisymmetric", "euler", "tanh", 2, 3, 7, True, 3, 4, 1.0, 0.1),
    ("antisymmetric", "midpoint", "softplus", 1, 4, 4, False, 2, 3, 1.3, 0.0),
    ("antisymmetric", "rk4", "relu", 3, 2, 3, True, 3, 3, 0.8, 0.5),
    ("antisymmetric", "rk4_38", "identity", 0, 3, 3, True, 2, 4, "tensor", 0.2),
    ("antisymmetric", "euler", "sigmoid", 1, 1, 2, True, 1, 1, 1.0, 0.3),
    ("standard", "euler", "relu", 1, 1, 1, True, 1, 1, 1.0, 0.0),
    ("symmetric", "rk4", "tanh", 0, 1, 1, False, 1, 1, 2.0, 0.0),
]


def _dense_id(c):
    v, s, a, d, L, N, bias, B, m, scale, gamma = c
    return f"{v}-{s}-{a}-d{d}-L{L}-N{N}-{'bias' if bias else 'nobias'}-B{B}m{m}" + (
        f"-g{gamma}" if gamma else "")


# dims, variant, scheme, activation, degree, L, N, bias, B, C, spatial, kernel, scale
CONVS = [
    (1, "standard", "euler", "relu", 1, 2, 4, True, 2, 2, (5,), (3,), 1.0),
    (1, "symmetric", "rk4", "tanh", 3, 2, 2, False, 2, 3, (6,), (5,), 0.8),
    (1, "standard", "rk4_38", "softplus", 3, 3, 3, False, 1, 2, (4,), (3,), "tensor"),
    (1, "symmetric", "euler", "identity", 0, 1, 3, True, 1, 1, (4,), (1,), 0.5),
    (2, "standard", "midpoint", "sigmoid", 2, 3, 3, True, 2, 2, (4, 5), (3, 3), 1.1),
    (2, "symmetric", "rk4_38", "softplus", 0, 2, 4, True, 2, 2, (3, 4), (1, 3), 1.0),
    (2, "symmetric", "midpoint", "tanh", 1, 4, 4, True, 1, 3, (4, 4), (3, 3), "tensor"),
    (2, "standard", "euler", "identity", 2, 1, 2, False, 2, 1, (3, 3), (5, 5), 0.7),
    (3, "standard", "rk4", "identity", 1, 1, 2, True, 2, 2, (3, 4, 2), (3, 3, 3), 1.0),
    (3, "symmetric", "euler", "relu", 2, 2, 3, True, 1, 2, (3, 3, 3), (3, 3, 3), 1.2),
    (3, "standard", "midpoint", "sigmoid", 3, 1, 2, False, 2, 1, (2, 3, 2), (3, 1, 3), 0.9),
]


def _conv_id(c):
    dims, v, s, a, d, L, N, bias, B, C, sp, k, scale = c
    return (f"conv{dims}d-{v}-{s}-{a}-d{d}-L{L}-N{N}-{'bias' if bias else 'nobias'}"
            f"-C{C}-k{'x'.join(map(str, k))}")


def _scale(scale):
    return torch.tensor(1.25, dtype=DT) if scale == "tensor" else scale


def make_dense(B, m, n, bias, seed=0, wscale=0.6):
    """(x, W, b) with n coefficients, float64, without grad."""
    return dense_inputs(B, m, n, 0, bias=bias, seed=seed, wscale=wscale, bscale=0.5, requires_grad=False)[:3]


def make_conv(B, C, spatial, kernel, n, bias, seed=0, wscale=0.3):
    return conv_inputs(len(spatial), B=B, C=C, spatial=spatial, k=kernel, L=n, d=0, bias=bias, seed=seed,
                       wscale=wscale, bscale=0.5, requires_grad=False)[:3]


TOL = dict(rtol=1e-10, atol=1e-11)


@pytest.fixture
def one_thread():
    """gradcheck and the loop model make thousands of tiny calls: intra-op threads only add contention."""
    with num_threads(1):
        yield




# --------------------------------------------------------------------------------------
# Self-checks of the independent model (so a wrong test helper cannot hide a bug)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [0, 1, 2, 3])
def test_helper_basis_matches_closed_forms(d):
    L = 4
    forms = {
        0: lambda u: [1.0],
        1: lambda u: [1 - u, u],
        2: lambda u: [(1 - u) ** 2 / 2, (-2 * u * u + 2 * u + 1) / 2, u * u / 2],
        3: lambda u: [(1 - u) ** 3 / 6, (3 * u ** 3 - 6 * u ** 2 + 4) / 6,
                      (-3 * u ** 3 + 3 * u ** 2 + 3 * u + 1) / 6, u ** 3 / 6],
    }
    for t in [0.0, 0.1, 0.3, 0.55, 0.8, 0.99, 1.0]:
        k = min(math.floor(t * L), L - 1)
        u = t * L - k
        v = scipy_basis_vector(t, L, d)
        expect = np.zeros(L + d)
        expect[k:k + d + 1] = forms[d](u)
        np.testing.assert_allclose(v, expect, atol=1e-14)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_helper_conv_transpose_is_adjoint(dims):
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2, 3) + (4,) * dims, generator=g, dtype=DT)
    y = torch.randn((2, 3) + (4,) * dims, generator=g, dtype=DT)
    W = torch.randn((3, 3) + (3,) * dims, generator=g, dtype=DT)
    Kx = CONV[dims](x, W, padding=_same_padding(W))
    KTy = CONV_T[dims](y, W, padding=_same_padding(W))
    assert Kx.shape == x.shape and KTy.shape == y.shape
    torch.testing.assert_close((Kx * y).sum(), (x * KTy).sum())


def test_helper_rk4_is_fourth_order_on_scalar_ode():
    # dx/dt = lam * x with constant coefficient: the rk4 tableau reproduces exp(lam).
    W = torch.full((2, 1, 1), 0.0, dtype=DT)
    b = None
    x = torch.ones(1, 1, dtype=DT)
    # identity activation, antisymmetric with gamma -> f = -gamma * x
    errs = []
    for N in [4, 8, 16]:
        tr = independent_ode(x, W, b, 1.0, steps=N, degree=1, activation="identity",
                             scheme="rk4", variant="antisymmetric", gamma=1.0)
        errs.append(abs(tr[-1].item() - math.exp(-1.0)))
    assert 14 < errs[0] / errs[1] < 18 and 14 < errs[1] / errs[2] < 18


# --------------------------------------------------------------------------------------
# reference vs. the independent model
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", DENSE, ids=[_dense_id(c) for c in DENSE])
def test_reference_dense_matches_independent(cfg, one_thread):
    variant, scheme, act, d, L, N, bias, B, m, scale, gamma = cfg
    x, W, b = make_dense(B, m, L + d, bias, seed=zlib.crc32(_dense_id(cfg).encode()) % 1000)
    scale = _scale(scale)
    expect = independent_ode(x, W, b, scale, steps=N, degree=d, activation=act,
                             scheme=scheme, variant=variant, gamma=gamma)
    y = reference.spline_ode(x, W, b, scale, steps=N, degree=d, activation=act,
                             scheme=scheme, variant=variant, gamma=gamma)
    assert y.shape == (B, m) and y.dtype == DT
    torch.testing.assert_close(y, expect[-1], **TOL)

    traj = reference.spline_ode(x, W, b, scale, steps=N, degree=d, activation=act,
                                scheme=scheme, variant=variant, gamma=gamma,
                                return_trajectory=True)
    assert traj.shape == (N + 1, B, m)
    torch.testing.assert_close(traj[0], x, rtol=0, atol=0)
    torch.testing.assert_close(traj[-1], y, rtol=0, atol=0)
    torch.testing.assert_close(traj, expect, **TOL)


@pytest.mark.parametrize("cfg", CONVS, ids=[_conv_id(c) for c in CONVS])
def test_reference_conv_matches_independent(cfg, one_thread):
    dims, variant, scheme, act, d, L, N, bias, B, C, spatial, kernel, scale = cfg
    x, W, b = make_conv(B, C, spatial, kernel, L + d, bias, seed=zlib.crc32(_conv_id(cfg).encode()) % 1000)
    scale = _scale(scale)
    expect = independent_ode(x, W, b, scale, steps=N, degree=d, activation=act,
                             scheme=scheme, variant=variant, conv=True)
    y = reference.spline_ode_conv(x, W, b, scale, steps=N, degree=d, activation=act,
                                  scheme=scheme, variant=variant)
    assert y.shape == x.shape and y.dtype == DT
    torch.testing.assert_close(y, expect[-1], **TOL)

    traj = reference.spline_ode_conv(x, W, b, scale, steps=N, degree=d, activation=act,
                                     scheme=scheme, variant=variant, return_trajectory=True)
    assert traj.shape == (N + 1,) + tuple(x.shape)
    torch.testing.assert_close(traj[0], x, rtol=0, atol=0)
    torch.testing.assert_close(traj[-1], y, rtol=0, atol=0)
    torch.testing.assert_close(traj, expect, **TOL)


def test_default_activations():
    # Public API defaults: spline_ode defaults to tanh, spline_ode_conv to relu; scheme euler, variant standard.
    x, W, b = make_dense(3, 4, 5, True)
    expect = independent_ode(x, W, b, 1.0, steps=3, degree=2, activation="tanh", scheme="euler")
    torch.testing.assert_close(reference.spline_ode(x, W, b, 1.0, steps=3, degree=2), expect[-1], **TOL)
    torch.testing.assert_close(sc.spline_ode(x, W, b, 1.0, steps=3, degree=2), expect[-1], **TOL)
    xc, Wc, bc = make_conv(2, 2, (5,), (3,), 3, True)
    expect = independent_ode(xc, Wc, bc, 1.0, steps=3, degree=1, activation="relu",
                             scheme="euler", conv=True)
    torch.testing.assert_close(reference.spline_ode_conv(xc, Wc, bc, 1.0, steps=3, degree=1),
                               expect[-1], **TOL)
    torch.testing.assert_close(sc.spline_ode_conv(xc, Wc, bc, 1.0, steps=3, degree=1),
                               expect[-1], **TOL)


def test_float32_close_to_float64():
    x, W, b = make_dense(3, 4, 5, True)
    y64 = reference.spline_ode(x, W, b, 1.0, steps=4, degree=2, scheme="rk4")
    y32 = reference.spline_ode(x.float(), W.float(), b.float(), 1.0, steps=4, degree=2, scheme="rk4")
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Public dispatcher
# --------------------------------------------------------------------------------------


def test_available_backends_contains_reference():
    backends = sc.available_backends()
    assert "reference" in list(backends)
    assert all(isinstance(name, str) for name in backends)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("cfg", DENSE[::2], ids=[_dense_id(c) for c in DENSE[::2]])
def test_dispatcher_dense_matches_reference(cfg, backend):
    variant, scheme, act, d, L, N, bias, B, m, scale, gamma = cfg
    x, W, b = make_dense(B, m, L + d, bias, seed=7)
    scale = _scale(scale)
    kw = dict(steps=N, degree=d, activation=act, scheme=scheme, variant=variant, gamma=gamma)
    expect = reference.spline_ode(x, W, b, scale, **kw)
    y = sc.spline_ode(x, W, b, scale, backend=backend, **kw)
    torch.testing.assert_close(y, expect, **TOL)
    traj = sc.spline_ode(x, W, b, scale, backend=backend, return_trajectory=True, **kw)
    assert traj.shape == (N + 1, B, m)
    torch.testing.assert_close(traj, reference.spline_ode(x, W, b, scale, return_trajectory=True, **kw),
                               **TOL)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("cfg", CONVS[::2], ids=[_conv_id(c) for c in CONVS[::2]])
def test_dispatcher_conv_matches_reference(cfg, backend):
    dims, variant, scheme, act, d, L, N, bias, B, C, spatial, kernel, scale = cfg
    x, W, b = make_conv(B, C, spatial, kernel, L + d, bias, seed=7)
    scale = _scale(scale)
    kw = dict(steps=N, degree=d, activation=act, scheme=scheme, variant=variant)
    expect = reference.spline_ode_conv(x, W, b, scale, **kw)
    y = sc.spline_ode_conv(x, W, b, scale, backend=backend, **kw)
    torch.testing.assert_close(y, expect, **TOL)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_dispatcher_gradients_match_reference(backend):
    x, W, b = make_dense(3, 4, 5, True, seed=11)
    s = torch.tensor(0.8, dtype=DT)
    grads = []
    for fn in (lambda *a, **k: reference.spline_ode(*a, **k),
               lambda *a, **k: sc.spline_ode(*a, backend=backend, **k)):
        leaves = [t.clone().requires_grad_(True) for t in (x, W, b, s)]
        y = fn(*leaves, steps=4, degree=2, activation="tanh", scheme="euler")
        (y * torch.linspace(-1, 1, y.numel(), dtype=DT).reshape(y.shape)).sum().backward()
        grads.append([t.grad for t in leaves])
    for g_ref, g in zip(*grads):
        assert g is not None
        torch.testing.assert_close(g, g_ref, **TOL)


# --------------------------------------------------------------------------------------
# gradcheck (float64) wrt x, weight, bias and a learnable 0-dim scale
# --------------------------------------------------------------------------------------

# kind, variant, scheme, activation, degree, L
GRAD_CFGS = [
    ("dense", "standard", "euler", "tanh", 2, 2),
    ("dense", "symmetric", "rk4", "sigmoid", 1, 2),
    ("dense", "antisymmetric", "midpoint", "softplus", 3, 1),
    ("dense", "standard", "rk4_38", "identity", 0, 2),
    ("conv1d", "standard", "midpoint", "tanh", 1, 2),
    ("conv2d", "symmetric", "midpoint", "softplus", 2, 1),
    ("conv1d", "symmetric", "euler", "sigmoid", 3, 2),
]


@pytest.mark.parametrize("cfg", GRAD_CFGS, ids=["-".join(map(str, c)) for c in GRAD_CFGS])
def test_gradcheck_reference(cfg, one_thread):
    kind, variant, scheme, act, d, L = cfg
    n, N, B = L + d, 3, 2
    if kind == "dense":
        x, W, b = make_dense(B, 3, n, True, seed=5)
        fn = reference.spline_ode
        extra = dict(variant=variant, gamma=0.3 if variant == "antisymmetric" else 0.0)
    else:
        dims = int(kind[4])
        x, W, b = make_conv(B, 2, (4,) if dims == 1 else (3, 3), (3,) * dims, n, True, seed=5)
        fn = reference.spline_ode_conv
        extra = dict(variant=variant)
    s = torch.tensor(0.9, dtype=DT)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, W, b, s))

    def f(x_, W_, b_, s_):
        return fn(x_, W_, b_, s_, steps=N, degree=d, activation=act, scheme=scheme, **extra)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_reference_no_bias_trajectory(one_thread):
    x, W, _ = make_dense(2, 3, 3, False, seed=9)
    s = torch.tensor(1.1, dtype=DT)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, W, s))

    def f(x_, W_, s_):
        return reference.spline_ode(x_, W_, None, s_, steps=3, degree=1, activation="tanh",
                                    scheme="midpoint", return_trajectory=True)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_learnable_scale_gradient_finite_difference(backend):
    x, W, b = make_dense(3, 3, 4, True, seed=2)
    kw = dict(steps=5, degree=2, activation="tanh", scheme="rk4", backend=backend)
    s = torch.tensor(0.7, dtype=DT, requires_grad=True)
    sc.spline_ode(x, W, b, s, **kw).sum().backward()
    eps = 1e-6
    fd = (sc.spline_ode(x, W, b, 0.7 + eps, **kw).sum() - sc.spline_ode(x, W, b, 0.7 - eps, **kw).sum()) / (2 * eps)
    assert s.grad is not None and s.grad.shape == ()
    torch.testing.assert_close(s.grad, fd, rtol=1e-7, atol=1e-8)


# --------------------------------------------------------------------------------------
# Paper Remark 1: degree 1 with L = N is an ODEnet (and a ResNet when scale = N)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("act", ["tanh", "relu", "softplus"])
@pytest.mark.parametrize("N", [1, 4, 7])
def test_remark1_odenet_and_resnet(N, act, backend):
    B, m = 3, 4
    x, W, b = make_dense(B, m, N + 1, True, seed=N)
    f = ACTS[act]
    h = 1.0 / N
    kw = dict(steps=N, degree=1, activation=act, scheme="euler", backend=backend)

    scale = 0.8
    xi = x
    for i in range(N):
        xi = xi + h * scale * f(xi @ W[i].T + b[i])
    torch.testing.assert_close(sc.spline_ode(x, W, b, scale, **kw), xi, rtol=1e-12, atol=1e-12)

    xi = x
    for i in range(N):
        xi = xi + f(xi @ W[i].T + b[i])
    torch.testing.assert_close(sc.spline_ode(x, W, b, float(N), **kw), xi, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# Convergence order of the schemes
# --------------------------------------------------------------------------------------

ORDERS = {
    "euler": ([8, 16, 32, 64], (0.8, 1.2)),
    "midpoint": ([8, 16, 32, 64], (1.8, 2.2)),
    "rk4": ([8, 16, 32, 64], (3.6, 4.4)),
    "rk4_38": ([8, 16, 32, 64], (3.6, 4.4)),
}


@pytest.fixture(scope="module")
def convergence_problem():
    L, d, m, B = 2, 3, 3, 4
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(B, m, generator=g, dtype=DT)
    W = 0.3 * torch.randn(L + d, m, m, generator=g, dtype=DT)
    b = 0.5 * torch.randn(L + d, m, generator=g, dtype=DT)
    kw = dict(degree=d, activation="tanh", variant="standard")
    exact = reference.spline_ode(x, W, b, 1.0, steps=2048, scheme="rk4", **kw)
    return x, W, b, kw, exact


@pytest.mark.parametrize("scheme", list(ORDERS))
def test_convergence_order(scheme, convergence_problem):
    x, W, b, kw, exact = convergence_problem
    Ns, (lo, hi) = ORDERS[scheme]
    errs = []
    for N in Ns:
        assert N % 2 == 0  # knots (L = 2) on step boundaries
        y = reference.spline_ode(x, W, b, 1.0, steps=N, scheme=scheme, **kw)
        errs.append((y - exact).abs().max().item())
    assert min(errs) > 1e-11, errs  # far above float64 roundoff
    slope = np.polyfit(np.log([1.0 / N for N in Ns]), np.log(errs), 1)[0]
    assert lo <= slope <= hi, (scheme, slope, errs)


# --------------------------------------------------------------------------------------
# Edge sizes and non-contiguous inputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["euler", "rk4"])
def test_tiny_sizes(scheme):
    for B, m, N, d, L in [(1, 1, 1, 0, 1), (1, 1, 1, 3, 1), (1, 3, 1, 1, 1), (4, 1, 2, 2, 3)]:
        x, W, b = make_dense(B, m, L + d, True, seed=B + m)
        expect = independent_ode(x, W, b, 1.3, steps=N, degree=d, activation="tanh", scheme=scheme)
        for fn in (reference.spline_ode, sc.spline_ode):
            y = fn(x, W, b, 1.3, steps=N, degree=d, activation="tanh", scheme=scheme)
            assert y.shape == (B, m)
            torch.testing.assert_close(y, expect[-1], **TOL)


def _noncontig_cases():
    g = torch.Generator().manual_seed(21)
    m, B, n = 3, 4, 4
    big_x = torch.randn(B + 2, 2 * m + 1, generator=g, dtype=DT)
    big_w = 0.5 * torch.randn(n, 2 * m, 2 * m + 1, generator=g, dtype=DT)
    big_b = torch.randn(n, 3 * m, generator=g, dtype=DT)
    W0 = 0.5 * torch.randn(n, m, m, generator=g, dtype=DT)
    b0 = torch.randn(n, m, generator=g, dtype=DT)
    x0 = torch.randn(B, m, generator=g, dtype=DT)
    return {
        "x-sliced": (big_x[1:1 + B, 1:1 + m], W0, b0),
        "x-step-sliced": (big_x[:B, ::2][:, :m], W0, b0),
        "x-transposed": (torch.randn(m, B, generator=g, dtype=DT).t(), W0, b0),
        "weight-strided": (x0, big_w[:, ::2, 1::2][:, :m, :m], b0),
        "weight-transposed": (x0, W0.transpose(1, 2), b0),
        "bias-strided": (x0, W0, big_b[:, ::3]),
        "all-strided": (big_x[1:1 + B, 1:1 + m], big_w[:, ::2, 1::2][:, :m, :m], big_b[:, ::3]),
    }


NONCONTIG = _noncontig_cases()


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("case", list(NONCONTIG))
def test_noncontiguous_inputs(case, backend):
    x, W, b = NONCONTIG[case]
    assert not (x.is_contiguous() and W.is_contiguous() and b.is_contiguous())
    kw = dict(steps=3, degree=1, activation="tanh", scheme="midpoint")
    y = sc.spline_ode(x, W, b, 1.0, backend=backend, **kw)
    expect = sc.spline_ode(x.contiguous(), W.contiguous(), b.contiguous(), 1.0, backend=backend, **kw)
    torch.testing.assert_close(y, expect, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(y, reference.spline_ode(x.contiguous(), W.contiguous(), b.contiguous(), 1.0, **kw),
                               **TOL)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_noncontiguous_conv_inputs(backend):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 6, 3, generator=g, dtype=DT).permute(0, 3, 1, 2)  # (2, 3, 5, 6)
    # conv2d weight (n, C, C, kh, kw) = (3, 3, 3, 3, 3), a strided view of a bigger buffer
    W = (0.3 * torch.randn(3, 3, 3, 7, 7, generator=g, dtype=DT))[..., ::2, 1::2][..., :3, :3]
    b = torch.randn(3, 6, generator=g, dtype=DT)[:, 1::2]
    kw = dict(steps=2, degree=2, activation="relu", scheme="euler")
    assert W.shape == (3, 3, 3, 3, 3) and not W.is_contiguous()
    assert not x.is_contiguous() and not b.is_contiguous()
    y = sc.spline_ode_conv(x, W, b, 1.0, backend=backend, **kw)
    expect = reference.spline_ode_conv(x.contiguous(), W.contiguous(), b.contiguous(), 1.0, **kw)
    torch.testing.assert_close(y, expect, **TOL)


# --------------------------------------------------------------------------------------
# Named fused backends (when built): forward and gradients equal the reference on CPU tensors
# --------------------------------------------------------------------------------------

FUSED_CFGS = [
    # variant, scheme, activation, degree, L, N
    ("standard", "euler", "tanh", 1, 3, 4),
    ("standard", "euler", "relu", 3, 2, 5),
    ("standard", "euler", "softplus", 0, 2, 4),
    ("symmetric", "euler", "sigmoid", 2, 3, 3),
    ("antisymmetric", "euler", "identity", 1, 2, 3),
    ("standard", "rk4", "tanh", 2, 2, 3),
]


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"], indirect=True)
@pytest.mark.parametrize("cfg", FUSED_CFGS, ids=["-".join(map(str, c)) for c in FUSED_CFGS])
def test_named_backend_matches_reference(cfg, backend, device):
    # CUDA tensors for the GPU backends when there is a GPU (triton runs CPU tensors under
    # its interpreter); the cuda backend takes CUDA tensors only.
    variant, scheme, act, d, L, N = cfg
    x, W, b = make_dense(3, 5, L + d, True, seed=13)
    kw = dict(steps=N, degree=d, activation=act, scheme=scheme, variant=variant,
              gamma=0.2 if variant == "antisymmetric" else 0.0)
    leaves = [t.to(device).clone().requires_grad_(True) for t in (x, W, b, torch.tensor(0.9, dtype=DT))]
    try:
        y = sc.spline_ode(*leaves, backend=backend, **kw)
    except (ValueError, NotImplementedError) as e:
        if "device" in str(e) or scheme != "euler" or variant != "standard":
            pytest.skip(f"{backend!r} does not take this case on CPU tensors: {e}")
        raise
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    y_ref = reference.spline_ode(*ref_leaves, **kw)
    torch.testing.assert_close(y, y_ref, **TOL)
    probe = torch.linspace(-1, 1, y.numel(), dtype=DT, device=y.device).reshape(y.shape)
    (y * probe).sum().backward()
    (y_ref * probe).sum().backward()
    for name, g, g_ref in zip(("x", "weight", "bias", "scale"), leaves, ref_leaves):
        assert g.grad is not None, name
        torch.testing.assert_close(g.grad, g_ref.grad, **TOL, msg=lambda m: f"grad of {name}: {m}")
