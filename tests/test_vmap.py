"""torch.func.vmap over the dense layer on the CPU: ensembles (weights, bias and scale mapped)
and per-sample gradients (the input mapped) run every model in one call of the model-dim ops
(spline_dense_fwd_models / _bwd_models), with results equal to a Python loop over the models
bit for bit and to the float64 reference within tolerance; the model-ensembling recipe
(stack_module_state + functional_call + vmap(grad)) end to end; the per-slice fallback."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

import splinet_cuda as sc
from splinet_cuda import _autograd
from helpers import (SCHEMES, VARIANTS, assert_all_close, assert_equal_results, dense_inputs, grid, grid_id,
                     num_threads, skip_unless, tolerance)

pytestmark = pytest.mark.usefixtures("_needs_model_ops")


@pytest.fixture
def _needs_model_ops():
    skip_unless("cpu", "spline_dense_fwd_models")


def _models(M, B, m, L, d, *, dtype, bias=True, seed=0):
    """M models' (x (M, B, m), weight (M, n, m, m), bias (M, n, m) or None, scale (M,)), each
    model drawn with its own seed and scale."""
    per = [dense_inputs(B, m, L, d, dtype=dtype, bias=bias, requires_grad=False, seed=seed + i, scale=0.7 + 0.3 * i)
           for i in range(M)]
    return tuple(None if per[0][j] is None else torch.stack([p[j] for p in per]) for j in range(4))


def _loss(out):
    """A nonlinear loss weighing each output element differently (a gradient in the wrong slot
    does not cancel)."""
    probe = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).reshape(out.shape)
    return (out.sin() * probe).sum()


def _fn(backend="auto", **kw):
    return lambda x, w, b, s: _loss(sc.spline_ode(x, w, b, s, backend=backend, **kw))


def _vmapped(fn, in_dims, tensors, M):
    """dL/dx, dL/dweight, dL/dbias (where there is one), dL/dscale of every model through
    vmap(grad): an unmapped tensor's gradient per model too (per-sample gradients)."""
    argnums = tuple(i for i, t in enumerate(tensors) if t is not None)
    return vmap(grad(fn, argnums=argnums), in_dims=in_dims)(*tensors)


def _looped(fn, in_dims, tensors, M):
    """The same, model after model, each a plain call (eager autograd) of the layer."""
    out = []
    for i in range(M):
        args = [t if d is None or t is None else t.select(d, i) for t, d in zip(tensors, in_dims)]
        args = [None if a is None else a.detach().clone().requires_grad_() for a in args]
        loss = fn(*args)
        out.append(torch.autograd.grad(loss, [a for a in args if a is not None]))
    return tuple(torch.stack([o[j] for o in out]) for j in range(len(out[0])))


NAMES = ["grad x", "grad weight", "grad bias (or scale)", "grad scale"]
CASES = grid(VARIANTS, SCHEMES, ["relu", "tanh", "softplus"])


@pytest.mark.parametrize("case", CASES, ids=grid_id)
def test_ensemble_matches_loop_and_reference(case, dtype):
    """An ensemble (weight, bias and scale mapped, x shared): vmap(grad) equals the loop over the
    models bit for bit, and the float64 reference's loop within the dtype's tolerance."""
    variant, scheme, act, degree, bias = case
    M, B, m, L = 3, 4, 3, 2
    x, w, b, s = _models(M, B, m, L, degree, dtype=dtype, bias=bias)
    x = x[0]
    kw = dict(steps=3, degree=degree, activation=act, scheme=scheme, variant=variant, gamma=0.1)
    in_dims = (None, 0, 0 if bias else None, 0)
    got = _vmapped(_fn(**kw), in_dims, (x, w, b, s), M)
    assert_equal_results(got, _looped(_fn(**kw), in_dims, (x, w, b, s), M))
    cast = lambda t: None if t is None else t.double()
    ref = _looped(_fn(backend="reference", **kw), in_dims, tuple(map(cast, (x, w, b, s))), M)
    assert_all_close(got, ref, NAMES, **tolerance(dtype))


# What vmap maps: everything, the models' tensors (the ensembling recipe), the input alone
# (per-sample gradients), the input along another dim than 0.
MAPPINGS = {"all": (0, 0, 0, 0), "models": (None, 0, 0, 0), "input": (0, None, None, None),
            "input-dim1": (1, None, None, None), "weight-only": (None, 0, None, None)}


@pytest.mark.parametrize("mapping", list(MAPPINGS))
@pytest.mark.parametrize("m,B", [(3, 5), (4, 300), (20, 6), (130, 3)], ids=["m3", "m4-soa", "m20-gemm", "m130-wide"])
def test_mappings_and_widths_equal_the_loop(mapping, m, B, dtype):
    """Every mapping, on the kernel's paths (raw loops, transposed chunks from B = 256, GEMMs,
    the one-chunk threaded path from m = 128), equals the loop over models bit for bit."""
    M = 3
    x, w, b, s = _models(M, B, m, 3, 2, dtype=dtype)
    in_dims = MAPPINGS[mapping]
    tensors = [t if d is not None else t[0] for t, d in zip((x, w, b, s), in_dims)]
    if in_dims[0] == 1:
        tensors[0] = tensors[0].transpose(0, 1).contiguous()
    kw = dict(steps=4, degree=2, activation="tanh", scheme="midpoint", variant="standard")
    got = _vmapped(_fn(**kw), in_dims, tuple(tensors), M)
    assert_equal_results(got, _looped(_fn(**kw), in_dims, tuple(tensors), M))


@pytest.mark.parametrize("M,B", [(1, 4), (4, 1), (1, 1)])
def test_one_model_and_one_row(M, B, dtype):
    x, w, b, s = _models(M, B, 4, 2, 1, dtype=dtype)
    kw = dict(steps=3, degree=1, activation="sigmoid", scheme="rk4")
    in_dims = (0, 0, 0, 0)
    got = _vmapped(_fn(**kw), in_dims, (x, w, b, s), M)
    assert_equal_results(got, _looped(_fn(**kw), in_dims, (x, w, b, s), M))


def test_threads_one_and_two():
    """The (model, chunk) tasks give the loop's results at any thread count."""
    x, w, b, s = _models(5, 40, 5, 3, 3, dtype=torch.float32)
    kw = dict(steps=6, degree=3, activation="relu")
    in_dims = (None, 0, 0, 0)
    for n in (1, 2):
        with num_threads(n):
            got = _vmapped(_fn(**kw), in_dims, (x[0], w, b, s), 5)
            assert_equal_results(got, _looped(_fn(**kw), in_dims, (x[0], w, b, s), 5))


def test_checkpointing_equals_the_loop(dtype):
    """A checkpointed layer (every K-th state kept, the rest recomputed) under vmap."""
    x, w, b, s = _models(3, 5, 4, 3, 2, dtype=dtype)
    kw = dict(steps=7, degree=2, activation="tanh", scheme="rk4", checkpoint=3)
    in_dims = (None, 0, 0, 0)
    got = _vmapped(_fn(**kw), in_dims, (x[0], w, b, s), 3)
    assert_equal_results(got, _looped(_fn(**kw), in_dims, (x[0], w, b, s), 3))


def test_trajectory_equals_the_loop(dtype):
    """return_trajectory=True under vmap and vmap(grad) (the trajectory's Function under
    torch.func, folded like x_N), against the loop, and torch.func.grad of the trajectory
    against the reference (for every layer: torch.func does not differentiate an op's
    torch.library autograd)."""
    x, w, b, s = _models(3, 5, 4, 3, 2, dtype=dtype)
    f = lambda w, b, s: sc.spline_ode(x[0], w, b, s, steps=4, degree=2, return_trajectory=True)
    got = vmap(f)(w, b, s)
    assert got.shape == (3, 5, 5, 4)
    for i in range(3):
        assert torch.equal(got[i], f(w[i], b[i], s[i]))
    loss = lambda x, w, b, s, backend="auto": _loss(sc.spline_ode(x, w, b, s, steps=4, degree=2, scheme="rk4",
                                                                  return_trajectory=True, backend=backend))
    in_dims = (None, 0, 0, 0)
    folded = _vmapped(loss, in_dims, (x[0], w, b, s), 3)
    assert_equal_results(folded, _looped(loss, in_dims, (x[0], w, b, s), 3))
    ref = _vmapped(lambda *a: loss(*a, backend="reference"), in_dims, tuple(t.double() for t in (x[0], w, b, s)), 3)
    assert_all_close(folded, ref, NAMES, **tolerance(dtype))


@pytest.mark.parametrize("layer", ["conv", "hamiltonian"])
def test_trajectory_gradient_of_the_other_layers(layer):
    """torch.func.grad of the conv and Hamiltonian trajectories (no model-dim ops: vmap loops)."""
    if layer == "conv":
        x, w = torch.randn(1, 2, 4, 4, dtype=torch.float64), 0.3 * torch.randn(3, 2, 2, 3, 3, dtype=torch.float64)
        run = lambda w, backend: sc.spline_ode_conv(x, w, None, 1.0, steps=2, degree=1, return_trajectory=True,
                                                    backend=backend)
    else:
        x, w = torch.randn(3, 4, dtype=torch.float64), 0.3 * torch.randn(3, 2, 4, 4, dtype=torch.float64)
        run = lambda w, backend: torch.cat(sc.spline_ode_hamiltonian(x, x, w, None, 1.0, steps=3, degree=1,
                                                                     return_trajectory=True, backend=backend))
    got = vmap(grad(lambda w: _loss(run(w, "auto"))))(torch.stack([w, 1.5 * w]))
    for i, wi in enumerate((w, 1.5 * w)):
        torch.testing.assert_close(got[i], grad(lambda w: _loss(run(w, "reference")))(wi), rtol=1e-10, atol=1e-12)


def test_gradient_outside_vmap():
    """torch.autograd (or grad) above a vmap differentiates the model-dim ops themselves: a
    mapped tensor gets each model's gradient, a shared one their sum."""
    x, w, b, s = _models(3, 5, 4, 3, 2, dtype=torch.float64)
    w = w.requires_grad_()
    shared = b[0].clone().requires_grad_()
    kw = dict(steps=4, degree=2, activation="softplus", scheme="midpoint")
    y = vmap(lambda w: sc.spline_ode(x[0], w, shared, 1.1, **kw))(w)
    gw, gb = torch.autograd.grad(_loss(y), (w, shared))
    ys = torch.stack([sc.spline_ode(x[0], w[i], shared, 1.1, **kw) for i in range(3)])
    rw, rb = torch.autograd.grad(_loss(ys), (w, shared))
    assert torch.equal(gw, rw)
    torch.testing.assert_close(gb, rb, rtol=1e-13, atol=1e-14)  # the models' sum in another order


def _one_call(fn, *args):
    """fn(*args) and the splinet_cuda ops it ran (names, with repeats)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return out, sorted(e.name for e in prof.events() if e.name.startswith("splinet_cuda::"))


def test_the_models_run_in_one_call():
    """An ensemble's vmap(grad) runs one forward and one backward of the model-dim ops, never
    the single-model ops once per model."""
    x, w, b, s = _models(6, 5, 4, 3, 2, dtype=torch.float32)
    fn = vmap(grad(_fn(steps=4, degree=2), argnums=(1, 2, 3)), in_dims=(None, 0, 0, 0))
    _, ops = _one_call(fn, x[0], w, b, s)
    calls = [op for op in ops if op.endswith("_models")]
    assert calls == ["splinet_cuda::spline_dense_bwd_models", "splinet_cuda::spline_dense_fwd_models"], ops
    assert "splinet_cuda::spline_dense_fwd" not in ops


def _ensemble(M, width, dtype, **kw):
    torch.manual_seed(0)
    return [torch.nn.Sequential(torch.nn.Linear(2, width, dtype=dtype),
                                sc.SplineODE(width, 3, 2, 8, activation="relu", learn_scale=True, dtype=dtype, **kw),
                                torch.nn.Linear(width, 1, dtype=dtype)) for _ in range(M)]


@pytest.mark.parametrize("checkpoint", [None, 2])
def test_ensembling_recipe(checkpoint, dtype):
    """PyTorch's model-ensembling recipe over networks with a SpliNet layer: stack_module_state,
    functional_call on a meta-device copy, vmap of the forward and of grad, with no per-slice
    fallback warning; every model's output and gradients equal its own training step's (to
    rounding: torch's Linear layers round differently under vmap; the SpliNet layer alone is
    bit for bit, above)."""
    models = _ensemble(4, 5, dtype, checkpoint=checkpoint)
    for i, net in enumerate(models):  # distinct scales, so a mix-up of models shows
        with torch.no_grad():
            net[1].scale.fill_(0.6 + 0.2 * i)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x, y = torch.randn(16, 2, dtype=dtype), torch.randn(16, 1, dtype=dtype)

    def loss(p, bufs, x, y):
        return torch.nn.functional.mse_loss(functional_call(base, (p, bufs), (x,)), y)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "have not yet implemented the batching rule"
        out = vmap(lambda p, bufs: functional_call(base, (p, bufs), (x,)), in_dims=(0, 0))(params, buffers)
        grads = vmap(grad(loss), in_dims=(0, 0, None, None))(params, buffers, x, y)
    for i, net in enumerate(models):
        net.zero_grad()
        torch.testing.assert_close(out[i], net(x).detach(), **tolerance(dtype))
        torch.nn.functional.mse_loss(net(x), y).backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, **tolerance(dtype), msg=name)


def test_per_sample_gradients(dtype):
    """vmap(grad(loss), in_dims=(None, 0, 0)): the weights shared, each sample's gradient its
    own (the backward keeps a model dimension; a batch folded into one model would sum them)."""
    net = _ensemble(1, 4, dtype)[0]
    params = {k: v.detach() for k, v in net.named_parameters()}
    x, y = torch.randn(9, 2, dtype=dtype), torch.randn(9, 1, dtype=dtype)

    def loss(p, xi, yi):
        return torch.nn.functional.mse_loss(functional_call(net, p, (xi[None],)), yi[None])

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(x.shape[0]):
        net.zero_grad()
        loss(dict(net.named_parameters()), x[i], y[i]).backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, **tolerance(dtype), msg=name)


def test_fallback_loop_is_correct(monkeypatch):
    """Without the model-dim ops (another device, a build without them) the rules run the layer
    once per slice, with the same results."""
    x, w, b, s = _models(3, 5, 4, 3, 2, dtype=torch.float64)
    kw = dict(steps=4, degree=2, activation="tanh")
    in_dims = (None, 0, 0, 0)
    folded = _vmapped(_fn(**kw), in_dims, (x[0], w, b, s), 3)
    monkeypatch.setattr(_autograd, "_HAS_MODEL_OPS", False)
    _, ops = _one_call(lambda: _vmapped(_fn(**kw), in_dims, (x[0], w, b, s), 3))
    assert not any(op.endswith("_models") for op in ops), ops
    looped = _vmapped(_fn(**kw), in_dims, (x[0], w, b, s), 3)
    assert_equal_results(looped, folded)


def test_compile_of_the_vmapped_forward():
    """torch.compile(fullgraph=True) of vmap of the layer, autograd outside it: the forward op's
    vmap rule and the model-dim ops' fakes and autograd. (torch.compile of vmap(grad(...)) is
    not supported: Dynamo does not trace a Function under torch.func's grad.)"""
    x, w, b, s = _models(3, 5, 4, 3, 2, dtype=torch.float64)
    w = w.requires_grad_()
    f = vmap(lambda w, b, s: sc.spline_ode(x[0], w, b, s, steps=4, degree=2, activation="relu"))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(w, b, s), f(w, b, s)
    assert torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(_loss(got), w)[0], torch.autograd.grad(_loss(want), w)[0])


def test_validation_under_vmap():
    """A non-finite plain scale is still rejected under vmap; a vmapped scale is not read (its
    values are per slice); mismatched model counts of a direct op call name the argument."""
    x, w, b, s = _models(3, 5, 4, 3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="scale must be finite"):
        vmap(lambda x: sc.spline_ode(x, w[0], b[0], torch.tensor(float("nan"), dtype=torch.float64), steps=2,
                                     degree=2))(x)
    out = vmap(lambda s: sc.spline_ode(x[0], w[0], b[0], s, steps=2, degree=2))(torch.tensor([1.0, float("inf")],
                                                                                         dtype=torch.float64))
    assert out[0].isfinite().all()
    states = torch.ops.splinet_cuda.spline_dense_fwd_models(x, w, b, s, 2, 2, "tanh", "euler", "standard", 0.0, 1)
    cfg = (2, 2, "tanh", "euler", "standard", 0.0, 1)
    for name, args in (("weight", (x, w[:2], b, s)), ("bias", (x, w, b[:2], s)), ("scale", (x, w, b, s[:2])),
                       ("x", (x[:2], w, b, s))):
        with pytest.raises(ValueError, match=name):
            torch.ops.splinet_cuda.spline_dense_fwd_models(*args, *cfg)
    with pytest.raises(ValueError, match="states"):
        torch.ops.splinet_cuda.spline_dense_bwd_models(states[:, -1], states[:2], w, b, s, *cfg)
    with pytest.raises(ValueError, match="x must have shape"):
        torch.ops.splinet_cuda.spline_dense_fwd_models(x[0], w, b, s, *cfg)


def test_nested_vmap_equals_the_loop():
    """Per-sample gradients of every model of an ensemble (vmap of vmap): the inner vmap folds,
    the outer runs it once per model (the model-dim ops take one model dimension)."""
    x, w, b, s = _models(3, 4, 3, 3, 2, dtype=torch.float64)
    f = lambda x, w, b, s: _loss(sc.spline_ode(x[None], w, b, s, steps=3, degree=2))
    per_sample = vmap(grad(f, argnums=1), in_dims=(0, None, None, None))
    got = vmap(per_sample, in_dims=(None, 0, 0, 0))(x[0], w, b, s)
    for i in range(3):
        for j in range(4):
            assert torch.equal(got[i, j], grad(f, argnums=1)(x[0, j], w[i], b[i], s[i]))


@pytest.mark.parametrize("make,x", [
    (lambda: sc.SplineODEConv2d(2, 3, 2, 1, 3, learn_scale=True), (2, 2, 4, 4)),
    (lambda: sc.SplineODEHamiltonian(4, 2, 1, 3, learn_scale=True), (3, 4)),
    (lambda: sc.SplineODE(4, 2, 1, 3, learn_scale=True, backend="reference"), (3, 4)),
], ids=["conv2d", "hamiltonian", "reference"])
def test_recipe_on_the_other_layers_runs_per_slice(make, x):
    """The recipe on the layers without model-dim ops (the vmapped scale passes validation;
    the layer runs once per slice): every model's gradients equal its own."""
    models = [make() for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(*x)
    loss = lambda p, b, x: functional_call(base, (p, b), (x,)).square().sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's loop of a backward op without a vmap rule
        grads = vmap(grad(loss), in_dims=(0, 0, None))(params, buffers, x)
    for i, net in enumerate(models):
        net.zero_grad()
        net(x).square().sum().backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, **tolerance(torch.float32), msg=name)


@pytest.mark.parametrize("M", [7, 300], ids=["rows", "transposed-chunks"])
@pytest.mark.parametrize("m", [3, 4, 12])
@pytest.mark.parametrize("variant", VARIANTS)
def test_per_sample_rows_equal_the_loop(M, m, variant, dtype):
    """Per-sample gradients (one row a sample, the weights, bias and scale shared) run the
    samples as one batch with per-row gradients: equal to the loop over samples bit for bit
    for identity, relu and tanh; for sigmoid and softplus to rounding (their vectorised exp
    over the whole batch rounds apart from a one-row call's scalar loop in the last bit)."""
    x, w, b, s = _models(1, M, m, 3, 2, dtype=dtype)
    x, w, b, s = x[0], w[0], b[0], s[0]
    for act in ("relu", "tanh", "sigmoid", "softplus"):
        kw = dict(steps=5, degree=2, activation=act, scheme="midpoint", variant=variant, gamma=0.1)
        f = lambda x, w, b, s: _fn(**kw)(x[None], w, b, s)
        in_dims = (0, None, None, None)
        got = _vmapped(f, in_dims, (x, w, b, s), M)
        want = _looped(f, in_dims, (x, w, b, s), M)
        if act in ("relu", "tanh"):
            assert_equal_results(got, want)
        else:
            assert_all_close(got, want, NAMES, **tolerance(dtype))


def test_per_sample_with_checkpoint_and_full_grad_states():
    """The per-row path with checkpointing, and with a gradient of every saved state (the
    trajectory's, above the vmap)."""
    x, w, b, s = _models(1, 9, 4, 3, 2, dtype=torch.float64)
    x, w, b, s = x[0], w[0], b[0], s[0]
    kw = dict(steps=7, degree=2, activation="tanh", scheme="rk4", checkpoint=3)
    f = lambda x, w, b, s: _fn(**kw)(x[None], w, b, s)
    in_dims = (0, None, None, None)
    assert_equal_results(_vmapped(f, in_dims, (x, w, b, s), 9), _looped(f, in_dims, (x, w, b, s), 9))
    w = w.clone().requires_grad_()
    traj = vmap(lambda xi: sc.spline_ode(xi[None], w, b, s, steps=4, degree=2, return_trajectory=True))(x)
    (gw,) = torch.autograd.grad(_loss(traj), w)
    ref = torch.stack([sc.spline_ode(x[i][None], w, b, s, steps=4, degree=2, return_trajectory=True)
                       for i in range(9)])
    torch.testing.assert_close(gw, torch.autograd.grad(_loss(ref), w)[0], rtol=1e-12, atol=1e-14)


def test_jacrev_folds_the_cotangents():
    """jacrev: the forward runs once outside the vmap (keeping its stage values), the backward
    is vmapped over the cotangents and runs in one model-dim call from the saved states; equal
    to one vjp per cotangent bit for bit."""
    x, w, b, s = _models(1, 3, 4, 3, 2, dtype=torch.float64)
    x, w, b, s = x[0], w[0], b[0], s[0]
    f = lambda x, w, b: sc.spline_ode(x, w, b, s, steps=4, degree=2, scheme="rk4", activation="softplus")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, ops = _one_call(lambda: torch.func.jacrev(f, argnums=(0, 1, 2))(x, w, b))
        jac = torch.func.jacrev(f, argnums=(0, 1, 2))(x, w, b)
    assert "splinet_cuda::spline_dense_bwd_models" in ops, ops
    _, vjp = torch.func.vjp(f, x, w, b)
    basis = torch.eye(x.numel(), dtype=x.dtype).reshape(-1, *x.shape)
    rows = [vjp(e) for e in basis]
    for k in range(3):
        want = torch.stack([r[k] for r in rows]).reshape(jac[k].shape)
        assert torch.equal(jac[k], want)
