"""Static check of the Triton kernels for Hopper (sm_90), without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels as numpy and accepts code that the
Triton compiler rejects or that does not fit the hardware. This compiles, ahead of time for
``GPUTarget("cuda", 90, 32)``, the kernel configurations that the backend's own launchers
choose, and fails on

* a compile error (frontend, lowering or ptxas),
* ``metadata.shared`` above Hopper's 232,448-byte opt-in limit per block (the launch would
  fail with "out of resource: shared memory"),
* register spills above ``SPILL_LIMIT`` bytes of spill stores per thread (ptxas's report).

How the configurations are found: the launchers of ``triton_kernels`` take a ``wrap``
callable (``torch.library.wrap_triton`` on a GPU); here a recording ``wrap`` captures every
``kernel[grid](*args, **kwargs)`` instead of launching it, while the launchers run on small
CPU tensors. So the tile sizes, ``num_warps`` / ``num_stages`` and constexprs are exactly what
the backend's selection rules (``dense_blocks``, ``gemm_blocks``, ``uses_gemm``,
``conv_blocks`` and the ``*_options`` rules) pick; the widths and channel counts tried are
derived from those rules (one representative per distinct tile choice, a multiple of 16 as real
layers have). Each captured launch goes through Triton's own binder and ``_pack_args`` for
the target backend, so the signature and the launch-time specialisation (16-byte aligned
pointers, ``tt.divisibility`` of sizes divisible by 16, integers listed in
``do_not_specialize`` left alone) are those of a real launch. Launches that compile to the
same kernel (same signature, constexprs, attributes and options) are compiled once.

Coverage (``--full``: every configuration, about 5,600 kernels; by default the sample of
``in_sample``): every dtype (float32, float64, bfloat16, float16) and tile size at the heavy
corner (rk4_38, degree 3, the variants with extra products, both checkpoint forms), where
shared memory and registers peak, and every scheme, variant and degree one axis at a time
on the smallest tile in float32. Activations are sampled (one per configuration, cycling):
an activation changes a few instructions of the epilogue, not the tiles, the shared memory
or the live registers. Conv kernel sizes 3 and 5 (the taps are a runtime loop, so the kernel
size changes neither shared memory nor registers). ``--corners-only`` compiles only the
corners on the largest tile of each path and dtype (``make triton-check`` runs the sample
with 3.6.0, the GPU image's version, and the corners with the installed Triton, to bound the
time on a 2-core CI machine).

Usage: ``python tools/triton_check.py [--triton-path DIR] [--jobs 2] [--cache DIR]
[--corners-only | --full] [-k SUBSTR]`` (``DIR`` put first on sys.path selects another
Triton install, e.g. 3.6.0 under ``build/triton36``). Prints one line per compiled kernel:
shared bytes, registers, spill stores / loads, compile seconds, then the maxima per kernel;
exits non-zero on any failure. Compiled kernels are cached in ``build/triton-cache``
(Triton's on-disk cache; ptxas's report is kept beside it, since a cache hit skips ptxas).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import itertools
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Hopper's maximum dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin
# on H100 / H200: 227 KB).
SHARED_LIMIT = 232_448
# Spill stores per thread that a kernel may have. Spilled registers go to local memory,
# which lives in L1/L2. The spills this check exists for are tiles that do not fit the
# register file: kilobytes per thread (2-109 KB in the kernels it first caught), which turn
# every step of the trajectory loop into a round trip to memory and take minutes of ptxas
# time. A few hundred bytes is a handful of long-lived values: the float32 trajectory adjoint
# at the 64-wide tile with rk4 / rk4_38 and degree 3 spills 300-380 B with 8 warps (16 warps
# cap the registers at 128 and spill more), which costs far less than routing those widths
# to the per-stage GEMM path. 512 B (128 words per thread) separates the two.
SPILL_LIMIT = 512

ARCH = 90
WARP = 32


# --------------------------------------------------------------------------------------
# configurations: the launchers, run with a recording wrap
# --------------------------------------------------------------------------------------

class _Recorder:
    """A ``wrap`` for the launchers that records ``kernel[grid](*args, **kwargs)`` launches."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: rec.launches.append((kernel, args, kwargs))

        return _Grid()


def _representatives(rule, candidates):
    """One candidate per distinct value of ``rule`` (the largest candidate of each)."""
    out = {}
    for c in candidates:
        out[rule(c)] = c
    return sorted(out.values())


def configurations(keep=None):
    """Yields (label, kernel, args, kwargs) for every launch the launchers make over the grid
    (only for the configurations whose label ``keep(label, smallest)`` accepts, when given;
    ``smallest`` maps (kind, dtype) to the smallest width / channel count tried)."""
    import torch

    torch.set_num_threads(1)  # tiny host tensors; threads would only contend on a shared machine

    from splinet_cuda._triton import time_grid
    from splinet_cuda.triton_kernels import _common, conv, dense, dense_gemm

    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    schemes = ["euler", "midpoint", "rk4", "rk4_38"]
    variants = ["standard", "symmetric", "antisymmetric"]
    acts = list(_common.ACT_IDS)
    B = 64
    # Widths: one per distinct (path, tiles) the rules choose, multiples of 16.
    _dense_blocks = lambda B, m, dt: (dense.dense_blocks(B, m, dt) if "dtype" in
                                      inspect.signature(dense.dense_blocks).parameters else dense.dense_blocks(B, m))
    uses_gemm = lambda m, dt: (dense.uses_gemm(m, dt) if "dtype" in inspect.signature(dense.uses_gemm).parameters
                               else dense.uses_gemm(m))
    widths = {dt: _representatives(lambda m, dt=dt: (dense_gemm.gemm_blocks(B, m, dt) if uses_gemm(m, dt)
                                                      else _dense_blocks(B, m, dt)),
                                   range(16, 4 * dense.TRAJECTORY_MAX_WIDTH + 1, 16)) for dt in dtypes}
    conv_blocks = getattr(conv, "conv_blocks", None) or (lambda c, dt: conv._blocks(c))  # older name
    channels = {dt: _representatives(lambda c, dt=dt: conv_blocks(c, dt), range(16, 257, 16)) for dt in dtypes}
    smallest = {}
    for dt in dtypes:
        smallest[("dense", str(dt)[6:])] = min(widths[dt])
        smallest[("conv", str(dt)[6:])] = min(channels[dt])
        smallest[("dense-gemm", str(dt)[6:])] = min([m for m in widths[dt] if uses_gemm(m, dt)])
        smallest[("dense-max", str(dt)[6:])] = max([m for m in widths[dt] if not uses_gemm(m, dt)])
        smallest[("conv-max", str(dt)[6:])] = max(channels[dt])
    keep = keep or (lambda label, smallest: True)
    count = itertools.count()
    for dt in dtypes:
        for m, scheme, variant, d in itertools.product(widths[dt], schemes, variants, range(4)):
            i = next(count)
            act = acts[i % len(acts)]
            bias = i % 2 == 0
            # checkpoint 1 (every state saved) and 2 (recomputed segments), gradient of the
            # trajectory and of x_N alone: the backward kernel's SAVED_ALL / LAST_ONLY forms.
            for ck, last_only in ((1, False), (2, True)) if not uses_gemm(m, dt) else ((2, False),):
                label = f"dense {str(dt)[6:]} m={m} {scheme} {variant} d={d} {act} bias={bias} ck={ck}"
                if not keep(label, smallest):
                    continue
                steps = 3
                n = 2 + d
                x = torch.zeros(B, m, dtype=dt)
                w = torch.zeros(n, m, m, dtype=dt)
                b = torch.zeros(n, m, dtype=dt) if bias else None
                s = torch.ones((), dtype=dt)
                rec = _Recorder()
                args = (w, b, s, steps, d, act, scheme, variant, 0.1, ck)
                grid = time_grid(steps, n, d, scheme)
                states = dense.dense_forward(x, *args, grid=grid, wrap=rec)
                gs = torch.zeros_like(states[-1] if last_only else states)
                dense.dense_backward(gs, states, *args, grid=grid, wrap=rec)
                for launch in rec.launches:
                    yield (label,) + launch
        for C, k, scheme, variant, d in itertools.product(channels[dt], (3, 5), schemes, ("standard", "symmetric"),
                                                          range(4)):
            i = next(count)
            act = acts[i % len(acts)]
            bias = i % 2 == 0
            label = f"conv {str(dt)[6:]} C={C} k={k} {scheme} {variant} d={d} {act} bias={bias}"
            if not keep(label, smallest):
                continue
            n = 2 + d
            x = torch.zeros(2, C, 16, 16, dtype=dt)
            w = torch.zeros(n, C, C, k, k, dtype=dt)
            b = torch.zeros(n, C, dtype=dt) if bias else None
            s = torch.ones((), dtype=dt)
            rec = _Recorder()
            args = (w, b, s, 2, d, act, scheme, variant, 0.0, 1)
            grid = time_grid(2, n, d, scheme)
            states = conv.conv_forward(x, *args, grid=grid, wrap=rec)
            conv.conv_backward(torch.zeros_like(states), states, *args, grid=grid, wrap=rec)
            for launch in rec.launches:
                yield (label,) + launch


_HEAVY = {"scheme": "rk4_38", "d": "3"}


def _axes(label: str) -> dict:
    kind, dtype, size, *rest = label.split()
    ax = dict(kind=kind, dtype=dtype, size=int(size.split("=")[1]))
    for tok in rest:
        if "=" in tok:
            k, v = tok.split("=")
            ax[k] = v
        elif tok in ("euler", "midpoint", "rk4", "rk4_38"):
            ax["scheme"] = tok
        elif tok in ("standard", "symmetric", "antisymmetric"):
            ax["variant"] = tok
    return ax


def in_sample(label: str, smallest: dict) -> bool:
    """The configurations ``make triton-check`` compiles (``--full``: all of them).

    Shared memory and registers grow with the stages of the scheme, the degree (d + 1 tiles
    blended per product) and the variant's extra products / transposed loads, so the limits
    bind at the heavy corner (rk4_38, degree 3, the two variants with extra products: dense
    symmetric and antisymmetric, conv standard and symmetric). Compiled there: float32 and
    float64 at every tile size (the trajectory kernels' adjoint in its checkpointed form, and
    on the largest trajectory tile also with every state saved), conv kernel size 5 in
    float32; bfloat16 / float16 on the largest tile of each path, one variant (they differ
    from float32 only in the element type of loads and stores: the arithmetic is float32).
    Every other scheme, variant and degree is compiled on the smallest tile in float32, one
    axis moved off the corner at a time (on the GEMM path only the variant: schemes and
    degrees change the number of launches and blended tiles, which the corners cover), so
    each value of each axis compiles (frontend / lowering errors)."""
    ax = _axes(label)
    if ax["kind"] == "dense" and ax["size"] > smallest[("dense-gemm", ax["dtype"])]:
        return False  # one width per GEMM tile choice is enough: the GEMM tiles do not depend on m
    heavy_variants = ("symmetric", "antisymmetric") if ax["kind"] == "dense" else ("standard", "symmetric")
    half = ax["dtype"] in ("bfloat16", "float16")
    if half:
        heavy_variants = heavy_variants[1:]
    if ax["kind"] == "dense" and ax["size"] == smallest[("dense-max", ax["dtype"])]:
        # The widest trajectory tile: the variants the rules route to the GEMM path there
        # leave the standard one as the trajectory kernels' heaviest case.
        heavy_variants = heavy_variants + ("standard",)
    off = [ax["scheme"] != _HEAVY["scheme"], ax["d"] != _HEAVY["d"], ax["variant"] not in heavy_variants]
    if not any(off):
        if ax.get("k", "3") != "3" and ax["dtype"] != "float32":
            return False
        largest = ax["size"] in (smallest[(ax["kind"] + "-max", ax["dtype"])],
                                 smallest.get((ax["kind"] + "-gemm", ax["dtype"])))
        if (half or CORNERS_ONLY) and not largest:
            return False
        return ax.get("ck", "2") == "2" or largest
    small = (ax["size"] in (smallest[(ax["kind"], ax["dtype"])], smallest.get((ax["kind"] + "-gemm", ax["dtype"])))
             and ax.get("k", "3") == "3"
             and ax["dtype"] == "float32" and ax.get("ck", "2") == "2")
    if ax["kind"] == "dense" and ax["size"] == smallest[("dense-gemm", ax["dtype"])]:
        small = small and off[2]  # GEMM path: the standard variant (schemes and degrees: above)
    return (small and not CORNERS_ONLY and sum(off) == 1
            and (ax["variant"] != "standard" or ax["kind"] == "conv" or off[2]))


CORNERS_ONLY = False
# The trajectory adjoint takes 20-60 s per compile on 2 cores (every RK stage and its adjoint
# unrolled): it is compiled at the corners only, the axis sweeps compile its forward kernel,
# whose stage code it shares.
SWEEP_SKIP = ("_dense_bwd_kernel",)


def _is_corner(label: str) -> bool:
    ax = _axes(label)
    return ax["scheme"] == _HEAVY["scheme"] and ax["d"] == _HEAVY["d"]


def _arg_key(a):
    if hasattr(a, "data_ptr"):
        return ("t", str(a.dtype), a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or not isinstance(a, int):
        return a if not hasattr(a, "name") else repr(a)
    return ("i", a == 1, a % 16 == 0)


def _jobs(select=None, full=False):
    """Deduplicated compile jobs: {key: (label, kernel, signature, constexprs, attrs, options)}."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", ARCH, WARP))
    binders = {}
    jobs = {}
    seen = set()
    for label, kernel, args, kwargs in configurations(None if full else in_sample):
        if select and not all(part in f"{kernel.fn.__name__} {label}" for part in select.split("&")):
            continue
        if not full and kernel.fn.__name__ in SWEEP_SKIP and not _is_corner(label):
            continue
        # Launches that differ only in what the specialisation ignores (tensor values and
        # shapes, integers other than 1 / multiples of 16) bind to the same kernel: skip them
        # before the (slow) binder.
        pre = (kernel, tuple(_arg_key(a) for a in args), tuple(sorted((k, _arg_key(v)) for k, v in kwargs.items())))
        if pre in seen:
            continue
        seen.add(pre)
        if kernel not in binders:
            binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, backend)
        kwargs = dict(kwargs, debug=False)
        bound, spec, opts = binders[kernel](*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
        # Float constexprs are tableau coefficients and signs: the kernels branch only on
        # whether one is zero, otherwise it is an immediate operand. Kernels that differ only
        # in their nonzero values have the same code shape, tiles and resources: one compiles.
        key = "|".join([kernel.fn.__name__, repr(sorted(signature.items())),
                        repr(sorted((k, repr(v != 0.0 if isinstance(v, float) else v))
                                    for k, v in constexprs.items())),
                        repr(sorted(attrs.items())), f"w{options.num_warps}s{options.num_stages}"])
        if key not in jobs:
            jobs[key] = (label, kernel, signature, constexprs, attrs, options)
    return jobs


# --------------------------------------------------------------------------------------
# compiling
# --------------------------------------------------------------------------------------

_PTXAS = {"regs": re.compile(r"Used (\d+) registers"),
          "spill_st": re.compile(r"(\d+) bytes spill stores"),
          "spill_ld": re.compile(r"(\d+) bytes spill loads")}


def _parse_ptxas(log: str):
    out = {}
    for name, pat in _PTXAS.items():
        vals = [int(v) for v in pat.findall(log)]
        out[name] = max(vals) if vals else None
    return out if out["regs"] is not None else None


def _ptxas_report(compiled, facts_dir):
    """ptxas's resource report of a compiled kernel: the log Triton printed while compiling
    (TRITON_DUMP_PTXAS_LOG), else (a cache hit) the one stored for this kernel hash, else
    ptxas run again on the kernel's PTX."""
    path = os.path.join(facts_dir, f"{compiled.hash}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    from triton.backends.nvidia import compiler as nv

    ptx = compiled.asm["ptx"]
    src = os.path.join(facts_dir, f"{compiled.hash}.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    arch = f"sm_{ARCH}a" if ".target sm_90a" in ptx else f"sm_{ARCH}"
    proc = subprocess.run([nv.get_ptxas(ARCH).path, "-v", f"--gpu-name={arch}", src, "-o", os.devnull],
                          capture_output=True, text=True)
    os.remove(src)
    return _parse_ptxas(proc.stderr)


def _compile(key):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label, kernel, signature, constexprs, attrs, options = _JOBS[key]
    t0 = time.time()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", ARCH, WARP), options=options.__dict__)
    except Exception as exc:  # every failure is reported, the others still compile
        # The cause is at the end of a CompilationError (after the source excerpt), the
        # position at its start.
        msg = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        text = " | ".join(msg[:1] + msg[-2:]) if len(msg) > 3 else " | ".join(msg)
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ is not None else ""
        return key, dict(error=f"{type(exc).__name__}: {text}{cause}"[:500], secs=time.time() - t0)
    report = _parse_ptxas(log.getvalue())
    if report is not None:
        with open(os.path.join(_FACTS, f"{compiled.hash}.json"), "w") as f:
            json.dump(report, f)
    else:
        report = _ptxas_report(compiled, _FACTS)
    return key, dict(shared=compiled.metadata.shared, secs=time.time() - t0, **(report or {}))


_JOBS: dict = {}
_FACTS = ""


def _describe(key, label, options):
    name = key.split("|", 1)[0]
    return f"{name} [{label}] warps={options.num_warps} stages={options.num_stages}"


def check(select=None, jobs_n=2, cache=None, full=False) -> int:
    global _JOBS, _FACTS
    import multiprocessing

    import triton

    _FACTS = os.path.join(cache, "ptxas-facts")
    os.makedirs(_FACTS, exist_ok=True)
    t0 = time.time()
    _JOBS = _jobs(select, full)
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}), sm_{ARCH}: {len(_JOBS)} kernels "
          f"to compile (found in {time.time() - t0:.1f} s), cache {cache}", flush=True)
    # Longest first (more stages, more coefficients, wider tiles), so the pool ends together.
    order = sorted(_JOBS, key=lambda k: -len(k))
    failed = 0
    summary = {}
    ctx = multiprocessing.get_context("fork")  # the workers inherit the job table
    with ctx.Pool(jobs_n) as pool:
        for key, res in pool.imap_unordered(_compile, order):
            label, kernel, _, _, _, options = _JOBS[key]
            desc = _describe(key, label, options)
            problems = []
            if "error" in res:
                problems.append(res["error"])
            else:
                if res["shared"] > SHARED_LIMIT:
                    problems.append(f"shared {res['shared']} B > {SHARED_LIMIT}")
                if res.get("regs") is None:
                    problems.append("no ptxas report")
                elif res["spill_st"] > SPILL_LIMIT:
                    problems.append(f"spill stores {res['spill_st']} B > {SPILL_LIMIT}")
            facts = ("" if "error" in res else
                     f"shared={res['shared']} regs={res.get('regs')} spill={res.get('spill_st')}/{res.get('spill_ld')} ")
            status = "FAIL" if problems else "ok  "
            print(f"{status} {desc} {facts}{res['secs']:.1f}s" + (f"  <- {'; '.join(problems)}" if problems else ""),
                  flush=True)
            failed += bool(problems)
            name = key.split("|", 1)[0]
            agg = summary.setdefault(name, dict(n=0, shared=0, regs=0, spill=0))
            agg["n"] += 1
            if "error" not in res:
                agg["shared"] = max(agg["shared"], res["shared"])
                agg["regs"] = max(agg["regs"], res.get("regs") or 0)
                agg["spill"] = max(agg["spill"], res.get("spill_st") or 0)
    for name, agg in sorted(summary.items()):
        print(f"  {name}: {agg['n']} kernels, max shared {agg['shared']} B, max regs {agg['regs']}, "
              f"max spill stores {agg['spill']} B")
    print(f"triton {triton.__version__}: {len(_JOBS) - failed}/{len(_JOBS)} ok in {time.time() - t0:.0f} s")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--triton-path", help="directory put first on sys.path (another Triton install)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--cache", help="Triton's on-disk cache (default build/triton-cache)")
    p.add_argument("--corners-only", action="store_true",
                   help="only the heavy corners of in_sample() on the largest tile of each path and dtype")
    p.add_argument("--full", action="store_true", help="every configuration, not the sample of in_sample()")
    p.add_argument("-k", dest="select",
                   help="only configurations whose kernel name + label contain this ('&' separates substrings)")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this compiles for the GPU", file=sys.stderr)
        return 2
    if a.triton_path:
        sys.path.insert(0, os.path.abspath(a.triton_path))
    sys.path.insert(0, ROOT)
    global CORNERS_ONLY
    CORNERS_ONLY = a.corners_only
    # Set before Triton reads them. One cache serves every version: its keys hash the version.
    cache = os.path.abspath(a.cache or os.path.join(ROOT, "build", "triton-cache"))
    os.environ["TRITON_CACHE_DIR"] = cache
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    return check(a.select, a.jobs, cache, a.full)


if __name__ == "__main__":
    sys.exit(main())
