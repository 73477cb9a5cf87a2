"""Implementations of a benchmark case: every way to run one layer call that gets compared.

The CLI and the pytest-benchmark suite compare the same ones: the fused backends through
``sc.spline_ode(..., backend=name)`` (also with checkpointing, and "cuda+cublas"); the
eager pure-PyTorch ``reference`` (the baseline of every speedup, and in float64 the oracle
every other one is checked against); ``compiled``, the reference under ``torch.compile``,
and on a GPU ``compiled+cudagraphs``, the same with ``mode="reduce-overhead"`` (CUDA
graphs); and the peers a user would otherwise reach for, torchdiffeq's fixed-step
``odeint`` (backprop through the solver) and ``odeint_adjoint`` (its continuous adjoint),
optional: skipped with a note when torchdiffeq is not installed (``pip install torchdiffeq``).

Legend: B batch, m width, C channels, n = L + d coefficients, N steps.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import splinet_cuda as sc

from bench.cases import Case, Inputs, forward_backward

__all__ = [
    "Impl", "IMPL_NAMES", "FUSED_BACKENDS", "PEERS", "COMPILED", "set_environment", "checkpoint_interval",
    "backend_impl", "reference_impl", "compiled_impl", "torchdiffeq_impl", "vmap_baseline_impl", "default_impls",
    "oracle_outputs",
]

# Every name --backends accepts: the public API's backends, each also with checkpointing
# ("<backend>+ckpt", every ceil(sqrt(N))-th state kept), the torch.compile baseline and the
# torchdiffeq peers (below).
FUSED_BACKENDS = ("cpu", "triton", "cuda")
PEERS = ("torchdiffeq", "torchdiffeq_adjoint")
# "cuda+cublas": the CUDA backend with its dense large-width path forced onto cuBLAS
# (SPLINET_DENSE_GEMM=cublas) instead of the fused blended GEMM it takes for bf16/fp16.
VARIANT_IMPLS = {"cuda+cublas": ("cuda", {"SPLINET_DENSE_GEMM": "cublas"})}
# torch.compile of the reference: default mode, and "reduce-overhead" (CUDA graphs; GPU only).
COMPILED = {"compiled": None, "compiled+cudagraphs": "reduce-overhead"}
# The baselines of the vmap cases (bench/cases.py VMAP): the CPU backend in a Python loop over
# the models, and under vmap with the per-slice rule (the layer once per model, as the rules
# run what the model-dim ops do not take).
VMAP_IMPLS = ("cpu+loop", "cpu+per-slice")
IMPL_NAMES = (("reference",) + FUSED_BACKENDS + tuple(f"{b}+ckpt" for b in FUSED_BACKENDS) + tuple(VARIANT_IMPLS)
              + tuple(COMPILED) + PEERS + VMAP_IMPLS)


@contextlib.contextmanager
def set_environment(env: Dict[str, str]):
    """Sets the variables of ``env`` for the duration of the block, then restores each one
    (unset again if it was unset)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(frozen=True)
class Impl:
    """A way to run a case. ``build(case)`` returns ``fn(x, weight, bias) -> y``;
    ``skip(case, device)`` returns why it does not apply there, or None. For a
    ``compiled`` implementation the first call builds it, and its time is reported."""

    name: str
    build: Callable[[Case], Callable]
    skip: Callable[[Case, torch.device], Optional[str]] = lambda case, device: None
    compiled: bool = False
    # False for a continuous adjoint (odeint_adjoint), whose gradients approximate the
    # discrete ones: only its output is checked against the reference.
    exact_grads: bool = True
    # Environment variables set while this implementation runs (forward and backward).
    env: Dict[str, str] = field(default_factory=dict)

    def environment(self):
        return set_environment(self.env)


def _registry_entry(name: str):
    # splinet_cuda's backend registry is private; without it nothing is skipped here and a
    # backend that cannot run a case shows up as an ERROR row with the package's message.
    return getattr(getattr(sc, "_dispatch", None), "_REGISTRY", {}).get(name)


def checkpoint_interval(case: Case) -> int:
    """The checkpoint interval of the "+ckpt" implementations: ceil(sqrt(N)) keeps
    O(sqrt(N)) states and recomputes each segment once."""
    return max(1, math.ceil(math.sqrt(case.N)))


def backend_impl(name: str) -> Impl:
    """A backend of ``sc.spline_ode``/``sc.spline_ode_conv`` ("reference", "cpu", "triton",
    "cuda"), or "<backend>+ckpt" for the same with checkpointing."""
    impl_name, ckpt = name, name.endswith("+ckpt")
    name = name[: -len("+ckpt")] if ckpt else name
    name, env = VARIANT_IMPLS.get(name, (name, {}))

    def build(case: Case) -> Callable:
        kwargs = {"checkpoint": checkpoint_interval(case)} if ckpt else {}
        return lambda x, weight, bias: case.run(x, weight, bias, backend=name, **kwargs)

    def skip(case: Case, device: torch.device) -> Optional[str]:
        if env and (case.kind != "dense" or case.m <= 64 or case.torch_dtype not in (torch.bfloat16, torch.float16)):
            return f"the same as {name!r} here (the GEMM choice is for bf16/fp16 dense layers wider than 64)"
        entry = _registry_entry(name)
        if entry is None:
            return None
        op = "spline_ode" if case.kind == "dense" else "spline_ode_conv"
        if getattr(entry, op, True) is None:
            return f"backend {name!r} has no {op} kernel"
        types = getattr(entry, "device_types", None)
        if types is not None and torch.device(device).type not in types:
            return f"backend {name!r} runs on {list(types)} tensors"
        auto = getattr(entry, "auto_device_types", None)
        if auto is not None and torch.device(device).type not in auto:
            # e.g. triton on CPU tensors: Triton's interpreter, for tests, not for timing
            return f"backend {name!r} runs on {torch.device(device).type} tensors for tests only"
        dtypes = getattr(entry, "dtypes", None)
        if dtypes is not None and case.torch_dtype not in dtypes:
            return f"backend {name!r} takes {[str(t).replace('torch.', '') for t in dtypes]}"
        dims = getattr(entry, "conv_dims", None)
        if case.kind == "conv" and dims is not None and len(case.spatial) not in dims:
            return f"backend {name!r} takes convolutions over {list(dims)} spatial dims"
        return None

    return Impl(impl_name, build, skip, env=env)


def reference_impl() -> Impl:
    """The eager pure-PyTorch reference (``sc.reference``): every speedup's baseline."""

    def build(case: Case) -> Callable:
        ref = sc.reference.spline_ode if case.kind == "dense" else sc.reference.spline_ode_conv
        return lambda x, weight, bias: case.run(x, weight, bias, fn=ref)

    return Impl("reference", build)


def compiled_impl(name: str = "compiled") -> Impl:
    """``torch.compile(fullgraph=True)`` of the reference, the N steps unrolled into one graph;
    ``name`` "compiled+cudagraphs" adds ``mode="reduce-overhead"`` (CUDA graphs, GPU only).

    Dynamo's caches are reset for every case, so each build pays a full trace (Inductor's
    on-disk cache may still shorten code generation on a second run)."""
    mode = COMPILED[name]

    def build(case: Case) -> Callable:
        torch._dynamo.reset()
        # The "bwd" mode runs the backward of one forward repeatedly (retain_graph), which
        # AOTAutograd's donated buffers forbid.
        torch._functorch.config.donated_buffer = False
        fn = torch.compile(reference_impl().build(case), fullgraph=True, mode=mode)
        if mode is None:
            return fn

        def graphed(x, weight, bias):
            # Each call is a new step for the CUDA-graph trees; the output is copied out of the
            # graph's static buffer (one small copy) because the next replay overwrites it.
            torch.compiler.cudagraph_mark_step_begin()
            return fn(x, weight, bias).clone()

        return graphed

    def skip(case: Case, device: torch.device) -> Optional[str]:
        if mode == "reduce-overhead" and torch.device(device).type != "cuda":
            return "CUDA graphs need a GPU"
        return None if case.compile else "compile not requested for this case (use --full)"

    return Impl(name, build, skip, compiled=True)


@contextlib.contextmanager
def _per_slice_rule():
    """The dense layer's vmap rules running the layer once per slice (what they do where the
    model-dim ops do not apply)."""
    from splinet_cuda import _autograd

    before = _autograd._HAS_MODEL_OPS
    _autograd._HAS_MODEL_OPS = False
    try:
        yield
    finally:
        _autograd._HAS_MODEL_OPS = before


def vmap_baseline_impl(name: str) -> Impl:
    """A baseline of the vmap cases on the CPU backend: "cpu+loop", a Python loop over the
    models; "cpu+per-slice", vmap with the per-slice rule (a vmap case's backward, run by
    autograd above the vmap, replays what the forward recorded: one node per slice)."""

    def build(case: Case) -> Callable:
        if name == "cpu+loop":
            return lambda x, weight, bias: case.run(x, weight, bias, backend="cpu", loop=True)

        def per_slice(x, weight, bias):
            with _per_slice_rule():
                return case.run(x, weight, bias, backend="cpu")

        return per_slice

    def skip(case: Case, device: torch.device) -> Optional[str]:
        if not case.vmap:
            return "a baseline of the vmap cases"
        return backend_impl("cpu").skip(case, device)

    return Impl(name, build, skip)


def default_impls(names: Optional[Sequence[str]] = None, *, compile: bool = True) -> List[Impl]:
    """The implementations to compare: ``names`` (default: every built backend, then
    ``compiled``, and ``compiled+cudagraphs`` where a GPU is visible), always with
    ``reference`` first since speedups are relative to it. ``compile=False`` drops the
    compiled ones."""
    if names is None:
        fused = [b for b in sc.available_backends() if b != "reference"]
        variants = [v for v, (b, _) in VARIANT_IMPLS.items() if b in fused]
        graphs = ["compiled+cudagraphs"] if torch.cuda.is_available() else []
        names = fused + [f"{b}+ckpt" for b in fused] + variants + ["compiled", *graphs, *PEERS]
    unknown = [n for n in names if n not in IMPL_NAMES]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; expected some of {list(IMPL_NAMES)}")
    impls = [reference_impl()]
    for name in dict.fromkeys(names):
        if name == "reference" or (name in COMPILED and not compile):
            continue
        if name in PEERS:
            impls.append(torchdiffeq_impl(adjoint=name.endswith("adjoint")))
        elif name in VMAP_IMPLS:
            impls.append(vmap_baseline_impl(name))
        else:
            impls.append(compiled_impl(name) if name in COMPILED else backend_impl(name))
    return impls


def oracle_outputs(case: Case, inputs: Inputs) -> Tuple[torch.Tensor, ...]:
    """Output and gradients of the eager reference in float64 on the same (upcast) inputs."""
    wide = Inputs(*(t.detach().to(torch.float64).requires_grad_() for t in inputs))
    return forward_backward(reference_impl().build(case), wide)


# --------------------------------------------------------------------------------------
# Peers: torchdiffeq
# --------------------------------------------------------------------------------------

# splinet_cuda's schemes -> torchdiffeq's fixed-grid methods. torchdiffeq's "rk4" is
# Kutta's 3/8 rule (rk4_alt_step_func); it has no classic RK4 on a fixed grid.
_METHODS = {"euler": "euler", "midpoint": "midpoint", "rk4_38": "rk4"}


class SplineRHS(torch.nn.Module):
    """dx/dt = scale * f(x, W(t), b(t)) with W, b blended from the coefficients at t."""

    def __init__(self, case: Case, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.case, self.weight, self.bias = case, weight, bias
        if case.kind == "dense":
            self.f = sc.reference.dense_rhs(case.activation, case.variant)
        else:
            self.f = sc.reference.conv_rhs(case.activation, case.variant, len(case.spatial))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k, w = sc.bspline_basis(min(max(float(t.detach()), 0.0), 1.0), self.case.L, self.case.d)
        w = w.to(dtype=x.dtype, device=x.device)
        blend = lambda c: None if c is None else sum(w[r] * c[k + r] for r in range(self.case.d + 1))
        return self.case.scale * self.f(x, blend(self.weight), blend(self.bias))


def torchdiffeq_impl(adjoint: bool = False) -> Impl:
    """torchdiffeq.odeint (or odeint_adjoint) on the fixed grid t_i = i / N."""
    name = "torchdiffeq_adjoint" if adjoint else "torchdiffeq"

    def build(case: Case) -> Callable:
        import torchdiffeq

        solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint

        def fn(x, weight, bias):
            t = torch.linspace(0.0, 1.0, case.N + 1, dtype=torch.float64)
            func = SplineRHS(case, weight, bias)
            kwargs = {"adjoint_params": tuple(p for p in (weight, bias) if p is not None)} if adjoint else {}
            return solve(func, x, t.to(x.dtype), method=_METHODS[case.scheme], **kwargs)[-1]

        return fn

    def skip(case: Case, device: torch.device) -> Optional[str]:
        if case.vmap:
            return "the vmap cases compare splinet_cuda's own ways to run many models"
        if importlib.util.find_spec("torchdiffeq") is None:
            return "torchdiffeq is not installed (pip install torchdiffeq)"
        if case.scheme not in _METHODS:
            return f"torchdiffeq has no fixed-grid {case.scheme!r}"
        return None

    return Impl(name, build, skip, exact_grads=not adjoint)
