"""One command for a GPU machine: builds splinet_cuda for the local GPU, then validates and
benchmarks it, every step under its own timeout, with every log and result in one directory.

    make gpu-check             # python3 tools/gpu_check.py
    make gpu-check DRY_RUN=1   # python3 tools/gpu_check.py --dry-run: no GPU needed (`make test` runs it)

It works offline with the machine's own python3 (its CUDA torch, triton, pytest, ninja,
setuptools): no virtualenv, no pip, no network. The extension is built in place
(``setup.py build_ext --inplace``) with FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST set to the
local GPUs' compute capabilities only and MAX_JOBS set to every core. The steps, in order,
with their time limits in seconds (planned for one H200 machine with 16 cores; the four
checks run at the same time, and the longest path, 555 s, stays under BUDGET_S so that the
command fits a 10-minute call with the probe before and the packing after):

    build      200  compile the CPU and CUDA extension (one .cu file per core at once)
    import      15  the package imports and registers the cuda and triton backends
    tests      150  the CUDA, Triton and fused-backend test files on the GPU (pytest)
    then at the same time, 80 s each:
      smoke         tools/gpu_smoke.py: what the tests do not reach (large shared memory,
                    tiles over SMs, empty batches, determinism, streams, a second GPU)
      racecheck     compute-sanitizer --tool racecheck on tiny shapes of every block program
      synccheck     compute-sanitizer --tool synccheck on the same
      compile       torch.compile(fullgraph=True), default Inductor, cuda and triton backends
      ddp           examples/ddp.py under torchrun, one process per GPU, NCCL
    bench      110  python -m bench --device cuda --sizes gpu (short GPU mode), alone on the GPU

A failed or timed-out step does not stop the others. Results go to --out, else $OUT when it
is set, else build/gpu-check/ (build/gpu-check-dry-run/ for a dry run): logs/<step>.log,
summary.md and summary.json (step, status, seconds, log tail), the bench results (also
kept in bench/results/). With $OUT (a device lease brings back at most 8 files) the logs
are packed into logs.tar.gz.

The dry run plans the same steps, prints their exact commands, environments and timeouts,
and checks the offline setup path without a GPU: the python imports torch, triton, pytest,
ninja and setuptools, nvcc is found, setup.py configures the CUDA extension for the arch
list it would use, no step reaches for the network; then it runs each step's own dry run
(the import, test collection, the smoke and bench plans) through the same executor.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()

# The whole run must fit a 10-minute device call; 30 s of it are left for starting python,
# probing the machine and packing the results.
CALL_LIMIT_S = 600
BUDGET_S = 570
STEP_BUDGET: Dict[str, float] = {
    # nvcc compiles one .cu file per core; the slowest file (at most 120 s for one
    # architecture on a busy 2-core machine here), not the core count, sets the time.
    "build": 200,
    "import": 15,
    # Several hundred GPU tests; the cold Triton JIT compiles of the Triton suite dominate.
    "tests": 150,
    # The correctness checks share the GPU and the cores (CHECKS_GROUP): one 80 s window.
    "smoke": 80,
    "racecheck": 80,
    "synccheck": 80,
    "compile": 80,
    "ddp": 80,
    "bench": 110,
}
CHECKS_GROUP = "checks"
# The bench stops starting new cases after this many seconds, so it writes its results
# (and plots) before the step's timeout even when its last case is slow.
BENCH_BUDGET_S = 80
DRY_STEP_LIMIT_S = 120  # a dry run's step (imports, collection, plans) on a busy CPU machine
PER_TEST_TIMEOUT_S = 60
TAIL_LINES = 15

# Test files of the GPU step: the CUDA and Triton suites and the fused-backend suites, which
# parametrize over the cuda device when a GPU is visible (tests/conftest.py). The emulation
# tests run the CUDA programs on the CPU; CI runs them, so the GPU step leaves them out.
TEST_GLOBS = ("tests/test_cuda_*.py", "tests/test_triton*.py", "tests/test_fused_*.py")
TEST_DESELECT = "not emulated"

BENCH_BACKENDS = "cuda,triton,cuda+cublas,compiled+cudagraphs"

# compute-sanitizer instruments only the block programs' kernel (csrc/cuda/cuda_exec.cuh),
# the only kernels with shared memory and barriers: racecheck and synccheck have nothing to
# find in PyTorch's own kernels, and instrumenting them all would eat the step's time.
SANITIZER_KERNEL = "block_kernel"

PASS, FAIL, TIMEOUT, SKIP = "PASS", "FAIL", "TIMEOUT", "SKIP"

# Required on the GPU machine's python (module name -> what for). pytest-timeout and
# pytest-xdist are optional: a per-test timeout and parallel test processes when present.
REQUIRED_MODULES = {"torch": "everything", "triton": "the triton backend", "pytest": "the tests step",
                    "ninja": "the build (torch's extension builder)", "setuptools": "the build",
                    "numpy": "the bench", "matplotlib": "the bench's plots", "tqdm": "the bench"}
OPTIONAL_MODULES = ("pytest_timeout", "xdist", "torchdiffeq")

# Words of a command that would reach for a package index or the network.
NETWORK_WORDS = ("curl", "wget", "download", "--index-url", "--extra-index-url", "clone", "fetch")


@dataclass
class Step:
    """One step: ``argv`` run in the repository root with ``env`` added to the environment
    (a None value unsets a variable), killed with its whole process group after ``timeout``
    seconds. ``skip`` says why a step will not run (e.g. a tool is missing). ``dry_argv`` is
    what a dry run executes instead (None: nothing, ``dry_note`` says why). ``classify`` may
    turn (return code, log text) into a status and a note (e.g. a sanitizer that refuses the
    device is a skip, not a failure). Consecutive steps of one ``group`` run at the same time."""

    name: str
    purpose: str
    argv: List[str]
    timeout: float
    env: Dict[str, Optional[str]] = field(default_factory=dict)  # None: unset
    skip: Optional[str] = None
    dry_argv: Optional[List[str]] = None
    dry_note: str = "nothing to run in a dry run"
    group: Optional[str] = None
    classify: Optional[Callable[[int, str], Tuple[str, str]]] = None


@dataclass
class Result:
    name: str
    status: str
    seconds: float
    timeout: float
    returncode: Optional[int]
    note: str
    log: str
    tail: List[str]


# ----------------------------------------------------------------------------------------
# What the machine has
# ----------------------------------------------------------------------------------------

def probe() -> dict:
    """What this python and its GPUs offer (printed as JSON by ``--probe``)."""
    import importlib.metadata
    import importlib.util
    import platform

    def version(module: str) -> Optional[str]:
        if importlib.util.find_spec(module) is None:
            return None
        dist = {"pytest_timeout": "pytest-timeout", "xdist": "pytest-xdist"}.get(module, module)
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "present"

    info = {"python": platform.python_version(), "executable": sys.executable, "cpu_count": os.cpu_count(),
            "modules": {m: version(m) for m in (*REQUIRED_MODULES, *OPTIONAL_MODULES)},
            "ninja_binary": shutil.which("ninja"), "devices": []}
    try:
        import torch
    except ImportError as err:
        info["torch_error"] = str(err)
        return info
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"name": p.name, "capability": [p.major, p.minor],
                                    "multiprocessors": p.multi_processor_count,
                                    "memory_gib": round(p.total_memory / 2**30, 1)})
    return info


def run_probe(python: str, env: Dict[str, str], timeout: float = 120) -> dict:
    """:func:`probe` in a fresh process of ``python`` (this process never imports torch)."""
    try:
        proc = subprocess.run([python, str(THIS), "--probe"], cwd=ROOT, env=step_environ(env),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"probe_error": [f"no answer in {timeout:.0f} s"], "devices": [], "modules": {}}
    if proc.returncode != 0:
        return {"probe_error": (proc.stderr or proc.stdout).strip().splitlines()[-5:], "devices": [], "modules": {}}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def arch_list(capabilities: Sequence[Sequence[int]]) -> str:
    """TORCH_CUDA_ARCH_LIST for exactly these compute capabilities, e.g. [[9, 0]] -> "9.0"."""
    archs = sorted({(int(c[0]), int(c[1])) for c in capabilities})
    if not archs:
        raise ValueError("capabilities: need at least one (major, minor)")
    return ";".join(f"{major}.{minor}" for major, minor in archs)


def parse_capability(text: str) -> Tuple[int, int]:
    """"9.0" -> (9, 0); ValueError naming --capability otherwise."""
    try:
        major, minor = (int(p) for p in text.split("."))
    except ValueError:
        raise ValueError(f"--capability must look like 9.0, got {text!r}") from None
    return major, minor


TOOL_PLACES = "PATH, $CUDA_HOME, /usr/local/cuda*"


def find_tool(name: str, env: Optional[Dict[str, str]] = None) -> Optional[str]:
    """``name`` (nvcc, compute-sanitizer) on PATH, under $CUDA_HOME, or in /usr/local/cuda*."""
    env = os.environ if env is None else env
    cands = [shutil.which(name, path=env.get("PATH"))]
    if env.get("CUDA_HOME"):
        cands += [os.path.join(env["CUDA_HOME"], "bin", name), os.path.join(env["CUDA_HOME"], name, name)]
    for root in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        cands += [os.path.join(root, "bin", name), os.path.join(root, name, name)]
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def out_dir(explicit: Optional[str], environ: Dict[str, str], dry_run: bool) -> Path:
    """Where logs and results go: --out, else $OUT, else build/gpu-check[-dry-run]/."""
    if explicit:
        return Path(explicit).resolve()
    if environ.get("OUT"):
        return Path(environ["OUT"]).resolve()
    return ROOT / "build" / ("gpu-check-dry-run" if dry_run else "gpu-check")


def base_env(python: str, nvcc: Optional[str]) -> Dict[str, str]:
    """Variables every step gets: unbuffered output, pip barred from any index (nothing may
    be fetched), and the python's and nvcc's folders first on PATH (torch's extension
    builder runs `ninja` and `nvcc` from PATH; a virtualenv's bin/ need not be on it)."""
    dirs = [os.path.dirname(python)] + ([os.path.dirname(nvcc)] if nvcc else [])
    dirs += [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    env = {"PYTHONUNBUFFERED": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PATH": os.pathsep.join(dict.fromkeys(dirs))}
    if nvcc and not os.environ.get("CUDA_HOME"):
        env["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return env


# ----------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------

def sanitizer_classify(returncode: int, text: str) -> Tuple[str, str]:
    """A compute-sanitizer run: PASS with no hazards, FAIL on reported errors; a tool that
    refuses the device or the runtime (as under gVisor) is a SKIP that says why."""
    refusals = ("Device not supported", "device is not supported", "Unable to find injection",
                "not supported on this platform")
    for line in text.splitlines():
        if any(r.lower() in line.lower() for r in refusals):
            return SKIP, f"compute-sanitizer refused: {line.strip()}"
    summary = [ln.strip() for ln in text.splitlines() if "SUMMARY" in ln]
    note = summary[-1] if summary else ""
    if returncode == 0 and (not summary or " 0 errors" in note or ": 0 " in note):
        return PASS, note
    return FAIL, note or f"exit status {returncode}"


def plan(python: str, out: Path, info: dict, *, cores: int, archs: str, nvcc: Optional[str],
         sanitizer: Optional[str], env: Dict[str, str]) -> List[Step]:
    """The steps of a run on a machine described by ``info`` (:func:`probe`)."""
    logs = out / "logs"
    gpu_env = {**env, "TRITON_INTERPRET": None}  # compiled Triton kernels, never the interpreter
    modules = info.get("modules", {})
    steps = [
        Step("build", f"build the CPU and CUDA extension in place for sm {archs}",
             [python, "setup.py", "build_ext", "--inplace"], STEP_BUDGET["build"],
             {**env, "FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": archs, "MAX_JOBS": str(cores)},
             dry_argv=[python, str(THIS), "--check-setup"] if nvcc else None,
             dry_note="no nvcc here: the CUDA build configuration is not checked"),
        Step("import", "splinet_cuda imports and registers its cuda and triton backends",
             [python, str(THIS), "--check-import"], STEP_BUDGET["import"], gpu_env,
             dry_note="GPU only (the test suite imports the package in CI)"),
    ]
    files = test_files()
    # -v: one line per test as it ends, so a run stopped by its timeout still shows its failures.
    pytest = [python, "-m", "pytest", *files, "-k", TEST_DESELECT, "-v", "-rfE", "-p", "no:cacheprovider",
              "--durations=15"]
    if modules.get("pytest_timeout"):
        pytest += [f"--timeout={PER_TEST_TIMEOUT_S}"]
    if modules.get("xdist") and cores >= 4:
        pytest += ["-n", str(min(8, cores // 2))]
    steps.append(Step("tests", "the CUDA, Triton and fused-backend suites on the GPU",
                      pytest + [f"--junitxml={logs / 'tests-junit.xml'}"], STEP_BUDGET["tests"], gpu_env,
                      dry_note="GPU only (CI runs these files on the CPU; the selection is checked statically)"))
    smoke = [python, "tools/gpu_smoke.py", "--out", str(logs)]
    steps.append(Step("smoke", "paths the tests do not reach, each against the reference",
                      smoke + ["--group", "smoke"], STEP_BUDGET["smoke"], gpu_env,
                      dry_argv=smoke + ["--group", "smoke,sanitizer", "--dry-run"], group=CHECKS_GROUP))
    for tool in ("racecheck", "synccheck"):
        argv = [sanitizer or "compute-sanitizer", "--tool", tool, "--kernel-name", f"kns={SANITIZER_KERNEL}",
                "--error-exitcode", "3", *smoke, "--group", "sanitizer", "--tag", tool]
        steps.append(Step(tool, f"compute-sanitizer {tool} on tiny shapes of every block program", argv,
                          STEP_BUDGET[tool], gpu_env,
                          skip=None if sanitizer else f"compute-sanitizer not found ({TOOL_PLACES})",
                          dry_argv=[sanitizer, "--version"] if sanitizer else None, classify=sanitizer_classify,
                          group=CHECKS_GROUP))
    steps.append(Step("compile", "torch.compile(fullgraph=True), default Inductor, on the cuda and triton backends",
                      smoke + ["--group", "compile"], STEP_BUDGET["compile"], gpu_env,
                      dry_argv=smoke + ["--group", "compile", "--dry-run"], group=CHECKS_GROUP))
    # examples/ddp.py under torchrun, one process per GPU, NCCL: DDP's all-reduce over the layers.
    ddp = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={max(1, len(info.get('devices', [])))}",
           "examples/ddp.py", "--steps", "20"]
    steps.append(Step("ddp", "DistributedDataParallel training over NCCL, one process per GPU (examples/ddp.py)",
                      ddp, STEP_BUDGET["ddp"], gpu_env, dry_argv=[python, "examples/ddp.py", "--help"],
                      group=CHECKS_GROUP))
    bench = [python, "-m", "bench", "--device", "cuda", "--sizes", "gpu", "--backends", BENCH_BACKENDS,
             "--min-run-time", "0.03", "--budget", str(BENCH_BUDGET_S), "--no-progress",
             "--out", str(ROOT / "bench" / "results")]
    steps.append(Step("bench", "the GPU benchmark, short mode (the target sizes; results in bench/results/)", bench,
                      STEP_BUDGET["bench"], gpu_env, dry_argv=bench + ["--dry-run"]))
    return steps


def test_files() -> List[str]:
    """The tests step's files (TEST_GLOBS), relative to the repository."""
    return sorted({str(Path(p).relative_to(ROOT)) for g in TEST_GLOBS for p in glob.glob(str(ROOT / g))})


def selection_problems(files: Sequence[str]) -> List[str]:
    """Without collecting (which imports torch): the tests step has files, and each file has
    a test function that the -k expression keeps."""
    import re

    if not files:
        return [f"no test files match {list(TEST_GLOBS)}"]
    word = TEST_DESELECT.split()[-1]
    problems = []
    for f in files:
        names = re.findall(r"^def (test_\w+)", (ROOT / f).read_text(), re.M)
        if not any(word not in n for n in names):
            problems.append(f"{f}: no test kept by -k {TEST_DESELECT!r}")
    return problems


def sanitizer_filter_problems() -> List[str]:
    """The sanitizer steps' kernel filter still names a CUDA kernel (a renamed kernel would
    leave them checking nothing)."""
    import re

    sources = "".join(p.read_text() for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu*")))
    sources += "".join(p.read_text() for p in sorted((ROOT / "csrc" / "cuda").glob("*.h")))
    if not re.search(r"__global__[^;{]*\b" + SANITIZER_KERNEL + r"\s*\(", sources):
        return [f"no __global__ {SANITIZER_KERNEL} in csrc/cuda/: update SANITIZER_KERNEL for the sanitizer steps"]
    return []


def offline_problems(steps: Sequence[Step]) -> List[str]:
    """Steps whose command would reach for the network: any pip, or a download/fetch word."""
    problems = []
    for s in steps:
        for argv in (s.argv, s.dry_argv or []):
            words = [os.path.basename(w) for w in argv]
            if any(w in ("pip", "pip3", "conda", "uv") for w in words) or "pip" in argv[1:3]:
                problems.append(f"{s.name}: runs a package installer: {shlex.join(argv)}")
            elif any(w in NETWORK_WORDS for w in argv):
                problems.append(f"{s.name}: reaches for the network: {shlex.join(argv)}")
    return problems


def setup_problems(info: dict, nvcc: Optional[str], dry_run: bool) -> Tuple[List[str], List[str]]:
    """(errors, notes) about the machine: a missing required module or nvcc is an error; in a
    real run so is a CPU-only torch or no visible GPU."""
    errors, notes = [], []
    if info.get("probe_error"):
        errors.append(f"the python probe failed: {info['probe_error']}")
        return errors, notes
    mods = info.get("modules", {})
    for m, why in REQUIRED_MODULES.items():
        if not mods.get(m):
            errors.append(f"python module {m} is missing ({why})")
    for m in OPTIONAL_MODULES:
        if not mods.get(m):
            notes.append(f"optional module {m} is missing here")
    if not info.get("ninja_binary"):
        errors.append("no ninja binary on PATH (torch's extension builder needs it)")
    if nvcc is None:
        # Like `make cuda-check`, a dry run on a machine without a CUDA toolkit says so and passes.
        (notes if dry_run else errors).append(f"nvcc not found ({TOOL_PLACES}): the build step needs it")
    if not info.get("torch_cuda"):
        (notes if dry_run else errors).append(f"torch {info.get('torch')} is not a CUDA build")
    if not info.get("devices"):
        (notes if dry_run else errors).append("no GPU visible to torch")
    return errors, notes


# ----------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------

def _kill_group(proc: subprocess.Popen) -> None:
    """Ends the step and everything it started (its own process group), politely first."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def step_environ(extra: Dict[str, Optional[str]]) -> Dict[str, str]:
    """This process's environment with ``extra`` applied (None values removed)."""
    environ = {**os.environ, **{k: v for k, v in extra.items() if v is not None}}
    for k, v in extra.items():
        if v is None:
            environ.pop(k, None)
    return environ


def shell_line(step: Step, common: Dict[str, Optional[str]]) -> str:
    """The step as one shell command: `env -u X A=B ... argv`, naming only the variables that
    differ from ``common`` (the ones every step gets)."""
    unset = [k for k, v in step.env.items() if v is None and k in os.environ]
    assign = [f"{k}={shlex.quote(v)}" for k, v in step.env.items() if v is not None and common.get(k) != v]
    prefix = ["env"] + [f"-u {k}" for k in unset] + assign if unset or assign else []
    return " ".join(prefix + [shlex.join(step.argv)])


def tail(text: str, lines: int = TAIL_LINES) -> List[str]:
    return [ln[:300] for ln in text.rstrip().splitlines()[-lines:]]


def batches(steps: Sequence[Step]) -> List[List[Step]]:
    """Consecutive steps that share a ``group`` run at the same time; the others alone."""
    out: List[List[Step]] = []
    for s in steps:
        if out and s.group is not None and out[-1][-1].group == s.group:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def planned_seconds(steps: Sequence[Step]) -> float:
    """The longest a run can take: per batch, its longest timeout."""
    return sum(max(s.timeout for s in b) for b in batches(steps))


@dataclass
class _Running:
    step: Step
    proc: Optional[subprocess.Popen]
    log: Path
    limit: float
    start: float
    timed_out: bool = False


def _start(s: Step, argv: List[str], log: Path, limit: float) -> _Running:
    with log.open("w") as f:
        f.write(f"$ {shlex.join(argv)}\n# timeout {limit:.0f} s; env: "
                f"{' '.join(f'{k}={v}' for k, v in s.env.items())}\n")
        f.flush()
        try:
            proc = subprocess.Popen(argv, cwd=ROOT, env=step_environ(s.env), stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as err:
            f.write(f"could not start: {err}\n")
            proc = None
    return _Running(s, proc, log, limit, time.monotonic())


def _finish(r: _Running, dry_run: bool) -> Result:
    seconds = time.monotonic() - r.start
    returncode = None if r.proc is None else r.proc.returncode
    text = r.log.read_text(errors="replace")
    if r.timed_out:
        status, note = TIMEOUT, f"stopped after {r.limit:.0f} s"
    elif returncode is None:
        status, note = FAIL, "could not start"
    elif r.step.classify is not None and not dry_run:
        status, note = r.step.classify(returncode, text)
    else:
        status, note = (PASS, "") if returncode == 0 else (FAIL, f"exit status {returncode}")
    with r.log.open("a") as f:
        f.write(f"\n# {status} in {seconds:.1f} s {note}\n")
    return Result(r.step.name, status, round(seconds, 1), round(r.limit, 1), returncode, note, str(r.log), tail(text))


def run_steps(steps: Sequence[Step], logs: Path, *, dry_run: bool = False, budget: float = BUDGET_S,
              echo: Callable[[str], None] = print) -> List[Result]:
    """Runs the steps (a batch of one group at the same time), each under min(its timeout,
    what is left of ``budget``), its output in logs/<name>.log. A failing or timed-out step
    does not stop the others; a timed-out step is ended with everything it started."""
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget
    results: Dict[str, Result] = {}
    for batch in batches(steps):
        running: List[_Running] = []
        for s in batch:
            argv = s.dry_argv if dry_run else s.argv
            log = logs / f"{s.name}.log"
            limit = min(min(s.timeout, DRY_STEP_LIMIT_S) if dry_run else s.timeout, deadline - time.monotonic())
            skip = s.skip if s.skip else (s.dry_note if argv is None else None)
            if skip is None and limit < 1:
                skip = "no time left in the budget"
            if skip is not None:
                log.write_text(f"skipped: {skip}\n")
                results[s.name] = Result(s.name, SKIP, 0.0, s.timeout, None, skip, str(log), [])
                echo(f"[gpu-check] {s.name}: SKIP ({skip})")
                continue
            alongside = [o.name for o in batch if o is not s]
            echo(f"[gpu-check] {s.name}: {shlex.join(argv)}  (timeout {limit:.0f} s"
                 + (f", alongside {', '.join(alongside)})" if alongside else ")"))
            running.append(_start(s, argv, log, limit))
        try:
            while running:
                for r in list(running):
                    if r.proc is not None and r.proc.poll() is None:
                        if time.monotonic() - r.start < r.limit:
                            continue
                        r.timed_out = True
                        _kill_group(r.proc)
                    running.remove(r)
                    results[r.step.name] = res = _finish(r, dry_run)
                    echo(f"[gpu-check] {res.name}: {res.status} in {res.seconds:.1f} s {res.note}".rstrip())
                if running:
                    time.sleep(0.1)
        except BaseException:
            for r in running:
                if r.proc is not None:
                    _kill_group(r.proc)
            raise
    return [results[s.name] for s in steps]


def junit_counts(path: Path) -> Optional[str]:
    """"N passed, F failed, E errors, S skipped" from a pytest junit XML file."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"


def pytest_progress(text: str) -> Optional[str]:
    """From a pytest -v log cut short (no junit file): "so far N passed, F failed: names"."""
    import re

    outcomes = re.findall(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", text)
    if not outcomes:
        return None
    failed = re.findall(r"(?:FAILED|ERROR) (tests/\S+)|(tests/\S+) (?:FAILED|ERROR)", text)
    names = sorted({a or b for a, b in failed})
    counts = {k: outcomes.count(k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    head = f"so far {counts['PASSED']} passed, {counts['FAILED']} failed, {counts['ERROR']} errors, " \
           f"{counts['SKIPPED']} skipped"
    return head + (": " + ", ".join(names[:10]) + (" ..." if len(names) > 10 else "") if names else "")


def write_summary(results: Sequence[Result], meta: dict, out: Path) -> str:
    """summary.md and summary.json in ``out``; returns the text to print: the log tails, then
    the header and the table (last, so that the end of the output shows it)."""
    lines = ["# make gpu-check" + (" (dry run)" if meta.get("dry_run") else ""), ""]
    for key in ("date", "machine", "python", "torch", "gpus", "arch_list", "nvcc", "sanitizer", "cores", "out"):
        if meta.get(key) not in (None, ""):
            lines.append(f"- {key}: {meta[key]}")
    for kind in ("errors", "notes"):
        for item in meta.get(kind, []):
            lines.append(f"- {kind[:-1]}: {item}")
    total = meta.get("seconds", sum(r.seconds for r in results))
    lines += ["", f"| step | status | seconds | timeout | note |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.timeout:.0f} | {r.note} |")
    lines += [f"| all (wall clock) | | {total:.1f} | {meta.get('planned_s', '')} of {meta.get('budget', '')} | |",
              ""]
    tails = []
    for r in results:
        if r.tail:
            tails += [f"## {r.name}: {r.status}", "", "```", *r.tail, "```", ""]
    (out / "summary.md").write_text("\n".join(lines + tails) + "\n")
    (out / "summary.json").write_text(json.dumps({"meta": meta, "steps": [r.__dict__ for r in results]}, indent=1))
    return "\n".join(tails + lines)


def collect_bench_results(out: Path, since: float) -> List[Path]:
    """Copies the bench's result files written since ``since`` into out/bench/."""
    copied = []
    for p in sorted((ROOT / "bench" / "results").glob("*")):
        if p.is_file() and p.stat().st_mtime >= since:
            (out / "bench").mkdir(exist_ok=True)
            copied.append(Path(shutil.copy2(p, out / "bench" / p.name)))
    return copied


def pack(out: Path) -> Path:
    """logs/ and bench/ into logs.tar.gz; the plain copies of the logs are removed and only
    the bench's .json/.csv stay beside the summary (a lease brings back 8 files at most)."""
    archive = out / "logs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for sub in ("logs", "bench"):
            if (out / sub).exists():
                tar.add(out / sub, arcname=sub)
    shutil.rmtree(out / "logs", ignore_errors=True)
    bench = sorted((out / "bench").glob("*")) if (out / "bench").exists() else []
    for p in bench:
        if p.suffix not in (".json", ".csv"):
            p.unlink()
    return archive


# ----------------------------------------------------------------------------------------
# Small modes run as steps (so they use the step's python and environment)
# ----------------------------------------------------------------------------------------

def check_setup() -> int:
    """The build's configuration without compiling: setup.py configures the CUDA extension
    with every csrc/cuda/*.cu for TORCH_CUDA_ARCH_LIST, torch's builder finds CUDA_HOME
    and ninja. Exit status 1 on a problem."""
    import importlib.util

    from torch.utils import cpp_extension

    problems = []
    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    cpp_extension.CUDA_HOME = home
    print(f"CUDA_HOME={home}  TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}  "
          f"MAX_JOBS={os.environ.get('MAX_JOBS')}")
    try:
        cpp_extension.verify_ninja_availability()
        print("ninja: " + subprocess.run(["ninja", "--version"], capture_output=True, text=True).stdout.strip())
    except RuntimeError as err:
        problems.append(f"ninja: {err}")
    os.environ["FORCE_CUDA"] = "1"
    spec = importlib.util.spec_from_file_location("splinet_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ext = mod._extension()
    cu = sorted(s for s in ext.sources if s.endswith(".cu"))
    want = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    print(f"extension {ext.name}: {len(ext.sources)} sources, {len(cu)} CUDA: {' '.join(cu)}")
    if not cu or cu != want:
        problems.append(f"setup.py's CUDA sources {cu} are not csrc/cuda/*.cu {want}")
    if "nvcc" not in getattr(ext, "extra_compile_args", {}):
        problems.append("setup.py configured no nvcc flags")
    for p in problems:
        print("PROBLEM: " + p)
    return 1 if problems else 0


def check_import(dry_run: bool) -> int:
    """Imports splinet_cuda; on a GPU its cuda and triton backends must be registered."""
    import torch

    import splinet_cuda as sc

    backends = sc.available_backends()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); backends {backends}; "
          f"extension load error: {sc._ext.LOAD_ERROR}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}")
    missing = [] if dry_run else [b for b in ("cpu", "cuda", "triton") if b not in backends]
    if missing:
        print(f"PROBLEM: backends {missing} are not available")
    return 1 if missing else 0


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="plan, print and check the setup; needs no GPU")
    p.add_argument("--out", default=None, help="results directory (default: $OUT, else build/gpu-check/)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="MAX_JOBS for the build (default: all cores)")
    p.add_argument("--capability", default="9.0",
                   help="compute capability a dry run plans for when no GPU is visible (default 9.0: an H200)")
    p.add_argument("--only", default=None, help="comma list of steps to run (default: all)")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check-setup", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check-import", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return 0
    if args.check_setup:
        return check_setup()
    if args.check_import:
        return check_import(args.dry_run)

    started, wall = time.monotonic(), time.time()
    python = sys.executable
    nvcc = find_tool("nvcc")
    env = base_env(python, nvcc)
    sanitizer = find_tool("compute-sanitizer", {**os.environ, **env})
    out = out_dir(args.out, os.environ, args.dry_run)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("logs", "bench"):
        shutil.rmtree(out / stale, ignore_errors=True)
    info = run_probe(python, env)
    errors, notes = setup_problems(info, nvcc, args.dry_run)
    caps = [d["capability"] for d in info.get("devices", [])]
    assumed = not caps
    if assumed:
        caps = [parse_capability(args.capability)]
    archs = arch_list(caps)
    steps = plan(python, out, info, cores=args.jobs, archs=archs, nvcc=nvcc, sanitizer=sanitizer, env=env)
    if args.only:
        keep = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = set(keep) - {s.name for s in steps}
        if unknown:
            raise SystemExit(f"--only: unknown steps {sorted(unknown)}; steps: {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in keep]
    errors += offline_problems(steps) + selection_problems(test_files()) + sanitizer_filter_problems()
    planned = planned_seconds(steps)
    if planned > BUDGET_S:
        errors.append(f"the step timeouts add up to {planned:.0f} s, over the {BUDGET_S} s budget")

    gpus = ", ".join(f"{d['name']} (sm {d['capability'][0]}.{d['capability'][1]}, {d['multiprocessors']} SMs)"
                     for d in info.get("devices", [])) or "none"
    meta = {"dry_run": args.dry_run, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": os.uname().nodename, "python": f"{python} ({info.get('python')})",
            "torch": f"{info.get('torch')} (CUDA {info.get('torch_cuda')})", "gpus": gpus,
            "arch_list": archs + (" (assumed: no GPU visible)" if assumed else ""),
            "nvcc": nvcc, "sanitizer": sanitizer, "cores": args.jobs, "out": str(out),
            "budget": BUDGET_S, "planned_s": planned, "modules": info.get("modules"), "errors": errors, "notes": notes}

    print(f"[gpu-check] {'dry run: ' if args.dry_run else ''}{len(steps)} steps, {planned:.0f} s of "
          f"timeouts (budget {BUDGET_S} s); results in {out}")
    print(f"[gpu-check] python {python} {info.get('python')}, torch {info.get('torch')}, GPUs: {gpus}")
    print(f"[gpu-check] modules: {json.dumps(info.get('modules'))}")
    print(f"[gpu-check] every step: {' '.join(f'{k}={v}' for k, v in env.items())}")
    for s in steps:
        together = f" (at the same time as the other {s.group} steps)" if s.group else ""
        print(f"  {s.name:<9} {s.timeout:>4.0f} s  {s.purpose}{together}")
        print(f"            $ {shell_line(s, env)}")
        if s.skip:
            print(f"            skipped: {s.skip}")
    for e in errors:
        print(f"[gpu-check] ERROR: {e}")
    for n in notes:
        print(f"[gpu-check] note: {n}")

    if errors and not args.dry_run:
        results = []
        print("[gpu-check] not running: fix the errors above (or run with DRY_RUN=1 to check the setup)")
    else:
        results = run_steps(steps, out / "logs", dry_run=args.dry_run,
                            budget=BUDGET_S if not args.dry_run else len(steps) * DRY_STEP_LIMIT_S)
    if not args.dry_run and any(r.name == "bench" for r in results):
        collect_bench_results(out, wall)
    tests = next((r for r in results if r.name == "tests" and not args.dry_run), None)
    if tests is not None:
        counts = junit_counts(out / "logs" / "tests-junit.xml")
        if counts is None:
            counts = pytest_progress(Path(tests.log).read_text(errors="replace"))
        if counts:
            tests.note = f"{counts}; {tests.note}".strip("; ")
    meta["seconds"] = round(time.monotonic() - started, 1)
    text = write_summary(results, meta, out)
    if os.environ.get("OUT") and out == Path(os.environ["OUT"]).resolve() and not args.dry_run:
        pack(out)
    print("\n" + text)
    print(f"[gpu-check] {meta['seconds']} s in all; summary in {out / 'summary.md'}")
    bad = [r.name for r in results if r.status in (FAIL, TIMEOUT)]
    return 1 if errors or bad else 0


if __name__ == "__main__":
    sys.exit(main())
