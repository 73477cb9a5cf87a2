"""Builds the CPU extension and the test-only emulation extension with AddressSanitizer and
UndefinedBehaviorSanitizer into build/sanitize/ and runs tests under them (make sanitize).

    python tools/sanitize.py                 # build, then the CI subset (SUBSET_* below)
    python tools/sanitize.py --tests all     # build, then every CPU test
    python tools/sanitize.py --build-only
    python tools/sanitize.py -- tests/test_fused_dense.py -k relu   # build, then these pytest args

The normal in-place build is untouched: build/sanitize/ holds a copy of the package (its
Python files and the sanitized libraries) and goes on PYTHONPATH ahead of the checkout. The
extensions come from setup.py's extensions() (the same sources and flags as `make build-test`,
with SPLINET_EMULATION=1), with -O1 instead of -O3 (what the sanitizer documentation
recommends for reasonable speed with exact stacks), debug info and the sanitizer flags added.
Python is not instrumented, so the runtimes are preloaded (LD_PRELOAD). Any ASan or UBSan
report stops the process (halt_on_error) and fails the run; LeakSanitizer checks the live
process at the end of the test session (pytest_sessionfinish) and any leak it reports, bar
the third-party entries of tests/sanitizer_suppressions.txt, fails the run too.
tools/racecheck.py builds its ThreadSanitizer emulation with build() here.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "sanitize")
PKG = os.path.join(OUT, "site")  # goes on PYTHONPATH: splinet_cuda/ and triton_kernels/
SAN_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
SUPPRESSIONS = os.path.join(ROOT, "tests", "sanitizer_suppressions.txt")
# The extensions, as their paths appear in a report's stack frames.
OWN_LIBRARIES = ("splinet_cuda/_C", "splinet_cuda/_emulation")

# The CI subset: every CPU kernel path under the sanitizers in about a tenth of the full
# suite's time (docs/reliability.md lists what it leaves out). The property tests, with the
# "sanitize" profile (the ci profile's first sixth), draw every size-chosen path
# of the dense, conv and Hamiltonian kernels and the emulated CUDA programs; the chosen tests
# below add the paths they draw too rarely to rely on (the float32 GEMMs at large widths,
# ragged fused-GEMM tiles, split-K weight gradients, thread teams at a barrier, kernels wider
# than the plane) and the extension's own argument checks.
SUBSET_FILES = ["test_properties.py", "test_basis_op.py", "test_validation.py", "test_fused_dense.py",
                "test_fused_conv.py", "test_cuda_dense.py", "test_cuda_conv.py", "test_memory.py"]
SUBSET_KEYWORDS = " or ".join([
    "test_properties", "test_basis_op", "test_validation",
    "test_cpu_float32_products", "test_cpu_float32_tanh_within_3_ulp",
    "test_cpu_transposed_chunks_thread_count_between_forward_and_backward", "test_cpu_transposed_chunks_gradcheck",
    "test_cpu_kept_preactivations_gradcheck_and_grad_of_states", "test_cpu_wide_deterministic",
    "test_cpu_keeps_preactivations_only_for_a_backward", "test_cpu_direct_and_aten_paths",
    "test_cpu_same_bits_for_any_thread_count",
    "test_emulated_small_program_with_thread_teams", "test_emulated_large_width_paths_agree",
    "(test_emulated_split_k_weight_gradient and standard-64)",
    "(test_emulated_fused_gemm_ragged_tiles and standard-rk4-tanh-3-128)",
    "test_emulated_small_rows_spread_over_multiprocessors", "test_emulated_direct_program_with_thread_teams",
    "test_emulated_float32_and_wide_kernels", "test_emulated_edge_shapes_and_last_only",
    "test_bytes_visible_and_released", "test_limit_bounds_and_zero_turns_off",
    "test_newest_shapes_evict_the_oldest",
])
# Tests that never reach the extensions' kernels, or only through the Triton interpreter,
# the benchmark harness or subprocesses that do not inherit the preload usefully.
FULL_EXCLUDE = ["tests/test_triton.py", "tests/test_bench.py", "tests/test_gpu_check.py",
                "tests/test_cuda_archs.py", "tests/test_build.py", "tests/test_packaging.py",
                "tests/test_examples.py", "tests/test_ddp.py"]


def _load_setup():
    spec = importlib.util.spec_from_file_location("splinet_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: setup() does not run
    return mod


def _sanitized(ext, flags):
    cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
    cxx = [f for f in cxx if not re.fullmatch(r"-O\d|-g0", f)] + ["-O1", "-g"] + flags
    ext.extra_compile_args = {"cxx": cxx}
    ext.extra_link_args = [f for f in ext.extra_link_args if f != "-s"] + flags
    return ext


def build(jobs: str, out: str = OUT, flags=SAN_FLAGS, only=None) -> str:
    """setup.py's extensions (those named in `only`, or all) built with `flags` into out/,
    and the package as the tests import it in out/site/: the checkout's Python files and the
    libraries just built. Returns that site directory (the PYTHONPATH entry)."""
    os.environ.update(SPLINET_EMULATION="1", SPLINET_DEBUG="1", FORCE_ONLY_CPU="1", MAX_JOBS=jobs)
    os.chdir(ROOT)  # setup.py's sources are relative to the repository root
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension

    exts = [_sanitized(e, flags) for e in _load_setup().extensions() if only is None or e.name in only]
    dist = Distribution(dict(name="splinet_cuda", ext_modules=exts,
                             cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)}))
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib = os.path.join(out, "lib")
    cmd.build_temp = os.path.join(out, "temp")
    dist.run_command("build_ext")
    site = os.path.join(out, "site")
    for name in ("splinet_cuda", "triton_kernels"):
        shutil.rmtree(os.path.join(site, name), ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, name), os.path.join(site, name),
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for lib in glob.glob(os.path.join(out, "lib", "splinet_cuda", "*.so")):
        shutil.copy2(lib, os.path.join(site, "splinet_cuda"))
    return site


def _runtime(name: str) -> str:
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        sys.exit(f"sanitize: gcc does not know {name} (install gcc's sanitizer runtimes)")
    return path


def environment(log_prefix: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PKG] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["LD_PRELOAD"] = " ".join([_runtime("libasan.so"), _runtime("libubsan.so")])
    env["ASAN_OPTIONS"] = ":".join([
        "halt_on_error=1", "abort_on_error=0", "exitcode=86", "detect_leaks=1",
        "strict_init_order=1", "check_initialization_order=1",
    ])
    # LeakSanitizer: one check at the end of the test session, in the pytest process, while
    # the interpreter is alive (pytest_sessionfinish below), not at exit: at exit CPython and
    # torch leave most of their memory unfreed by design, tens of thousands of stacks, more
    # than LeakSanitizer keeps (it stops collecting at 5000, so a leak of ours could drop
    # out). PYTHONMALLOC=malloc puts Python's objects on the tracked heap, so that memory
    # owned by a live object (a tensor's storage held by its Python wrapper) is reachable.
    env["PYTHONMALLOC"] = "malloc"
    # Stacks are unwound by frame pointers (fast): through torch and CPython, built without
    # them, an allocation's stack may stop short of the extension's frames, so every direct
    # leak fails the run whatever its stack names (leak_report_failures), bar the
    # suppressions file's third-party entries.
    env["LSAN_OPTIONS"] = f"leak_check_at_exit=0:suppressions={SUPPRESSIONS}:print_suppressions=0:log_path={log_prefix}"
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], os.path.dirname(os.path.abspath(__file__))])
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1:exitcode=87"
    env["SPLINET_REQUIRE_EMULATION"] = "1"
    env.setdefault("SPLINET_FUZZ_PROFILE", "sanitize")
    # The float32 chunk products through the hand-written AVX-512 GEMM wherever the CPU has
    # AVX-512 (on Intel CPUs the default is ATen's, whose code is not ours to sanitize);
    # SPLINET_CPU_GEMM=aten in the environment runs the ATen path instead.
    env.setdefault("SPLINET_CPU_GEMM", "avx512")
    return env


def pytest_configure(config):
    """Under run_tests, the sanitized libraries must be the ones imported (not the checkout's)."""
    if os.environ.get("LD_PRELOAD", "").find("libasan") < 0:
        return
    import splinet_cuda._C as native

    if not os.path.abspath(native.__file__).startswith(PKG + os.sep):
        raise RuntimeError(f"sanitize: imported {native.__file__}, not the sanitized build in {PKG}")


def pytest_sessionfinish(session, exitstatus):
    """The leak check (this module is loaded as a pytest plugin by run_tests): every object
    the tests made is gone or reachable by now, so an unreachable block allocated through the
    extensions is theirs to have freed."""
    import ctypes
    import gc

    gc.collect()
    try:
        check = ctypes.CDLL(None).__lsan_do_recoverable_leak_check
    except AttributeError:
        return  # not under the sanitizer runtime
    check()


def leak_report_failures(log_prefix: str) -> list[str]:
    """Every sanitizer report in the logs: an ASan or UBSan error, a sanitizer's own failure
    (an unreadable suppressions file), and each leak LeakSanitizer reports after the
    suppressions: a direct leak whatever its stack, an indirect one (memory reachable only
    from a direct leak, reported with it) where its stack names the extensions."""
    bad = []
    for path in glob.glob(log_prefix + "*"):
        text = open(path, encoding="utf-8", errors="replace").read()
        if re.search(r"ERROR: AddressSanitizer|runtime error:|Sanitizer: failed|CHECK failed|fatal error", text):
            bad.append(text)
            continue
        for block in re.split(r"\n(?=(?:Direct|Indirect) leak of )", text):
            if block.startswith("Direct leak") or (block.startswith("Indirect leak")
                                                    and any(lib in block for lib in OWN_LIBRARIES)):
                bad.append(block)
    return bad


def run_tests(pytest_args: list[str]) -> int:
    log_dir = os.path.join(OUT, "logs")
    shutil.rmtree(log_dir, ignore_errors=True)
    os.makedirs(log_dir)
    log_prefix = os.path.join(log_dir, "sanitizer")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "sanitize", *pytest_args]
    print("sanitize:", " ".join(pytest_args), flush=True)
    # Run from build/sanitize so that the checkout's own splinet_cuda/ (first on sys.path when
    # python runs from the root) cannot shadow the sanitized copy; rootdir stays the checkout.
    cmd += ["--rootdir", ROOT, "-c", os.path.join(ROOT, "pyproject.toml")]
    rc = subprocess.call(cmd, cwd=OUT, env=environment(log_prefix))
    failures = leak_report_failures(log_prefix)
    for text in failures:
        print(text, file=sys.stderr)
    if rc in (86, 87):
        print(f"sanitize: a sanitizer report stopped the run (exit {rc})", file=sys.stderr)
    if failures:
        print(f"sanitize: {len(failures)} report(s) in the extensions (logs in {log_dir})", file=sys.stderr)
        return rc or 1
    if rc == 0:
        print("sanitize: no ASan/UBSan report, no leak in the extensions")
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", choices=["ci", "all"], default="ci", help="the CI subset (default) or every CPU test")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--jobs", default=os.environ.get("MAX_JOBS", "2"))
    ap.add_argument("pytest_args", nargs="*", help="after --: pytest arguments instead of --tests")
    args = ap.parse_args()
    build(args.jobs)
    if args.build_only:
        return 0
    if args.pytest_args:  # paths relative to the checkout (pytest runs from build/sanitize/)
        selection = [os.path.join(ROOT, a) if os.path.exists(os.path.join(ROOT, a.split("::")[0])) else a
                     for a in args.pytest_args]
    elif args.tests == "all":
        selection = [os.path.join(ROOT, "tests")] + [f"--ignore={os.path.join(ROOT, t)}" for t in FULL_EXCLUDE]
    else:
        selection = [os.path.join(ROOT, "tests", t) for t in SUBSET_FILES] + ["-k", SUBSET_KEYWORDS]
    return run_tests(selection)


if __name__ == "__main__":
    sys.exit(main())
