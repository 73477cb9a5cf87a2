"""`make gpu-check` (tools/gpu_check.py and the bench's GPU mode) without a GPU: the plan for a
faked H200 machine (steps, arch list, timeouts within the budget, nothing fetched), the
executor (a failing or timed-out step does not stop the next; a timed-out step's processes
are ended), the summary, and the dry run end to end.

Legend: B batch, m width, C channels, N steps.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import gpu_check as gc  # noqa: E402

PY = sys.executable
H200 = {"python": "3.12.3", "torch": "2.11.0+cu130", "torch_cuda": "13.0", "ninja_binary": "/usr/bin/ninja",
        "devices": [{"name": "NVIDIA H200", "capability": [9, 0]}],
        "modules": {m: True for m in (*gc.REQUIRED_MODULES, *gc.OPTIONAL_MODULES)}}
NVCC, SANITIZER = "/usr/local/cuda/bin/nvcc", "/usr/local/cuda/bin/compute-sanitizer"


def h200_plan(tmp_path, info=H200, sanitizer=SANITIZER, cores=16):
    env = gc.base_env("/opt/torch/.venv/bin/python3", NVCC)
    archs = gc.arch_list([d["capability"] for d in info["devices"]])
    return gc.plan("/opt/torch/.venv/bin/python3", tmp_path, info, cores=cores, archs=archs, nvcc=NVCC,
                   sanitizer=sanitizer, env=env)


# ---------------------------------------------------------------------------------- plan

def test_arch_list_is_the_local_gpus_only():
    assert gc.arch_list([[9, 0]]) == "9.0"
    assert gc.arch_list([(9, 0), (8, 6), (9, 0)]) == "8.6;9.0"
    with pytest.raises(ValueError, match="capabilities"):
        gc.arch_list([])
    assert gc.parse_capability("8.9") == (8, 9)
    with pytest.raises(ValueError, match="--capability"):
        gc.parse_capability("sm_90")


def test_plan_for_an_h200(tmp_path):
    steps = h200_plan(tmp_path)
    assert [s.name for s in steps] == ["build", "info", "selftest", "tests", "racecheck", "synccheck", "bench"]
    by = {s.name: s for s in steps}
    build = by["build"]
    assert build.argv[1:] == ["setup.py", "build_ext", "--inplace"]
    assert build.env["TORCH_CUDA_ARCH_LIST"] == "9.0" and build.env["MAX_JOBS"] == "16"
    assert build.env["FORCE_CUDA"] == "1" and build.env["PIP_NO_INDEX"] == "1"
    assert by["info"].argv[1:] == ["-m", "splinet_cuda", "info"] == by["info"].dry_argv[1:]
    assert by["selftest"].argv[1:] == ["-m", "splinet_cuda", "selftest", "--device", "cuda", "--strict"]
    tests = by["tests"].argv
    assert tests[1:6] == ["-m", "pytest", "-m", "gpu", "tests"] and "--timeout=60" in tests and "-v" in tests
    assert tests[tests.index("-n") + 1] == "8"
    assert any(a.startswith("--junitxml=" + str(tmp_path)) for a in tests)
    assert by["tests"].dry_argv[-2:] == ["--collect-only", "-q"]
    for tool in ("racecheck", "synccheck"):
        argv = by[tool].argv
        assert argv[0] == SANITIZER and argv[argv.index("--tool") + 1] == tool and by[tool].skip is None
        assert argv[argv.index("--kernel-name") + 1] == "kns=" + gc.SANITIZER_KERNEL
        assert argv[argv.index("selftest"):] == ["selftest", "--device", "cuda", "--tiny", "--backends", "cuda"]
    bench = by["bench"].argv
    assert bench[bench.index("--device") + 1] == "cuda" and bench[bench.index("--sizes") + 1] == "gpu"
    assert bench[bench.index("--out") + 1] == str(tmp_path / "bench")
    assert "compiled+cudagraphs" in bench[bench.index("--backends") + 1]
    assert float(bench[bench.index("--budget") + 1]) < by["bench"].timeout  # results written before the kill
    for s in steps[1:]:  # compiled Triton kernels on the GPU, whatever the caller's environment
        assert s.env.get("TRITON_INTERPRET", "unset") is None
    assert gc.offline_problems(steps) == []


def test_timeouts_fit_the_budget():
    assert set(gc.STEP_BUDGET) == {"build", "info", "selftest", "tests", "racecheck", "synccheck", "bench"}
    assert all(t > 0 for t in gc.STEP_BUDGET.values()) and gc.BUDGET_S <= 600 - 20
    steps = h200_plan(Path("/tmp/unused"))
    assert [[s.name for s in b] for b in gc.batches(steps)] == [
        ["build"], ["info"], ["selftest"], ["tests"], ["racecheck", "synccheck"], ["bench"]]
    assert gc.planned_seconds(steps) == sum(gc.STEP_BUDGET[n] for n in ("build", "info", "selftest", "tests",
                                                                        "racecheck", "bench"))
    assert gc.planned_seconds(steps) <= gc.BUDGET_S


def test_plan_without_optional_tools(tmp_path):
    info = {**H200, "modules": {m: True for m in gc.REQUIRED_MODULES}}
    by = {s.name: s for s in h200_plan(tmp_path, info, sanitizer=None, cores=2)}
    assert not any(a.startswith("--timeout") for a in by["tests"].argv) and "-n" not in by["tests"].argv
    assert by["build"].env["MAX_JOBS"] == "2"
    for tool in ("racecheck", "synccheck"):
        assert "compute-sanitizer not found" in by[tool].skip and by[tool].dry_argv is None


def test_network_and_installers_are_flagged():
    steps = [gc.Step("a", "", [PY, "-m", "pip", "install", "--no-build-isolation", "-e", "."], 1),
             gc.Step("b", "", ["curl", "-O", "http://example.com/x"], 1),
             gc.Step("c", "", [PY, "setup.py", "build_ext", "--inplace"], 1)]
    problems = gc.offline_problems(steps)
    assert len(problems) == 2 and problems[0].startswith("a:") and problems[1].startswith("b:")


def test_setup_problems():
    errors, notes = gc.setup_problems(H200, NVCC, dry_run=False)
    assert errors == [] and notes == []
    cpu = {**H200, "torch_cuda": None, "devices": [], "ninja_binary": None}
    errors, notes = gc.setup_problems(cpu, None, dry_run=False)
    assert any("ninja" in e for e in errors) and any("nvcc" in e for e in errors)
    assert any("CUDA build" in e for e in errors) and any("no GPU" in e for e in errors)
    errors, notes = gc.setup_problems(cpu, None, dry_run=True)  # a CPU machine may plan
    assert [e for e in errors if "ninja" not in e] == [] and any("no GPU" in n for n in notes)


def test_the_sanitizer_filter_is_checked(monkeypatch):
    assert gc.sanitizer_filter_problems() == []
    monkeypatch.setattr(gc, "SANITIZER_KERNEL", "renamed_kernel")
    assert "renamed_kernel" in gc.sanitizer_filter_problems()[0]


def test_tests_step_fails_when_no_test_carries_the_marker():
    assert gc.tests_classify(5, "no tests ran", dry_run=False)[0] == gc.FAIL
    status, note = gc.tests_classify(5, "", dry_run=True)
    assert status == gc.SKIP and "gpu marker" in note
    assert gc.tests_classify(0, "12 tests collected in 3.1s") == (gc.PASS, "12 gpu tests collected")
    assert gc.tests_classify(1, "") == (gc.FAIL, "exit status 1")


def test_make_test_runs_the_dry_run():
    text = (REPO / "Makefile").read_text()
    recipe = text.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "gpu-check DRY_RUN=1" in recipe
    assert "\ngpu-check:" in text and "tools/gpu_check.py" in text


# ------------------------------------------------------------------------------ executor

def _py(code):
    return [PY, "-c", code]


def test_failures_and_timeouts_do_not_stop_the_run(tmp_path):
    pidfile = tmp_path / "child.pid"
    steps = [
        gc.Step("fails", "", _py("print('boom'); raise SystemExit(3)"), 30),
        gc.Step("hangs", "", _py("import subprocess, sys, time; "
                                 "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                                 f"open({str(pidfile)!r}, 'w').write(str(c.pid)); print('started', flush=True); "
                                 "time.sleep(60)"), 3),
        gc.Step("missing", "", ["compute-sanitizer"], 30, skip="compute-sanitizer not found"),
        gc.Step("env", "", _py("import os; print(os.environ['GC_A'], os.environ.get('GC_B'))"), 30,
                env={"GC_A": "set", "GC_B": None}),
        gc.Step("refused", "", _py("print('Device not supported'); raise SystemExit(1)"), 30,
                classify=gc.sanitizer_classify),
    ]
    os.environ["GC_B"] = "should be unset"
    try:
        start = time.monotonic()
        results = gc.run_steps(steps, tmp_path / "logs", echo=lambda _: None)
    finally:
        del os.environ["GC_B"]
    assert time.monotonic() - start < 25
    assert [r.status for r in results] == [gc.FAIL, gc.TIMEOUT, gc.SKIP, gc.PASS, gc.SKIP]
    fails, hangs, missing, env, refused = results
    assert fails.returncode == 3 and "boom" in fails.tail and fails.note == "exit status 3"
    assert "started" in hangs.tail and "stopped after 3 s" in hangs.note
    assert missing.note == "compute-sanitizer not found"
    assert "set None" in env.tail
    assert "refused" in refused.note
    for r in results:
        assert Path(r.log).exists()
    # The hung step's child was ended with its process group (gone, or a zombie left for init).
    pid = int(pidfile.read_text())
    try:
        state = Path(f"/proc/{pid}/status").read_text()
        assert "\nState:\tZ" in state, state
    except FileNotFoundError:
        pass


def test_a_group_runs_at_the_same_time(tmp_path):
    sleep = lambda t: _py(f"import time; time.sleep({t}); print('slept')")
    steps = [gc.Step("a", "", sleep(1.5), 10, group="g"), gc.Step("b", "", sleep(30), 2, group="g"),
             gc.Step("c", "", _py("raise SystemExit(2)"), 10, group="g"), gc.Step("d", "", sleep(1.5), 10, group="g"),
             gc.Step("e", "", _py("print('after')"), 10)]
    start = time.monotonic()
    results = gc.run_steps(steps, tmp_path, echo=lambda _: None)
    wall = time.monotonic() - start
    assert [r.status for r in results] == [gc.PASS, gc.TIMEOUT, gc.FAIL, gc.PASS, gc.PASS]
    assert wall < 1.5 + 1.5 + 2 and results[1].seconds < 8  # a, b, d overlapped
    assert "after" in results[4].tail


def test_the_budget_caps_the_steps(tmp_path):
    steps = [gc.Step("slow", "", _py("import time; time.sleep(30)"), 100),
             gc.Step("late", "", _py("print(1)"), 100)]
    results = gc.run_steps(steps, tmp_path, budget=1.5, echo=lambda _: None)
    assert [r.status for r in results] == [gc.TIMEOUT, gc.SKIP]
    assert results[0].seconds < 10 and "no time left" in results[1].note


def test_dry_run_executes_the_dry_commands(tmp_path):
    steps = [gc.Step("a", "", _py("raise SystemExit(1)"), 10, dry_argv=_py("print('planned')")),
             gc.Step("b", "", _py("raise SystemExit(1)"), 10, dry_note="GPU only")]
    results = gc.run_steps(steps, tmp_path, dry_run=True, echo=lambda _: None)
    assert [r.status for r in results] == [gc.PASS, gc.SKIP]
    assert "planned" in results[0].tail and results[1].note == "GPU only"


def test_sanitizer_classify():
    clean = "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
    assert gc.sanitizer_classify(0, clean)[0] == gc.PASS
    assert gc.sanitizer_classify(0, "========= ERROR SUMMARY: 0 errors")[0] == gc.PASS
    assert gc.sanitizer_classify(3, "========= ERROR SUMMARY: 2 errors")[0] == gc.FAIL
    assert gc.sanitizer_classify(0, "RACECHECK SUMMARY: 1 hazard displayed (0 errors, 1 warning)")[0] == gc.FAIL
    status, note = gc.sanitizer_classify(1, "========= Error: Device not supported\n========= ERROR SUMMARY: 1 error")
    assert status == gc.SKIP and "Device not supported" in note
    assert gc.sanitizer_classify(1, "Traceback ...\nRuntimeError: x")[0] == gc.FAIL


def test_summary_and_junit(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "tests-junit.xml").write_text('<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2"/>'
                                          '</testsuites>')
    assert gc.junit_counts(logs / "tests-junit.xml") == "7 passed, 1 failed, 0 errors, 2 skipped"
    assert gc.junit_counts(logs / "absent.xml") is None
    results = [gc.Result("build", gc.PASS, 12.5, 170, 0, "", str(logs / "build.log"), ["ok"]),
               gc.Result("tests", gc.FAIL, 80.0, 140, 1, "exit status 1", str(logs / "tests.log"), ["1 failed"])]
    text = gc.write_summary(results, {"gpus": "NVIDIA H200", "budget": 570, "errors": [], "notes": ["n"]}, tmp_path)
    assert "| build | PASS | 12.5 | 170 |" in text and "| tests | FAIL |" in text and "1 failed" in text
    data = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in data["steps"]] == ["build", "tests"]


def test_dry_run_end_to_end(tmp_path, capsys):
    """What `make gpu-check DRY_RUN=1` does (probe, plan, offline checks, dry commands,
    summary), limited to the steps that need no build: info and the selftest's GPU rows."""
    code = gc.main(["--dry-run", "--only", "info,selftest", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().out
    summary = (tmp_path / "summary.md").read_text()
    assert "| info | PASS |" in summary and "| selftest | PASS |" in summary
    assert "arch_list: " in summary
    if not torch.cuda.is_available():
        assert "no GPU visible" in (tmp_path / "logs" / "selftest.log").read_text()


# ---------------------------------------------------------------------- bench GPU mode

def test_bench_gpu_mode_plans_without_a_gpu(tmp_path, capsys):
    from bench import run
    from bench.cases import CASE_SETS
    from bench.impls import compiled_impl

    gpu = {c.name: c for c in CASE_SETS["gpu"]}
    big = gpu["dense1024_d3_bf16"]
    assert (big.B, big.m, big.L, big.d, big.N, big.dtype) == (4096, 1024, 8, 3, 16, "bfloat16") and big.compile
    assert {(c.B, c.m, c.N, c.dtype) for n, c in gpu.items() if n.startswith("width-")} == \
        {(4096, m, 100, "float32") for m in (4, 16, 64)}
    result = run.main(["--device", "cuda", "--sizes", "gpu", "--backends", gc.BENCH_BACKENDS, "--budget", "60",
                       "--out", str(tmp_path), "--dry-run"])
    assert result["rows"] == [] and not list(tmp_path.iterdir())
    plan = {(p["case"], p["impl"]): p["skip"] for p in result["plan"]}
    assert plan[("dense1024_d3_bf16", "compiled+cudagraphs")] is None
    assert plan[("dense1024_d3_bf16", "cuda+cublas")] is None and plan[("width-4", "cuda+cublas")] is not None
    assert "conv2d_64_bf16" in capsys.readouterr().out
    assert compiled_impl("compiled+cudagraphs").skip(big, torch.device("cpu")) == "CUDA graphs need a GPU"


def test_bench_budget_skips_the_cases_left():
    from bench import run
    from bench.cases import CASE_SETS
    from bench.impls import reference_impl

    dense = next(c for c in CASE_SETS["tiny"] if c.kind == "dense")
    cases = [replace(dense, name=f"tiny_dense_{i}", memory=False) for i in range(3)]
    rows = run.run_benchmarks(cases, [reference_impl()], torch.device("cpu"), 0.005, progress=False, budget=0.001)
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], set()).add(r["status"])
    first, *rest = list(by_case)
    assert by_case[first] == {run.OK} and rest  # the first case always runs
    assert all(by_case[c] == {run.SKIPPED} for c in rest)
    assert all("time budget" in r["note"] for r in rows if r["case"] in rest)


def test_bench_memory_never_rebuilds_a_compiled_impl():
    """On a GPU the peak-memory pass rebuilt every implementation, so a compiled one was
    compiled twice per case (inside the GPU bench's time budget)."""
    from bench import run
    from bench.cases import CASE_SETS
    from bench.impls import Impl

    built = []

    def build(case):
        built.append(case.name)
        raise RuntimeError("built")

    impls = [Impl("compiled-probe", build, compiled=True), Impl("plain-probe", build)]
    rows = [{"impl": i.name, "mode": "fwd+bwd", "status": run.OK, "note": ""} for i in impls]
    run._measure_memory(CASE_SETS["tiny"][0], impls, None, torch.device("cuda"), rows)
    assert rows[0]["note"] == "" and "built" in rows[1]["note"] and len(built) == 1


def test_bench_pytest_suite_runs_an_impl_in_its_environment():
    """`make bench-pytest` called the implementations without their environment, so on a GPU
    its "cuda+cublas" rows timed the fused GEMM path under the cuBLAS label."""
    from bench import test_suite
    from bench.cases import CASE_SETS
    from bench.impls import Impl, reference_impl

    seen = []

    def build(case):
        ref = reference_impl().build(case)

        def fn(x, weight, bias):
            seen.append(os.environ.get("SPLINET_BENCH_PROBE"))
            return ref(x, weight, bias)

        return fn

    class Benchmark:  # pytest-benchmark's fixture, reduced to one call
        group = None

        def __call__(self, f):
            f()

    impl = Impl("probe", build, env={"SPLINET_BENCH_PROBE": "on"})
    test_suite.test_layer(Benchmark(), CASE_SETS["tiny"][0], impl, "fwd+bwd")
    assert seen and all(s == "on" for s in seen) and "SPLINET_BENCH_PROBE" not in os.environ
