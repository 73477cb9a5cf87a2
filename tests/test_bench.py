"""The benchmark harness (bench/): the CLI runs end to end on tiny cases and writes its
files, an implementation that disagrees with the reference is reported, not timed, and
the bench modules import one another without a circle.

Legend: B batch, m width, C channels, N steps.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is not installed; it lives next to tests/
    sys.path.insert(0, str(REPO))

from bench import results, run  # noqa: E402
from bench.cases import CASE_SETS, MODES, check_agreement, forward_backward, make_inputs  # noqa: E402
from bench.impls import Impl, oracle_outputs, reference_impl  # noqa: E402

TINY_ARGS = ["--sizes", "tiny", "--device", "cpu", "--no-compile", "--no-progress", "--min-run-time", "0.005"]


def _wrong_impl() -> Impl:
    """The reference with the scale off by 1 percent: plausible output, wrong numbers."""

    def build(case):
        ref = reference_impl().build(case)
        return lambda x, weight, bias: ref(x, weight, bias) * 1.01

    return Impl("off_by_1pct", build)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run.main(TINY_ARGS + ["--out", str(out)], extra_impls=[_wrong_impl()])
    return out, result


def test_writes_json_csv_png(tiny_run):
    out, result = tiny_run
    files = sorted(p.name for p in out.iterdir())
    stem = Path(sorted(f for f in files if f.endswith(".json"))[0]).stem
    # The results, the speedup plot, and the sweep/memory plot (tiny_dense measures memory).
    assert files == sorted([f"{stem}.csv", f"{stem}.json", f"{stem}.png", f"{stem}-sweeps.png"])
    assert stem.startswith("cpu-float32-") and len(stem.split("-")[-1]) == 8  # <device>-<dtype>-<YYYYMMDD>

    data = json.loads((out / f"{stem}.json").read_text())
    meta = data["meta"]
    for key in ("device", "device_name", "dtype", "torch", "git_sha", "date", "threads"):
        assert meta[key] not in (None, ""), key
    assert meta["torch"] == torch.__version__
    rows = data["rows"]
    impls = {r["impl"] for r in rows}
    assert {"reference", "off_by_1pct"} <= impls and "compiled" not in impls
    assert len(rows) == len(CASE_SETS["tiny"]) * len(impls) * len(MODES)
    assert all("agrees" in r for r in rows)

    with (out / f"{stem}.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert {"case", "impl", "mode", "median_ms", "p20_ms", "p80_ms", "speedup", "agrees", "device", "dtype",
            "torch", "git_sha", "date"} <= set(csv_rows[0])
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_is_timed_and_agrees(tiny_run):
    _, result = tiny_run
    ref_rows = [r for r in result["rows"] if r["impl"] == "reference"]
    assert ref_rows and all(r["status"] == results.OK and r["agrees"] is True for r in ref_rows)
    for r in ref_rows:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["speedup"] == pytest.approx(1.0)


def test_wrong_impl_is_reported_not_timed(tiny_run, capsys):
    _, result = tiny_run
    wrong = [r for r in result["rows"] if r["impl"] == "off_by_1pct"]
    assert len(wrong) == len(CASE_SETS["tiny"]) * len(MODES)
    for r in wrong:
        assert r["status"] == "WRONG" and r["agrees"] is False
        assert r["median_ms"] is None and r["speedup"] is None
        assert "output" in r["note"]
    assert "WRONG" in results.format_table(result["rows"])


def test_raising_impl_is_reported_not_fatal(tmp_path):
    def build(case):
        def fn(x, weight, bias):
            raise RuntimeError("kernel not built")
        return fn

    result = run.main(TINY_ARGS + ["--cases", "tiny_dense", "--backends", "reference", "--out", str(tmp_path)],
                      extra_impls=[Impl("broken", build)])
    rows = [r for r in result["rows"] if r["impl"] == "broken"]
    assert [r["status"] for r in rows] == ["ERROR"] * len(MODES)
    assert all(r["agrees"] is False and "kernel not built" in r["note"] for r in rows)


def test_check_agreement_catches_a_wrong_gradient():
    case = CASE_SETS["tiny"][0]
    inputs = make_inputs(case, "cpu")
    expected = oracle_outputs(case, inputs)
    actual = forward_backward(reference_impl().build(case), inputs)
    assert check_agreement(actual, expected, torch.float32) is None
    bad = list(actual)
    bad[2] = bad[2] * 1.001  # grad weight
    assert "grad weight" in check_agreement(bad, expected, torch.float32)


def test_inputs_are_deterministic():
    case = CASE_SETS["tiny"][1]
    a, b = make_inputs(case, "cpu"), make_inputs(case, "cpu")
    assert all(torch.equal(x, y) and x.requires_grad for x, y in zip(a, b))


def test_script_entry_point_runs():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--no-compile" in proc.stdout and "--sizes" in proc.stdout


def test_metrics_and_memory_columns(tiny_run):
    _, result = tiny_run
    for r in result["rows"]:
        if r["status"] != results.OK:
            continue
        assert r["gflops"] > 0 and r["gemm_ms"] > 0 and r["of_gemm"] > 0
    mem = [r for r in result["rows"] if r["case"] == "tiny_dense" and r["mode"] == "fwd+bwd"
           and r["status"] == results.OK and r["impl"] in ("reference", "cpu")]
    assert mem and all(r["peak_mb"] is not None and r["peak_mb"] >= 0 for r in mem)


def test_regressions_are_flagged(tiny_run, tmp_path):
    """A run compared with an earlier file whose medians were half as long flags every row."""
    out, result = tiny_run
    earlier = json.loads(next(out.glob("*.json")).read_text())
    for r in earlier["rows"]:
        if r["median_ms"]:
            r["median_ms"] /= 2
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    rows = [dict(r) for r in result["rows"]]
    flagged = results.compare(rows, path)
    ok = [r for r in rows if r["status"] == results.OK]
    assert flagged == len(ok) and all("vs earlier.json" in r["regression"] for r in ok)
    assert "slower than the earlier results" in results.format_table(rows)


def test_impl_environment_covers_forward_and_backward(tmp_path):
    """An implementation's env (e.g. "cuda+cublas": SPLINET_DENSE_GEMM=cublas) is set while its
    forward and its backward run, in the check and in every timed call, and restored after."""
    import os

    seen = []

    def build(case):
        ref = reference_impl().build(case)

        def fn(x, weight, bias):
            seen.append(os.environ.get("SPLINET_BENCH_PROBE"))
            y = ref(x, weight, bias)
            y.register_hook(lambda g: seen.append(os.environ.get("SPLINET_BENCH_PROBE")))
            return y
        return fn

    result = run.main(TINY_ARGS + ["--cases", "tiny_dense", "--backends", "reference", "--out", str(tmp_path)],
                      extra_impls=[Impl("probe", build, env={"SPLINET_BENCH_PROBE": "1"})])
    assert [r["status"] for r in result["rows"] if r["impl"] == "probe"] == [results.OK] * len(MODES)
    assert len(seen) > 2 and set(seen) == {"1"}
    assert "SPLINET_BENCH_PROBE" not in os.environ


def test_cublas_variant_only_where_it_differs():
    from bench.impls import backend_impl

    impl = backend_impl("cuda+cublas")
    assert impl.env == {"SPLINET_DENSE_GEMM": "cublas"}
    case = CASE_SETS["tiny"][0]  # float32 dense
    assert "bf16/fp16" in impl.skip(case, torch.device("cpu"))


def _timed_row(impl, round_ms, median_ms=None):
    return {"case": "c", "impl": impl, "mode": "fwd", "status": results.OK, "round_ms": round_ms,
            "median_ms": median_ms if median_ms is not None else float(sorted(round_ms)[len(round_ms) // 2])}


def test_round_speedups_flag_a_noisy_row():
    """Each interleaved round gives a speedup; rounds that disagree mark the row, and a
    marked speedup whose range holds 1 prints as ~1x, not as a 0.96x that is load."""
    ref = _timed_row("reference", [10.0, 10.0, 10.0])
    steady = _timed_row("a", [5.0, 5.1, 4.9])
    steady["speedup"] = 2.0
    results.round_spread(steady, ref)
    assert not steady["noisy"] and results.speedup_cell(steady) == "2.00x"
    assert steady["speedup_lo"] == pytest.approx(10 / 5.1) and steady["speedup_hi"] == pytest.approx(10 / 4.9)

    loaded = _timed_row("b", [8.0, 10.4, 12.5])  # one round sped up, one slowed down: load, not the code
    loaded["speedup"] = 10.0 / 10.4
    results.round_spread(loaded, ref)
    assert loaded["noisy"] and loaded["speedup_lo"] < 1 < loaded["speedup_hi"]
    assert results.speedup_cell(loaded) == "~1x"

    fast_noisy = _timed_row("c", [2.0, 2.5, 3.0])
    fast_noisy["speedup"] = 4.0
    results.round_spread(fast_noisy, ref)
    assert fast_noisy["noisy"] and results.speedup_cell(fast_noisy) == "4.00x ~"

    rows = [dict(ref, speedup=1.0, noisy=False), steady, loaded, fast_noisy]
    noisy, noisy_run = results.noise(rows)
    assert noisy == ["c/b/fwd", "c/c/fwd"] and noisy_run  # 2 of 4 > a fifth
    assert results.noise(rows[:2]) == ([], False)


def test_noisy_run_is_flagged_in_the_table(tiny_run):
    _, result = tiny_run
    rows = [dict(r) for r in result["rows"]]
    timed = [r for r in rows if r["status"] == results.OK and r["impl"] != "reference"]
    assert timed and all(len(r["round_ms"]) == run.ROUNDS and "noisy" in r for r in timed)
    for r in timed:
        r.update(noisy=True, speedup_lo=0.5, speedup_hi=1.5)
    table = results.format_table(rows)
    assert "NOISY RUN" in table and "~1x" in table
    assert "noisy_run" in result["meta"] and "noisy_rows" in result["meta"]


def test_every_case_list_is_documented_and_listed(capsys):
    from bench.cases import CASE_SET_DOCS

    assert set(CASE_SET_DOCS) == set(CASE_SETS) and all(CASE_SET_DOCS.values())
    out = run.main(["--list"])
    printed = capsys.readouterr().out
    for name, cases in CASE_SETS.items():
        assert f"--sizes {name}:" in printed
        assert all(c.name in printed for c in cases)
    assert out["sets"]["quick"] == [c.name for c in CASE_SETS["quick"]]


def test_help_names_every_case_list():
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr
    for name in CASE_SETS:
        assert f"{name}:" in proc.stdout
    assert "--list" in proc.stdout


def test_results_go_outside_the_sources_by_default():
    """A plain run writes into the git-ignored build/ folder, not into bench/results/ (the
    committed results)."""
    assert run.DEFAULT_OUT == REPO / "build" / "bench"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(run.DEFAULT_OUT / "x.json")], cwd=REPO)
    if ignored.returncode == 128:  # not a git checkout (an unpacked sdist): nothing to check
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0
    assert run.parse_args([]).out == run.DEFAULT_OUT


def test_train_step_mode(tmp_path):
    """--train-step times one optimizer step of a small model per implementation; the
    markdown report gets its columns."""
    from bench import report

    result = run.main(TINY_ARGS + ["--train-step", "--backends", "cpu,reference", "--cases", "tiny_dense,tiny_conv2d",
                                   "--out", str(tmp_path)])
    train = [r for r in result["rows"] if r["mode"] == "train"]
    assert {(r["case"], r["impl"]) for r in train} == {(c, i) for c in ("tiny_dense", "tiny_conv2d")
                                                       for i in ("cpu", "reference")}
    assert all(r["status"] == results.OK and r["median_ms"] > 0 and r["speedup"] is not None for r in train)
    table = report.markdown(json.loads(next(tmp_path.glob("*.json")).read_text()))
    assert "train step ms" in table and "train speedup" in table
    # without the flag, no train rows (the default suite stays within its time)
    plain = run.main(TINY_ARGS + ["--backends", "reference", "--cases", "tiny_dense", "--out", str(tmp_path / "p")])
    assert {r["mode"] for r in plain["rows"]} == set(MODES)


def test_train_step_is_the_same_model_for_every_implementation():
    """The train step builds the same lift, head, labels and coefficients for every
    implementation, so their first losses agree, and a step changes the parameters."""
    from bench.cases import train_step_fn
    from bench.impls import backend_impl

    for case in (CASE_SETS["tiny"][0], CASE_SETS["tiny"][2]):
        inputs = make_inputs(case, "cpu")
        losses = []
        for impl in (reference_impl(), backend_impl("cpu")):
            step = train_step_fn(case, impl.build(case), inputs)
            first = float(step())
            second = float(step())
            assert first != second  # Adam moved the parameters
            losses.append(first)
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        assert inputs.weight.grad is None  # the case's own tensors are left alone


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_cpu_peak_memory_is_repeatable(tmp_path):
    """Each measurement runs in a fresh process forked from a clean server, with malloc's
    mmap threshold fixed: the same call measures the same peak whatever ran before, and a
    script without a __main__ guard can call it (no re-import of the caller's module)."""
    from dataclasses import replace

    from bench.metrics import peak_memory_cpu

    case = replace(CASE_SETS["tiny"][0], B=256, m=32, N=20, name="mem_probe")
    first = peak_memory_cpu(case, "reference")
    forward_backward(reference_impl().build(case), make_inputs(case, "cpu"))  # history in this process
    assert peak_memory_cpu(case, "reference") == pytest.approx(first, abs=0.5)
    # the reference keeps per-step tensors of B x m floats (32 KB each): several MB live
    assert first > 1.0 and peak_memory_cpu(case, "cpu") < first
    script = tmp_path / "unguarded.py"
    script.write_text("import sys\nsys.path.insert(0, %r)\nfrom bench.cases import CASE_SETS\n"
                      "from bench.metrics import peak_memory_cpu\n"
                      "print(peak_memory_cpu(CASE_SETS['tiny'][0], 'reference'))\n" % str(REPO))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) >= 0


def _bench_imports():
    """{module: the bench modules it imports}, for every module of bench/, counting the
    imports inside functions too (a circle closed by a late import is still a circle)."""
    import ast

    graph = {}
    for path in sorted((REPO / "bench").glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("bench.")}
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("bench."):
                    deps.add(node.module)
                elif node.module == "bench":
                    deps |= {f"bench.{a.name}" for a in node.names}
        graph[f"bench.{path.stem}"] = deps
    return graph


def test_bench_imports_have_no_circle():
    """Cases are data (cases), the ways to run them one module (impls), result files and
    their comparison another (results), timing and the CLI on top (run): no module imports
    one that imports it back, directly or through others."""
    graph = _bench_imports()
    assert graph["bench.cases"] == set() and graph["bench.results"] == set()
    assert graph["bench.impls"] == {"bench.cases"}
    assert graph["bench.report"] == {"bench.results"}

    def visit(module, path):
        assert module not in path, "import circle: " + " -> ".join(path + [module])
        for dep in graph.get(module, ()):
            visit(dep, path + [module])

    for module in graph:
        visit(module, [])


def test_report_needs_neither_torch_nor_the_timing_code(tmp_path):
    """The docs build runs `python -m bench.report FILE.json`: it formats a file without
    importing torch or bench.run."""
    proc = subprocess.run([sys.executable, "-c", "import sys, bench.report; "
                           "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('bench.')))"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(["bench.report", "bench.results"])


def test_report_cli_prints_the_markdown_table(tiny_run):
    from bench import report

    out, _ = tiny_run
    path = next(out.glob("*.json"))
    proc = subprocess.run([sys.executable, "-m", "bench.report", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == report.markdown(json.loads(path.read_text())) + "\n"
    assert "| case | shape | impl | fwd ms | fwd+bwd ms | fwd+bwd speedup |" in proc.stdout


COMMITTED = sorted((REPO / "bench" / "results").glob("*.json"))


@pytest.mark.skipif(not COMMITTED, reason="no committed results (an unpacked sdist)")
def test_committed_results_still_load(tiny_run):
    """Every committed results file formats as a table and serves as the earlier file of a
    regression comparison (the rows of a new run are matched by case, impl and mode)."""
    from bench import report

    _, result = tiny_run
    for path in COMMITTED:
        data = json.loads(path.read_text())
        assert report.markdown(data).count("\n") > 3, path.name
        rows = [dict(r) for r in data["rows"]]
        assert results.compare(rows, path) == 0  # a file compared with itself: nothing slower
        results.compare([dict(r) for r in result["rows"]], path)  # other cases: no match, no error
