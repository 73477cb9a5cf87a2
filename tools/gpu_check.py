"""`make gpu-check`: builds splinet_cuda for this machine's GPUs and checks it, every step under
its own timeout, with every log in one directory and a summary at the end.

    make gpu-check             # python3 tools/gpu_check.py
    make gpu-check DRY_RUN=1   # --dry-run: plans and checks the setup, no GPU needed (`make test` runs it)

It works offline with the machine's own python3 (a CUDA torch, triton, pytest, ninja,
setuptools): no virtualenv, no pip, no network. The steps, in order, with their time limits
in seconds (the whole check stays under ten minutes on a 16-core machine with one GPU):

    build      165  setup.py build_ext --inplace, FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST = the local GPUs
    info        20  python -m splinet_cuda info
    selftest    90  python -m splinet_cuda selftest --device cuda --strict
    tests      140  pytest -m gpu tests (no test collected is a failure)
    racecheck   60  compute-sanitizer racecheck, then synccheck, on selftest --tiny (the block
    synccheck   60  programs' kernels only); the two run at the same time
    bench       90  python -m bench --device cuda --sizes gpu (short mode), alone on the GPU

A failed or timed-out step does not stop the others. Logs and results go to --out (default
build/gpu-check/): logs/<step>.log, bench/, summary.md and summary.json.

The dry run prints each step's command, environment and timeout, checks that the python has
the modules, that nvcc is found and setup.py configures the CUDA extension, that no step
reaches for the network, then runs each step's own dry form: info, selftest (its GPU rows
are skipped, with the reason), the collection of the gpu-marked tests and the bench's plan.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()

BUDGET_S = 570  # the longest path through the steps; under ten minutes with start-up
STEP_BUDGET: Dict[str, float] = {
    # nvcc compiles one .cu file per core; the slowest file, not the core count, sets the time.
    "build": 165,
    "info": 20,
    # Cold Triton JIT compiles dominate (one per kernel configuration of the rows).
    "selftest": 90,
    "tests": 140,
    "racecheck": 60,
    "synccheck": 60,
    "bench": 90,
}
SANITIZER_GROUP = "sanitizer"
BENCH_BUDGET_S = 70  # the bench starts no case after this, so it writes its results before its timeout
BENCH_BACKENDS = "cuda,triton,cuda+cublas,compiled+cudagraphs"
DRY_STEP_LIMIT_S = 120
PER_TEST_TIMEOUT_S = 60
TAIL_LINES = 15
# compute-sanitizer instruments only the block programs' kernel (csrc/cuda/cuda_exec.cuh), the
# only kernels with shared memory and barriers: racecheck and synccheck have nothing to find in
# PyTorch's own kernels, and instrumenting them all would take the step's whole time.
SANITIZER_KERNEL = "block_kernel"

PASS, FAIL, TIMEOUT, SKIP = "PASS", "FAIL", "TIMEOUT", "SKIP"

REQUIRED_MODULES = {"torch": "everything", "triton": "the triton backend", "pytest": "the tests step",
                    "ninja": "the build (torch's extension builder)", "setuptools": "the build",
                    "numpy": "the bench", "matplotlib": "the bench's plots", "tqdm": "the bench"}
OPTIONAL_MODULES = ("pytest_timeout", "xdist")
NETWORK_WORDS = ("curl", "wget", "download", "--index-url", "--extra-index-url", "clone", "fetch")
TOOL_PLACES = "PATH, $CUDA_HOME, /usr/local/cuda*"


@dataclass
class Step:
    """``argv`` run in the repository root with ``env`` added (None unsets a variable), ended
    with its process group after ``timeout`` s. ``skip``: why it will not run. ``dry_argv``:
    what a dry run runs instead (None: nothing, ``dry_note`` says why). ``classify(returncode,
    log, dry_run)`` -> (status, note). Consecutive steps of one ``group`` run at the same time."""

    name: str
    purpose: str
    argv: List[str]
    timeout: float
    env: Dict[str, Optional[str]] = field(default_factory=dict)
    skip: Optional[str] = None
    dry_argv: Optional[List[str]] = None
    dry_note: str = "nothing to run in a dry run"
    group: Optional[str] = None
    classify: Optional[Callable[[int, str, bool], Tuple[str, str]]] = None


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


# ---------------------------------------------------------------------------------------- the machine

def probe() -> dict:
    """What this python and its GPUs offer (printed as JSON by ``--probe``)."""
    import importlib.util
    import platform

    info = {"python": platform.python_version(), "ninja_binary": shutil.which("ninja"), "devices": [],
            "modules": {m: importlib.util.find_spec(m) is not None for m in (*REQUIRED_MODULES, *OPTIONAL_MODULES)}}
    try:
        import torch
    except ImportError as err:
        return {**info, "torch_error": str(err)}
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        info["devices"].append({"name": p.name, "capability": [p.major, p.minor]})
    return info


def run_probe(python: str, env: Dict[str, Optional[str]], timeout: float = 120) -> dict:
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


def find_tool(name: str, env: Optional[Dict[str, str]] = None) -> Optional[str]:
    """``name`` (nvcc, compute-sanitizer) on PATH, under $CUDA_HOME, or in /usr/local/cuda*."""
    env = os.environ if env is None else env
    cands = [shutil.which(name, path=env.get("PATH"))]
    roots = ([env["CUDA_HOME"]] if env.get("CUDA_HOME") else []) + sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for root in roots:
        cands += [os.path.join(root, "bin", name), os.path.join(root, name, name)]
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def base_env(python: str, nvcc: Optional[str]) -> Dict[str, str]:
    """Variables every step gets: unbuffered output, pip barred from any index, and the
    python's and nvcc's folders first on PATH (torch's extension builder runs `ninja` and
    `nvcc` from PATH; a virtualenv's bin/ need not be on it)."""
    dirs = [os.path.dirname(python)] + ([os.path.dirname(nvcc)] if nvcc else [])
    dirs += [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    env = {"PYTHONUNBUFFERED": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PATH": os.pathsep.join(dict.fromkeys(dirs))}
    if nvcc and not os.environ.get("CUDA_HOME"):
        env["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return env


# ---------------------------------------------------------------------------------------- the plan

def sanitizer_classify(returncode: int, text: str, dry_run: bool = False) -> Tuple[str, str]:
    """PASS with no hazards, FAIL on reported errors; a tool that refuses the device or the
    runtime (as under gVisor) is a SKIP that says why."""
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


def tests_classify(returncode: int, text: str, dry_run: bool = False) -> Tuple[str, str]:
    """pytest's exit status 5 (no test collected): on a GPU machine the gpu marker selected
    nothing, a failure; in a dry run a SKIP that says so."""
    if returncode == 5:
        return (SKIP if dry_run else FAIL), "no test carries the gpu marker (pytest -m gpu collected nothing)"
    counts = re.findall(r"(\d+) tests? collected", text)
    return (PASS, f"{counts[-1]} gpu tests collected" if counts else "") if returncode == 0 else \
        (FAIL, f"exit status {returncode}")


def plan(python: str, out: Path, info: dict, *, cores: int, archs: str, nvcc: Optional[str],
         sanitizer: Optional[str], env: Dict[str, str]) -> List[Step]:
    """The steps of a run on a machine described by ``info`` (:func:`probe`)."""
    gpu_env = {**env, "TRITON_INTERPRET": None}  # compiled Triton kernels, never the interpreter
    mods = info.get("modules", {})
    cli = [python, "-m", "splinet_cuda"]
    steps = [Step("build", f"build the CPU and CUDA extension in place for sm {archs}",
                  [python, "setup.py", "build_ext", "--inplace"], STEP_BUDGET["build"],
                  {**env, "FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": archs, "MAX_JOBS": str(cores)},
                  dry_argv=[python, str(THIS), "--check-setup"] if nvcc else None,
                  dry_note="no nvcc here: the CUDA build configuration is not checked"),
             Step("info", "what was built and which backends run on each GPU", cli + ["info"], STEP_BUDGET["info"],
                  gpu_env, dry_argv=cli + ["info"]),
             Step("selftest", "every backend on the GPU against the float64 reference",
                  cli + ["selftest", "--device", "cuda", "--strict"], STEP_BUDGET["selftest"], gpu_env,
                  dry_argv=cli + ["selftest", "--device", "cuda", "--quick"])]
    # -v: one line per test as it ends, so a run stopped by its timeout still shows its failures.
    pytest = [python, "-m", "pytest", "-m", "gpu", "tests", "-p", "no:cacheprovider"]
    run_opts = ["-v", "-rfE", "--durations=15", f"--junitxml={out / 'logs' / 'tests-junit.xml'}"]
    run_opts += [f"--timeout={PER_TEST_TIMEOUT_S}"] if mods.get("pytest_timeout") else []
    run_opts += ["-n", str(min(8, cores // 2))] if mods.get("xdist") and cores >= 4 else []
    steps.append(Step("tests", "the tests marked gpu (pytest -m gpu)", pytest + run_opts, STEP_BUDGET["tests"],
                      gpu_env, dry_argv=pytest + ["--collect-only", "-q"], classify=tests_classify))
    for tool in ("racecheck", "synccheck"):
        argv = [sanitizer or "compute-sanitizer", "--tool", tool, "--kernel-name", f"kns={SANITIZER_KERNEL}",
                "--error-exitcode", "3", *cli, "selftest", "--device", "cuda", "--tiny", "--backends", "cuda"]
        steps.append(Step(tool, f"compute-sanitizer {tool} on one tiny call per block program", argv,
                          STEP_BUDGET[tool], gpu_env, skip=None if sanitizer else f"compute-sanitizer not found "
                          f"({TOOL_PLACES})", dry_argv=[sanitizer, "--version"] if sanitizer else None,
                          classify=sanitizer_classify, group=SANITIZER_GROUP))
    bench = [python, "-m", "bench", "--device", "cuda", "--sizes", "gpu", "--backends", BENCH_BACKENDS,
             "--min-run-time", "0.03", "--budget", str(BENCH_BUDGET_S), "--no-progress", "--out", str(out / "bench")]
    steps.append(Step("bench", "the GPU benchmark, short mode", bench, STEP_BUDGET["bench"], gpu_env,
                      dry_argv=bench + ["--dry-run"]))
    return steps


def sanitizer_filter_problems() -> List[str]:
    """The sanitizer steps' kernel filter still names a CUDA kernel (a renamed kernel would
    leave them checking nothing)."""
    sources = "".join(p.read_text() for p in sorted((ROOT / "csrc" / "cuda").glob("*.[ch]*")))
    if not re.search(r"__global__[^;{]*\b" + SANITIZER_KERNEL + r"\s*\(", sources):
        return [f"no __global__ {SANITIZER_KERNEL} in csrc/cuda/: update SANITIZER_KERNEL for the sanitizer steps"]
    return []


def offline_problems(steps: Sequence[Step]) -> List[str]:
    """Steps whose command would reach for the network: any package installer, or a download word."""
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
    """(errors, notes): a missing module or nvcc is an error; in a real run so are a CPU-only
    torch and no visible GPU (a dry run notes them)."""
    if info.get("probe_error"):
        return [f"the python probe failed: {info['probe_error']}"], []
    mods = info.get("modules", {})
    errors = [f"python module {m} is missing ({why})" for m, why in REQUIRED_MODULES.items() if not mods.get(m)]
    notes = [f"optional module {m} is missing here" for m in OPTIONAL_MODULES if not mods.get(m)]
    if not info.get("ninja_binary"):
        errors.append("no ninja binary on PATH (torch's extension builder needs it)")
    soft = notes if dry_run else errors
    if nvcc is None:
        soft.append(f"nvcc not found ({TOOL_PLACES}): the build step needs it")
    if not info.get("torch_cuda"):
        soft.append(f"torch {info.get('torch')} is not a CUDA build")
    if not info.get("devices"):
        soft.append("no GPU visible to torch")
    return errors, notes


# ---------------------------------------------------------------------------------------- running

def step_environ(extra: Dict[str, Optional[str]]) -> Dict[str, str]:
    """This process's environment with ``extra`` applied (None values removed)."""
    environ = {**os.environ, **{k: v for k, v in extra.items() if v is not None}}
    for k in [k for k, v in extra.items() if v is None]:
        environ.pop(k, None)
    return environ


def shell_line(step: Step, common: Dict[str, Optional[str]]) -> str:
    """The step as one shell command, naming only the variables that differ from ``common``."""
    unset = [f"-u {k}" for k, v in step.env.items() if v is None and k in os.environ]
    assign = [f"{k}={shlex.quote(v)}" for k, v in step.env.items() if v is not None and common.get(k) != v]
    return " ".join((["env"] + unset + assign if unset or assign else []) + [shlex.join(step.argv)])


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


def _kill_group(proc: subprocess.Popen) -> None:
    """Ends the step and everything it started (its own process group), politely first."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=5)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _finish(s: Step, proc: Optional[subprocess.Popen], log: Path, limit: float, seconds: float, timed_out: bool,
            dry_run: bool) -> Result:
    returncode = None if proc is None else proc.returncode
    text = log.read_text(errors="replace")
    if timed_out:
        status, note = TIMEOUT, f"stopped after {limit:.0f} s"
    elif returncode is None:
        status, note = FAIL, "could not start"
    elif s.classify is not None:
        status, note = s.classify(returncode, text, dry_run)
    else:
        status, note = (PASS, "") if returncode == 0 else (FAIL, f"exit status {returncode}")
    with log.open("a") as f:
        f.write(f"\n# {status} in {seconds:.1f} s {note}\n")
    tail = [ln[:300] for ln in text.rstrip().splitlines()[-TAIL_LINES:]]
    return Result(s.name, status, round(seconds, 1), round(limit, 1), returncode, note, str(log), tail)


def run_steps(steps: Sequence[Step], logs: Path, *, dry_run: bool = False, budget: float = BUDGET_S,
              echo: Callable[[str], None] = print) -> List[Result]:
    """Runs the steps (a group's at the same time), each under min(its timeout, what is left
    of ``budget``), its output in logs/<name>.log. A failing or timed-out step does not stop
    the others; a timed-out step is ended with everything it started."""
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget
    results: Dict[str, Result] = {}
    for batch in batches(steps):
        running = []  # (step, process, log, limit, start)
        for s in batch:
            argv = s.dry_argv if dry_run else s.argv
            log = logs / f"{s.name}.log"
            limit = min(min(s.timeout, DRY_STEP_LIMIT_S) if dry_run else s.timeout, deadline - time.monotonic())
            skip = s.skip or (s.dry_note if argv is None else None) or ("no time left in the budget"
                                                                          if limit < 1 else None)
            if skip is not None:
                log.write_text(f"skipped: {skip}\n")
                results[s.name] = Result(s.name, SKIP, 0.0, s.timeout, None, skip, str(log), [])
                echo(f"[gpu-check] {s.name}: SKIP ({skip})")
                continue
            echo(f"[gpu-check] {s.name}: {shlex.join(argv)}  (timeout {limit:.0f} s)")
            with log.open("w") as f:
                f.write(f"$ {shlex.join(argv)}\n")
                f.flush()
                try:
                    proc = subprocess.Popen(argv, cwd=ROOT, env=step_environ(s.env), stdout=f,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
                except OSError as err:
                    f.write(f"could not start: {err}\n")
                    proc = None
            running.append((s, proc, log, limit, time.monotonic()))
        try:
            while running:
                for r in list(running):
                    s, proc, log, limit, start = r
                    timed_out = proc is not None and proc.poll() is None
                    if timed_out and time.monotonic() - start < limit:
                        continue
                    if timed_out:
                        _kill_group(proc)
                    running.remove(r)
                    res = results[s.name] = _finish(s, proc, log, limit, time.monotonic() - start, timed_out, dry_run)
                    echo(f"[gpu-check] {res.name}: {res.status} in {res.seconds:.1f} s {res.note}".rstrip())
                time.sleep(0.1 if running else 0)
        except BaseException:
            for _, proc, *_ in running:
                if proc is not None:
                    _kill_group(proc)
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


def write_summary(results: Sequence[Result], meta: dict, out: Path) -> str:
    """summary.md and summary.json in ``out``; returns the text to print: the log tails, then
    the header and the table (last, so that the end of the output shows it)."""
    lines = ["# make gpu-check" + (" (dry run)" if meta.get("dry_run") else ""), ""]
    lines += [f"- {k}: {meta[k]}" for k in ("date", "python", "torch", "gpus", "arch_list", "nvcc", "sanitizer",
                                            "cores", "out") if meta.get(k) not in (None, "")]
    lines += [f"- {kind[:-1]}: {item}" for kind in ("errors", "notes") for item in meta.get(kind, [])]
    lines += ["", "| step | status | seconds | timeout | note |", "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.timeout:.0f} | {r.note} |" for r in results]
    lines += [f"| all (wall clock) | | {meta.get('seconds', sum(r.seconds for r in results)):.1f} | "
              f"{meta.get('planned_s', '')} of {meta.get('budget', '')} | |", ""]
    tails = [ln for r in results if r.tail for ln in (f"## {r.name}: {r.status}", "", "```", *r.tail, "```", "")]
    (out / "summary.md").write_text("\n".join(lines + tails) + "\n")
    (out / "summary.json").write_text(json.dumps({"meta": meta, "steps": [r.__dict__ for r in results]}, indent=1))
    return "\n".join(tails + lines)


def check_setup() -> int:
    """The build's configuration without compiling: setup.py configures the CUDA extension
    with every csrc/cuda/*.cu, and torch's builder finds CUDA_HOME and ninja."""
    import importlib.util

    from torch.utils import cpp_extension

    problems = []
    cpp_extension.CUDA_HOME = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    print(f"CUDA_HOME={cpp_extension.CUDA_HOME}  TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}")
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as err:
        problems.append(f"ninja: {err}")
    os.environ["FORCE_CUDA"] = "1"
    spec = importlib.util.spec_from_file_location("splinet_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ext = mod._extension()
    cu = sorted(s for s in ext.sources if s.endswith(".cu"))
    want = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    print(f"extension {ext.name}: {len(ext.sources)} sources, {len(cu)} CUDA")
    if not cu or cu != want:
        problems.append(f"setup.py's CUDA sources {cu} are not csrc/cuda/*.cu {want}")
    if "nvcc" not in getattr(ext, "extra_compile_args", {}):
        problems.append("setup.py configured no nvcc flags")
    for p in problems:
        print("PROBLEM: " + p)
    return 1 if problems else 0


# ---------------------------------------------------------------------------------------- main

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="plan, print and check the setup; needs no GPU")
    p.add_argument("--out", default=None, help="results directory (default build/gpu-check/)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="MAX_JOBS for the build (default: all cores)")
    p.add_argument("--capability", default="9.0", help="compute capability a dry run plans for (default 9.0)")
    p.add_argument("--only", default=None, help="comma list of steps to run (default: all)")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check-setup", action="store_true", help=argparse.SUPPRESS)
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
    started = time.monotonic()
    python, nvcc = sys.executable, find_tool("nvcc")
    env = base_env(python, nvcc)
    sanitizer = find_tool("compute-sanitizer", {**os.environ, **env})
    out = Path(args.out).resolve() if args.out else ROOT / "build" / ("gpu-check-dry-run" if args.dry_run
                                                                      else "gpu-check")
    for stale in ("logs", "bench"):
        shutil.rmtree(out / stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    info = run_probe(python, env)
    errors, notes = setup_problems(info, nvcc, args.dry_run)
    caps = [d["capability"] for d in info.get("devices", [])]
    archs = arch_list(caps or [parse_capability(args.capability)])
    steps = plan(python, out, info, cores=args.jobs, archs=archs, nvcc=nvcc, sanitizer=sanitizer, env=env)
    if args.only:
        keep = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = set(keep) - {s.name for s in steps}
        if unknown:
            raise SystemExit(f"--only: unknown steps {sorted(unknown)}; steps: {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in keep]
    errors += offline_problems(steps) + sanitizer_filter_problems()
    planned = planned_seconds(steps)
    if planned > BUDGET_S:
        errors.append(f"the step timeouts add up to {planned:.0f} s, over the {BUDGET_S} s budget")
    gpus = ", ".join(f"{d['name']} (sm {d['capability'][0]}.{d['capability'][1]})" for d in info.get("devices", []))
    meta = {"dry_run": args.dry_run, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": f"{python} ({info.get('python')})",
            "torch": f"{info.get('torch')} (CUDA {info.get('torch_cuda')})",
            "gpus": gpus or "none", "arch_list": archs + ("" if caps else " (assumed: no GPU visible)"),
            "nvcc": nvcc, "sanitizer": sanitizer, "cores": args.jobs, "out": str(out), "budget": BUDGET_S,
            "planned_s": planned, "errors": errors, "notes": notes}
    print(f"[gpu-check] {'dry run: ' if args.dry_run else ''}{len(steps)} steps, {planned:.0f} s of timeouts "
          f"(budget {BUDGET_S} s); GPUs: {meta['gpus']}; results in {out}")
    print(f"[gpu-check] every step: {' '.join(f'{k}={v}' for k, v in env.items())}")
    for s in steps:
        print(f"  {s.name:<9} {s.timeout:>4.0f} s  {s.purpose}" + (f" (with the other {s.group} steps)"
                                                                     if s.group else ""))
        print(f"            $ {shell_line(s, env)}" + (f"\n            skipped: {s.skip}" if s.skip else ""))
    for e in errors:
        print(f"[gpu-check] ERROR: {e}")
    for n in notes:
        print(f"[gpu-check] note: {n}")
    if errors and not args.dry_run:
        results = []
        print("[gpu-check] not running: fix the errors above (DRY_RUN=1 checks the setup)")
    else:
        results = run_steps(steps, out / "logs", dry_run=args.dry_run,
                            budget=BUDGET_S if not args.dry_run else len(steps) * DRY_STEP_LIMIT_S)
    tests = next((r for r in results if r.name == "tests" and not args.dry_run), None)
    counts = junit_counts(out / "logs" / "tests-junit.xml") if tests is not None else None
    if counts:
        tests.note = f"{counts}; {tests.note}".strip("; ")
    meta["seconds"] = round(time.monotonic() - started, 1)
    print("\n" + write_summary(results, meta, out))
    print(f"[gpu-check] {meta['seconds']} s in all; summary in {out / 'summary.md'}")
    return 1 if errors or any(r.status in (FAIL, TIMEOUT) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
