"""GPU smoke checks of what the test suite does not reach, each layer call compared with the
pure-PyTorch reference (float64, same inputs) and run twice for bitwise determinism.

Groups (--group, comma list):
  smoke      every path that asks for more than 48 KB of shared memory (the launch must
             raise the block's dynamic shared-memory limit first), the 128x128 tensor-core
             GEMM tile with more tiles than SMs, empty batches, a non-default stream, and
             tensors on a second GPU where there is one
  sanitizer  tiny shapes of every CUDA block program (for compute-sanitizer racecheck /
             synccheck: few launches, quick under instrumentation)
  compile    torch.compile(fullgraph=True) with the default Inductor backend on the cuda
             and triton backends, forward and backward against eager, then a second batch
             size (a recompile with dynamic shapes)

    python tools/gpu_smoke.py --group smoke [--out DIR]   # on a GPU
    python tools/gpu_smoke.py --dry-run                    # anywhere: list the checks

Without a GPU, --device cpu --backends cpu runs the same harness on the CPU backend (the
tests of tools/gpu_check.py do, at reduced sizes). Results: a table on stdout (one line as
each check ends, so a timed-out run still shows what ran) and smoke-<groups>.json in --out.
Exit status 1 when a check fails.

The shared-memory figures in the notes are this revision's formulas in csrc/cuda/
(dense_small_smem_elems, conv_small_smem_elems, GemmTile::kSmemBytes) for the shapes
chosen; the checks themselves only need the shapes.

Legend: B batch, m width, C channels, L knot intervals, d degree, N steps.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from tools/: the package is the repository's
    sys.path.insert(0, str(ROOT))

PASS, FAIL, SKIP, REJECTED = "PASS", "FAIL", "SKIP", "REJECTED"

# Relative error ||got - ref|| / ||ref|| against the float64 reference, per dtype of the
# backend's inputs (fp32/fp64 accumulation everywhere; bf16/fp16 store states and inputs in
# 16 bits between stages).
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


@dataclass(frozen=True)
class Layer:
    """One layer call: dense (x (B, m)) when ``spatial`` is empty, else conv (x (B, m, *spatial),
    m channels, kernel ``k``)."""

    B: int
    m: int
    L: int = 2
    d: int = 2
    N: int = 3
    scheme: str = "euler"
    variant: str = "standard"
    activation: str = "tanh"
    dtype: str = "float32"
    spatial: Tuple[int, ...] = ()
    k: int = 3
    bias: bool = True

    @property
    def kind(self) -> str:
        return "conv" if self.spatial else "dense"

    def describe(self) -> str:
        size = f"B={self.B} m={self.m}" if not self.spatial else \
            f"B={self.B} C={self.m} {'x'.join(map(str, self.spatial))} k={self.k}"
        return (f"{size} L={self.L} d={self.d} N={self.N} {self.scheme} {self.variant} {self.activation} "
                f"{self.dtype}" + ("" if self.bias else " nobias"))


@dataclass(frozen=True)
class Check:
    """A layer call on each of ``backends`` (a backend name, or "cuda+cublas": the cuda
    backend with SPLINET_DENSE_GEMM=cublas). ``mode``: "match" (reference and determinism),
    "stream" (on a non-default stream that is busy first), "device2" (tensors on cuda:1
    while cuda:0 is current). ``env`` is set while it runs. ``optional``: a backend may
    reject the configuration with a ValueError/TypeError (reported REJECTED, not a failure);
    otherwise a rejection fails the check."""

    name: str
    layer: Layer
    backends: Tuple[str, ...]
    why: str
    mode: str = "match"
    env: Dict[str, str] = field(default_factory=dict)
    optional: bool = False


def _dense(B, m, **kw) -> Layer:
    return Layer(B, m, **kw)


def _conv(B, C, spatial, **kw) -> Layer:
    return Layer(B, C, spatial=tuple(spatial), **kw)


CT = ("cuda", "triton")
SMOKE: List[Check] = [
    # Small-width dense program: one block per batch tile of TB rows, W(t), bias and TB x m
    # stage buffers in shared memory; TB = min(1024 / m, B / SMs) halved until the backward
    # fits 100 KB, so only a large batch (B >= 132 TB on an H200) gets the large tiles.
    Check("dense-small-m64-rk4-f32", _dense(4096, 64, L=4, d=3, N=6, scheme="rk4"), CT,
          "cuda: TB=16, fwd 62 KB, bwd 86 KB; triton: the width 33-64 rk4 d=3 trajectory kernel"),
    Check("dense-small-m64-euler-f64", _dense(4096, 64, L=3, d=2, N=5, variant="antisymmetric", activation="relu",
                                              dtype="float64"), CT, "cuda: TB=16, fwd and bwd 99 KB"),
    Check("dense-small-m32-rk438-f64", _dense(8192, 32, L=2, d=3, N=4, scheme="rk4_38", variant="symmetric",
                                              activation="sigmoid", dtype="float64"), CT,
          "cuda: TB=16 (the backward's fit), fwd 54 KB, bwd 78 KB"),
    Check("dense-small-m32-slots-f32", _dense(8192, 32, L=5, d=3, N=7, scheme="rk4", activation="softplus"), CT,
          "cuda: TB=32, fwd 49 KB, bwd 91 KB with the 17 KB cache of the d+1 gradient slots"),
    # Fused blended GEMM (bf16/fp16 only; fp32/fp64 take cuBLAS): 128 x 128 tiles once the
    # tiles reach the SM count.
    Check("dense-gemm128-bf16", _dense(4096, 1024, L=8, d=3, N=4, dtype="bfloat16"), CT + ("cuda+cublas",),
          "cuda: 128x128 wmma tile, 32x8 = 256 tiles > 132 SMs, 46 KB"),
    Check("dense-gemm64-bf16-ragged", _dense(300, 200, L=2, d=2, N=3, scheme="midpoint", variant="symmetric",
                                             activation="relu", dtype="bfloat16"), CT + ("cuda+cublas",),
          "cuda: 64x64 tiles, ragged edges"),
    Check("dense-gemm64-f16-antisym", _dense(130, 96, L=3, d=1, N=3, scheme="rk4", variant="antisymmetric",
                                             dtype="float16"), CT + ("cuda+cublas",), "cuda: 64x64 tiles, fp16"),
    Check("dense-large-f32-cublas", _dense(512, 160, L=2, d=2, N=3, scheme="rk4"), CT,
          "cuda: blend + cuBLAS (TF32 off); triton: fp32 GEMM tiles"),
    # Direct conv program: the blended filter (C x C x k^D) in shared memory.
    Check("conv-direct-C32-f64", _conv(6, 32, (12, 12), L=2, d=2, N=3, activation="relu", dtype="float64"), CT,
          "cuda: 74 KB filter; triton: float64 conv"),
    Check("conv-direct-C24-slots-f32", _conv(5, 24, (10, 10), L=3, d=1, N=4, variant="symmetric"), CT,
          "cuda: bwd 62 KB with the filter-gradient slots"),
    Check("conv-direct-3d-C16-f32", _conv(2, 16, (8, 8, 8), L=2, d=1, N=3, activation="relu"), ("cuda",),
          "cuda: 3-D, bwd 83 KB with the filter-gradient slots"),
    Check("conv-cudnn-C40-f32", _conv(4, 40, (16, 16), L=2, d=2, N=3, scheme="rk4"), CT,
          "cuda: the cuDNN path (deterministic mode, TF32 off)"),
    Check("conv-C64-bf16", _conv(8, 64, (16, 16), L=2, d=3, N=3, activation="relu", dtype="bfloat16"), CT,
          "bf16 conv, fp32 accumulation"),
    # Empty batches on every path.
    Check("zero-dense-small", _dense(0, 8), CT, "B = 0"),
    Check("zero-dense-large-bf16", _dense(0, 128, dtype="bfloat16"), CT + ("cuda+cublas",), "B = 0"),
    Check("zero-dense-large-f32", _dense(0, 96), CT, "B = 0"),
    Check("zero-conv", _conv(0, 4, (8, 8)), CT, "B = 0"),
    Check("zero-conv-cudnn", _conv(0, 40, (8, 8)), ("cuda",), "B = 0"),
    # The current stream and the tensors' device, as PyTorch ops honour them.
    Check("stream-dense-small", _dense(512, 16, N=4), CT, "a busy non-default stream", mode="stream"),
    Check("stream-dense-large-bf16", _dense(512, 256, N=3, dtype="bfloat16"), CT, "a busy non-default stream",
          mode="stream"),
    Check("stream-conv", _conv(4, 8, (16, 16), N=3), CT, "a busy non-default stream", mode="stream"),
    Check("device2-dense", _dense(256, 16, N=3), CT, "tensors on cuda:1, cuda:0 current", mode="device2"),
    Check("device2-dense-large-bf16", _dense(256, 256, N=3, dtype="bfloat16"), CT,
          "tensors on cuda:1, cuda:0 current", mode="device2"),
    Check("device2-conv", _conv(2, 8, (8, 8), N=3), CT, "tensors on cuda:1, cuda:0 current", mode="device2"),
]

# One tiny call per CUDA block program and dtype family, for compute-sanitizer.
SANITIZER: List[Check] = [
    Check("san-dense-small-f32", _dense(9, 5, L=2, d=2, N=3, scheme="rk4"), ("cuda",), "dense small fwd + bwd"),
    Check("san-dense-small-bf16", _dense(9, 12, L=2, d=1, N=2, variant="symmetric", dtype="bfloat16"), ("cuda",),
          "dense small, 16-bit"),
    Check("san-dense-gemm-bf16", _dense(70, 80, L=2, d=1, N=2, dtype="bfloat16"), ("cuda",),
          "fused GEMM, 64x64 tiles"),
    Check("san-dense-gemm-f16", _dense(40, 72, L=1, d=1, N=1, scheme="midpoint", variant="symmetric",
                                       dtype="float16"), ("cuda",), "fused GEMM, fp16"),
    Check("san-conv-direct-f32", _conv(2, 3, (6, 6), L=2, d=2, N=2, scheme="midpoint"), ("cuda",),
          "conv direct fwd + bwd"),
    Check("san-conv-direct-bf16", _conv(2, 4, (9,), L=1, d=1, N=2, variant="symmetric", dtype="bfloat16"),
          ("cuda",), "conv direct, 16-bit"),
]

GROUPS = {"smoke": SMOKE, "sanitizer": SANITIZER}
BACKEND_ORDER = ("cuda", "cuda+cublas", "triton")


# ----------------------------------------------------------------------------------------
# One layer call
# ----------------------------------------------------------------------------------------

def _dtype(name: str):
    import torch

    return getattr(torch, name)


def make_inputs(layer: Layer, seed: int = 0):
    """float64 CPU tensors (x, weight, bias or None, scale, cotangent of y): weights scaled by
    0.8 / sqrt(fan_in) so that the N steps stay tame."""
    import torch

    g = torch.Generator().manual_seed(seed)
    fan_in = layer.m * layer.k ** len(layer.spatial)
    x = torch.randn((layer.B, layer.m, *layer.spatial), generator=g, dtype=torch.float64)
    w = torch.randn((layer.L + layer.d, layer.m, layer.m) + (layer.k,) * len(layer.spatial), generator=g,
                    dtype=torch.float64) * (0.8 / math.sqrt(fan_in))
    b = 0.3 * torch.randn((layer.L + layer.d, layer.m), generator=g, dtype=torch.float64) if layer.bias else None
    s = torch.tensor(1.1, dtype=torch.float64)
    cot = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, w, b, s, cot


def call(layer: Layer, backend: str, inputs, device, dtype: Optional[str] = None):
    """(y, grad x, grad weight, grad bias, grad scale) of ``backend`` on ``inputs`` cast to
    ``dtype`` (default the layer's) on ``device``; the loss is <y, cotangent>."""
    import torch

    import splinet_cuda as sc
    from bench.impls import set_environment

    dt = _dtype(dtype or layer.dtype)
    x, w, b, s, cot = (None if t is None else t.detach().to(device=device, dtype=dt, copy=True) for t in inputs)
    leaves = [t.requires_grad_() for t in (x, w, b, s) if t is not None]
    fn = sc.spline_ode_conv if layer.spatial else sc.spline_ode
    name, env = (("cuda", {"SPLINET_DENSE_GEMM": "cublas"}) if backend == "cuda+cublas" else (backend, {}))
    with set_environment(env):
        y = fn(x, w, b, s, steps=layer.N, degree=layer.d, activation=layer.activation, scheme=layer.scheme,
               variant=layer.variant, backend=name)
        grads = torch.autograd.grad(y, leaves, grad_outputs=cot)
    grads = list(grads)
    if b is None:
        grads.insert(2, None)
    return [y.detach()] + grads


NAMES = ("out", "grad x", "grad weight", "grad bias", "grad scale")


def compare(got: Sequence, ref: Sequence, dtype: str) -> Tuple[bool, float, str]:
    """(agrees, worst relative error, what differs) of ``got`` against the float64 ``ref``;
    against an all-zero reference the result's norm is the error; NaN never passes."""
    import torch

    worst, problems = 0.0, []
    for name, g, r in zip(NAMES, got, ref):
        if g is None or r is None:
            if (g is None) != (r is None):
                problems.append(f"{name}: missing")
            continue
        if tuple(g.shape) != tuple(r.shape):
            problems.append(f"{name}: shape {tuple(g.shape)}, expected {tuple(r.shape)}")
            continue
        g64, r64 = g.detach().to(device="cpu", dtype=torch.float64), r.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(g64).all():
            problems.append(f"{name}: not finite")
            continue
        norm = float(r64.norm())
        err = float((g64 - r64).norm()) / norm if norm > 0 else float(g64.norm())
        worst = max(worst, err)
        if err > TOLERANCE[dtype]:
            problems.append(f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}")
    return not problems, worst, "; ".join(problems)


def bitwise_equal(a: Sequence, b: Sequence) -> str:
    """'' when two runs' outputs are bitwise equal (NaN payloads and signed zeros included),
    else which differ."""
    import torch

    bits = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)
    diff = [n for n, x, y in zip(NAMES, a, b)
            if (x is None) != (y is None) or (x is not None and not torch.equal(bits(x), bits(y)))]
    return "" if not diff else "not bitwise equal between two runs: " + ", ".join(diff)


# ----------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------

@dataclass
class Outcome:
    check: str
    backend: str
    status: str
    error: Optional[float]
    seconds: float
    note: str
    shape: str


def _available(backend: str) -> bool:
    import splinet_cuda as sc

    return (backend.split("+")[0]) in sc.available_backends()


def run_check(check: Check, backend: str, device: str) -> Outcome:
    """One check on one backend (see :class:`Check`)."""
    import torch

    start = time.perf_counter()
    layer = check.layer
    out = lambda status, err, note: Outcome(check.name, backend, status, err, round(time.perf_counter() - start, 3),
                                            note, layer.describe())
    if not _available(backend):
        return out(SKIP, None, f"backend {backend.split('+')[0]!r} not available here")
    dev = torch.device(device)
    if check.mode in ("stream", "device2") and dev.type != "cuda":
        return out(SKIP, None, f"{check.mode} needs a GPU")
    if check.mode == "device2":
        if torch.cuda.device_count() < 2:
            return out(SKIP, None, f"{torch.cuda.device_count()} GPU: no second device")
        dev = torch.device("cuda", 1)
    # Inputs rounded to the layer's dtype first: the reference then sees exactly what the
    # backend sees, and the error measures the backend's arithmetic alone.
    inputs = [None if t is None else t.to(_dtype(layer.dtype)).double() for t in make_inputs(layer)]
    from bench.impls import set_environment

    with set_environment(check.env):
        try:
            ref = call(layer, "reference", inputs, dev, "float64")
        except Exception as err:  # e.g. a sticky CUDA error left by an earlier check
            traceback.print_exc()
            return out(FAIL, None, f"the reference failed: {type(err).__name__}: {err}".splitlines()[0][:300])
        try:
            if check.mode == "stream":
                got, again = _on_busy_stream(layer, backend, inputs, dev), None
            elif check.mode == "device2":
                with torch.cuda.device(0):
                    got, again = call(layer, backend, inputs, dev), call(layer, backend, inputs, dev)
            else:
                got, again = call(layer, backend, inputs, dev), call(layer, backend, inputs, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        except (ValueError, TypeError, NotImplementedError) as err:
            # Rejected by the argument checks, before any kernel ran.
            traceback.print_exc()
            return out(REJECTED if check.optional else FAIL, None,
                       f"{type(err).__name__}: {err}".splitlines()[0][:300])
        except Exception as err:  # a kernel or launch error: this check fails, the others still run
            traceback.print_exc()
            return out(FAIL, None, f"{type(err).__name__}: {err}".splitlines()[0][:300])
    ok, err, note = compare(got, ref, layer.dtype)
    if check.mode == "device2" and ok:
        placed = [t.device for t in got if t is not None]
        if any(p != dev for p in placed):
            ok, note = False, f"results on {sorted(set(map(str, placed)))}, inputs on {dev}"
    if again is not None:
        nondet = bitwise_equal(got, again)
        if nondet:
            ok, note = False, "; ".join(filter(None, [note, nondet]))
    return out(PASS if ok else FAIL, err, note)


def _on_busy_stream(layer: Layer, backend: str, inputs, dev):
    """The call on a non-default stream that first sleeps and then writes the inputs: a
    kernel launched on any other stream reads the inputs before they are written."""
    import torch

    stream = torch.cuda.Stream(dev)
    staged = [None if t is None else t.to(dev) for t in inputs]
    stream.wait_stream(torch.cuda.current_stream(dev))  # the copies above are on the default stream
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)  # ~25 ms at ~2 GHz
        fresh = [None if t is None else t * 1 for t in staged]  # written on `stream` after the sleep
        got = call(layer, backend, fresh, dev)
    stream.synchronize()
    return got


def run_compile_checks(device: str, backends: Sequence[str], echo=print) -> List[Outcome]:
    """torch.compile(fullgraph=True) (default Inductor) of a model holding a SpliNet layer:
    loss and every parameter gradient against eager, then again at another batch size."""
    import torch

    import splinet_cuda as sc

    results = []
    for backend in backends:
        for kind in ("dense", "conv2d"):
            start = time.perf_counter()
            name = f"compile-{kind}"
            if not _available(backend):
                results.append(Outcome(name, backend, SKIP, None, 0.0, "backend not available here", kind))
                echo(format_outcome(results[-1]))
                continue
            torch.manual_seed(0)
            torch._dynamo.reset()
            if kind == "dense":
                layer = sc.SplineODE(16, knots=3, degree=2, steps=4, scheme="rk4", learn_scale=True, backend=backend,
                                     device=device)
                model = torch.nn.Sequential(layer, torch.nn.Linear(16, 3, device=device))
                shapes = [(33, 16), (20, 16)]
            else:
                layer = sc.SplineODEConv2d(6, 3, knots=2, degree=1, steps=3, learn_scale=True, backend=backend,
                                           device=device)
                model = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(6 * 64, 3, device=device))
                shapes = [(5, 6, 8, 8), (3, 6, 8, 8)]
            try:
                compiled = torch.compile(model, fullgraph=True)
                worst, notes = 0.0, []
                for shape in shapes:
                    x = torch.randn(shape, device=device)
                    ref = _loss_and_grads(model, model, x)
                    got = _loss_and_grads(model, compiled, x)
                    for (pname, a), b in zip(ref.items(), got.values()):
                        err = float((a.double() - b.double()).norm() / a.double().norm().clamp_min(1e-30))
                        worst = max(worst, err)
                        if not err <= 1e-4:
                            notes.append(f"batch {shape[0]}: {pname} relative error {err:.2e}")
                status = PASS if not notes else FAIL
                note = "; ".join(notes)
            except Exception as err:
                traceback.print_exc()
                status, worst, note = FAIL, None, f"{type(err).__name__}: {err}".splitlines()[0][:300]
            results.append(Outcome(name, backend, status, worst, round(time.perf_counter() - start, 3), note,
                                   f"batches {[s[0] for s in shapes]}"))
            echo(format_outcome(results[-1]))
    return results


def _loss_and_grads(model, fn, x) -> Dict[str, "object"]:
    import torch

    model.zero_grad()
    loss = fn(x).square().mean()
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.detach().clone() for n, p in model.named_parameters()}}


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------

def format_outcome(o: Outcome) -> str:
    err = f"{o.error:.1e}" if o.error is not None else "-"
    return f"{o.status:<8} {o.check:<28} {o.backend:<12} err {err:>8} {o.seconds:7.2f} s  {o.shape}" + \
        (f"  | {o.note}" if o.note else "")


def select(groups: Sequence[str], names: Optional[Sequence[str]] = None) -> List[Check]:
    checks = [c for g in groups if g in GROUPS for c in GROUPS[g]]
    if names:
        unknown = set(names) - {c.name for c in checks}
        if unknown:
            raise ValueError(f"--checks: unknown {sorted(unknown)}")
        checks = [c for c in checks if c.name in names]
    return checks


def run_checks(checks: Sequence[Check], device: str, backends: Optional[Sequence[str]] = None,
               echo=print) -> List[Outcome]:
    """Every check on each of its backends (restricted to ``backends`` when given; a check
    with none of them runs on ``backends`` instead, for the CPU harness tests). The CUDA
    backend's checks come first: the Triton ones start with JIT compiles, and a run cut
    short by its timeout should still have covered the CUDA kernels."""
    import torch

    pairs = []
    for c in checks:
        names = c.backends if backends is None else ([b for b in c.backends if b in backends] or list(backends))
        pairs += [(c, b) for b in names]
    pairs.sort(key=lambda cb: BACKEND_ORDER.index(cb[1]) if cb[1] in BACKEND_ORDER else len(BACKEND_ORDER))
    results = []
    for c, b in pairs:
        results.append(run_check(c, b, device))
        echo(format_outcome(results[-1]))
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", default="smoke", help="comma list of smoke, sanitizer, compile")
    p.add_argument("--checks", default=None, help="comma list of check names to keep")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--backends", default=None, help="comma list: only these backends (default: each check's)")
    p.add_argument("--out", default=None, help="directory for smoke-<groups>.json")
    p.add_argument("--tag", default="", help="suffix of the JSON file's name (e.g. the sanitizer tool)")
    p.add_argument("--dry-run", action="store_true", help="list the checks and exit")
    args = p.parse_args(argv)
    args.groups = [g.strip() for g in args.group.split(",") if g.strip()]
    bad = [g for g in args.groups if g not in (*GROUPS, "compile")]
    if bad or not args.groups:
        p.error(f"--group: unknown {bad}; expected some of {[*GROUPS, 'compile']}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.checks.split(",")] if args.checks else None
    checks = select(args.groups, names)
    if args.dry_run:
        for c in checks:
            print(f"{c.name:<28} {c.mode:<7} {','.join(c.backends):<28} {c.layer.describe()}  | {c.why}"
                  + (f"  [{' '.join(f'{k}={v}' for k, v in c.env.items())}]" if c.env else ""))
        if "compile" in args.groups:
            print("compile-dense, compile-conv2d on cuda, triton: fullgraph, default Inductor, batches 33/20 and 5/3")
        print(f"{len(checks)} checks{' + compile' if 'compile' in args.groups else ''} (dry run: nothing ran)")
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("no GPU visible: nothing to check (use --dry-run, or --device cpu --backends cpu)")
        return 1
    # float32 means float32: no TF32 in cuBLAS/cuDNN, and deterministic cuDNN algorithms for
    # the bitwise run-to-run comparison of the cuDNN conv path.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    start = time.perf_counter()
    results = run_checks(checks, device, backends)
    if "compile" in args.groups:
        results += run_compile_checks(device, backends or ["cuda", "triton"])
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP, REJECTED)}
    print(f"\n{' '.join(f'{v} {k}' for k, v in counts.items())} in {time.perf_counter() - start:.1f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = "-".join(args.groups) + (f"-{args.tag}" if args.tag else "")
        (out / f"smoke-{tag}.json").write_text(json.dumps(
            {"device": str(device), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
             "torch": torch.__version__, "results": [asdict(r) for r in results]}, indent=1))
    return 1 if counts[FAIL] else 0


if __name__ == "__main__":
    sys.exit(main())
