"""Shared test helpers: the option lists, per-dtype tolerances, seeded input builders, the
backend availability rule, and the compare-against-reference assertion."""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Sequence

import pytest
import torch

import splinet_cuda as sc
from splinet_cuda import _ext

ACTS = ["identity", "relu", "tanh", "sigmoid", "softplus"]
SCHEMES = ["euler", "midpoint", "rk4", "rk4_38"]
VARIANTS = ["standard", "symmetric", "antisymmetric"]
CONV_VARIANTS = ["standard", "symmetric"]  # the conv layer has no antisymmetric variant

# Tolerances against the float64 / float32 reference. The fused C++ kernels sum as the
# reference does up to reassociation; Triton's tiles reassociate more (float64 rtol 1e-9),
# and bf16/fp16 store with float32 accumulation.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5),
       torch.bfloat16: dict(rtol=5e-2, atol=5e-2), torch.float16: dict(rtol=1e-2, atol=1e-2)}
TRITON_TOL = {**TOL, torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5)}
# A whole bf16/fp16 layer (every step rounded to 8 or 11 bits) against the float64 reference,
# each tensor scaled by its largest magnitude.
HALF_TOL = {torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=1e-2, atol=1e-2)}
# The CUDA driver's programs (emulated on the CPU) against the CPU kernel: the same sums in
# another order.
EMULATED_TOL = {torch.float64: dict(rtol=1e-11, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def tolerance(dtype: torch.dtype, backend: str = "cpu") -> dict:
    """rtol/atol for comparing ``backend``'s results in ``dtype`` with the reference's (the
    emulated CUDA driver's with the CPU kernel's)."""
    return {"triton": TRITON_TOL, "cuda-emulated": EMULATED_TOL}.get(backend, TOL)[dtype]


def grid(variants: Sequence[str], schemes: Sequence[str] = SCHEMES, acts: Sequence[str] = ACTS):
    """Every variant x scheme x activation once, with the degree (0-3) and bias (2 in 3)
    cycling through the product: (variant, scheme, activation, degree, bias)."""
    return [(v, s, a, i % 4, i % 3 != 0) for i, (v, s, a) in enumerate(itertools.product(variants, schemes, acts))]


def grid_id(case) -> str:
    v, s, a, d, b = case[:5]
    return f"{v}-{s}-{a}-d{d}-{'b' if b else 'nob'}"


# --- backends --------------------------------------------------------------------------

def backend_device(backend: str) -> str:
    """The device whose tensors a backend takes here: CUDA for the GPU backends when there is
    a GPU (Triton otherwise runs CPU tensors in its interpreter)."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def backend_skip_reason(backend: str, op: str | None = None) -> str | None:
    """Why ``backend`` (and, when given, its kernel of ``splinet_cuda::<op>``) cannot run
    here, or None when it can. Besides sc.available_backends()'s names, "cuda-emulated" is the
    CUDA driver run on the CPU by the test-only extension (tests/emulation.py)."""
    if backend == "cuda-emulated":
        import emulation

        return None if emulation.AVAILABLE else emulation.SKIP_REASON
    if backend == "reference":
        return None
    if backend not in sc.available_backends():
        if backend == "triton":
            from splinet_cuda import _triton

            return f"the triton backend is not registered: {_triton.IMPORT_ERROR}"
        return f"the {backend} backend is not built here"
    if backend == "cuda" and not torch.cuda.is_available():
        return "the cuda backend needs a GPU"
    if op is not None and backend in ("cpu", "cuda") and not _ext.has_kernel(op, backend.upper()):
        return f"splinet_cuda::{op} has no {backend.upper()} kernel in this build"
    return None


def requires(backend: str, op: str | None = None):
    """A skipif mark for a test that runs on ``backend`` alone (see backend_skip_reason)."""
    reason = backend_skip_reason(backend, op)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def gpu_test(backend: str, op: str | None = None):
    """A decorator for a test that runs on a GPU backend alone: the ``gpu`` marker (``pytest -m
    gpu``) and the skip of :func:`requires`."""
    skip = requires(backend, op)
    return lambda fn: pytest.mark.gpu(skip(fn))


def skip_unless(backend: str, op: str | None = None) -> None:
    reason = backend_skip_reason(backend, op)
    if reason is not None:
        pytest.skip(reason)


# --- inputs ----------------------------------------------------------------------------

def _finish(tensors, scale, *, dtype, device, requires_grad, learn_scale):
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)
    out = [cast(t) for t in tensors] + [cast(torch.tensor(scale, dtype=torch.float64))]
    if requires_grad:
        out = [None if t is None else t.requires_grad_() for t in out]
    if not learn_scale:
        out[-1] = scale
    return tuple(out)


def dense_inputs(B, m, L, d, *, dtype=torch.float64, device="cpu", bias=True, learn_scale=True,
                 requires_grad=True, seed=0, wscale=None, bscale=0.3, scale=1.3):
    """Seeded (x (B, m), weight (L + d, m, m), bias (L + d, m) or None, scale) for the dense
    layer, drawn in float64 and cast. The weight is scaled by ``wscale`` (default 0.8 /
    sqrt(m), which keeps the ODE's right-hand side O(1)); ``learn_scale=False`` gives the scale
    as a Python number."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, m, generator=g, dtype=torch.float64)
    wscale = 0.8 / max(m, 1) ** 0.5 if wscale is None else wscale
    w = torch.randn(L + d, m, m, generator=g, dtype=torch.float64) * wscale
    b = torch.randn(L + d, m, generator=g, dtype=torch.float64) * bscale if bias else None
    return _finish((x, w, b), scale, dtype=dtype, device=device, requires_grad=requires_grad,
                   learn_scale=learn_scale)


CONV_SPATIAL = {1: (7,), 2: (5, 4), 3: (3, 4, 3)}


def conv_inputs(sd=2, *, B=2, C=3, spatial=None, L=2, d=2, k=3, dtype=torch.float64, device="cpu", bias=True,
                learn_scale=True, requires_grad=True, seed=0, wscale=None, bscale=0.3, scale=1.3):
    """Seeded (x (B, C, *spatial), weight (L + d, C, C, *kernel), bias (L + d, C) or None,
    scale) for the conv layer with ``sd`` spatial dims; ``k`` is one odd size or one per dim.
    The weight is scaled by ``wscale`` (default 0.9 / sqrt(fan_in))."""
    g = torch.Generator().manual_seed(seed)
    spatial = CONV_SPATIAL[sd] if spatial is None else tuple(spatial)
    ks = (k,) * sd if isinstance(k, int) else tuple(k)
    fan_in = C
    for v in ks:
        fan_in *= v
    x = torch.randn(B, C, *spatial, generator=g, dtype=torch.float64)
    wscale = 0.9 / fan_in ** 0.5 if wscale is None else wscale
    w = torch.randn(L + d, C, C, *ks, generator=g, dtype=torch.float64) * wscale
    b = torch.randn(L + d, C, generator=g, dtype=torch.float64) * bscale if bias else None
    return _finish((x, w, b), scale, dtype=dtype, device=device, requires_grad=requires_grad,
                   learn_scale=learn_scale)


def hamiltonian_inputs(B, m, L, d, *, dtype=torch.float64, device="cpu", bias=True, learn_scale=True,
                       requires_grad=True, seed=0):
    """Seeded (y (B, m), z (B, m), weight (L + d, 2, m, m), bias (L + d, 2, m) or None, scale)
    for the Hamiltonian (Verlet) layer."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, m, generator=g, dtype=torch.float64)
    z = torch.randn(B, m, generator=g, dtype=torch.float64)
    w = torch.randn(L + d, 2, m, m, generator=g, dtype=torch.float64) * (0.8 / m ** 0.5)
    b = torch.randn(L + d, 2, m, generator=g, dtype=torch.float64) * 0.3 if bias else None
    return _finish((y, z, w, b), 1.3, dtype=dtype, device=device, requires_grad=requires_grad,
                   learn_scale=learn_scale)


def detached(args):
    """The tensors of ``args`` detached (None and numbers pass through)."""
    return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)


def randomize_layer(layer, seed=0, wscale=0.4):
    """Fills a SpliNet layer's coefficients with seeded random values (weight * wscale, bias * 0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(wscale * torch.randn(layer.weight.shape, generator=g, dtype=layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(0.5 * torch.randn(layer.bias.shape, generator=g, dtype=layer.bias.dtype))
    return layer


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- running and comparing ----------------------------------------------------------------

def outputs_and_grads(fn: Callable, *args, **kw):
    """``fn(*args, **kw)``'s outputs (a tensor or a tuple of them) and the gradients of a fixed
    nonlinear loss with respect to every input tensor that requires grad. The loss weighs each
    output element differently (sin of the first output, cos of the others, times a ramp), so
    a gradient in the wrong slot does not cancel; bf16/fp16 outputs enter it in float32."""
    out = fn(*args, **kw)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    loss = 0
    for k, o in enumerate(outs):
        ol = o if o.dtype in (torch.float32, torch.float64) else o.float()
        probe = torch.linspace(-1, 1 + k, o.numel(), dtype=ol.dtype, device=o.device).reshape(o.shape)
        loss = loss + ((ol.sin() if k == 0 else ol.cos()) * probe).sum()
    inputs = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, inputs))


def assert_all_close(got, ref, names: Sequence[str] = (), **tol) -> None:
    """Each pair within ``tol`` (torch.testing.assert_close, whose message gives the number of
    mismatched elements and the largest absolute and relative differences), prefixed with the
    tensor's name; a lower-precision result is compared in the reference's dtype."""
    got, ref = list(got), list(ref)
    assert len(got) == len(ref), f"{len(got)} results against {len(ref)} reference results"
    names = list(names) + [f"result {i}" for i in range(len(names), len(got))]
    for name, g, r in zip(names, got, ref):
        if isinstance(g, torch.Tensor) and isinstance(r, torch.Tensor):
            assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} against {tuple(r.shape)}"
            if g.dtype != r.dtype:
                g, r = g.double(), r.double()
            g = g.to(r.device)
        torch.testing.assert_close(g, r, **tol, msg=lambda msg, name=name: f"{name}: {msg}")


def assert_all_close_scaled(got, ref, names: Sequence[str] = (), **tol) -> None:
    """assert_all_close after dividing each pair by the reference's largest magnitude (at least
    1e-3): bf16/fp16 results, whose error scales with the tensor's range, not each element."""
    got, ref = [g.double().cpu() for g in got], [r.double().cpu() for r in ref]
    scales = [r.abs().max().clamp_min(1e-3) for r in ref]
    assert_all_close([g / c for g, c in zip(got, scales)], [r / c for r, c in zip(ref, scales)], names, **tol)


LAYER_RESULTS = ["out", "grad x", "grad weight", "grad bias (or scale)", "grad scale"]
HAMILTONIAN_RESULTS = ["y_N", "z_N", "grad y", "grad z", "grad weight", "grad bias (or scale)", "grad scale"]
OP_RESULTS = ["states", "grad_x", "grad_weight", "grad_bias", "grad_scale"]


def assert_matches_reference(fn: Callable, args, *, backend: str, dtype=None, tol=None, ref_args=None,
                             names: Sequence[str] = LAYER_RESULTS, **kw) -> None:
    """``fn`` (sc.spline_ode, spline_ode_conv or spline_ode_hamiltonian) on ``backend`` gives the
    outputs and gradients of ``fn`` on the reference (on ``ref_args`` when given, else the
    same inputs; the reference takes no ``checkpoint``) within the tolerance of ``dtype``
    (default: x's dtype) for that backend."""
    dtype = args[0].dtype if dtype is None else dtype
    tol = tolerance(dtype, backend) if tol is None else tol
    got = outputs_and_grads(fn, *args, backend=backend, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "checkpoint"}
    ref = outputs_and_grads(fn, *(args if ref_args is None else ref_args), backend="reference", **ref_kw)
    assert_all_close(got, ref, names, **tol)


def assert_equal_results(first, second) -> None:
    """Bit-for-bit equality of two runs' results (determinism, exact checkpointing)."""
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"result {i} differs: largest difference {(a - b).abs().max()}"


# --- raw ops and compiled models -------------------------------------------------------------

def check_dense_op_rejects_bad_args(fwd) -> None:
    """A dense forward op (C++ or Triton; the schema of spline_dense_fwd) rejects bad
    arguments with a ValueError/TypeError naming them, before any kernel runs."""
    x, w, b, s = torch.randn(3, 4), torch.randn(5, 4, 4), torch.randn(5, 4), torch.tensor(1.0)
    cfg = dict(steps=3, degree=1, activation="tanh", scheme="euler", variant="standard", gamma=0.0, checkpoint=1)
    call = lambda *a, **kw: fwd(*a, *{**cfg, **kw}.values())
    cases = [
        (ValueError, "weight", (x, torch.randn(5, 3, 3), b, s), {}),
        (ValueError, "bias", (x, w, torch.randn(5, 3), s), {}),
        (ValueError, "degree", (x, w, b, s), {"degree": 5}),
        (ValueError, "steps", (x, w, b, s), {"steps": 0}),
        (ValueError, "checkpoint", (x, w, b, s), {"checkpoint": 0}),
        (ValueError, "activation", (x, w, b, s), {"activation": "gelu"}),
        (ValueError, "scheme", (x, w, b, s), {"scheme": "rk5"}),
        (ValueError, "variant", (x, w, b, s), {"variant": "skew"}),
        (TypeError, "dtype", (x, w.double(), b, s), {}),
    ]
    assert_rejects(call, cases)


def assert_rejects(call, cases) -> None:
    """Each ``(error type, message pattern, args, kwargs)`` of ``cases`` makes ``call`` raise
    that error with a message naming the argument."""
    for error, match, args, kwargs in cases:
        with pytest.raises(error, match=match):
            call(*args, **kwargs)


def check_model_compiles(model, x) -> None:
    """The model's loss and parameter gradients agree eagerly and under
    torch.compile(fullgraph=True, backend="aot_eager") (graph capture, fakes, autograd)."""

    def loss_and_grads(m):
        model.zero_grad()
        loss = m(x).square().sum()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    torch._dynamo.reset()
    eager = loss_and_grads(model)
    compiled = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert_all_close(compiled, eager, ["loss"] + [f"grad {n}" for n, _ in model.named_parameters()])
