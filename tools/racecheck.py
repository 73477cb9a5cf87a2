"""Builds the test-only emulation extension with ThreadSanitizer into build/tsan/ and runs the
race check of the CUDA block programs under it, tests/test_races.py (make racecheck).

    python tools/racecheck.py                  # build, then tests/test_races.py
    python tools/racecheck.py --build-only
    python tools/racecheck.py -- -k dense      # build, then these pytest args on tests/test_races.py

The build is tools/sanitize.py's (setup.py's emulation extension, -O1 -g, its own directory,
the package copied to build/tsan/site/ ahead of the checkout on PYTHONPATH) with
-fsanitize=thread, frame pointers and SPLINET_RACECHECK (the emulation's barrier probe reads
its call sites through them). Only the emulation is instrumented: the block programs are
what runs on several threads; splinet_cuda._C (the CPU kernels the workloads are checked
against) is the checkout's own build, copied beside it, run on one thread. ATen and OpenMP
stay single-threaded (OMP_NUM_THREADS=1 and torch.set_num_threads(1) in the tests), so no
uninstrumented code runs concurrently with the teams and no suppression is needed
(tests/tsan_suppressions.txt says so and stays empty). Any ThreadSanitizer report in the
pytest process stops it (halt_on_error, exit status 66) and fails the run; the sweep's
deliberately broken runs happen in forked children whose reports the test reads itself.
The interpreter runs under `setarch -R` (no address randomisation) where that is allowed:
gcc's ThreadSanitizer aborts with "unexpected memory mapping" on kernels whose high-entropy
address randomisation puts libraries where its shadow memory goes.
"""
from __future__ import annotations

import argparse
import glob
import os
import platform
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sanitize  # noqa: E402  (tools/sanitize.py: the build and the runtime lookup)

ROOT = sanitize.ROOT
OUT = os.path.join(ROOT, "build", "tsan")
FLAGS = ["-fsanitize=thread", "-fno-omit-frame-pointer", "-DSPLINET_RACECHECK"]
SUPPRESSIONS = os.path.join(ROOT, "tests", "tsan_suppressions.txt")
TESTS = os.path.join(ROOT, "tests", "test_races.py")
REPORT = os.path.join(OUT, "barriers.txt")


def build(jobs: str) -> str:
    site = sanitize.build(jobs, out=OUT, flags=FLAGS, only=["splinet_cuda._emulation"])
    native = glob.glob(os.path.join(ROOT, "splinet_cuda", "_C.*.so")) + glob.glob(os.path.join(ROOT, "splinet_cuda", "_C.so"))
    if not native:
        sys.exit("racecheck: splinet_cuda/_C is not built in the checkout (make build-test first)")
    shutil.copy2(native[0], os.path.join(site, "splinet_cuda"))
    return site


def environment(site: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([site] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["LD_PRELOAD"] = sanitize._runtime("libtsan.so")
    # history_size=4: more of each thread's past accesses kept, so that the report of a race
    # can name the earlier access's stack (the phases between barriers are long loops).
    env["TSAN_OPTIONS"] = ":".join([
        "halt_on_error=1", "exitcode=66", f"suppressions={SUPPRESSIONS}", "history_size=4",
        "second_deadlock_stack=1",
    ])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", SPLINET_RACECHECK="1", SPLINET_REQUIRE_EMULATION="1",
               SPLINET_RACECHECK_REPORT=REPORT)
    return env


def _no_randomisation() -> list[str]:
    """`setarch <arch> -R` where it works here (a container may forbid the personality call)."""
    cmd = ["setarch", platform.machine(), "-R"]
    try:
        ok = subprocess.run(cmd + ["true"], capture_output=True).returncode == 0
    except OSError:
        ok = False
    return cmd if ok else []


def run_tests(site: str, pytest_args: list[str]) -> int:
    if os.path.exists(REPORT):
        os.remove(REPORT)
    cmd = _no_randomisation() + [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TESTS, *pytest_args,
                                 "--rootdir", ROOT, "-c", os.path.join(ROOT, "pyproject.toml")]
    # From build/tsan/, so that the checkout's own splinet_cuda/ cannot shadow the copy.
    rc = subprocess.call(cmd, cwd=OUT, env=environment(site))
    if os.path.exists(REPORT):
        print(open(REPORT, encoding="utf-8").read(), end="")
    if rc == 66:
        print("racecheck: a ThreadSanitizer report stopped the run (exit 66)", file=sys.stderr)
    elif rc == 0:
        print("racecheck: no ThreadSanitizer report")
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--jobs", default=os.environ.get("MAX_JOBS", "2"))
    ap.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments")
    args = ap.parse_args()
    site = build(args.jobs)
    if args.build_only:
        return 0
    return run_tests(site, args.pytest_args)


if __name__ == "__main__":
    sys.exit(main())
