"""The fused dense backends (cpu, and cuda with a GPU) against the pure-PyTorch reference:
forward, every gradient, every variant / scheme / activation / degree, checkpointing, edge
shapes, the backward's last-state-only form, determinism and input checks; the CPU kernel's
own paths (kept pre-activations, transposed chunks, float32 GEMMs, tanh). The ops' opcheck,
torch.compile and torch.func checks are in test_contract.py.

Legend: B batch, m width, n = L + d coefficients, d degree, N steps.
"""
import functools

import pytest
import torch

import splinet_cuda as sc
from helpers import (TOL, VARIANTS, assert_equal_results, assert_matches_reference, check_dense_op_rejects_bad_args,
                     dense_inputs, detached, grid, grid_id, num_threads, outputs_and_grads, requires)

pytestmark = pytest.mark.backend_op("spline_dense_fwd")

run = functools.partial(outputs_and_grads, sc.spline_ode)


def assert_match(backend, args, **kw):
    assert_matches_reference(sc.spline_ode, args, backend=backend, **kw)


# Every variant x scheme x activation, degrees and bias cycling through the grid.
GRID = grid(VARIANTS)


@pytest.mark.parametrize("variant,scheme,activation,degree,bias", GRID, ids=[grid_id(c) for c in GRID])
def test_matches_reference_float64(backend, device, variant, scheme, activation, degree, bias):
    args = dense_inputs(5, 4, 3, degree, device=device, bias=bias)
    assert_match(backend, args, steps=6, degree=degree, activation=activation, scheme=scheme, variant=variant,
                 gamma=0.2)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scheme", ["euler", "rk4"])
@pytest.mark.parametrize("m", [7, 48, 67])  # small-width loops and the GEMM path
def test_matches_reference_float32(backend, device, variant, scheme, m):
    args = dense_inputs(9, m, 4, 2, dtype=torch.float32, device=device)
    assert_match(backend, args, steps=5, degree=2, activation="tanh", scheme=scheme,
                 variant=variant, gamma=0.1)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
@pytest.mark.parametrize("B,m,N,L", [(1, 1, 1, 1), (1, 5, 3, 2), (3, 1, 4, 5), (2, 3, 1, 4), (13, 64, 3, 2)],
                         ids=["B1-m1-N1", "B1", "m1", "N1", "gemm"])
def test_edge_shapes(backend, device, degree, B, m, N, L):
    args = dense_inputs(B, m, L, degree, device=device)
    assert_match(backend, args, steps=N, degree=degree, activation="tanh", scheme="rk4", variant="standard")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", [4, 50])
def test_trajectory(backend, device, variant, m):
    args = dense_inputs(3, m, 2, 3, device=device)
    kw = dict(steps=5, degree=3, activation="softplus", scheme="midpoint", variant=variant)
    assert_match(backend, args, return_trajectory=True, **kw)
    traj = sc.spline_ode(*args, backend=backend, return_trajectory=True, **kw)
    assert traj.shape == (6, 3, m)
    torch.testing.assert_close(traj[0], args[0].detach())


@pytest.mark.parametrize("learn_scale,bias", [(True, False), (False, True), (False, False)])
def test_scale_and_bias_options(backend, device, learn_scale, bias):
    args = dense_inputs(4, 3, 2, 1, device=device, bias=bias, learn_scale=learn_scale)
    assert_match(backend, args, steps=4, degree=1, activation="sigmoid", scheme="euler", variant="symmetric")


@pytest.mark.parametrize("m", [4, 64])
@pytest.mark.parametrize("checkpoint", [2, 3, 7, 50])
def test_checkpointing_is_exact(backend, device, m, checkpoint):
    """Recomputed segments replay the forward bit for bit, so gradients equal those of checkpoint=1."""
    args = dense_inputs(6, m, 3, 2, device=device)
    kw = dict(steps=7, degree=2, activation="tanh", scheme="rk4", variant="standard")
    full = run(*args, backend=backend, checkpoint=1, **kw)
    ckpt = run(*args, backend=backend, checkpoint=checkpoint, **kw)
    assert_equal_results(full, ckpt)
    assert_match(backend, args, checkpoint=checkpoint, **kw)


def test_noncontiguous_inputs(backend, device):
    x_big = torch.randn(4, 10, dtype=torch.float64, device=device)
    x = x_big[:, ::2].detach().requires_grad_()  # (4, 5), stride 2
    w = (0.3 * torch.randn(6, 5, 5, dtype=torch.float64, device=device)).transpose(1, 2).detach().requires_grad_()
    b = torch.randn(5, 6, dtype=torch.float64, device=device).t().detach().requires_grad_()
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    assert_match(backend, (x, w, b, 0.7), steps=4, degree=3, activation="relu", scheme="rk4_38",
                 variant="antisymmetric", gamma=0.5)


@pytest.mark.parametrize("variant,scheme", [("standard", "euler"), ("symmetric", "rk4"), ("antisymmetric", "midpoint")])
@pytest.mark.parametrize("m", [3, 48])
def test_gradcheck(backend, device, variant, scheme, m):
    x, w, b, s = dense_inputs(2, m, 2, 2, device=device)
    fn = lambda x, w, b, s: sc.spline_ode(x, w, b, s, steps=3, degree=2, activation="tanh", scheme=scheme,
                                          variant=variant, gamma=0.3, backend=backend)
    assert torch.autograd.gradcheck(fn, (x, w, b, s), eps=1e-6, atol=1e-7, fast_mode=m > 8)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m,checkpoint", [(3, 1), (3, 2), (48, 1)])
def test_backward_last_only_gradient(backend, device, bias, m, checkpoint):
    """dLoss/dx_N alone (the layer's usual backward) gives the same gradients, bit for bit, as
    the full form with zeros for the other saved states."""
    x, w, b, s = (None if t is None else t.detach() for t in dense_inputs(3, m, 2, 2, device=device, bias=bias))
    cfg = (5, 2, "tanh", "rk4", "symmetric", 0.0, checkpoint)
    states = torch.ops.splinet_cuda.spline_dense_fwd(x, w, b, s, *cfg)
    bwd = torch.ops.splinet_cuda.spline_dense_bwd
    g_last = torch.randn_like(states[-1])
    full = torch.zeros_like(states)
    full[-1] = g_last
    assert_equal_results(bwd(g_last, states, w, b, s, *cfg), bwd(full, states, w, b, s, *cfg))


def test_deterministic(backend, device):
    args = dense_inputs(600, 6, 4, 3, dtype=torch.float32, device=device)  # several row chunks
    kw = dict(steps=20, degree=3, activation="tanh", scheme="rk4", variant="standard")
    first, second = run(*args, backend=backend, **kw), run(*args, backend=backend, **kw)
    assert_equal_results(first, second)


def test_many_steps(backend, device):
    x, w, b, s = dense_inputs(8, 4, 10, 3, device=device)
    kw = dict(steps=2000, degree=3, activation="tanh", scheme="euler")
    y = sc.spline_ode(x, w, b, s, backend=backend, **kw)
    y.sum().backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(x.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(y, sc.reference.spline_ode(x, w, b, s, **kw), rtol=1e-10, atol=1e-10)


def test_auto_picks_fused_backend(backend, device):
    x, w, b, s = dense_inputs(3, 4, 2, 1, device=device)
    assert sc._dispatch._select("auto", "spline_ode", x) is sc._autograd.spline_ode_fused


@requires("cpu", "spline_dense_fwd")
def test_raw_ops_reject_bad_input():
    fwd = torch.ops.splinet_cuda.spline_dense_fwd
    check_dense_op_rejects_bad_args(fwd)
    x, w, b, s = torch.randn(3, 4), torch.randn(5, 4, 4), torch.randn(5, 4), torch.tensor(1.0)
    cfg = lambda: dict(steps=3, degree=1, activation="tanh", scheme="euler", variant="standard", gamma=0.0,
                       checkpoint=1)
    with pytest.raises(TypeError, match="float32 or float64"):
        fwd(x.half(), w.half(), b.half(), s, *cfg().values())
    states = fwd(x, w, b, s, *cfg().values())
    with pytest.raises(ValueError, match="states"):
        torch.ops.splinet_cuda.spline_dense_bwd(states[:-1], states[:-1], w, b, s, *cfg().values())


@requires("cpu", "spline_dense_fwd")
def test_public_api_rejects_bad_checkpoint_and_dtype():
    x, w = torch.randn(3, 4), torch.randn(5, 4, 4)
    with pytest.raises(ValueError, match="checkpoint"):
        sc.spline_ode(x, w, None, 1.0, steps=3, degree=1, backend="cpu", checkpoint=0)
    with pytest.raises(TypeError, match="dtype"):
        sc.spline_ode(x.half(), w.half(), None, 1.0, steps=3, degree=1, backend="cpu")


@requires("cpu", "spline_dense_fwd")
def test_cpu_float32_tanh_within_3_ulp():
    """The CPU kernel's float32 tanh (tanh_poly) against torch.tanh: with W = 0, x0 = 0 and
    one euler step of h * scale = 1, x_1 = tanh(b)."""
    v = torch.cat([torch.linspace(-25, 25, 12001), torch.logspace(-8, 1.5, 2000), -torch.logspace(-8, 1.5, 2000),
                   torch.tensor([0.0, 0.3, -0.3, 0.29999, 20.0, -20.0, 1e-30])]).float()
    m = 2000
    v = torch.cat([v, v.new_zeros((-v.numel()) % m)]).reshape(-1, m)
    W, x, s = torch.zeros(1, m, m), torch.zeros(1, m), torch.tensor(1.0)
    for row in v:
        y = torch.ops.splinet_cuda.spline_dense_fwd(x, W, row[None], s, 1, 0, "tanh", "euler", "standard", 0.0, 1)[1, 0]
        ref = torch.tanh(row)
        ulp = (torch.nextafter(ref, torch.tensor(float("inf"))) - ref).abs().clamp_min(1e-45)
        assert ((y - ref).abs() / ulp).max() <= 3.0
    # NaN stays NaN (both the array kernel's vectors and its zero-padded tail), as torch.tanh
    for n in (16, 11):
        row = torch.full((1, n), float("nan"))
        y = torch.ops.splinet_cuda.spline_dense_fwd(torch.zeros(1, n), torch.zeros(1, n, n), row, s, 1, 0, "tanh",
                                                    "euler", "standard", 0.0, 1)[1]
        assert torch.isnan(y).all()


# --- wide CPU layers: one threaded chunk, pre-activations kept for the backward ----------

needs_cpu = requires("cpu", "spline_dense_fwd")
WIDE = 128  # the one-chunk path: GEMMs and element-wise loops over every thread


@needs_cpu
@pytest.mark.parametrize("variant,scheme,activation,degree", [
    ("standard", "euler", "tanh", 2), ("antisymmetric", "midpoint", "relu", 1),
    ("symmetric", "rk4", "softplus", 3), ("standard", "rk4_38", "sigmoid", 0),
    ("symmetric", "midpoint", "relu", 2), ("standard", "euler", "identity", 1)])
@pytest.mark.parametrize("B,bias", [(5, True), (1, False)])
@pytest.mark.parametrize("m", [4, 48, WIDE + 3], ids=["loops", "gemm-per-chunk", "one-chunk"])
def test_cpu_kept_preactivations(variant, scheme, activation, degree, B, bias, m):
    """checkpoint=None keeps each step's activations (softplus: pre-activations) and blended
    weights, and the backward reads them instead of replaying the forward product, on each of
    the kernel's paths: the same output and gradients as the replaying backward
    (checkpoint=1) bit for bit, and the reference's within tolerance."""
    args = dense_inputs(B, m, 2, degree, bias=bias)
    kw = dict(steps=3, degree=degree, activation=activation, scheme=scheme, variant=variant, gamma=0.2)
    assert sc._autograd._keeps_preact(args[0], None, False)
    assert not sc._autograd._keeps_preact(args[0], 1, False)
    kept, replayed = run(*args, backend="cpu", **kw), run(*args, backend="cpu", checkpoint=1, **kw)
    assert_equal_results(kept, replayed)
    assert_match("cpu", args, **kw)


@needs_cpu
@pytest.mark.parametrize("variant", ["standard", "symmetric"])
@pytest.mark.parametrize("B,m", [(1, 16), (7, 47), (300, 20), (33, 129), (260, 300)])
def test_cpu_float32_products(B, m, variant):
    """float32 on the GEMM paths (on CPUs with AVX-512 that are not Intel's the kernels' own
    GEMM, sgemm_avx512): tails of its 8-row and 32-column tiles and sums deeper than one
    256-long block, in X W^T, G W (symmetric) and G^T X. Against the reference, and kept ==
    checkpoint=1 bit for bit."""
    args = dense_inputs(B, m, 2, 2, dtype=torch.float32)
    kw = dict(steps=3, degree=2, activation="tanh", scheme="midpoint", variant=variant)
    kept, replayed = run(*args, backend="cpu", **kw), run(*args, backend="cpu", checkpoint=1, **kw)
    assert_equal_results(kept, replayed)
    assert_match("cpu", args, **kw)


@needs_cpu
@pytest.mark.parametrize("variant,scheme,activation,degree,bias", GRID[::4])
@pytest.mark.parametrize("m", [2, 5, 8])
def test_cpu_transposed_chunks(variant, scheme, activation, degree, bias, m):
    """Batches of 256 rows and more at the unrolled widths run in transposed chunks (m rows
    of R values): against the reference, kept == checkpoint=1 bit for bit, a checkpointed
    backward and the trajectory too."""
    args = dense_inputs(300, m, 2, degree, bias=bias)
    kw = dict(steps=4, degree=degree, activation=activation, scheme=scheme, variant=variant, gamma=0.2)
    kept, replayed = run(*args, backend="cpu", **kw), run(*args, backend="cpu", checkpoint=1, **kw)
    assert_equal_results(kept, replayed)
    assert_match("cpu", args, **kw)
    assert_match("cpu", args, checkpoint=3, **kw)
    assert_match("cpu", args, return_trajectory=True, **kw)


@needs_cpu
def test_cpu_transposed_chunks_thread_count_between_forward_and_backward():
    """The kept values of transposed chunks are read back by chunks that do not depend on the
    thread count: a backward on another thread count than its forward's is still right."""
    args = dense_inputs(600, 5, 3, 2)
    kw = dict(steps=5, degree=2, activation="tanh", scheme="midpoint", backend="cpu")
    with num_threads(1):
        y = sc.spline_ode(*args, **kw)
    with num_threads(3):
        got = torch.autograd.grad(y.sin().sum(), args)
    ref = sc.spline_ode(*args, **{**kw, "backend": "reference"})
    for g, r in zip(got, torch.autograd.grad(ref.sin().sum(), args)):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


@needs_cpu
def test_cpu_transposed_chunks_gradcheck():
    x, w, b, s = dense_inputs(260, 5, 1, 2)
    fn = lambda x, w, b, s: sc.spline_ode(x, w, b, s, steps=3, degree=2, activation="tanh", scheme="rk4",
                                          backend="cpu")
    assert torch.autograd.gradcheck(fn, (x, w, b, s), eps=1e-6, atol=1e-7, fast_mode=True)


@needs_cpu
def test_cpu_kept_preactivations_gradcheck_and_grad_of_states():
    x, w, b, s = dense_inputs(2, WIDE, 1, 1)
    fn = lambda x, w, b, s: sc.spline_ode(x, w, b, s, steps=2, degree=1, activation="tanh", scheme="midpoint",
                                          backend="cpu")
    assert torch.autograd.gradcheck(fn, (x, w, b, s), eps=1e-6, atol=1e-7, fast_mode=True)
    # The saved states, kept activations and blended weights are outputs with no gradient of
    # their own; every blended weight starts 64-byte aligned like the kernel's own buffers.
    out, states, preact, blended = sc._autograd.SplineDenseSavedFunction.apply(
        x, w, b, s, 2, 1, "tanh", "midpoint", "standard", 0.0)
    assert not any(t.requires_grad for t in (states, preact, blended))
    assert preact.shape == (2, 2, 2, WIDE) and blended.shape == (2, 2, WIDE * WIDE)
    assert torch.equal(blended[0, 0].view(WIDE, WIDE), w[0].detach())  # t = 0: degree 1's basis is (1, 0)
    assert all(t.data_ptr() % 64 == 0 for t in blended.flatten(0, 1))


@needs_cpu
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m", [3, 48])
def test_saved_ops_shapes_and_errors(bias, m):
    """The ops that keep activations: their shapes, the same states as spline_dense_fwd, and
    bad kept tensors rejected (their opcheck is in test_contract.py)."""
    x, w, b, s = detached(dense_inputs(3, m, 2, 2, bias=bias))
    cfg = (4, 2, "tanh", "rk4", "symmetric", 0.0)
    fwd, bwd = torch.ops.splinet_cuda.spline_dense_fwd_saved, torch.ops.splinet_cuda.spline_dense_bwd_saved
    states, preact, blended = fwd(x, w, b, s, *cfg)
    assert preact.shape == (4, 4, 3, m) and blended.shape == (4, 4, -(-m * m // 8) * 8)  # float64: 8 a line
    torch.testing.assert_close(states, torch.ops.splinet_cuda.spline_dense_fwd(x, w, b, s, *cfg, 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="preact"):
        bwd(states[-1], states, preact[:-1], blended, w, b, s, *cfg)
    with pytest.raises(TypeError, match="preact"):
        bwd(states[-1], states, preact.float(), blended, w, b, s, *cfg)
    with pytest.raises(ValueError, match="blended"):
        bwd(states[-1], states, preact, blended[:, :, 1:], w, b, s, *cfg)
    with pytest.raises(TypeError, match="blended"):
        bwd(states[-1], states, preact, blended.float(), w, b, s, *cfg)
    with pytest.raises(ValueError, match="states"):
        bwd(states[-1], states[:-1], preact, blended, w, b, s, *cfg)


@needs_cpu
def test_cpu_wide_deterministic():
    """The one-chunk path (threaded GEMMs and element-wise loops) gives the same bits on every
    call (that its kept pre-activations trace under torch.compile is in test_contract.py)."""
    args = dense_inputs(40, WIDE, 2, 2, dtype=torch.float32)
    kw = dict(steps=5, degree=2, activation="tanh", scheme="rk4", variant="antisymmetric", gamma=0.1)
    first, second = run(*args, backend="cpu", **kw), run(*args, backend="cpu", **kw)
    assert_equal_results(first, second)


@needs_cpu
def test_cpu_keeps_preactivations_only_for_a_backward(monkeypatch):
    """Inference (no_grad, or no input that needs a gradient) runs the plain forward op."""
    calls = []
    real = torch.ops.splinet_cuda.spline_dense_fwd_saved
    monkeypatch.setattr(sc._autograd.SplineDenseSavedFunction, "forward",
                        staticmethod(lambda *a: calls.append(1) or (lambda st, *kept: (st[-1].clone(), st, *kept))(*real(*a))))
    x, w, b, s = dense_inputs(3, WIDE, 1, 1)
    kw = dict(steps=2, degree=1, backend="cpu")
    with torch.no_grad():
        y0 = sc.spline_ode(x, w, b, s, **kw)
    y1 = sc.spline_ode(x.detach(), w.detach(), b.detach(), s.detach(), **kw)
    assert calls == []
    y2 = sc.spline_ode(x, w, b, s, **kw)
    assert calls == [1]
    assert torch.equal(y0, y1) and torch.equal(y0, y2.detach())
