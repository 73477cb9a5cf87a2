"""Command-line benchmark of the SpliNet layer implementations (``python -m bench``).

For every case of bench/cases.py and every implementation of bench/impls.py (fused
backends, the eager reference, torch.compile of the reference, torchdiffeq) it checks
output and gradients against the float64 reference, then times the forward, the backward
and the forward+backward (and with --train-step one optimizer step): with
torch.utils.benchmark on the CPU, with CUDA events on a GPU. An implementation that
disagrees is reported WRONG and not timed. Results (bench/results.py): a table on the
terminal, and ``<device>-<dtype>-<YYYYMMDD>.json/.csv/.png`` under --out (long format, one
row per case x implementation x mode), compared with the newest earlier file.

This module holds the timing and the CLI; FLOPs, the GEMM floor and peak memory are
measured by bench/metrics.py.

Legend: B batch, m width, C channels, L knot intervals, d degree, N steps.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script, `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.utils.benchmark
from tqdm import tqdm

from bench.cases import (CASE_SETS, CASE_SET_DOCS, DTYPES, MODES, TRAIN, Case, Inputs, check_agreement,
                         forward_backward, loss_fn, make_inputs, train_step_fn)
from bench.impls import IMPL_NAMES, Impl, default_impls, oracle_outputs
from bench.metrics import MODE_FACTOR, flops, peak_memory_cpu, peak_memory_cuda, product_fn
from bench.results import (ERROR, OK, SKIPPED, WRONG, compare, earlier_results, format_table, noise, results_stem,
                           round_spread, write_results)

REPO = Path(__file__).resolve().parent.parent
# A run's files go to the git-ignored build/ folder, so benchmarking leaves the source tree
# clean; bench/results/ holds the committed results (written with --out bench/results).
DEFAULT_OUT = REPO / "build" / "bench"


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

MIN_SAMPLES = 6  # per (case, implementation, mode) over all rounds; fewer make p20/p80 meaningless


def time_cpu(fn: Callable[[], object], min_run_time: float, min_samples: int = MIN_SAMPLES) -> np.ndarray:
    """Per-call times (ms) of ``fn`` from torch.utils.benchmark's blocked_autorange, at
    the process's thread count (Timer's default would be one thread), topped up with
    single calls to at least ``min_samples`` samples when one call outlasts ``min_run_time``."""
    timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times = list(timer.blocked_autorange(min_run_time=min_run_time).times)
    times += [timer.timeit(1).median for _ in range(min_samples - len(times))]
    return np.asarray(times) * 1e3


def time_cuda(fn: Callable[[], object], min_run_time: float, min_samples: int = MIN_SAMPLES) -> np.ndarray:
    """Per-call times (ms) of ``fn`` from CUDA events, after a warm-up; as many calls as
    fit in ``min_run_time`` (at least ``min_samples``, at most 1000)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
    reps = int(min(1000, max(min_samples, min_run_time * 1e3 / estimate_ms)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return np.asarray([s.elapsed_time(e) for s, e in events])


def mode_fn(fn: Callable, inputs: Inputs, mode: str, case: Optional[Case] = None) -> Callable[[], object]:
    """The timed statement of ``mode``: the forward; the gradients of one forward, kept for
    repeated backwards; forward, loss and gradients; or (``train``) one optimizer step of
    a small model around the layer (bench/cases.py: train_step_fn)."""
    if mode == TRAIN:
        step = train_step_fn(case, fn, inputs)
        step()  # builds what a first step builds (Adam's state; a compiled graph's variant)
        return step
    if mode == "fwd":
        return lambda: fn(*inputs)
    if mode == "bwd":
        loss = loss_fn(fn(*inputs))
        return lambda: torch.autograd.grad(loss, inputs, retain_graph=True)
    return lambda: torch.autograd.grad(loss_fn(fn(*inputs)), inputs)


# Timing rounds; each round times every implementation and mode in turn (bench/results.py
# round_spread compares the rounds' speedups to flag a noisy row).
ROUNDS = 3


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------

def _row(case: Case, impl: Impl, mode: str, status: str, *, agrees: Optional[bool],
         times: Optional[np.ndarray] = None, compile_s: Optional[float] = None,
         compile_cache: Optional[str] = None, note: str = "") -> dict:
    """One row of the results (the columns of bench/results.py CSV_FIELDS): the 20/50/80th
    percentiles of ``times``; speedup, GEMM floor and memory are filled in by bench_case."""
    p20, p50, p80 = np.quantile(times, [0.2, 0.5, 0.8]) if times is not None else (None, None, None)
    return {
        "case": case.name, "kind": case.kind, "shape": case.shape, "impl": impl.name, "mode": mode,
        "status": status, "agrees": agrees,
        "median_ms": None if p50 is None else float(p50),
        "p20_ms": None if p20 is None else float(p20),
        "p80_ms": None if p80 is None else float(p80),
        "speedup": None, "compile_s": compile_s, "compile_cache": compile_cache, "note": note,
        "gflops": None if p50 is None else flops(case, mode) / (p50 * 1e6),
        "gemm_ms": None, "of_gemm": None, "peak_mb": None, "mem_vs_ref": None,
    }


def bench_case(case: Case, impls: Sequence[Impl], device: torch.device, min_run_time: float,
               progress: Optional[tqdm] = None, modes: Sequence[str] = MODES) -> List[dict]:
    """Rows of one case: each implementation checked against the float64 reference, then
    timed in every mode of ``modes`` unless it disagrees, raises or does not apply."""
    inputs = make_inputs(case, device)
    expected = oracle_outputs(case, inputs)
    timer = time_cuda if device.type == "cuda" else time_cpu
    rows, ready = [], []
    for impl in impls:
        if progress is not None:
            progress.set_postfix_str(f"{case.name} / {impl.name}")
        reason = impl.skip(case, device)
        if reason is not None:
            rows += [_row(case, impl, mode, SKIPPED, agrees=None, note=reason) for mode in modes]
        else:
            with impl.environment():
                checked = _check_impl(case, impl, inputs, expected, modes)
            if isinstance(checked, list):
                rows += checked
            else:
                ready.append((impl, checked))
        if progress is not None:
            progress.update()
    # Interleaved: every round times each implementation and mode in turn, so a noisy
    # stretch of the machine hits them all alike.
    samples = {(impl.name, mode): [] for impl, _ in ready for mode in modes}
    failed: Dict[tuple, str] = {}
    for _ in range(ROUNDS):
        for impl, (fn, _) in ready:
            for mode in modes:
                if (impl.name, mode) in failed:
                    continue
                try:
                    with impl.environment():
                        samples[(impl.name, mode)].append(timer(mode_fn(fn, inputs, mode, case), min_run_time / ROUNDS,
                                                                -(-MIN_SAMPLES // ROUNDS)))
                except Exception as err:  # reported on its row, not fatal
                    failed[(impl.name, mode)] = f"{type(err).__name__}: {err}".splitlines()[0]
    for impl, (_, built) in ready:
        for mode in modes:
            key = (impl.name, mode)
            if key in failed:
                rows.append(_row(case, impl, mode, ERROR, agrees=True, note=failed[key], **built))
            else:
                row = _row(case, impl, mode, OK, agrees=True, times=np.concatenate(samples[key]), **built)
                row["round_ms"] = [float(np.median(t)) for t in samples[key]]
                rows.append(row)
    # The floor: the same products on the device's own GEMM/convolution, back to back.
    gemm_ms = float(np.median(timer(product_fn(case, inputs), min_run_time)))
    if case.memory:
        _measure_memory(case, impls, inputs, device, rows)
    ref = {r["mode"]: r for r in rows if r["impl"] == "reference" and r["status"] == OK}
    for r in rows:
        if r["status"] != OK:
            continue
        r["gemm_ms"] = gemm_ms * MODE_FACTOR[r["mode"]]
        r["of_gemm"] = r["gemm_ms"] / r["median_ms"]
        base = ref.get(r["mode"])
        if base is not None:
            r["speedup"] = base["median_ms"] / r["median_ms"]
            if r["peak_mb"] is not None and base["peak_mb"]:
                r["mem_vs_ref"] = r["peak_mb"] / base["peak_mb"]
            round_spread(r, base)
    return rows



def _measure_memory(case: Case, impls: Sequence[Impl], inputs: Inputs, device: torch.device,
                    rows: List[dict]) -> None:
    """Peak memory of one forward+backward per implementation that ran, on its fwd+bwd row:
    CUDA's allocator peak in this process; on the CPU the peak RSS of a fresh subprocess.
    Compiled implementations are left out: measuring one would compile it a second time."""
    for impl in impls:
        (row,) = [r for r in rows if r["impl"] == impl.name and r["mode"] == "fwd+bwd"]
        if row["status"] != OK or impl.compiled:
            continue
        try:
            if device.type == "cuda":
                with impl.environment():
                    row["peak_mb"] = peak_memory_cuda(impl.build(case), inputs)
            elif impl.name in IMPL_NAMES:  # rebuilt by name in the subprocess
                row["peak_mb"] = peak_memory_cpu(case, impl.name)
        except Exception as err:  # memory is extra information: never fatal
            row["note"] = (row["note"] + f" memory: {type(err).__name__}: {err}").strip()


def _check_impl(case: Case, impl: Impl, inputs: Inputs, expected, modes: Sequence[str] = MODES):
    """Builds ``impl`` and checks its first call (the build, for a compiled one) against
    ``expected``: its ERROR or WRONG rows, or (fn, build info) when it agrees."""
    cache_before = _inductor_cache_counts() if impl.compiled else None
    try:
        fn = impl.build(case)
        start = time.perf_counter()
        actual = forward_backward(fn, inputs)  # the first call: builds a compiled impl
        first_call_s = time.perf_counter() - start
        mismatch = check_agreement(actual, expected, case.torch_dtype, grads=impl.exact_grads)
    except Exception as err:  # an implementation that raises is reported, not fatal
        traceback.print_exc()  # the row keeps one line; the log keeps where it came from
        note = f"{type(err).__name__}: {err}".splitlines()[0]
        return [_row(case, impl, mode, ERROR, agrees=False, note=note) for mode in modes]
    built = {}
    if impl.compiled:
        hits, misses = (after - before for after, before in zip(_inductor_cache_counts(), cache_before))
        # "warm": Inductor found every graph in its on-disk cache (a rerun), so the build was cheaper.
        built = {"compile_s": first_call_s, "compile_cache": "warm" if hits and not misses else "cold"}
    if mismatch is not None:
        note = " ".join(mismatch.split())
        return [_row(case, impl, mode, WRONG, agrees=False, note=note, **built) for mode in modes]
    return fn, built


def _inductor_cache_counts():
    """(hits, misses) of Inductor's FX graph cache so far in this process."""
    import torch._dynamo.utils

    counts = torch._dynamo.utils.counters["inductor"]
    return counts["fxgraph_cache_hit"], counts["fxgraph_cache_miss"]


def run_benchmarks(cases: Sequence[Case], impls: Sequence[Impl], device: torch.device,
                   min_run_time: float, progress: bool = True, budget: Optional[float] = None,
                   modes: Sequence[str] = MODES) -> List[dict]:
    """Rows of every case (see :func:`bench_case`), with a tqdm bar over case x implementation.
    With a ``budget`` (seconds), the cases not yet started when it is spent (never the first)
    get SKIPPED rows, so a run under a hard time limit still writes its results."""
    rows: List[dict] = []
    start = time.perf_counter()
    with tqdm(total=len(cases) * len(impls), desc="bench", unit="impl", disable=not progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for i, case in enumerate(cases):
            if budget is not None and i > 0 and time.perf_counter() - start > budget:
                note = f"time budget of {budget:g} s spent before this case"
                rows += [_row(case, impl, mode, SKIPPED, agrees=None, note=note) for impl in impls for mode in modes]
                bar.update(len(impls))
                continue
            t0 = time.perf_counter()
            case_rows = bench_case(case, impls, device, min_run_time, bar, modes)
            for r in case_rows:  # where a run's time goes: checks, compiles, timing, memory
                r["case_s"] = round(time.perf_counter() - t0, 1)
            rows += case_rows
    return rows


# --------------------------------------------------------------------------------------
# Metadata: what produced the results (device, versions, git)
# --------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    """The device in words: the GPU's name, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_slug(device: torch.device) -> str:
    """The device for file names: "cpu", or the GPU's name, e.g. "nvidia-h100-80gb-hbm3"."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def git_sha() -> str:
    """The repository's HEAD (short), "+dirty" with uncommitted changes to tracked files."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def metadata(device: torch.device, dtype: str, sizes: str) -> dict:
    """The results file's ``meta``: what ran (device, dtype, --sizes) on what (torch, CUDA,
    threads, git, Python), and when; _run adds the wall time, noise and comparison."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "device": device_slug(device), "device_name": device_name(device), "dtype": dtype, "sizes": sizes,
        "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
        "git_sha": git_sha(), "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to run on")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="dtype of every case (default: each case's own; float32 unless the case list says)")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--sizes", choices=list(CASE_SETS), default="quick", metavar="{" + ",".join(CASE_SETS) + "}",
                       help="which case list to run: " + "; ".join(f"{k}: {v}" for k, v in CASE_SET_DOCS.items()))
    sizes.add_argument("--quick", dest="sizes", action="store_const", const="quick", help="same as --sizes quick")
    sizes.add_argument("--full", dest="sizes", action="store_const", const="full", help="same as --sizes full")
    p.add_argument("--cases", default=None,
                   help="comma list of case names of --sizes to keep (default: all; --list shows them)")
    p.add_argument("--list", action="store_true",
                   help="print every --sizes list with its cases and the implementations, then exit")
    p.add_argument("--backends", default=None,
                   help=f"comma list of implementations among {','.join(IMPL_NAMES)} "
                        "(default: every built backend and compiled; the reference always runs)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (slow to build)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads (torch.set_num_threads); 1 is steadier on a busy machine")
    p.add_argument("--min-run-time", type=float, default=0.25, help="seconds of timing per case, impl and mode")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="directory for the JSON, CSV and PNG (outside the sources; the committed results "
                        "are in bench/results/, written with --out bench/results)")
    p.add_argument("--compare", default="auto",
                   help="earlier results JSON to flag regressions against (> 10%% slower); 'auto': the newest "
                        "file in --out for this device, dtype and --sizes; 'none': no comparison")
    p.add_argument("--memory", action="store_true", help="measure peak memory on every case (default: marked cases)")
    p.add_argument("--train-step", action="store_true",
                   help="also time mode 'train': one whole optimizer step of a small model per implementation "
                        "(a lift, the layer, a head, cross-entropy, backward, Adam), as a training loop runs it")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which no new case starts (the rest are reported SKIPPED)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the cases and implementations that would run, time nothing (needs no GPU)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, extra_impls: Sequence[Impl] = ()) -> dict:
    """Runs the benchmark; returns {"meta", "rows", "paths"}. ``extra_impls`` are compared
    too (for experiments and tests of the harness)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, device, extra_impls)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, device: torch.device, extra_impls: Sequence[Impl]) -> dict:
    if device.type == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        raise SystemExit("--device cuda: no CUDA device is available to this PyTorch build")
    if args.budget is not None and args.budget <= 0:
        raise SystemExit(f"--budget must be > 0 seconds, got {args.budget}")
    names = None if args.backends is None else [n.strip() for n in args.backends.split(",") if n.strip()]
    try:
        impls = default_impls(names, compile=not args.no_compile) + list(extra_impls)
    except ValueError as err:
        raise SystemExit(f"--backends: {err}")
    if args.list:
        return _list(impls, device)
    cases = CASE_SETS[args.sizes]
    if args.cases is not None:
        keep = {c.strip() for c in args.cases.split(",")}
        unknown = keep - {c.name for c in cases}
        if unknown:
            raise SystemExit(f"--cases: unknown {sorted(unknown)} in --sizes {args.sizes}; "
                             f"known: {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in keep]
    cases = [replace(c, dtype=args.dtype or c.dtype, memory=c.memory or args.memory) for c in cases]
    dtypes = sorted({c.dtype for c in cases})
    dtype = dtypes[0] if len(dtypes) == 1 else "mixed"
    if args.dry_run:
        return _dry_run(cases, impls, device, args)
    if device.type == "cuda":
        # float32 means float32: without this cuDNN convolutions run in TF32, and the float32
        # reference itself misses the float64 oracle's tolerance.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    print(f"python -m bench: {len(cases)} cases (--sizes {args.sizes}) x {len(impls)} implementations on "
          f"{device}; results to {args.out}", file=sys.stderr)
    meta = metadata(device, dtype, args.sizes)
    if device.type == "cuda":
        meta["tf32"] = False
    start = time.perf_counter()
    modes = MODES + ((TRAIN,) if args.train_step else ())
    rows = run_benchmarks(cases, impls, device, args.min_run_time, progress=not args.no_progress,
                          budget=args.budget, modes=modes)
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    stem = results_stem(meta)
    earlier = None
    if args.compare == "auto":
        earlier = earlier_results(args.out, meta, args.out / f"{stem}.json")
    elif args.compare != "none":
        earlier = Path(args.compare)
    if earlier is not None:
        meta["compared_with"] = earlier.name
        compare(rows, earlier)
    noisy, meta["noisy_run"] = noise(rows)
    meta["noisy_rows"] = len(noisy)
    paths = write_results(rows, meta, args.out)
    print(f"\nsplinet_cuda benchmark: {meta['device_name']} ({meta['device']}), {dtype}, "
          f"torch {meta['torch']}, {meta['threads']} threads, git {meta['git_sha']}\n")
    print(format_table(rows))
    print(f"\n{meta['wall_s']} s; wrote {', '.join(str(p) for p in paths.values())}")
    return {"meta": meta, "rows": rows, "paths": paths}


def _list(impls: Sequence[Impl], device: torch.device) -> dict:
    """Prints every case list (``--sizes``) with its cases, and the implementations."""
    for name, cases in CASE_SETS.items():
        print(f"--sizes {name}: {CASE_SET_DOCS[name]}")
        for c in cases:
            extra = [t for t, on in (("torch.compile", c.compile), ("peak memory", c.memory)) if on]
            print(f"    {c.name:<20} {c.kind:<5} {c.dtype:<8} {c.shape}" + (f"  [{', '.join(extra)}]" if extra else ""))
    print(f"implementations on {device} (--backends): {', '.join(i.name for i in impls)}; all known: "
          f"{', '.join(IMPL_NAMES)}")
    return {"meta": None, "rows": [], "paths": {}, "sets": {k: [c.name for c in v] for k, v in CASE_SETS.items()}}


def _dry_run(cases: Sequence[Case], impls: Sequence[Impl], device: torch.device, args: argparse.Namespace) -> dict:
    """Prints what a run would do (cases, implementations, and why one would be skipped)."""
    plan = []
    print(f"python -m bench dry run: {len(cases)} cases x {len(impls)} implementations on {device}, "
          f"--sizes {args.sizes}, min run time {args.min_run_time} s per mode"
          + (f", budget {args.budget:g} s" if args.budget else "") + f"; results would go to {args.out}")
    for case in cases:
        print(f"  {case.name:<20} {case.kind:<5} {case.shape}" + ("  [peak memory]" if case.memory else ""))
        for impl in impls:
            reason = impl.skip(case, device)
            plan.append({"case": case.name, "impl": impl.name, "skip": reason})
            print(f"      {impl.name:<22} {'skipped: ' + reason if reason else 'runs'}")
    return {"meta": None, "rows": [], "paths": {}, "plan": plan}


if __name__ == "__main__":
    main()
