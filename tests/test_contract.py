"""The PyTorch contract of every op on every backend that registers it: torch.library.opcheck
(schema, fake/meta kernels, autograd registration, AOT dispatch), torch.compile(fullgraph=True)
of the layers built on the ops, and torch.func (vmap of grad, jacrev) through the layers'
autograd Functions. One table of ops x sample inputs (OPS) feeds the opcheck tests, one of
layers (LAYERS) the compile tests; shapes are tiny (the Triton ops run under the interpreter
without a GPU, and opcheck and torch.compile cost seconds per case)."""
from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

import splinet_cuda as sc
from helpers import (backend_device, check_model_compiles, conv_inputs, dense_inputs, detached, skip_unless)

# --- the op table ------------------------------------------------------------------------


class Sample(NamedTuple):
    """Sample inputs of one op pair: ``build(fwd, bwd, device)`` returns {call: (op, args)}
    for each opcheck case in ``calls`` (the forward, the backward with a gradient for every
    saved state, the backward with dLoss/dx_N alone)."""
    id: str
    calls: tuple
    build: Callable


class OpInfo(NamedTuple):
    """An op pair (forward, backward) of one backend, the name of its C++ op (whose kernel for
    the backend's dispatch key must exist), and its samples."""
    name: str
    backend: str
    cpp_op: str | None
    ops: Callable[[], tuple]
    samples: tuple


def _req(t):
    return None if t is None else t.detach().clone().requires_grad_()


def _pair(fwd_args, cfg, fwd, bwd, *, calls, fwd_extra=(), bwd_extra=None, grad_inputs=True):
    """The forward's args (requiring grad when ``grad_inputs``, so opcheck tests the autograd
    registration) and the backward's on the forward's states; ``*_extra`` trail the layer
    arguments (the emulation's path and launch shape)."""
    x, w, b, s = detached(fwd_args)
    bwd_extra = fwd_extra if bwd_extra is None else bwd_extra
    states = fwd(x, w, b, s, *cfg, *fwd_extra)
    states = states[0] if isinstance(states, (tuple, list)) else states
    fa = tuple(map(_req, (x, w, b, s))) if grad_inputs else (x, w, b, s)
    out = {"fwd": (fwd.default, fa + cfg + tuple(fwd_extra)),
           "bwd": (bwd.default, (torch.randn_like(states), states, w, b, s) + cfg + tuple(bwd_extra)),
           "bwd-last": (bwd.default, (torch.randn_like(states[-1]), states, w, b, s) + cfg + tuple(bwd_extra))}
    return {c: out[c] for c in calls}


def _saved_pair(fwd_args, cfg, fwd, bwd, *, calls):
    """The saved-activation ops: the backward also takes the kept tensors."""
    x, w, b, s = detached(fwd_args)
    states, *kept = fwd(x, w, b, s, *cfg)
    out = {"fwd": (fwd.default, (x, w, b, s) + cfg),
           "bwd": (bwd.default, (torch.randn_like(states), states, *kept, w, b, s) + cfg),
           "bwd-last": (bwd.default, (torch.randn_like(states[-1]), states, *kept, w, b, s) + cfg)}
    return {c: out[c] for c in calls}


ALL = ("fwd", "bwd", "bwd-last")
FWD_BWD = ("fwd", "bwd")


def _dense_samples():
    # bias on and off; a width of the small loops and one of the GEMM path; checkpointing.
    out = []
    for bias in (True, False):
        for m, ck in ((3, 1), (3, 2), (48, 1)):
            build = lambda fwd, bwd, dev, bias=bias, m=m, ck=ck: _pair(
                dense_inputs(3, m, 2, 2, device=dev, bias=bias), (5, 2, "tanh", "rk4", "symmetric", 0.0, ck),
                fwd, bwd, calls=ALL)
            out.append(Sample(f"{'b' if bias else 'nob'}-m{m}-ck{ck}", ALL, build))
    return tuple(out)


def _dense_saved_samples():
    out = []
    for bias in (True, False):
        for m in (3, 48):
            build = lambda fwd, bwd, dev, bias=bias, m=m: _saved_pair(
                dense_inputs(3, m, 2, 2, device=dev, bias=bias), (4, 2, "tanh", "rk4", "symmetric", 0.0), fwd, bwd,
                calls=ALL)
            out.append(Sample(f"{'b' if bias else 'nob'}-m{m}", ALL, build))
    return tuple(out)


def _models_pair(M, m, bias, shared, cfg, B=2):
    """The model-dim ops: M models' x (M, B, m), weight (M, n, m, m), bias (M, n, m), scale (M,);
    ``shared`` names those given once (a leading dim of 1) for every model."""
    per = [dense_inputs(B, m, 2, 2, bias=bias, requires_grad=False, seed=i, scale=0.8 + 0.1 * i) for i in range(M)]
    x, w, b, s = (None if per[0][j] is None else torch.stack([p[j] for p in per]) for j in range(4))
    w, b, s = (t[:1] if t is not None and name in shared else t for t, name in ((w, "w"), (b, "b"), (s, "s")))
    fwd, bwd = torch.ops.splinet_cuda.spline_dense_fwd_models, torch.ops.splinet_cuda.spline_dense_bwd_models
    states = fwd(x, w, b, s, *cfg)
    return {"fwd": (fwd.default, tuple(map(_req, (x, w, b, s))) + cfg),
            "bwd": (bwd.default, (torch.randn_like(states), states, w, b, s) + cfg),
            "bwd-last": (bwd.default, (torch.randn_like(states[:, -1]), states, w, b, s) + cfg)}


def _dense_models_samples():
    # an ensemble (every tensor per model), a shared weight, per-sample gradients' shape (one
    # row a model, everything else shared: the per-row path); bias on and off; the raw loops
    # and the GEMM path; checkpointing
    out = []
    for bias, shared, m, ck, B in ((True, "", 3, 1, 2), (False, "", 3, 2, 2), (True, "w", 3, 1, 2),
                                   (True, "", 20, 2, 2), (True, "wbs", 3, 2, 1), (False, "ws", 4, 1, 1)):
        build = lambda fwd, bwd, dev, bias=bias, shared=shared, m=m, ck=ck, B=B: _models_pair(
            3, m, bias, shared, (3, 2, "tanh", "midpoint", "antisymmetric", 0.1, ck), B=B)
        out.append(Sample(f"{'b' if bias else 'nob'}-shared{shared or '-none'}-m{m}-ck{ck}-B{B}", ALL, build))
    return tuple(out)


def _conv_samples():
    out = []
    for bias in (True, False):
        for sd, variant, ck in ((2, "symmetric", 1), (1, "standard", 2), (3, "standard", 1)):
            build = lambda fwd, bwd, dev, bias=bias, sd=sd, variant=variant, ck=ck: _pair(
                conv_inputs(sd, B=2, C=2, bias=bias, device=dev), (3, 2, "tanh", "rk4", variant, 0.0, ck), fwd, bwd,
                calls=FWD_BWD)
            out.append(Sample(f"{'b' if bias else 'nob'}-{sd}d-{variant}-ck{ck}", FWD_BWD, build))
    return tuple(out)


def _conv_saved_samples():
    out = []
    for bias in (True, False):
        for sd, C in ((2, 3), (1, 40)):
            build = lambda fwd, bwd, dev, bias=bias, sd=sd, C=C: _saved_pair(
                conv_inputs(sd, B=2, C=C, bias=bias, device=dev), (4, 2, "tanh", "rk4", "symmetric", 0.0), fwd, bwd,
                calls=ALL)
            out.append(Sample(f"{'b' if bias else 'nob'}-{sd}d-C{C}", ALL, build))
    return tuple(out)


def _hamiltonian_inputs(dev, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64, generator=g)  # x = [y | z], m = 3
    w = 0.4 * torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=g)
    b = 0.3 * torch.randn(4, 2, 3, dtype=torch.float64, generator=g) if bias else None
    return tuple(None if t is None else t.to(dev) for t in (x, w, b, torch.tensor(0.9, dtype=torch.float64)))


HAMILTONIAN_SAMPLES = tuple(
    Sample(f"{'b' if bias else 'nob'}-ck{ck}", ALL,
           lambda fwd, bwd, dev, bias=bias, ck=ck: _pair(_hamiltonian_inputs(dev, bias),
                                                         (7, 2, "tanh", "verlet", "hamiltonian", 0.0, ck), fwd, bwd,
                                                         calls=ALL))
    for bias, ck in ((True, 1), (False, 3)))

TRITON_DENSE_SAMPLES = tuple(
    Sample(f"{'b' if bias else 'nob'}-ck{ck}", FWD_BWD,
           lambda fwd, bwd, dev, bias=bias, ck=ck: _pair(dense_inputs(3, 3, 2, 2, device=dev, bias=bias),
                                                         (3, 2, "tanh", "rk4", "symmetric", 0.1, ck), fwd, bwd,
                                                         calls=FWD_BWD))
    for bias, ck in ((True, 1), (False, 2)))

TRITON_CONV_SAMPLES = (
    Sample("b-1x2x3x3", FWD_BWD,
           lambda fwd, bwd, dev: _pair(conv_inputs(2, B=1, C=2, spatial=(3, 3), d=1, device=dev),
                                       (2, 1, "tanh", "euler", "symmetric", 0.0, 1), fwd, bwd, calls=FWD_BWD)),)

# The emulation's trailing arguments: path (1 small / direct, 2 large / cuDNN, 3 fused
# GEMM), tile rows (dense) or none (conv), blocks, threads.
EMULATED_DENSE_SAMPLES = (
    Sample("small-fwd-large-bwd", FWD_BWD,
           lambda fwd, bwd, dev: _pair(dense_inputs(3, 4, 2, 1, device=dev), (4, 1, "tanh", "rk4", "standard", 0.0, 2),
                                       fwd, bwd, calls=FWD_BWD, fwd_extra=(1, 2, 1, 1), bwd_extra=(2, 0, 0, 1),
                                       grad_inputs=False)),
    Sample("fused-gemm", ("bwd",),
           lambda fwd, bwd, dev: _pair(dense_inputs(3, 4, 2, 1, device=dev), (4, 1, "tanh", "rk4", "standard", 0.0, 2),
                                       fwd, bwd, calls=("bwd",), fwd_extra=(1, 2, 1, 1), bwd_extra=(3, 64, 0, 1),
                                       grad_inputs=False)),
)
EMULATED_CONV_SAMPLES = tuple(
    Sample(name, FWD_BWD,
           lambda fwd, bwd, dev, path=path: _pair(
               conv_inputs(1, B=2, C=3, spatial=(9,), d=1, k=3, device=dev, wscale=0.3, scale=1.2),
               (3, 1, "tanh", "euler", "standard", 0.0, 2), fwd, bwd, calls=FWD_BWD, fwd_extra=(path, 1, 1),
               grad_inputs=False))
    for name, path in (("direct", 1), ("cudnn", 2)))


def _cpp(fwd, bwd):
    return lambda: (getattr(torch.ops.splinet_cuda, fwd), getattr(torch.ops.splinet_cuda, bwd))


def _triton(kind):
    def ops():
        from splinet_cuda import _triton

        return _triton.OPS[kind]["interp"]
    return ops


def _emulated(layer):
    def ops():
        import emulation

        return tuple(getattr(emulation.ops, f"cuda_{layer}_{half}_emulated") for half in ("fwd", "bwd"))
    return ops


OPS = [
    *(OpInfo("dense", b, "spline_dense_fwd", _cpp("spline_dense_fwd", "spline_dense_bwd"), _dense_samples())
      for b in ("cpu", "cuda")),
    OpInfo("dense", "triton", None, _triton("dense"), TRITON_DENSE_SAMPLES),
    OpInfo("dense", "cuda-emulated", None, _emulated("dense"), EMULATED_DENSE_SAMPLES),
    OpInfo("dense_models", "cpu", "spline_dense_fwd_models", _cpp("spline_dense_fwd_models", "spline_dense_bwd_models"),
           _dense_models_samples()),
    OpInfo("dense_saved", "cpu", "spline_dense_fwd_saved", _cpp("spline_dense_fwd_saved", "spline_dense_bwd_saved"),
           _dense_saved_samples()),
    *(OpInfo("conv", b, "spline_conv_fwd", _cpp("spline_conv_fwd", "spline_conv_bwd"), _conv_samples())
      for b in ("cpu", "cuda")),
    OpInfo("conv", "triton", None, _triton("conv"), TRITON_CONV_SAMPLES),
    OpInfo("conv", "cuda-emulated", None, _emulated("conv"), EMULATED_CONV_SAMPLES),
    OpInfo("conv_saved", "cpu", "spline_conv_fwd_saved", _cpp("spline_conv_fwd_saved", "spline_conv_bwd_saved"),
           _conv_saved_samples()),
    OpInfo("hamiltonian", "cpu", "spline_hamiltonian_fwd",
           _cpp("spline_hamiltonian_fwd", "spline_hamiltonian_bwd"), HAMILTONIAN_SAMPLES),
]

OPCHECK_CASES = [pytest.param(info, sample, call, id=f"{info.name}-{info.backend}-{sample.id}-{call}")
                 for info in OPS for sample in info.samples for call in sample.calls]


def _skip_unless_registered(info: OpInfo) -> None:
    skip_unless(info.backend, info.cpp_op)
    if info.backend == "triton":
        from splinet_cuda import _triton

        if info.name not in _triton.OPS:
            pytest.skip(f"the triton backend registers no {info.name} ops")


@pytest.mark.parametrize("info,sample,call", OPCHECK_CASES)
def test_opcheck(info, sample, call):
    _skip_unless_registered(info)
    fwd, bwd = info.ops()
    op, args = sample.build(fwd, bwd, backend_device(info.backend))[call]
    torch.library.opcheck(op, args)


BASIS_SAMPLES = {"f64-knots4-d3": (torch.float64, 4, 3), "f32-knots1-d0": (torch.float32, 1, 0)}


@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)
@pytest.mark.parametrize("sample", list(BASIS_SAMPLES))
@pytest.mark.backend_op("basis_table")
def test_opcheck_basis_table(backend, device, sample):
    dtype, knots, degree = BASIS_SAMPLES[sample]
    t = torch.rand(9, dtype=torch.float64).to(dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.splinet_cuda.basis_table.default, (t, knots, degree))


# --- torch.compile ----------------------------------------------------------------------------

WIDE = 128  # the CPU dense kernel's one-chunk path, which keeps pre-activations for the backward


def _dense_model(backend, device, width=6):
    layer = sc.SplineODE(width, knots=3, degree=2, steps=4, activation="tanh", scheme="rk4", learn_scale=True,
                         backend=backend, dtype=torch.float64, device=device)
    model = torch.nn.Sequential(layer, torch.nn.Linear(width, 2, dtype=torch.float64, device=device))
    return model, torch.randn(5, width, dtype=torch.float64, device=device)


def _conv_model(backend, device):
    layer = sc.SplineODEConv2d(2, 3, knots=2, degree=1, steps=2, activation="relu", learn_scale=True,
                               backend=backend, dtype=torch.float64, device=device)
    return layer, torch.randn(1, 2, 3, 3, dtype=torch.float64, device=device)


def _hamiltonian_model(backend, device):
    layer = sc.SplineODEHamiltonian(6, knots=3, degree=2, steps=4, activation="tanh", learn_scale=True,
                                    backend=backend, dtype=torch.float64, device=device)
    model = torch.nn.Sequential(layer, torch.nn.Linear(6, 2, dtype=torch.float64, device=device))
    return model, torch.randn(5, 6, dtype=torch.float64, device=device)


# layer, backend, C++ op the backend needs (None: the Python backend's own check), model builder
LAYERS = [
    ("dense", "cpu", "spline_dense_fwd", _dense_model),
    ("dense", "cuda", "spline_dense_fwd", _dense_model),
    ("dense", "triton", None, lambda b, d: _dense_model(b, d, width=5)),
    ("dense-wide", "cpu", "spline_dense_fwd_saved", lambda b, d: _dense_model(b, d, width=WIDE)),
    ("conv2d", "cpu", "spline_conv_fwd", _conv_model),
    ("conv2d", "cuda", "spline_conv_fwd", _conv_model),
    ("conv2d", "triton", None, _conv_model),
    ("hamiltonian", "cpu", "spline_hamiltonian_fwd", _hamiltonian_model),
]


@pytest.mark.parametrize("layer,backend_name,cpp_op,build", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in LAYERS])
def test_compile_fullgraph(layer, backend_name, cpp_op, build):
    """Loss and parameter gradients agree eagerly and under torch.compile(fullgraph=True)
    (aot_eager: graph capture, the ops' fakes, autograd)."""
    skip_unless(backend_name, cpp_op)
    check_model_compiles(*build(backend_name, backend_device(backend_name)))


@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)
@pytest.mark.backend_op("basis_table")
def test_compile_fullgraph_basis_table(backend, device):
    t = torch.rand(7, dtype=torch.float64, device=device)
    fn = lambda t: torch.ops.splinet_cuda.basis_table(t, 4, 2)
    torch._dynamo.reset()
    for a, c in zip(fn(t), torch.compile(fn, fullgraph=True, backend="aot_eager")(t)):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", ["cpu", "reference"], indirect=True)
def test_no_graph_breaks(backend):
    """The layers as users compile them (default Inductor): no graph break, dense and conv."""
    x = torch.randn(6, 4)
    for layer, inp in ((sc.SplineODE(4, 2, 1, 3, variant="antisymmetric", gamma=0.1, backend=backend), x),
                       (sc.SplineODEConv2d(2, 3, 2, 1, 2, backend=backend), torch.randn(2, 2, 4, 4))):
        explained = torch._dynamo.explain(layer)(inp)
        assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]


def test_dynamic_fullgraph_inductor_matches_eager_and_steps_do_not_recompile():
    """Inductor, fullgraph=True, dynamic=True (a symbolic float gamma and symbolic sizes once
    broke the validator), and a new `steps` value reusing the graph on the fused backend (steps
    is a SymInt of the ops) instead of recompiling until Dynamo gives up."""
    skip_unless("cpu")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), sc.SplineODE(4, 2, 2, 5, variant="antisymmetric", gamma=0.1))
    compiled = torch.compile(lambda x, n: model[1](model[0](x), steps=n), dynamic=True, fullgraph=True)
    for B, n in ((8, 5), (13, 7), (5, 3)):
        x = torch.randn(B, 3)
        got = compiled(x, n)
        want = model[1](model[0](x), steps=n)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        g_got = torch.autograd.grad(got.square().sum(), model[1].weight)[0]
        g_want = torch.autograd.grad(want.square().sum(), model[1].weight)[0]
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


# --- torch.func -------------------------------------------------------------------------------

DT = torch.float64


@pytest.mark.parametrize("layer_fn, shape", [
    (lambda backend: sc.SplineODE(4, 2, 2, 3, variant="symmetric", learn_scale=True, backend=backend), (4,)),
    (lambda backend: sc.SplineODEConv2d(2, 3, 2, 1, 2, backend=backend), (2, 4, 4)),
    # the one-chunk path (threaded GEMMs)
    (lambda backend: sc.SplineODE(WIDE, 1, 1, 2, backend=backend), (WIDE,)),
], ids=["dense", "conv2d", "dense-wide"])
@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)
def test_vmap_per_sample_gradients(backend, device, layer_fn, shape):
    """Per-sample gradients (vmap of grad) through the Functions' vmap rules equal a loop (the
    dense layer's on the CPU fold the samples into one call: tests/test_vmap.py)."""
    layer = layer_fn(backend).to(device=device, dtype=DT)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(5, *shape, dtype=DT, device=device)

    def loss(p, xi):
        return functional_call(layer, p, (xi[None],)).square().sum()

    if len(shape) > 1:  # the conv backward op has no vmap rule: torch loops it, and says so
        with pytest.warns(UserWarning, match="batching rule"):
            per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    else:  # the dense ops' vmap rules: one call of the model-dim ops, or a loop of their own
        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        layer.zero_grad()
        loss(dict(layer.named_parameters()), x[i]).backward()
        for name, p in layer.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"], indirect=True)
def test_jacrev_matches_the_reference(backend, device):
    torch.manual_seed(1)
    B, m = (1, 2) if backend == "triton" else (3, 4)  # each Jacobian row is a backward: few under the interpreter
    x = torch.randn(B, m, dtype=DT, device=device)
    w, b = 0.4 * torch.randn(4, m, m, dtype=DT, device=device), 0.2 * torch.randn(4, m, dtype=DT, device=device)
    kw = dict(steps=3, degree=2, scheme="rk4", variant="antisymmetric", gamma=0.1)
    J = jacrev(lambda xx, ww: sc.spline_ode(xx, ww, b, 0.9, backend=backend, **kw), argnums=(0, 1))(x, w)
    R = jacrev(lambda xx, ww: sc.spline_ode(xx, ww, b, 0.9, backend="reference", **kw), argnums=(0, 1))(x, w)
    for a, r in zip(J, R):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_double_backward_raises(backend, device):
    """create_graph=True (what torch.func's transforms always ask for) gives first-order
    gradients; differentiating them again raises with the reason."""
    x, w, b, s = dense_inputs(2, 3, 2, 1, device=device)
    y = sc.spline_ode(x, w, b, s, steps=2, degree=1, backend=backend)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gx.sum(), x)


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_gradgradcheck_fails_with_the_reason(backend, device):
    x = torch.randn(2, 3, dtype=DT, device=device, requires_grad=True)
    w = (0.3 * torch.randn(3, 3, 3, dtype=DT, device=device)).requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.gradgradcheck(lambda xx, ww: sc.spline_ode(xx, ww, None, 1.0, steps=2, degree=1,
                                                                   backend=backend), (x, w))
