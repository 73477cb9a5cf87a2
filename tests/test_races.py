"""Races in the CUDA block programs without a GPU: the dense small-width program
(csrc/cuda/dense_program.h), the direct conv program (conv_program.h) and the fused GEMM body
(blend_gemm.h) run by teams of host threads that play a block's threads (warps, for the GEMM)
between barriers, every block of a launch at once (tests/cpp/cuda_emulated.cpp).

`make racecheck` (tools/racecheck.py) runs this file with the emulation built with
ThreadSanitizer: any report stops the process and fails the run, and the sweep below deletes
each barrier of each program in turn (the emulation's probe skips that call site in every
thread) and checks that ThreadSanitizer reports exactly the removals this file expects. In
the ordinary suite the same workloads run uninstrumented (checked against the CPU kernel)
and the sweep is skipped.

Legend: B batch, m width, C channels, N steps, K checkpoint interval, d degree.
"""
import os
import re
import signal
import subprocess
from collections import defaultdict

import pytest
import torch

from helpers import OP_RESULTS, assert_all_close, conv_inputs, dense_inputs, num_threads, requires

import emulation  # tests/emulation.py: the test-only extension

ops = torch.ops.splinet_cuda
emu = emulation.ops
needs_emu = requires("cuda-emulated")
# Under `make racecheck`: ThreadSanitizer is preloaded and the emulation is its build.
UNDER_TSAN = os.environ.get("SPLINET_RACECHECK") == "1" and "libtsan" in os.environ.get("LD_PRELOAD", "")
TSAN_EXIT = 66  # tools/racecheck.py's exitcode= for a report
SMALL, FUSED, DIRECT = 1, 3, 1  # the emulated ops' path argument (dense small / fused GEMM, conv direct)


@pytest.fixture(autouse=True)
def _blocks_at_once():
    """Every block of a launch runs at once, as on the GPU (the probe's concurrent mode)."""
    if emulation.AVAILABLE:
        emu.emulation_barriers([], True)
    yield
    if emulation.AVAILABLE:
        emu.emulation_barriers([], False)


def close(got, ref, dtype):
    tol = dict(rtol=1e-10, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    assert_all_close(got, ref, OP_RESULTS, **tol)


# --- the workloads -------------------------------------------------------------------------

def dense_run(B, m, N, d, K, variant, scheme, act, bias, dtype, path, tile, blocks, threads, last_only=False,
              check=True):
    x, w, b, s = dense_inputs(B, m, 2, d, bias=bias, dtype=dtype, requires_grad=False, seed=B + m + d)
    cfg = (N, d, act, scheme, variant, 0.2, K)
    states = emu.cuda_dense_fwd_emulated(x, w, b, s, *cfg, path, tile, blocks, threads)
    grad = torch.randn(states[-1].shape if last_only else states.shape, dtype=dtype,
                       generator=torch.Generator().manual_seed(1))
    got = emu.cuda_dense_bwd_emulated(grad, states, w, b, s, *cfg, path, tile, blocks, threads)
    if check:
        ref_states = ops.spline_dense_fwd(x, w, b, s, *cfg)
        ref = ops.spline_dense_bwd(grad, ref_states, w, b, s, *cfg)
        close([states, *got], [ref_states, *ref], dtype)


def conv_run(sd, B, C, N, d, K, variant, scheme, act, bias, dtype, blocks, threads, check=True):
    spatial = {1: (9,), 2: (5, 4), 3: (3, 4, 3)}[sd]
    kernel = {1: (3,), 2: (3, 1), 3: (3, 3, 1)}[sd]
    args = conv_inputs(sd, B=B, C=C, spatial=spatial, k=kernel, d=d, bias=bias, dtype=dtype, wscale=0.3,
                       requires_grad=False, seed=sd + C)
    cfg = (N, d, act, scheme, variant, 0.0, K)
    states = emu.cuda_conv_fwd_emulated(*args, *cfg, DIRECT, blocks, threads)
    grad = torch.randn(states.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    got = emu.cuda_conv_bwd_emulated(grad, states, *args[1:], *cfg, DIRECT, blocks, threads)
    if check:
        ref_states = ops.spline_conv_fwd(*args, *cfg)
        ref = ops.spline_conv_bwd(grad, ref_states, *args[1:], *cfg)
        close([states, *got], [ref_states, *ref], dtype)


# Tiles of 3 rows over 8 or 11 rows (a ragged last tile), fewer blocks than tiles (the
# persistent loop), every scheme and variant, degrees 0-3, K = 1 (every state saved) to 4
# (segments recomputed), float32 and float64, teams of 2 to 7 threads (none dividing the
# tile's elements evenly but 2); m = 40 at degree 3 keeps the gradient slots in the block's
# partials (too large for the shared-memory slot cache), the others cache them.
DENSE = [
    dict(B=8, m=5, N=6, d=2, K=3, variant="symmetric", scheme="rk4", act="tanh", bias=True, dtype=torch.float64,
         tile=3, blocks=2, threads=3),
    dict(B=11, m=4, N=4, d=3, K=1, variant="standard", scheme="rk4_38", act="relu", bias=True, dtype=torch.float32,
         tile=3, blocks=2, threads=4),
    dict(B=8, m=6, N=5, d=1, K=2, variant="antisymmetric", scheme="midpoint", act="softplus", bias=False,
         dtype=torch.float64, tile=3, blocks=3, threads=7),
    dict(B=7, m=3, N=4, d=0, K=4, variant="standard", scheme="euler", act="sigmoid", bias=True, dtype=torch.float32,
         tile=3, blocks=2, threads=2, last_only=True),
    dict(B=5, m=40, N=2, d=3, K=2, variant="symmetric", scheme="midpoint", act="tanh", bias=True,
         dtype=torch.float64, tile=3, blocks=2, threads=5),
]
# 3 samples over 2 blocks, 1-3 spatial dims, both dtypes, teams of 3 to 8.
CONV = [
    dict(sd=1, B=3, C=3, N=4, d=2, K=1, variant="standard", scheme="rk4", act="tanh", bias=True,
         dtype=torch.float64, blocks=2, threads=3),
    dict(sd=2, B=3, C=3, N=5, d=3, K=3, variant="symmetric", scheme="midpoint", act="relu", bias=True,
         dtype=torch.float32, blocks=2, threads=8),
    dict(sd=3, B=3, C=2, N=3, d=1, K=2, variant="standard", scheme="rk4_38", act="softplus", bias=False,
         dtype=torch.float64, blocks=2, threads=5),
]
# B = 130 rows and m = 67 columns: ragged 64- and 128-row tiles, five K slices of the
# products (double buffering), the weight gradients' K = B; degree 0 blends W(t) as the tiles
# load, degree 3 with 2-3 row tiles pre-blends it; teams of 3 threads (each plays several
# warps), 8 (one warp each) and 11 (more threads than warps: three play none in the
# products but load); 16 blocks split the weight gradients along K (split-K).
FUSED_CASES = [
    dict(B=130, m=67, N=2, d=0, K=2, variant="standard", scheme="midpoint", act="tanh", bias=True,
         dtype=torch.float64, tile=64, blocks=2, threads=3),
    dict(B=130, m=67, N=2, d=3, K=1, variant="symmetric", scheme="euler", act="relu", bias=True,
         dtype=torch.float32, tile=128, blocks=3, threads=8),
    dict(B=130, m=67, N=1, d=1, K=1, variant="antisymmetric", scheme="euler", act="sigmoid", bias=False,
         dtype=torch.float64, tile=64, blocks=16, threads=11),
]


def case_id(case):
    return "-".join(str(v).replace("torch.", "") for k, v in case.items() if k not in ("B", "m", "C", "N"))


@needs_emu
@pytest.mark.parametrize("case", DENSE, ids=case_id)
def test_dense_small_program_teams(case):
    with num_threads(1):
        dense_run(path=SMALL, **case)


@needs_emu
@pytest.mark.parametrize("case", CONV, ids=case_id)
def test_conv_direct_program_teams(case):
    with num_threads(1):
        conv_run(**case)


@needs_emu
@pytest.mark.parametrize("case", FUSED_CASES, ids=case_id)
def test_fused_gemm_teams(case):
    with num_threads(1):
        dense_run(path=FUSED, **case)


# --- the probe: delete each barrier in turn ----------------------------------------------

# One run of each program that passes every barrier it has: the symmetric variant (its
# extra product phase), a four-stage scheme, segments recomputed (K = 3 < N), the whole
# trajectory's gradient (the saved states' direct terms), a ragged last tile or sample and
# more tiles than blocks, forward and backward.
SWEEP = {
    "dense small program": lambda: dense_run(8, 5, 6, 2, 3, "symmetric", "rk4", "tanh", True, torch.float64, SMALL,
                                             3, 2, 3, check=False),
    "conv direct program": lambda: conv_run(2, 3, 3, 5, 2, 3, "symmetric", "rk4", "tanh", True, torch.float64, 2, 3,
                                            check=False),
    "fused GEMM": lambda: dense_run(130, 67, 1, 0, 1, "standard", "euler", "tanh", True, torch.float64, FUSED,
                                    64, 2, 3, check=False),
}
PROGRAM_FILES = {"dense small program": "dense_program.h", "conv direct program": "conv_program.h",
                 "fused GEMM": "blend_gemm.h"}

# What deleting each barrier does, by (file, function, n-th barrier of that function in source
# order): "race" (ThreadSanitizer must report it) or why its removal goes unreported. Every
# elementwise phase of the block programs maps element e to thread e mod nthreads over the
# same flat index, so a barrier between two elementwise phases over the same buffers orders
# nothing: no thread reads what another wrote. Those barriers are redundant as the programs
# stand (a change of mapping in one phase would make them needed), not untested.
OWN = "redundant: the phases on either side touch each element from the thread that owns it"
EXPECTED = {
    ("dense_program.h", "step", 1): "race",  # X_s (combine) -> the products read whole rows of X_s
    ("dense_program.h", "step", 2): "race",  # A_s, K_s / Y -> symmetric product reads Y rows; next blend rewrites W
    ("dense_program.h", "step", 3): "race",  # symmetric product reads W, Y -> the next stage's blend rewrites W
    ("dense_program.h", "step", 4): OWN,  # update x' (own elements) -> the next stage input reads x' elementwise
    ("dense_program.h", "adjoint", 1): "race",  # kbar (combine) -> symmetric V reads kbar rows
    ("dense_program.h", "adjoint", 2): "race",  # G -> dL/dX_s = G W and eq. 23 read G columns
    ("dense_program.h", "adjoint", 3): "race",  # eq. 23 / dL/dX_s read G, W -> the next stage's blend, kbar
    ("dense_program.h", "adjoint", 4): OWN,  # z update (own elements) -> the next step's combines
    ("dense_program.h", "forward_tile", 1): OWN,  # the tile's x_0 (own) -> the first stage input (own)
    ("dense_program.h", "load_state", 1): OWN,
    ("dense_program.h", "load_segment", 1): OWN,
    ("dense_program.h", "add_state_grad", 1): OWN,
    ("dense_program.h", "backward_tile", 1): OWN,
    ("dense_program.h", "backward_tile", 2): OWN,
    ("conv_program.h", "step", 1): "race",
    ("conv_program.h", "step", 2): "race",
    ("conv_program.h", "step", 3): "race",
    ("conv_program.h", "step", 4): OWN,
    ("conv_program.h", "adjoint", 1): "race",
    ("conv_program.h", "adjoint", 2): "race",
    ("conv_program.h", "adjoint", 3): "race",
    ("conv_program.h", "adjoint", 4): OWN,
    ("conv_program.h", "forward_sample", 1): OWN,
    ("conv_program.h", "forward_sample", 2): OWN,
    ("conv_program.h", "load_state", 1): OWN,
    ("conv_program.h", "load_segment", 1): OWN,
    ("conv_program.h", "add_state_grad", 1): OWN,
    ("conv_program.h", "backward_sample", 1): OWN,
    ("conv_program.h", "backward_sample", 2): OWN,
    ("blend_gemm.h", "gemm_k_loop", 1): "race",  # the first slice stored -> every warp reads it
    ("blend_gemm.h", "gemm_k_loop", 2): "race",  # a slice read -> its buffer rewritten two slices on
}


def _symbolize(lib, offsets):
    """offset -> [(function, file, line)], innermost inlined frame first (addr2line -i), for
    return addresses (looked up one byte back, inside the call)."""
    offsets = sorted(set(offsets))
    out = subprocess.run(["addr2line", "-e", lib, "-a", "-f", "-i", "-C", *[hex(o - 1) for o in offsets]],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    frames, cur = {}, None
    it = iter(out)
    for line in it:
        if line.startswith("0x"):
            cur = int(line, 16) + 1
            frames[cur] = []
            continue
        where = next(it).split(" (discriminator")[0]
        file, _, num = where.rpartition(":")
        frames[cur].append((line, os.path.basename(file), int(num) if num.isdigit() else 0))
    return frames


def _short(function):
    """splinet::DenseTile<double, ...>::step(long, long) -> step."""
    name = re.sub(r"<[^<>]*>", "", re.sub(r"<[^<>]*>", "", re.sub(r"<[^<>]*>", "", function)))
    return name.split("(")[0].split("::")[-1]


def barrier_sites(census):
    """The census's (site pair, crossings) triples grouped by the barrier's source line:
    {(file, line): [function, flattened pairs, crossings]}. The pair's first return address
    is the barrier's line where BlockCtx::sync was inlined, the second where it was not."""
    import splinet_cuda._emulation as lib

    triples = [census[i:i + 3] for i in range(0, len(census), 3)]
    frames = _symbolize(lib.__file__, [t[0] for t in triples] + [t[1] for t in triples])
    sites = {}
    for ra0, ra1, n in triples:
        chain = frames[ra0]
        inlined = _short(chain[0][0]) == "sync" and len(chain) > 1
        func, file, line = chain[1] if inlined else frames[ra1][0]
        site = sites.setdefault((file, line), [_short(func), [], 0])
        site[1].extend([ra0, ra1])
        site[2] += n
    return sites


def source_barriers(file):
    """The line of every ctx.sync() in a program header."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda", file)
    with open(path, encoding="utf-8") as f:
        return {i for i, line in enumerate(f, 1) if re.search(r"\bctx\.sync\(\)", line)}


def _run_without(pairs, workload, timeout=300):
    """The workload in a forked child with the barrier at these sites deleted: (exit status,
    stderr). The child inherits the loaded libraries and ThreadSanitizer's state (this
    process runs no other thread at the fork)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read)
            os.dup2(write, 2)
            signal.alarm(timeout)  # a deadlock would be the probe's bug: fail, do not hang
            emu.emulation_barriers(pairs, True)
            workload()
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, errors="replace") as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def sweep(name):
    """Census of the workload's barriers, then the workload once per barrier with that one
    deleted: [(file, line, function, ordinal, crossings, outcome)]."""
    workload = SWEEP[name]
    emu.emulation_barriers([], True)
    workload()
    sites = barrier_sites(emu.emulation_barriers([], True))
    ordinal = defaultdict(int)
    rows = []
    for (file, line) in sorted(sites):
        func, pairs, crossings = sites[(file, line)]
        ordinal[(file, func)] += 1
        code, err = _run_without(pairs, workload)
        if "starting new threads after multi-threaded fork" in err:
            pytest.fail("ThreadSanitizer cannot follow the fork: this process ran another thread")
        if code == TSAN_EXIT and "WARNING: ThreadSanitizer: data race" in err:
            outcome = "race"
        elif code == 0 and "ThreadSanitizer" not in err:
            outcome = "not reported"
        else:
            pytest.fail(f"{name}: the run without the barrier at {file}:{line} ended with status {code}:\n{err[-3000:]}")
        rows.append((file, line, func, ordinal[(file, func)], crossings, outcome))
    return rows


def write_report(name, rows):
    path = os.environ.get("SPLINET_RACECHECK_REPORT")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        caught = sum(r[5] == "race" for r in rows)
        f.write(f"{name}: {len(rows)} barriers, {caught} removals reported\n")
        for file, line, func, k, n, outcome in rows:
            f.write(f"  {file}:{line} {func} #{k} ({n} crossings): {outcome}\n")


@needs_emu
@pytest.mark.skipif(not UNDER_TSAN, reason="needs the ThreadSanitizer build (make racecheck)")
@pytest.mark.parametrize("name", list(SWEEP))
def test_deleted_barrier_is_reported(name):
    """Every barrier of the program is passed by its sweep workload, and deleting it is
    reported as a data race exactly where EXPECTED says so (at least one per program): the
    check sees a missing barrier."""
    rows = sweep(name)
    write_report(name, rows)
    file = PROGRAM_FILES[name]
    assert {r[1] for r in rows if r[0] == file} == source_barriers(file), "a barrier the workload never passed"
    got = {(r[0], r[2], r[3]): r[5] for r in rows}
    want = {key: ("race" if v == "race" else "not reported") for key, v in EXPECTED.items() if key[0] == file}
    assert got == want, "\n".join(f"{k}: {got.get(k)} (expected {want.get(k)})" for k in sorted(set(got) | set(want))
                                  if got.get(k) != want.get(k))
    assert "race" in got.values()


@needs_emu
@pytest.mark.skipif(UNDER_TSAN, reason="runs the program without barriers: racy by design")
def test_barrier_census_and_skip():
    """The probe, uninstrumented: the census names several barrier sites and their
    crossings, and a run with every one of them skipped completes (skipping never deadlocks);
    the result is then unspecified."""
    emu.emulation_barriers([], True)
    SWEEP["dense small program"]()
    census = emu.emulation_barriers([], True)
    assert len(census) % 3 == 0 and len(census) >= 3 * 5 and all(n > 0 for n in census[2::3])
    pairs = [a for i in range(0, len(census), 3) for a in census[i:i + 2]]
    emu.emulation_barriers(pairs, True)
    SWEEP["dense small program"]()
    assert emu.emulation_barriers([], True) == []  # nothing crossed: every barrier skipped
    with pytest.raises(ValueError, match="pairs"):
        emu.emulation_barriers([1, 2, 3], False)
