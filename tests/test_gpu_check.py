"""`make gpu-check` (tools/gpu_check.py, tools/gpu_smoke.py, the bench's GPU mode) without a GPU:
the plan for a faked H200 machine (steps, arch list, timeouts within the budget, nothing
fetched), the output directory, the executor (a failing or timed-out step does not stop the
next; a timed-out step's processes are ended), the summary, and the smoke harness on the CPU
backend.

Legend: B batch, m width, C channels, N steps.
"""
from __future__ import annotations

import json
import os
import sys
import tarfile
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
import gpu_smoke as gs  # noqa: E402

PY = sys.executable
H200 = {"python": "3.12.3", "torch": "2.11.0+cu130", "torch_cuda": "13.0", "ninja_binary": "/usr/bin/ninja",
        "devices": [{"name": "NVIDIA H200", "capability": [9, 0], "multiprocessors": 132, "memory_gib": 139.8}],
        "modules": {m: "1.0" for m in (*gc.REQUIRED_MODULES, *gc.OPTIONAL_MODULES)}}
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
    assert [s.name for s in steps] == ["build", "import", "tests", "smoke", "racecheck", "synccheck", "compile",
                                       "ddp", "bench"]
    by = {s.name: s for s in steps}
    build = by["build"]
    assert build.argv[1:] == ["setup.py", "build_ext", "--inplace"]
    assert build.env["TORCH_CUDA_ARCH_LIST"] == "9.0" and build.env["MAX_JOBS"] == "16"
    assert build.env["FORCE_CUDA"] == "1" and build.env["PIP_NO_INDEX"] == "1"
    tests = by["tests"].argv
    assert tests[1:3] == ["-m", "pytest"] and "--timeout=60" in tests and "-v" in tests
    assert tests[tests.index("-n") + 1] == "8"
    assert {"tests/test_cuda_dense.py", "tests/test_fused_dense.py", "tests/test_triton.py"} <= set(tests)
    assert tests[tests.index("-k") + 1] == "not emulated"
    assert any(a.startswith("--junitxml=" + str(tmp_path)) for a in tests)
    for tool in ("racecheck", "synccheck"):
        argv = by[tool].argv
        assert argv[0] == SANITIZER and argv[argv.index("--tool") + 1] == tool and by[tool].skip is None
        assert argv[argv.index("--kernel-name") + 1] == "kns=" + gc.SANITIZER_KERNEL
        assert argv[argv.index("--group") + 1] == "sanitizer"
    ddp = by["ddp"].argv
    assert ddp[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=1" in ddp and "examples/ddp.py" in ddp
    assert by["ddp"].group == by["smoke"].group
    bench = by["bench"].argv
    assert bench[bench.index("--device") + 1] == "cuda" and bench[bench.index("--sizes") + 1] == "gpu"
    assert "compiled+cudagraphs" in bench[bench.index("--backends") + 1]
    assert float(bench[bench.index("--budget") + 1]) < by["bench"].timeout  # results written before the kill
    for s in steps[1:]:  # compiled Triton kernels on the GPU, whatever the caller's environment
        assert s.env.get("TRITON_INTERPRET", "unset") is None
    assert gc.offline_problems(steps) == []


def test_timeouts_fit_the_budget_and_the_call():
    assert set(gc.STEP_BUDGET) == {"build", "import", "tests", "smoke", "racecheck", "synccheck", "compile", "ddp",
                                   "bench"}
    assert all(t > 0 for t in gc.STEP_BUDGET.values()) and gc.BUDGET_S <= gc.CALL_LIMIT_S - 20
    steps = h200_plan(Path("/tmp/unused"))
    assert [[s.name for s in b] for b in gc.batches(steps)] == [
        ["build"], ["import"], ["tests"], ["smoke", "racecheck", "synccheck", "compile", "ddp"], ["bench"]]
    assert gc.planned_seconds(steps) == sum(gc.STEP_BUDGET[n] for n in ("build", "import", "tests", "bench")) + \
        max(gc.STEP_BUDGET[n] for n in ("smoke", "racecheck", "synccheck", "compile", "ddp"))
    assert gc.planned_seconds(steps) <= gc.BUDGET_S


def test_plan_without_optional_tools(tmp_path):
    info = {**H200, "modules": {m: "1.0" for m in gc.REQUIRED_MODULES}}
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
    cpu = {**H200, "torch_cuda": None, "devices": [], "modules": {**H200["modules"], "ninja": None}}
    errors, notes = gc.setup_problems(cpu, None, dry_run=False)
    assert any("ninja" in e for e in errors) and any("nvcc" in e for e in errors)
    assert any("CUDA build" in e for e in errors) and any("no GPU" in e for e in errors)
    errors, notes = gc.setup_problems(cpu, None, dry_run=True)  # a CPU machine may plan
    assert [e for e in errors if "ninja" not in e] == [] and any("no GPU" in n for n in notes)


def test_test_selection_and_sanitizer_filter_are_checked_statically(monkeypatch):
    assert gc.selection_problems(gc.test_files()) == []
    assert gc.selection_problems([]) != []
    assert gc.sanitizer_filter_problems() == []
    monkeypatch.setattr(gc, "SANITIZER_KERNEL", "renamed_kernel")
    assert "renamed_kernel" in gc.sanitizer_filter_problems()[0]


def test_out_dir_choice():
    assert gc.out_dir("/tmp/x", {"OUT": "/tmp/o"}, False) == Path("/tmp/x")
    assert gc.out_dir(None, {"OUT": "/tmp/o"}, False) == Path("/tmp/o")
    assert gc.out_dir(None, {}, False) == REPO / "build" / "gpu-check"
    assert gc.out_dir(None, {"OUT": ""}, True) == REPO / "build" / "gpu-check-dry-run"


def test_make_test_runs_the_dry_run():
    text = (REPO / "Makefile").read_text()
    recipe = text.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "gpu-check DRY_RUN=1" in recipe
    assert "\ngpu-check:" in text and "tools/gpu_check.py" in text


# ----------------------------------------------------------------------------- executor

def _py(code: str):
    return [PY, "-c", code]


def test_a_failing_or_timed_out_step_does_not_stop_the_next(tmp_path):
    pidfile = tmp_path / "child.pid"
    steps = [
        gc.Step("fails", "", _py("import sys; print('boom'); sys.exit(3)"), 30),
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


def test_summary_junit_and_pack(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "tests-junit.xml").write_text('<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2"/>'
                                          '</testsuites>')
    assert gc.junit_counts(logs / "tests-junit.xml") == "7 passed, 1 failed, 0 errors, 2 skipped"
    assert gc.junit_counts(logs / "absent.xml") is None
    results = [gc.Result("build", gc.PASS, 12.5, 195, 0, "", str(logs / "build.log"), ["ok"]),
               gc.Result("tests", gc.FAIL, 80.0, 115, 1, "exit status 1", str(logs / "tests.log"), ["1 failed"])]
    text = gc.write_summary(results, {"gpus": "NVIDIA H200", "budget": 570, "errors": [], "notes": ["n"]}, tmp_path)
    assert "| build | PASS | 12.5 | 195 |" in text and "| tests | FAIL |" in text and "1 failed" in text
    data = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in data["steps"]] == ["build", "tests"]
    (tmp_path / "bench").mkdir()
    for name in ("gpu.json", "gpu.csv", "gpu.png"):
        (tmp_path / "bench" / name).write_text("x")
    archive = gc.pack(tmp_path)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "logs/tests-junit.xml" in names and "bench/gpu.png" in names
    kept = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert kept == ["bench/gpu.csv", "bench/gpu.json", "logs.tar.gz", "summary.json", "summary.md"]


def test_pytest_progress_of_a_cut_run():
    log = ("[gw0] [  1%] PASSED tests/test_cuda_dense.py::test_a[4]\n"
           "[gw1] [  2%] FAILED tests/test_triton.py::test_b\n"
           "tests/test_fused_dense.py::test_c[cuda-cuda] SKIPPED (no)\n"
           "tests/test_fused_dense.py::test_d[cuda-cuda] ERROR\n")
    assert gc.pytest_progress(log) == ("so far 1 passed, 1 failed, 1 errors, 1 skipped: "
                                       "tests/test_fused_dense.py::test_d[cuda-cuda], tests/test_triton.py::test_b")
    assert gc.pytest_progress("collecting ...") is None


def test_dry_run_end_to_end(tmp_path):
    """The planning run itself (probe, plan, offline checks, dry commands, summary): what
    `make gpu-check DRY_RUN=1` does, limited to the steps that need no build."""
    code = gc.main(["--dry-run", "--only", "smoke,compile", "--out", str(tmp_path)])
    assert code == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| smoke | PASS |" in summary and "| compile | PASS |" in summary
    assert "arch_list: 9.0 (assumed" in summary or "arch_list: " in summary


# ------------------------------------------------------------------------- smoke harness

def small(check: gs.Check) -> gs.Check:
    """The check at CPU sizes, in a dtype the CPU backend takes."""
    lay = check.layer
    dtype = lay.dtype if lay.dtype in ("float32", "float64") else "float64"
    return replace(check, layer=replace(lay, B=min(lay.B, 4), m=min(lay.m, 5), spatial=tuple(min(s, 5) for s in
                                                                                             lay.spatial),
                                          N=min(lay.N, 2), dtype=dtype))


def test_smoke_checks_are_well_formed():
    names = [c.name for g in gs.GROUPS.values() for c in g]
    assert len(names) == len(set(names))
    assert {c.mode for c in gs.SMOKE} == {"match", "stream", "device2"}
    assert any(c.layer.B == 0 and c.layer.spatial for c in gs.SMOKE) and any(c.layer.B == 0 for c in gs.SMOKE)
    big = next(c for c in gs.SMOKE if c.name == "dense-gemm128-bf16").layer
    assert (big.B, big.m, big.dtype) == (4096, 1024, "bfloat16") and (big.B // 128) * (big.m // 128) > 132
    with pytest.raises(ValueError, match="--checks"):
        gs.select(["smoke"], ["no-such-check"])


@pytest.mark.skipif("cpu" not in __import__("splinet_cuda").available_backends(), reason="CPU kernels not built")
def test_smoke_harness_on_the_cpu_backend():
    names = ["dense-small-m64-rk4-f32", "dense-small-m32-rk438-f64", "conv-direct-C24-slots-f32", "zero-dense-small",
             "zero-conv", "stream-dense-small", "device2-dense"]
    checks = [small(c) for c in gs.select(["smoke"], names)]
    results = gs.run_checks(checks, "cpu", ["cpu"], echo=lambda _: None)
    status = {r.check: r.status for r in results}
    assert status == {**{n: gs.PASS for n in names[:5]}, "stream-dense-small": gs.SKIP, "device2-dense": gs.SKIP}
    assert all(r.error is not None and r.error < 1e-5 for r in results if r.status == gs.PASS)


def test_smoke_catches_wrong_and_nondeterministic_results(monkeypatch):
    check = small(gs.select(["smoke"], ["dense-small-m64-euler-f64"])[0])
    real = gs.call
    calls = []

    def noisy(layer, backend, inputs, device, dtype=None):
        out = real(layer, backend, inputs, device, dtype)
        if backend != "reference":
            calls.append(1)
            out[2] = out[2] * (1 + 1e-12 * len(calls))  # grad weight differs between runs
        return out

    monkeypatch.setattr(gs, "call", noisy)
    result = gs.run_check(check, "cpu", "cpu")
    assert result.status == gs.FAIL and "not bitwise equal" in result.note and "grad x" not in result.note

    ref = [torch.ones(3, dtype=torch.float64), None]
    assert gs.compare([torch.ones(3), None], ref, "float32")[0]
    ok, err, note = gs.compare([torch.full((3,), 1.001), None], ref, "float32")
    assert not ok and "out: relative error" in note
    assert not gs.compare([torch.tensor([1.0, float("nan"), 1.0]), None], ref, "float64")[0]
    assert "shape" in gs.compare([torch.ones(2), None], ref, "float32")[2]


def test_smoke_rejection_is_a_failure_unless_optional(monkeypatch):
    def reject(*args, **kwargs):
        raise ValueError("x: unsupported here")

    check = small(gs.select(["smoke"], ["dense-small-m64-euler-f64"])[0])
    real = gs.call
    monkeypatch.setattr(gs, "call", lambda layer, backend, *a: (real if backend == "reference" else reject)(
        layer, backend, *a))
    assert gs.run_check(check, "cpu", "cpu").status == gs.FAIL
    assert gs.run_check(replace(check, optional=True), "cpu", "cpu").status == gs.REJECTED


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
