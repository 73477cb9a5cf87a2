"""The fused conv backends, CPU and (with a GPU) CUDA (splinet_cuda::spline_conv_fwd /
spline_conv_bwd) against the pure-PyTorch reference: forward and every gradient over spatial
dims, variants, schemes, activations, degrees, kernel sizes, checkpointing and edge shapes;
gradcheck, determinism, the CPU paths (direct and ATen convolutions, kept pre-activations) and
input checks of the raw ops. The ops' opcheck and torch.compile checks are in test_contract.py.

Legend: B batch, C channels, n = L + d coefficients, d degree, N steps, K checkpoint interval.
"""
import contextlib
import functools
import itertools

import pytest
import torch

import splinet_cuda as sc
from helpers import (ACTS, CONV_VARIANTS, SCHEMES, TOL, assert_equal_results, assert_matches_reference, conv_inputs,
                     detached, num_threads, outputs_and_grads, requires)

VARIANTS = CONV_VARIANTS
# The CPU kernels are the oracle of most tests here (as the reference is of all): without
# them the file is skipped.
pytestmark = [pytest.mark.backend_op("spline_conv_fwd"), requires("cpu", "spline_conv_fwd")]

run = functools.partial(outputs_and_grads, sc.spline_ode_conv)


def assert_match(args, backend="cpu", **kw):
    assert_matches_reference(sc.spline_ode_conv, args, backend=backend, **kw)


def deterministic(device):
    """cuDNN (the CUDA backend's path for many channels) is deterministic only when asked."""
    if device == "cuda":
        return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True)
    return contextlib.nullcontext()


# Every variant x scheme x activation once; spatial dims, degree, kernel and bias cycle.
GRID = [(v, s, a, 1 + i % 3, i % 4, (1, 3, 5)[(i // 2) % 3] if i % 3 != 2 else 3, i % 5 != 0)
        for i, (v, s, a) in enumerate(itertools.product(VARIANTS, SCHEMES, ACTS))]


@pytest.mark.parametrize("variant,scheme,activation,sd,degree,k,bias", GRID,
                         ids=[f"{v}-{s}-{a}-{sd}d-d{d}-k{k}-{'b' if b else 'nob'}" for v, s, a, sd, d, k, b in GRID])
def test_matches_reference_float64(backend, device, variant, scheme, activation, sd, degree, k, bias):
    args = conv_inputs(sd, d=degree, k=k, bias=bias, device=device)
    assert_match(args, backend=backend, steps=3, degree=degree, activation=activation, scheme=scheme, variant=variant)


@pytest.mark.parametrize("sd", [1, 2, 3])
@pytest.mark.parametrize("variant,scheme,activation", [("standard", "euler", "relu"), ("symmetric", "rk4", "tanh"),
                                                       ("standard", "rk4_38", "softplus"),
                                                       ("symmetric", "midpoint", "sigmoid")])
def test_matches_reference_float32(backend, device, sd, variant, scheme, activation):
    spatial = {1: (16,), 2: (8, 9), 3: (5, 4, 6)}[sd]
    args = conv_inputs(sd, B=3, C=4, spatial=spatial, L=3, d=2, dtype=torch.float32, device=device)
    assert_match(args, backend=backend, steps=4, degree=2, activation=activation, scheme=scheme, variant=variant)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_degrees_and_kernels(backend, device, degree, k):
    args = conv_inputs(2, spatial=(6, 5), L=3, d=degree, k=k, device=device)
    assert_match(args, backend=backend, steps=5, degree=degree, activation="tanh", scheme="midpoint", variant="symmetric")


@pytest.mark.parametrize("sd,k", [(2, (3, 1)), (3, (1, 3, 5)), (1, 5)])
def test_mixed_and_large_kernels(backend, device, sd, k):
    """Kernels of different sizes per dim, and kernels larger than the image."""
    spatial = {1: (3,), 2: (4, 2), 3: (2, 3, 4)}[sd]
    args = conv_inputs(sd, spatial=spatial, k=k, device=device)
    assert_match(args, backend=backend, steps=2, degree=2, activation="softplus", scheme="rk4", variant="standard")


@pytest.mark.parametrize("sd", [1, 2, 3])
@pytest.mark.parametrize("B,C,N,L", [(1, 1, 1, 1), (1, 3, 2, 2), (2, 1, 3, 4), (2, 2, 1, 3)],
                         ids=["B1-C1-N1", "B1", "C1", "N1"])
def test_edge_shapes(backend, device, sd, B, C, N, L):
    args = conv_inputs(sd, B=B, C=C, L=L, d=1, device=device)
    assert_match(args, backend=backend, steps=N, degree=1, activation="sigmoid", scheme="rk4", variant="symmetric")


def test_remark1_resnet_knots():
    """d = 1, L = N: one coefficient per step (an ODEnet); lam = N makes each step a ResNet block."""
    x, w, b, _ = conv_inputs(2, L=4, d=1)
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    assert_match((x, w, b, s), steps=4, degree=1, activation="relu", scheme="euler", variant="standard")
    y = sc.spline_ode_conv(x, w, b, s, steps=1, degree=1, activation="relu", backend="cpu")
    assert y.shape == x.shape


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sd", [1, 3])
def test_trajectory(backend, device, variant, sd):
    args = conv_inputs(sd, L=2, d=3, device=device)
    kw = dict(steps=4, degree=3, activation="softplus", scheme="rk4_38", variant=variant)
    assert_match(args, backend=backend, return_trajectory=True, **kw)
    traj = sc.spline_ode_conv(*args, backend=backend, return_trajectory=True, checkpoint=3, **kw)
    assert traj.shape == (5, *args[0].shape)
    torch.testing.assert_close(traj[0], args[0].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("learn_scale,bias", [(True, False), (False, True), (False, False)])
def test_scale_and_bias_options(backend, device, learn_scale, bias):
    args = conv_inputs(2, bias=bias, learn_scale=learn_scale, device=device)
    assert_match(args, backend=backend, steps=3, degree=2, activation="tanh", scheme="euler", variant="symmetric")


@pytest.mark.parametrize("variant,scheme", [("standard", "rk4"), ("symmetric", "rk4_38")])
@pytest.mark.parametrize("checkpoint", [2, 3, 7])
def test_checkpointing_is_exact(backend, device, variant, scheme, checkpoint):
    """Recomputed segments replay the forward bit for bit, so gradients equal those of checkpoint=1."""
    args = conv_inputs(2, B=2, C=2, L=3, device=device)
    kw = dict(steps=5, degree=2, activation="tanh", scheme=scheme, variant=variant)
    with deterministic(device):
        full = run(*args, backend=backend, checkpoint=1, **kw)
        ckpt = run(*args, backend=backend, checkpoint=checkpoint, **kw)
    assert_equal_results(full, ckpt)
    assert_match(args, backend=backend, checkpoint=checkpoint, **kw)


def test_checkpointed_saved_states():
    """The forward op keeps x_0, x_K, x_2K, ... below N and x_N."""
    x, w, b, s = (t.detach() for t in conv_inputs(2, L=2))
    cfg = dict(steps=7, degree=2, activation="relu", scheme="midpoint", variant="standard")
    traj = sc.spline_ode_conv(x, w, b, s, backend="reference", return_trajectory=True, **cfg)
    states = torch.ops.splinet_cuda.spline_conv_fwd(x, w, b, s, 7, 2, "relu", "midpoint", "standard", 0.0, 3)
    assert states.shape == (4, *x.shape)
    torch.testing.assert_close(states, traj[[0, 3, 6, 7]], **TOL[torch.float64])


# --- CPU: the direct convolution, ATen's, and the kept pre-activations -------------------

@pytest.mark.parametrize("sd,C,k,B", [(2, 40, 3, 2), (3, 10, 3, 2), (2, 16, 5, 1), (1, 12, 3, 1), (2, 5, 3, 9)])
def test_cpu_direct_and_aten_paths(sd, C, k, B):
    """Both CPU convolution paths against the reference: ATen's (C = 40; C * taps = 270 at
    C = 10 3x3x3 and 400 at C = 16 5x5, above the direct kernels' limit) and the direct
    kernels (B = 1 splits the output channels across threads; B = 9 leaves a partial group of
    samples in the filter gradient)."""
    spatial = {1: (9,), 2: (6, 5), 3: (3, 4, 3)}[sd]
    args = conv_inputs(sd, B=B, C=C, spatial=spatial, L=2, d=2, k=k)
    for variant, scheme in (("standard", "rk4"), ("symmetric", "midpoint")):
        assert_match(args, steps=3, degree=2, activation="tanh", scheme=scheme, variant=variant)


@pytest.mark.parametrize("sd,C,B", [(2, 12, 1), (1, 8, 9), (3, 3, 5)])
def test_cpu_same_bits_for_any_thread_count(sd, C, B):
    """Every CPU reduction (the direct filter gradient's sample groups, the bias and scale
    partials) has a fixed order, and the direct kernels split channels without changing any
    sum: 1 and 3 threads give the same bits."""
    args = conv_inputs(sd, B=B, C=C, dtype=torch.float32)
    kw = dict(steps=3, degree=2, activation="softplus", scheme="rk4", variant="symmetric")
    with num_threads(1):
        one = run(*args, backend="cpu", **kw)
    with num_threads(3):
        three = run(*args, backend="cpu", **kw)
    assert_equal_results(one, three)


@pytest.mark.parametrize("variant,scheme,activation,sd,C", [
    ("standard", "euler", "relu", 2, 3), ("symmetric", "rk4", "softplus", 1, 4),
    ("standard", "rk4_38", "sigmoid", 3, 2), ("symmetric", "midpoint", "identity", 2, 40)])
def test_cpu_kept_preactivations(variant, scheme, activation, sd, C):
    """checkpoint=None keeps each step's pre-activations (direct and ATen paths alike) and the
    backward reads them instead of replaying the forward convolution: the same output and
    gradients as the replaying backward (checkpoint=1) bit for bit, and the reference's."""
    args = conv_inputs(sd, B=2, C=C)
    kw = dict(steps=3, degree=2, activation=activation, scheme=scheme, variant=variant)
    assert sc._autograd._keeps_preact(args[0], None, False, conv=True)
    assert not sc._autograd._keeps_preact(args[0], 1, False, conv=True)
    assert not sc._autograd._keeps_preact(args[0], None, True, conv=True)
    kept, replayed = run(*args, backend="cpu", **kw), run(*args, backend="cpu", checkpoint=1, **kw)
    assert_equal_results(kept, replayed)
    assert_match(args, **kw)
    fn = lambda x, w, b, s: sc.spline_ode_conv(x, w, b, s, backend="cpu", **kw)
    small = conv_inputs(sd, B=1, C=2, spatial={1: (4,), 2: (3, 3), 3: (2, 3, 2)}[sd])
    assert torch.autograd.gradcheck(fn, small, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sd,C", [(2, 3), (1, 40)])
def test_saved_ops_shapes_and_errors(bias, sd, C):
    """The ops that keep pre-activations: their shapes, the same states as spline_conv_fwd, and
    bad kept tensors rejected (their opcheck is in test_contract.py)."""
    x, w, b, s = detached(conv_inputs(sd, B=2, C=C, bias=bias))
    cfg = (4, 2, "tanh", "rk4", "symmetric", 0.0)
    fwd, bwd = torch.ops.splinet_cuda.spline_conv_fwd_saved, torch.ops.splinet_cuda.spline_conv_bwd_saved
    states, preact = fwd(x, w, b, s, *cfg)
    assert preact.shape == (4, 4, *x.shape)
    assert torch.equal(states, torch.ops.splinet_cuda.spline_conv_fwd(x, w, b, s, *cfg, 1))
    with pytest.raises(ValueError, match="preact"):
        bwd(states[-1], states, preact[:-1], w, b, s, *cfg)
    with pytest.raises(TypeError, match="preact"):
        bwd(states[-1], states, preact.float(), w, b, s, *cfg)
    with pytest.raises(ValueError, match="states"):
        bwd(states[-1], states[:-1], preact, w, b, s, *cfg)


def test_cpu_keeps_preactivations_only_for_a_backward(monkeypatch):
    """Inference (no_grad, or no input that needs a gradient) runs the plain forward op."""
    calls = []
    real = torch.ops.splinet_cuda.spline_conv_fwd_saved
    monkeypatch.setattr(sc._autograd.SplineConvSavedFunction, "forward",
                        staticmethod(lambda *a: calls.append(1) or (lambda st, pre: (st[-1].clone(), st, pre))(*real(*a))))
    x, w, b, s = conv_inputs(2, B=2, C=3)
    kw = dict(steps=2, degree=2, backend="cpu")
    with torch.no_grad():
        y0 = sc.spline_ode_conv(x, w, b, s, **kw)
    y1 = sc.spline_ode_conv(x.detach(), w.detach(), b.detach(), s.detach(), **kw)
    assert calls == []
    y2 = sc.spline_ode_conv(x, w, b, s, **kw)
    assert calls == [1]
    assert torch.equal(y0, y1) and torch.equal(y0, y2.detach())


def test_noncontiguous_inputs():
    x_big = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    x = x_big[:, :, :, ::2].detach().requires_grad_()  # (2, 3, 6, 5), stride 2
    w = (0.2 * torch.randn(4, 3, 3, 3, 3, dtype=torch.float64)).transpose(1, 2).detach().requires_grad_()
    b = torch.randn(3, 4, dtype=torch.float64).t().detach().requires_grad_()
    xl = torch.randn(2, 3, 6, 5, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous() or xl.is_contiguous())
    for xx in (x, xl):
        assert_match((xx, w, b, 0.7), steps=3, degree=2, activation="relu", scheme="rk4", variant="symmetric")


def test_empty_batch(backend, device):
    x, w, b, s = conv_inputs(2, B=0, device=device)
    y = sc.spline_ode_conv(x, w, b, s, steps=2, degree=2, backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and float(s.grad) == 0.0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("activation", ACTS)
def test_nan_propagates_like_reference(variant, activation):
    x, w, b, s = (t.detach() for t in conv_inputs(2, B=1, C=2))
    x[0, 0, 2, 2] = float("nan")
    kw = dict(steps=2, degree=2, activation=activation, variant=variant)
    got = sc.spline_ode_conv(x, w, b, s, backend="cpu", **kw)
    ref = sc.spline_ode_conv(x, w, b, s, backend="reference", **kw)
    assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().any()


def test_auto_picks_fused_on_cpu():
    from splinet_cuda._autograd import spline_ode_conv_fused
    from splinet_cuda._dispatch import _select

    for dt in (torch.float32, torch.float64):
        for sd in (1, 2, 3):
            x = torch.zeros((1, 1) + (3,) * sd, dtype=dt)
            assert _select("auto", "spline_ode_conv", x) is spline_ode_conv_fused


@pytest.mark.parametrize("sd,variant,scheme,activation", [(1, "standard", "euler", "tanh"),
                                                          (2, "symmetric", "rk4", "softplus"),
                                                          (3, "symmetric", "midpoint", "sigmoid")])
def test_gradcheck(backend, device, sd, variant, scheme, activation):
    spatial = {1: (5,), 2: (4, 3), 3: (3, 2, 3)}[sd]
    x, w, b, s = conv_inputs(sd, B=2, C=2, spatial=spatial, L=2, d=2, device=device)
    fn = lambda x, w, b, s: sc.spline_ode_conv(x, w, b, s, steps=3, degree=2, activation=activation, scheme=scheme,
                                               variant=variant, backend=backend, checkpoint=2)
    assert torch.autograd.gradcheck(fn, (x, w, b, s), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sd,variant,checkpoint", [(2, "symmetric", 1), (1, "standard", 2), (3, "standard", 1)])
def test_backward_last_only_gradient(backend, device, bias, sd, variant, checkpoint):
    """dLoss/dx_N alone (the layer's usual backward) gives the same gradients, bit for bit, as
    the full form with zeros for the other saved states."""
    x, w, b, s = detached(conv_inputs(sd, B=2, C=2, bias=bias, device=device))
    cfg = (3, 2, "tanh", "rk4", variant, 0.0, checkpoint)
    states = torch.ops.splinet_cuda.spline_conv_fwd(x, w, b, s, *cfg)
    bwd = torch.ops.splinet_cuda.spline_conv_bwd
    g_last = torch.randn_like(states[-1])
    full = torch.zeros_like(states)
    full[-1] = g_last
    with deterministic(device):
        assert_equal_results(bwd(g_last, states, w, b, s, *cfg), bwd(full, states, w, b, s, *cfg))


def test_deterministic(backend, device, dtype):
    args = conv_inputs(2, B=3, C=4, spatial=(70, 65), L=3, dtype=dtype, device=device)  # several blocks per plane
    kw = dict(steps=3, degree=2, activation="softplus", scheme="rk4", variant="symmetric")
    with deterministic(device):
        first = run(*args, backend=backend, **kw)
        second = run(*args, backend=backend, **kw)
    assert_equal_results(first, second)


# --------------------------------------------------------------------------------------
# Bad input to the raw ops: ValueError / TypeError, never a crash.
# --------------------------------------------------------------------------------------

def _raw_args():
    x, w, b, s = (t.detach() for t in conv_inputs(2, B=2, C=2))
    return dict(x=x, weight=w, bias=b, scale=s, steps=3, degree=2, activation="relu", scheme="euler",
                variant="standard", gamma=0.0, checkpoint=1)


BAD_FWD = {
    "x-2d": (ValueError, dict(x=torch.randn(2, 2, dtype=torch.float64))),
    "x-6d": (ValueError, dict(x=torch.randn(1, 2, 2, 2, 2, 2, dtype=torch.float64))),
    "x-int": (TypeError, dict(x=torch.ones(2, 2, 5, 4, dtype=torch.int64))),
    "x-half": (TypeError, dict(x=torch.randn(2, 2, 5, 4).half())),
    "weight-dims": (ValueError, dict(weight=torch.randn(4, 2, 2, 3, dtype=torch.float64))),
    "weight-channels": (ValueError, dict(weight=torch.randn(4, 3, 2, 3, 3, dtype=torch.float64))),
    "weight-even-kernel": (ValueError, dict(weight=torch.randn(4, 2, 2, 3, 2, dtype=torch.float64))),
    "weight-dtype": (TypeError, dict(weight=torch.randn(4, 2, 2, 3, 3))),
    "bias-shape": (ValueError, dict(bias=torch.randn(3, 2, dtype=torch.float64))),
    "bias-dtype": (TypeError, dict(bias=torch.randn(4, 2))),
    "scale-numel": (ValueError, dict(scale=torch.ones(2, dtype=torch.float64))),
    "scale-int": (TypeError, dict(scale=torch.tensor(1))),
    "scale-nan": (ValueError, dict(scale=torch.tensor(float("nan")))),
    "steps": (ValueError, dict(steps=0)),
    "degree-neg": (ValueError, dict(degree=-1)),
    "n<=degree": (ValueError, dict(degree=4)),
    "checkpoint": (ValueError, dict(checkpoint=0)),
    "activation": (ValueError, dict(activation="gelu")),
    "scheme": (ValueError, dict(scheme="rk45")),
    "variant": (ValueError, dict(variant="skew")),
    "antisymmetric": (ValueError, dict(variant="antisymmetric")),
}


@pytest.mark.parametrize("case", list(BAD_FWD))
def test_bad_input_fwd(case):
    exc, change = BAD_FWD[case]
    args = {**_raw_args(), **change}
    with pytest.raises(exc):
        torch.ops.splinet_cuda.spline_conv_fwd(*args.values())


@pytest.mark.parametrize("case", list(BAD_FWD) + ["states-count", "states-dims", "grad-shape", "grad-int"])
def test_bad_input_bwd(case):
    args = _raw_args()
    good = torch.ops.splinet_cuda.spline_conv_fwd(*args.values())
    x = args.pop("x")
    states, grad = good, torch.ones_like(good)
    if case in BAD_FWD:
        exc, change = BAD_FWD[case]
        if "x" in change:
            states = change["x"].unsqueeze(0).expand(4, *change["x"].shape)
            grad = torch.ones_like(states)
        else:
            args.update(change)
    else:
        exc = TypeError if case == "grad-int" else ValueError
        states = {"states-count": good[:3], "states-dims": x}.get(case, good)
        grad = {"grad-shape": good[1:], "grad-int": torch.ones(good.shape, dtype=torch.int64)}.get(
            case, torch.ones_like(states))
    with pytest.raises(exc):
        torch.ops.splinet_cuda.spline_conv_bwd(grad, states, *args.values())
