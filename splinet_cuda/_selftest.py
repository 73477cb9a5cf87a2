"""``python -m splinet_cuda selftest``: every usable backend against the float64 reference.

Each row is one layer call on small shapes: the fused backend's output and the gradients
with respect to every input (x, weight, bias, scale; y and z for the Hamiltonian layer)
against :mod:`splinet_cuda.reference` in float64 on the CPU, fed the same values (the inputs
are rounded to the row's dtype first, so the error measures the backend's arithmetic alone),
and a second call that must agree bit for bit. Rows cover dense, conv (the spatial dims each
backend takes) and Hamiltonian layers, every dtype the backend takes on the device, a few
schemes, variants and degrees, a non-contiguous / channels_last input and ``torch.compile``
(``fullgraph=True``, the aot_eager backend: it traces the ops' fake implementations and the
autograd functions without compiling kernels, so it stays cheap). On a GPU, rows also cover
the kernels' larger shared-memory configurations, an empty batch and a busy non-default
stream. ``--bench`` adds a short speed check of each backend against the eager reference.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

# Largest accepted relative error ||got - ref|| / ||ref|| per output, by the dtype the backend
# computes in (float32 / float64 accumulation everywhere; bfloat16 / float16 keep states and
# inputs in 16 bits between the stages).
TOLERANCE: Dict[torch.dtype, float] = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2,
                                       torch.float16: 1e-2}
FUSED = ("cpu", "cuda", "triton")


@dataclass(frozen=True)
class Case:
    """One layer call. ``kind``: "dense" (x (B, m)), "conv" (x (B, m, *spatial), m channels,
    kernel k) or "hamiltonian" (y, z (B, m)). ``layout``: "strided" gives x as a
    non-contiguous (column-major) tensor, "channels_last" a channels-last one. ``compile``
    runs it under torch.compile; ``stream`` on a busy non-default CUDA stream."""

    kind: str
    B: int
    m: int
    spatial: Tuple[int, ...] = ()
    k: int = 3
    L: int = 2
    d: int = 2
    N: int = 3
    scheme: str = "euler"
    variant: str = "standard"
    activation: str = "tanh"
    bias: bool = True
    layout: str = "contiguous"
    compile: bool = False
    stream: bool = False
    dtypes: Optional[Tuple[torch.dtype, ...]] = None  # None: every dtype the backend takes
    env: Tuple[Tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return f"conv{len(self.spatial)}d" if self.kind == "conv" else self.kind

    def describe(self) -> str:
        size = (f"B={self.B} C={self.m} {'x'.join(map(str, self.spatial))} k={self.k}" if self.spatial
                else f"B={self.B} m={self.m}")
        parts = [size, f"L={self.L} d={self.d} N={self.N}", self.scheme]
        parts += [self.variant] if self.kind != "hamiltonian" else []
        parts += [self.activation] + ["no bias"] * (not self.bias)
        parts += [self.layout] * (self.layout != "contiguous") + ["torch.compile"] * self.compile
        parts += ["busy stream"] * self.stream + [f"{k}={v}" for k, v in self.env]
        return " ".join(parts)


def _dense(B, m, **kw) -> Case:
    return Case("dense", B, m, **kw)


def _conv(B, C, spatial, **kw) -> Case:
    return Case("conv", B, C, tuple(spatial), **kw)


F32, F64 = (torch.float32,), (torch.float64,)
# The first cases of each list are the --quick ones.
DENSE = [_dense(5, 6, L=2, d=1, N=3),
         _dense(4, 7, L=3, d=3, N=2, scheme="rk4", variant="symmetric", activation="relu"),
         _dense(3, 5, L=2, d=2, N=3, scheme="midpoint", variant="antisymmetric", activation="sigmoid"),
         _dense(4, 6, L=1, d=0, N=2, scheme="rk4_38", activation="softplus", bias=False)]
CONV = {1: [_conv(2, 3, (7,), L=2, d=1, N=2, activation="relu")],
        2: [_conv(2, 3, (5, 5), L=2, d=1, N=2, activation="relu"),
            _conv(2, 2, (4, 6), k=5, L=2, d=2, N=2, variant="symmetric", activation="softplus")],
        3: [_conv(1, 2, (4, 3, 4), L=1, d=1, N=2, activation="relu")]}
HAMILTONIAN = [Case("hamiltonian", 4, 5, L=2, d=2, N=3),
               Case("hamiltonian", 3, 4, L=3, d=3, N=2, activation="relu", bias=False)]
LAYOUT = [_dense(5, 6, layout="strided", dtypes=F32), _conv(2, 3, (5, 5), layout="channels_last", dtypes=F32)]
COMPILE = [_dense(5, 6, compile=True, dtypes=F32), _conv(2, 3, (5, 5), compile=True, dtypes=F32),
           Case("hamiltonian", 4, 5, compile=True, dtypes=F32)]
# On a GPU: the configurations that need more than 48 KB of shared memory (the launch must
# raise the block's limit first), the tensor-core GEMM of the 16-bit dense layer, empty
# batches and the current stream (the figures are this revision's formulas in csrc/cuda/).
GPU_ONLY = [_dense(4096, 64, L=4, d=3, N=6, scheme="rk4", dtypes=F32),  # dense small-width program, 86 KB bwd
            _dense(8192, 32, L=2, d=3, N=4, scheme="rk4_38", variant="symmetric", dtypes=F64),  # 78 KB bwd
            _dense(300, 200, L=2, d=2, N=3, scheme="midpoint", activation="relu",
                   dtypes=(torch.bfloat16, torch.float16)),  # fused GEMM, ragged 64x64 tiles
            _dense(300, 200, L=2, d=2, N=3, dtypes=(torch.bfloat16,), env=(("SPLINET_DENSE_GEMM", "cublas"),)),
            _conv(6, 32, (12, 12), L=2, d=2, N=3, activation="relu", dtypes=F64),  # 74 KB filter
            _conv(4, 40, (16, 16), L=2, d=2, N=3, scheme="rk4", dtypes=F32),  # the cuDNN path
            _dense(0, 8, dtypes=F32), _conv(0, 4, (8, 8), dtypes=F32),
            _dense(512, 16, N=4, stream=True, dtypes=F32), _conv(4, 8, (16, 16), N=3, stream=True, dtypes=F32)]
# One tiny call per CUDA block program and dtype family: few launches, for compute-sanitizer.
TINY = [_dense(9, 5, L=2, d=2, N=3, scheme="rk4", dtypes=F32),
        _dense(9, 12, L=2, d=1, N=2, variant="symmetric", dtypes=(torch.bfloat16,)),
        _dense(70, 80, L=2, d=1, N=2, dtypes=(torch.bfloat16,)),
        _dense(40, 72, L=1, d=1, N=1, scheme="midpoint", variant="symmetric", dtypes=(torch.float16,)),
        _conv(2, 3, (6, 6), L=2, d=2, N=2, scheme="midpoint", dtypes=F32),
        _conv(2, 4, (9,), L=1, d=1, N=2, variant="symmetric", dtypes=(torch.bfloat16,))]


def cases(backend: str, device: torch.device, quick: bool = False, tiny: bool = False) -> List[Case]:
    """The cases of ``backend`` on ``device``: its layers and conv dims only."""
    from . import _dispatch

    impl = _dispatch._REGISTRY[backend]
    n = 1 if quick else None
    if tiny:
        out = list(TINY)
    else:
        out = DENSE[:2] if quick else list(DENSE)
        out += [c for dim in (1, 2, 3) for c in CONV[dim][:n]] + HAMILTONIAN[:n] + LAYOUT + COMPILE[:n]
        out += GPU_ONLY if device.type == "cuda" and not quick else []
    runs = {"dense": lambda c: True,
            "conv": lambda c: impl.spline_ode_conv is not None and len(c.spatial) in impl.conv_dims,
            "hamiltonian": lambda c: impl.spline_ode_hamiltonian is not None}
    return [c for c in out if runs[c.kind](c)]


@dataclass
class Row:
    status: str
    device: str
    backend: str
    layer: str
    dtype: str
    case: str
    error: Optional[float] = None
    seconds: float = 0.0
    note: str = ""
    missing: bool = False  # a SKIP because the backend itself does not run here


# ----------------------------------------------------------------------------------------
# One call
# ----------------------------------------------------------------------------------------

def make_inputs(case: Case, seed: int = 0) -> List[Optional[torch.Tensor]]:
    """float64 CPU tensors: the states (x, or y and z), weight, bias or None, scale, then the
    cotangents of the outputs; weights scaled by 0.8 / sqrt(fan in) so that the steps stay tame."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64)
    n = case.L + case.d
    if case.kind == "hamiltonian":
        y, z = rand(case.B, case.m), rand(case.B, case.m)
        w = rand(n, 2, case.m, case.m) * (0.8 / math.sqrt(case.m))
        b = 0.3 * rand(n, 2, case.m) if case.bias else None
        return [y, z, w, b, torch.tensor(1.1, dtype=torch.float64), rand(case.B, case.m), rand(case.B, case.m)]
    fan_in = case.m * case.k ** len(case.spatial)
    x = rand(case.B, case.m, *case.spatial)
    w = rand(n, case.m, case.m, *(case.k,) * len(case.spatial)) * (0.8 / math.sqrt(fan_in))
    b = 0.3 * rand(n, case.m) if case.bias else None
    return [x, w, b, torch.tensor(1.1, dtype=torch.float64), rand(*x.shape)]


def _leaf(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A copy of ``t`` in ``layout`` that is a leaf requiring grad."""
    if layout == "strided" and t.dim() == 2:
        t = torch.empty_strided(t.shape, (1, max(1, t.shape[0])), dtype=t.dtype, device=t.device).copy_(t)
    elif layout == "channels_last" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.detach().requires_grad_()


def call(case: Case, backend: str, inputs, device: torch.device, dtype: torch.dtype) -> List[Optional[torch.Tensor]]:
    """[outputs..., gradient of every input (None for a missing bias)] of one call of
    ``backend``; the loss is the sum of <output, cotangent>."""
    import splinet_cuda as sc

    hamiltonian = case.kind == "hamiltonian"
    n_states = 2 if hamiltonian else 1
    moved = [None if t is None else t.to(device=device, dtype=dtype) for t in inputs]
    states = [_leaf(t, case.layout if i == 0 else "contiguous") for i, t in enumerate(moved[:n_states])]
    params = [None if t is None else t.detach().clone().requires_grad_() for t in moved[n_states:n_states + 3]]
    cots = moved[n_states + 3:]
    kw = dict(steps=case.N, degree=case.d, activation=case.activation, backend=backend)
    if hamiltonian:
        fn = lambda y, z, w, b, s: sc.spline_ode_hamiltonian(y, z, w, b, s, **kw)
    else:
        layer = sc.spline_ode_conv if case.kind == "conv" else sc.spline_ode
        fn = lambda x, w, b, s: (layer(x, w, b, s, scheme=case.scheme, variant=case.variant, **kw),)
    if case.compile:
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    outs = list(fn(*states, *params))
    leaves = [t for t in states + params if t is not None]
    grads = iter(torch.autograd.grad(outs, leaves, grad_outputs=cots))
    return [o.detach() for o in outs] + [None if t is None else next(grads) for t in states + params]


def _on_busy_stream(case: Case, backend: str, inputs, device: torch.device, dtype: torch.dtype):
    """The call on a non-default stream that first sleeps and then writes the inputs: a
    kernel launched on any other stream would read them before they are written."""
    stream = torch.cuda.Stream(device)
    staged = [None if t is None else t.to(device) for t in inputs]
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)  # tens of milliseconds
        got = call(case, backend, [None if t is None else t * 1 for t in staged], device, dtype)
    stream.synchronize()
    return got


def compare(got: Sequence, ref: Sequence, dtype: torch.dtype, names: Sequence[str]) -> Tuple[float, List[str]]:
    """(worst relative error, problems) of ``got`` against the float64 ``ref``; against an
    all-zero reference the result's norm is the error; a non-finite value never passes."""
    worst, problems = 0.0, []
    for name, g, r in zip(names, got, ref):
        if g is None or r is None:
            if (g is None) != (r is None):
                problems.append(f"{name}: missing")
            continue
        if tuple(g.shape) != tuple(r.shape):
            problems.append(f"{name}: shape {tuple(g.shape)}, expected {tuple(r.shape)}")
            continue
        g64, r64 = g.detach().to("cpu", torch.float64), r.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(g64).all()):
            problems.append(f"{name}: not finite")
            continue
        norm = float(r64.norm())
        err = float((g64 - r64).norm()) / norm if norm > 0 else float(g64.norm())
        worst = max(worst, err)
        if not err <= TOLERANCE[dtype]:
            problems.append(f"{name}: error {err:.1e} > {TOLERANCE[dtype]:.0e}")
    return worst, problems


def _bits_differ(a: Sequence, b: Sequence, names: Sequence[str]) -> List[str]:
    bits = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)
    return [n for n, x, y in zip(names, a, b)
            if (x is None) != (y is None) or (x is not None and not torch.equal(bits(x), bits(y)))]


class _environment:
    """Sets environment variables for the duration of a call (e.g. SPLINET_DENSE_GEMM)."""

    def __init__(self, env):
        self.env, self.saved = dict(env), {}

    def __enter__(self):
        import os

        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        import os

        for k, v in self.saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def run_case(case: Case, backend: str, device: torch.device, dtype: torch.dtype) -> Row:
    """One row: ``case`` on ``backend`` against the float64 reference (see the module docstring)."""
    from ._info import backend_unavailable

    start = time.perf_counter()
    row = Row(PASS, str(device), backend, case.name, str(dtype).replace("torch.", ""), case.describe())
    why = backend_unavailable(backend, device, dtype)
    if why is not None:
        row.status, row.note = SKIP, why
        return row
    states = ["y", "z"] if case.kind == "hamiltonian" else ["x"]
    names = (states if case.kind == "hamiltonian" else ["out"]) + \
        [f"grad {n}" for n in states + ["weight", "bias", "scale"]]
    # The reference sees the values the backend sees: the inputs rounded to the row's dtype.
    inputs = [None if t is None else t.to(dtype).double() for t in make_inputs(case)]
    try:
        with _environment(case.env):
            ref = call(replace(case, compile=False), "reference", inputs, torch.device("cpu"), torch.float64)
            if case.stream:
                got = again = _on_busy_stream(case, backend, inputs, device, dtype)
            else:
                got = call(case, backend, inputs, device, dtype)
                again = got if case.compile else call(case, backend, inputs, device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except Exception as err:  # a kernel, launch or tracing error fails this row; the others still run
        row.status, row.note = FAIL, f"{type(err).__name__}: {err}".splitlines()[0][:200]
        row.seconds = time.perf_counter() - start
        return row
    row.error, problems = compare(got, ref, dtype, names)
    differ = _bits_differ(got, again, names)
    if differ:
        problems.append("not bitwise equal between two runs: " + ", ".join(differ))
    placed = {str(t.device) for t in got if t is not None}
    if placed != {str(device)}:
        problems.append(f"results on {sorted(placed)}, inputs on {device}")
    row.status, row.note = (FAIL, "; ".join(problems)) if problems else (PASS, "")
    row.seconds = time.perf_counter() - start
    return row


# ----------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------

def devices(which: str) -> List[torch.device]:
    """The devices of --device: "cpu", "cuda" (every visible GPU) or "all" (both)."""
    out = [torch.device("cpu")] if which in ("cpu", "all") else []
    if which in ("cuda", "all"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        out += [torch.device("cuda", i) for i in range(n)] or [torch.device("cuda")]
    return out


def plan_rows(device: torch.device, quick: bool = False, tiny: bool = False,
              backends: Sequence[str] = FUSED) -> List[Tuple[str, Case, torch.dtype]]:
    """(backend, case, dtype) of every row on ``device``, or the reason none runs there: a
    (backend, None, reason) entry per fused backend that will not run on it."""
    from . import _dispatch
    from ._info import backend_unavailable

    out = []
    for backend in backends:
        if device.type == "cuda" and not torch.cuda.is_available():
            why = "torch is a CPU-only build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
            if backend != "cpu":
                out.append((backend, None, f"no GPU visible ({why})"))
            continue
        why = backend_unavailable(backend, device)
        if why is not None:
            # Say why only for backends meant for this device type (the cpu backend on a GPU is no news).
            if (backend == "cpu") == (device.type == "cpu"):
                out.append((backend, None, why))
            continue
        impl = _dispatch._REGISTRY[backend]
        firsts = DENSE[:1] + [c for cs in CONV.values() for c in cs[:1]] + HAMILTONIAN[:1]
        for case in cases(backend, device, quick, tiny):
            for dtype in impl.dtypes:
                # 16-bit dtypes on the first case of each layer and where a case names them: each
                # new configuration of the Triton kernels is a JIT compile of its own.
                wide = dtype in (torch.float32, torch.float64) or case in firsts
                if dtype in case.dtypes if case.dtypes is not None else wide:
                    out.append((backend, case, dtype))
    return out


def format_row(r: Row) -> str:
    err = f"{r.error:.1e}" if r.error is not None else "-"
    return (f"{r.status:<4}  {r.device:<6} {r.backend:<6} {r.layer:<11} {r.dtype:<8} {err:>7}  {r.seconds:5.2f}s  "
            f"{r.case}" + (f"  | {r.note}" if r.note else ""))


HEADER = f"{'':<4}  {'device':<6} {'backend':<6} {'layer':<11} {'dtype':<8} {'error':>7}  {'time':>6}  case"


def run(which: str = "all", quick: bool = False, tiny: bool = False, backends: Sequence[str] = FUSED,
        echo=print) -> List[Row]:
    """Every row of ``backends`` on the devices of ``which``, printed (``echo``) as each ends."""
    echo(HEADER)
    rows = []
    # float32 means float32: no TF32 in cuBLAS / cuDNN, and deterministic cuDNN algorithms for
    # the bitwise run-to-run comparison; the caller's settings come back afterwards.
    flags = [(torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False),
             (torch.backends.cudnn, "deterministic", True), (torch.backends.cudnn, "benchmark", False)]
    saved = [getattr(obj, name) for obj, name, _ in flags]
    try:
        for obj, name, value in flags:
            setattr(obj, name, value)
        for device in devices(which):
            for backend, case, dtype in plan_rows(device, quick, tiny, backends):
                if case is None:
                    rows.append(Row(SKIP, str(device), backend, "all", "-", "-", note=dtype, missing=True))
                else:
                    rows.append(run_case(case, backend, device, dtype))
                echo(format_row(rows[-1]))
    finally:
        for (obj, name, _), value in zip(flags, saved):
            setattr(obj, name, value)
    return rows


# ----------------------------------------------------------------------------------------
# --bench
# ----------------------------------------------------------------------------------------

# Two sizes per device type: (label, case); float32, fwd + bwd.
BENCH_SIZES = {"cpu": [("dense B=64 m=16 N=10", _dense(64, 16, L=4, N=10)),
                       ("dense B=512 m=64 N=10", _dense(512, 64, L=4, N=10))],
               "cuda": [("dense B=1024 m=32 N=20", _dense(1024, 32, L=4, N=20)),
                        ("dense B=4096 m=256 N=10", _dense(4096, 256, L=4, N=10))]}


def bench(which: str = "all", seconds: float = 20.0, backends: Sequence[str] = FUSED, echo=print) -> List[dict]:
    """The time of a forward and backward pass of each backend against the eager reference
    on the same device, float32, at two sizes (torch.utils.benchmark, ``seconds`` in all)."""
    from torch.utils import benchmark

    from ._info import backend_unavailable

    jobs = [(device, backend, label, case) for device in devices(which)
            if device.type != "cuda" or torch.cuda.is_available()
            for backend in backends if backend_unavailable(backend, device) is None
            for label, case in BENCH_SIZES[device.type]]
    out = []
    if not jobs:
        echo("bench: no fused backend runs here")
        return out
    each = max(0.2, seconds / (2 * len(jobs)))
    echo(f"{'device':<6} {'backend':<7} {'case':<26} {'backend ms':>10} {'reference ms':>12} {'speedup':>8}")
    for device, backend, label, case in jobs:
        x, w, b, s, cot = [t.to(device, torch.float32) for t in make_inputs(case)]
        times = {}
        for name in (backend, "reference"):
            leaves = [t.detach().requires_grad_() for t in (x, w, b)]

            def step(name=name, leaves=leaves):
                import splinet_cuda as sc

                y = sc.spline_ode(*leaves, s, steps=case.N, degree=case.d, backend=name)
                torch.autograd.grad(y, leaves, cot)

            step()  # warm-up (first-call JIT of Triton, allocator)
            timer = benchmark.Timer(stmt="step()", globals={"step": step})
            times[name] = timer.blocked_autorange(min_run_time=each).median * 1e3
        out.append({"device": str(device), "backend": backend, "case": label, "ms": times[backend],
                    "reference_ms": times["reference"], "speedup": times["reference"] / times[backend]})
        echo(f"{str(device):<6} {backend:<7} {label:<26} {times[backend]:>10.3f} {times['reference']:>12.3f} "
             f"{out[-1]['speedup']:>7.1f}x")
    return out


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                   help="the devices to check (default all: the CPU and every visible GPU)")
    p.add_argument("--backends", default=",".join(FUSED),
                   help=f"comma list of the fused backends to check (default {','.join(FUSED)})")
    p.add_argument("--quick", action="store_true", help="fewer cases per backend")
    p.add_argument("--tiny", action="store_true",
                   help="one tiny call per CUDA kernel family only (for runs under compute-sanitizer)")
    p.add_argument("--bench", action="store_true",
                   help="then a ~20 s speed check of each backend against the eager reference")
    p.add_argument("--strict", action="store_true",
                   help="a fused backend that does not run on a checked device (not built, GPU not covered, "
                        "no GPU) is a failure, not a SKIP")


def main(args: argparse.Namespace) -> int:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(FUSED))
    if unknown:
        raise SystemExit(f"--backends: unknown {unknown}; expected some of {list(FUSED)}")
    start = time.perf_counter()
    rows = run(args.device, args.quick, args.tiny, backends)
    if args.strict:
        for r in rows:
            if r.missing:
                r.status = FAIL
    failed = summarize(rows, time.perf_counter() - start)
    if args.bench:
        print()
        bench(args.device, backends=backends)
    return 1 if failed else 0


def summarize(rows: Sequence[Row], seconds: float) -> int:
    """Prints the closing count line and every failed row again; returns the number failed."""
    counts = {s: sum(r.status == s for r in rows) for s in (PASS, FAIL, SKIP)}
    print(f"\n{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped in {seconds:.1f} s")
    for r in rows:
        if r.status == FAIL:
            print("FAILED: " + format_row(r))
    return counts[FAIL]
