"""The fused CPU Hamiltonian (Verlet) layer against the pure-PyTorch reference: forward and
every gradient over degrees, activations, bias, checkpointing and edge shapes; gradcheck; the
dispatcher, the layer and argument checks. The ops' opcheck and torch.compile checks are in
test_contract.py.

Legend: B batch, m width of each state (x = [y | z] is (B, 2m)), n = L + d coefficients,
d degree, N steps, K checkpoint interval.
"""
import functools
import itertools

import pytest
import torch

import splinet_cuda as sc
from helpers import (ACTS, HAMILTONIAN_RESULTS, TOL, assert_matches_reference, assert_rejects,
                     hamiltonian_inputs, num_threads, outputs_and_grads, requires)
from splinet_cuda import _autograd, _dispatch, reference

pytestmark = requires("cpu", "spline_hamiltonian_fwd")

OPS = lambda: (torch.ops.splinet_cuda.spline_hamiltonian_fwd, torch.ops.splinet_cuda.spline_hamiltonian_bwd)


def make(B, m, L, d, *, dtype=torch.float64, bias=True, seed=0, scale_tensor=True):
    return hamiltonian_inputs(B, m, L, d, dtype=dtype, bias=bias, seed=seed, learn_scale=scale_tensor)


run = functools.partial(outputs_and_grads, sc.spline_ode_hamiltonian)


def assert_match(args, ref_args=None, **kw):
    """(y_N, z_N) (or trajectories) and the gradients of a fixed nonlinear loss wrt every input,
    on the CPU kernel and on the reference."""
    assert_matches_reference(sc.spline_ode_hamiltonian, args, backend="cpu", ref_args=ref_args,
                             names=HAMILTONIAN_RESULTS, **kw)


# Every activation x degree x bias, checkpoint 1 or 3 alternating.
GRID = [(a, d, bias, 1 + 2 * (i % 2)) for i, (a, d, bias) in
        enumerate(itertools.product(ACTS, range(4), (True, False)))]


@pytest.mark.parametrize("activation,degree,bias,checkpoint", GRID)
def test_matches_reference(activation, degree, bias, checkpoint):
    args = make(3, 3, 3, degree, bias=bias, seed=degree)
    assert_match(args, steps=7, degree=degree, activation=activation, checkpoint=checkpoint)


@pytest.mark.parametrize("steps,checkpoint,trajectory", [
    (1, None, False), (1, 1, True), (1, 3, False), (2, 3, False), (3, 3, False), (4, 3, False),
    (7, 3, True), (9, 2, False), (10, 20, False), (5, None, True)])
def test_steps_checkpoint_trajectory(steps, checkpoint, trajectory):
    args = make(4, 2, 2, 2, seed=steps)
    assert_match(args, steps=steps, degree=2, activation="tanh", checkpoint=checkpoint, return_trajectory=trajectory)


@pytest.mark.parametrize("B,m,L,d", [(1, 1, 1, 0), (1, 1, 3, 3), (2, 4, 2, 1), (5, 5, 4, 2), (3, 8, 3, 3),
                                     (6, 16, 2, 2), (4, 20, 3, 1), (1100, 6, 2, 2)])
def test_shapes(B, m, L, d):
    # widths 2-5, 8 take unrolled loops, 16+ ATen's GEMM, others run-time loops; B = 1100
    # splits the batch into several chunks.
    args = make(B, m, L, d, seed=m)
    assert_match(args, steps=5, degree=d, activation="softplus", checkpoint=2)


def test_float_scale_and_no_grad_inputs():
    y, z, w, b, _ = make(3, 3, 2, 1)
    y, z = y.detach(), z.detach()  # only the coefficients learn
    assert_match((y, z, w, b, 0.7), steps=4, degree=1, activation="sigmoid")


def test_non_contiguous_inputs():
    y, z, w, b, s = make(4, 3, 3, 2)
    g = torch.Generator().manual_seed(1)
    big = torch.randn(3, 12, dtype=torch.float64, generator=g)
    y_nc = big.t()[::3].detach().requires_grad_()   # (4, 3), strided
    z_nc = big.t()[1::3].detach().requires_grad_()
    w_nc = w.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # non-contiguous view
    b_nc = torch.randn(5, 2, 6, dtype=torch.float64, generator=g)[:, :, ::2].detach().requires_grad_()
    assert not (y_nc.is_contiguous() or w_nc.is_contiguous() or b_nc.is_contiguous())
    ref = tuple(t.detach().contiguous().requires_grad_() for t in (y_nc, z_nc, w_nc, b_nc)) + (s,)
    assert_match((y_nc, z_nc, w_nc, b_nc, s), ref_args=ref, steps=5, degree=2, activation="tanh", checkpoint=2)


def test_empty_batch():
    y, z, w, b, s = make(0, 3, 2, 1)
    yN, zN = sc.spline_ode_hamiltonian(y, z, w, b, s, steps=3, degree=1, backend="cpu")
    assert yN.shape == (0, 3) and zN.shape == (0, 3)
    gw, = torch.autograd.grad(yN.sum() + zN.sum(), [w])
    assert torch.equal(gw, torch.zeros_like(gw))


def test_dtypes(dtype, tol):
    """float32 and float64 inputs against the float64 reference on the same values."""
    args64 = make(5, 4, 3, 2)
    args = tuple(t.detach().to(dtype).requires_grad_() for t in args64)
    assert_matches_reference(sc.spline_ode_hamiltonian, args, backend="cpu", ref_args=args64, tol=tol,
                             names=HAMILTONIAN_RESULTS, steps=6, degree=2, activation="tanh")


def test_thread_count_does_not_change_results():
    args = make(600, 5, 2, 2)
    with num_threads(1):
        one = run(*args, backend="cpu", steps=4, degree=2, activation="tanh")
    with num_threads(max(2, torch.get_num_threads())):
        many = run(*args, backend="cpu", steps=4, degree=2, activation="tanh")
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("checkpoint,fast", [(None, True), (2, False)])
def test_gradcheck(checkpoint, fast):
    y, z, w, b, s = make(2, 2, 2, 2)

    def fn(y, z, w, b, s):
        return sc.spline_ode_hamiltonian(y, z, w, b, s, steps=5, degree=2, activation="tanh", backend="cpu",
                                         checkpoint=checkpoint)

    assert torch.autograd.gradcheck(fn, (y, z, w, b, s), eps=1e-6, atol=1e-7, fast_mode=fast)

    def traj(y, z, w, b, s):
        return sc.spline_ode_hamiltonian(y, z, w, b, s, steps=3, degree=2, activation="softplus", backend="cpu",
                                         return_trajectory=True)

    assert torch.autograd.gradcheck(traj, (y, z, w, b, s), eps=1e-6, atol=1e-7, fast_mode=fast)


def test_dispatch():
    y, z, w, b, s = make(2, 3, 2, 1)
    select = lambda backend, t: _dispatch._select(backend, "spline_ode_hamiltonian", t)
    assert select("auto", y) is _autograd.spline_ode_hamiltonian_fused
    assert select("auto", y.detach().float()) is _autograd.spline_ode_hamiltonian_fused
    assert select("auto", y.detach().half()) is reference.spline_ode_hamiltonian
    kw = dict(steps=3, degree=1)
    # reverse runs on the reference (auto) and round-trips
    yN, zN = sc.spline_ode_hamiltonian(y, z, w, b, s, **kw)
    y0, z0 = sc.spline_ode_hamiltonian(yN, zN, w, b, s, reverse=True, **kw)
    torch.testing.assert_close(y0, y, rtol=0, atol=1e-10)
    torch.testing.assert_close(z0, z, rtol=0, atol=1e-10)
    for backend in ("triton", "cuda"):
        with pytest.raises(ValueError, match="Hamiltonian"):
            sc.spline_ode_hamiltonian(y, z, w, b, s, backend=backend, **kw)
    with pytest.raises(ValueError, match="reverse"):
        sc.spline_ode_hamiltonian(y, z, w, b, s, backend="cpu", reverse=True, **kw)
    with pytest.raises(ValueError, match="unknown backend"):
        sc.spline_ode_hamiltonian(y, z, w, b, s, backend="gpu", reverse=True, **kw)
    with pytest.raises(TypeError, match="dtype"):
        h = lambda t: t.detach().half()
        sc.spline_ode_hamiltonian(h(y), h(z), h(w), h(b), 1.0, backend="cpu", **kw)
    with pytest.raises(TypeError, match="reverse"):
        sc.spline_ode_hamiltonian(y, z, w, b, s, reverse=1, **kw)
    with pytest.raises(ValueError, match="checkpoint"):
        sc.spline_ode_hamiltonian(y, z, w, b, s, checkpoint=0, **kw)


def test_layer_fused_matches_reference():
    fused = sc.SplineODEHamiltonian(6, knots=3, degree=2, steps=5, learn_scale=True, backend="cpu",
                                    dtype=torch.float64)
    ref = sc.SplineODEHamiltonian(6, knots=3, degree=2, steps=5, learn_scale=True, backend="reference",
                                  dtype=torch.float64)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(4, 6, dtype=torch.float64)
    outs = []
    for layer in (fused, ref):
        xr = x.clone().requires_grad_()
        out = layer(xr)
        grads = torch.autograd.grad(out.sin().sum(), [xr] + list(layer.parameters()))
        outs.append([out.detach(), *grads])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    torch.testing.assert_close(fused.inverse(fused(x)), x, rtol=0, atol=1e-10)
    assert "backend='cpu'" in repr(fused)
    with pytest.raises(ValueError, match="reference"):
        sc.SplineODEHamiltonian(4, 2, 1, 4, backend="cuda")


def test_op_rejects_bad_args():
    fwd, bwd = OPS()
    x, w, b, s = torch.randn(3, 6), torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3), torch.tensor(1.0)
    cfg = dict(steps=3, degree=1, activation="tanh", scheme="verlet", variant="hamiltonian", gamma=0.0,
               checkpoint=1)
    call = lambda *a, **kw: fwd(*a, *{**cfg, **kw}.values())
    cases = [
        (ValueError, "x must have shape", (torch.randn(3, 5), w, b, s), {}),
        (ValueError, "x must have shape", (torch.randn(6), w, b, s), {}),
        (ValueError, "weight", (x, torch.randn(4, 3, 3), b, s), {}),
        (ValueError, "weight", (x, torch.randn(4, 2, 2, 2), b, s), {}),
        (ValueError, "bias", (x, w, torch.randn(4, 3), s), {}),
        (ValueError, "bias", (x, w, torch.randn(3, 2, 3), s), {}),
        (ValueError, "scale", (x, w, b, torch.ones(2)), {}),
        (ValueError, "degree", (x, w, b, s), {"degree": 4}),
        (ValueError, "steps", (x, w, b, s), {"steps": 0}),
        (ValueError, "checkpoint", (x, w, b, s), {"checkpoint": 0}),
        (ValueError, "activation", (x, w, b, s), {"activation": "gelu"}),
        (ValueError, "scheme", (x, w, b, s), {"scheme": "euler"}),
        (ValueError, "variant", (x, w, b, s), {"variant": "symmetric"}),
        (TypeError, "dtype", (x, w.double(), b, s), {}),
        (TypeError, "bias dtype", (x, w, b.double(), s), {}),
        (TypeError, "float32 or float64", (x.half(), w.half(), b.half(), s), {}),
    ]
    assert_rejects(call, cases)
    states = call(x, w, b, s)
    rest = (w, b, s) + tuple(cfg.values())
    with pytest.raises(ValueError, match="states holds"):
        bwd(torch.zeros_like(states[:2]), states[:2], *rest)
    with pytest.raises(ValueError, match="grad_states"):
        bwd(torch.zeros(3, 3), states, *rest)
    with pytest.raises(ValueError, match="states must have shape"):
        bwd(states[0], states[0], *rest)


def test_python_rejects_bad_args():
    y, z, w, b, s = (t.detach() if isinstance(t, torch.Tensor) else t for t in make(2, 3, 2, 1))
    kw = dict(steps=3, degree=1, backend="cpu")
    bad = [
        (ValueError, "y and z", (y, z[:, :2], w, b, s), {}),
        (ValueError, "weight", (y, z, w[:, 0], b, s), {}),
        (ValueError, "bias", (y, z, w, b[:, 0], s), {}),
        (ValueError, "degree", (y, z, w, b, s), {"degree": 3}),
        (TypeError, "steps", (y, z, w, b, s), {"steps": 2.0}),
        (ValueError, "activation", (y, z, w, b, s), {"activation": "gelu"}),
        (TypeError, "dtype", (y, z.float(), w, b, s), {}),
        (TypeError, "y must be a torch.Tensor", (y.numpy(), z, w, b, s), {}),
        (ValueError, "scale", (y, z, w, b, float("nan")), {}),
    ]
    for error, match, args, extra in bad:
        with pytest.raises(error, match=match):
            sc.spline_ode_hamiltonian(*args, **{**kw, **extra})
