"""`python -m splinet_cuda info` and `python -m splinet_cuda selftest`: the report's contents,
the selftest on the CPU (passes, exit status 0; a wrong result or a broken backend fails it,
exit status 1; GPU rows are skipped with the reason), and both commands from outside the
checkout, as an installed package runs them.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import splinet_cuda as sc
from splinet_cuda import __main__ as cli
from splinet_cuda import _info, _selftest

HAS_CPU = "cpu" in sc.available_backends()
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="CPU kernels not built")


def test_info_reports_versions_build_devices_and_cpu_path(capsys):
    text = sc.info()
    assert capsys.readouterr().out == text
    lines = text.splitlines()
    assert lines[0].startswith(f"splinet_cuda {sc.__version__} (")
    assert any(ln.startswith(f"torch {torch.__version__} (CUDA {torch.version.cuda}") for ln in lines)
    assert any(ln.startswith("python ") for ln in lines) and any(ln.startswith("triton ") for ln in lines)
    assert f"backends: {', '.join(sc.available_backends())}" in lines
    assert "device cpu:" in lines and "    reference: yes (pure PyTorch); backend='auto' takes " in text
    if sc._ext.CUDA_ARCH_LIST:
        assert f"TORCH_CUDA_ARCH_LIST={sc._ext.CUDA_ARCH_LIST}" in text
    elif sc._ext.LOAD_ERROR is None:
        assert "CPU only (no CUDA kernels)" in text and "    cuda: no (extension built without CUDA)" in lines
    if HAS_CPU:
        assert any(ln.startswith("    cpu: yes (dense, conv 1,2,3-D, hamiltonian; float32, float64)") for ln in lines)
    if not torch.cuda.is_available():
        assert any(ln.startswith("device cuda: none visible (") for ln in lines)
    assert f"    torch CPU capability: {torch.backends.cpu.get_cpu_capability()}" in lines
    assert any(ln.startswith(f"    threads: {torch.get_num_threads()} ") for ln in lines)
    assert any(ln.startswith("    float32 dense GEMM: ") or "portable" in ln or "unknown" in ln for ln in lines)
    assert _info.info_text() == text  # stable: the same text twice


def test_info_names_the_environment_and_the_gemm_override(monkeypatch):
    monkeypatch.setenv("SPLINET_CPU_GEMM", "aten")
    text = _info.info_text()
    assert "    SPLINET_CPU_GEMM=aten  (" in text
    vendor, flags = _info._cpu_flags()
    if "avx512f" in flags:
        assert "float32 dense GEMM: ATen (SPLINET_CPU_GEMM=aten)" in text


def test_info_explains_a_gpu_the_build_does_not_cover(monkeypatch):
    """"cuda: no (... compute capability 7.5 ... TORCH_CUDA_ARCH_LIST="8.0;9.0" ...)" for a
    CUDA build on a GPU it has no kernels for (the registry and device check faked)."""
    from splinet_cuda import _cuda_archs, _dispatch

    monkeypatch.setitem(_dispatch._REGISTRY, "cuda", _dispatch.Backend(
        lambda *a, **k: None, None, ("cuda",), (torch.float32, torch.bfloat16), (1, 2, 3), ("cuda",),
        device_check=_cuda_archs.cuda_backend_error))
    monkeypatch.setattr(_cuda_archs, "device_capability", lambda device: ((7, 5), "Tesla T4"))
    monkeypatch.setattr(_cuda_archs, "compiled_arch_list", lambda: "8.0;9.0")
    why = _info.backend_unavailable("cuda", torch.device("cuda", 0))
    assert "Tesla T4 (compute capability 7.5" in why and 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in why
    monkeypatch.setattr(_cuda_archs, "compiled_arch_list", lambda: "7.5")
    assert _info.backend_unavailable("cuda", torch.device("cuda", 0)) is None
    assert "compute capability >= 8.0" in _info.backend_unavailable("cuda", torch.device("cuda", 0), torch.bfloat16)
    assert _info.backend_unavailable("cuda", torch.device("cpu")) == "runs on cuda tensors"


@needs_cpu
def test_selftest_on_the_cpu_passes(capsys):
    # The cpu backend only: under the tests' TRITON_INTERPRET=1 the triton backend runs CPU
    # tensors too, in its (slow) interpreter, which the triton tests cover.
    code = cli.main(["selftest", "--device", "cpu", "--quick", "--backends", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [ln for ln in out.splitlines() if ln[:4] in ("PASS", "FAIL", "SKIP")]
    layers = {ln.split()[3] for ln in rows}
    assert {"dense", "conv1d", "conv2d", "conv3d", "hamiltonian"} <= layers
    assert {ln.split()[4] for ln in rows} == {"float32", "float64"}
    assert all(ln.startswith("PASS") for ln in rows), out
    assert any("strided" in ln for ln in rows) and any("torch.compile" in ln for ln in rows)
    assert " 0 failed" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the rows of a machine without a GPU")
def test_selftest_gpu_rows_are_skipped_with_the_reason():
    rows = _selftest.run("cuda", quick=True, echo=lambda _: None)
    assert [(r.backend, r.status) for r in rows] == [("cuda", "SKIP"), ("triton", "SKIP")]
    assert all(r.note.startswith("no GPU visible (") and r.missing for r in rows)
    assert cli.main(["selftest", "--device", "cuda"]) == 0
    assert cli.main(["selftest", "--device", "cuda", "--strict"]) == 1


@needs_cpu
def test_selftest_fails_on_a_wrong_result(monkeypatch, capsys):
    monkeypatch.setitem(_selftest.TOLERANCE, torch.float64, 0.0)  # float64 rounding now fails
    monkeypatch.setattr(_selftest, "DENSE", _selftest.DENSE[:1])
    monkeypatch.setattr(_selftest, "CONV", {1: [], 2: [], 3: []})
    monkeypatch.setattr(_selftest, "HAMILTONIAN", [])
    monkeypatch.setattr(_selftest, "COMPILE", [])
    assert cli.main(["selftest", "--device", "cpu", "--quick", "--backends", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: FAIL  cpu    cpu    dense       float64" in out and "> 0e+00" in out
    assert "PASS  cpu    cpu    dense       float32" in out


@needs_cpu
def test_selftest_fails_on_a_broken_backend_and_a_nondeterministic_one(monkeypatch):
    from splinet_cuda import _dispatch

    impl = _dispatch._REGISTRY["cpu"]
    case = _selftest.DENSE[0]

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(_dispatch._REGISTRY, "cpu", impl._replace(spline_ode=broken))
    row = _selftest.run_case(case, "cpu", torch.device("cpu"), torch.float32)
    assert row.status == "FAIL" and row.note == "RuntimeError: kernel exploded"

    calls = []

    def noisy(x, *args, **kwargs):
        calls.append(1)
        return impl.spline_ode(x, *args, **kwargs) * (1 + 1e-7 * len(calls))

    monkeypatch.setitem(_dispatch._REGISTRY, "cpu", impl._replace(spline_ode=noisy))
    row = _selftest.run_case(case, "cpu", torch.device("cpu"), torch.float32)
    assert row.status == "FAIL" and "not bitwise equal between two runs: out" in row.note


def test_compare_rejects_nan_wrong_shapes_and_a_missing_gradient():
    names = ["out", "grad bias"]
    ref = [torch.ones(3, dtype=torch.float64), None]
    assert _selftest.compare([torch.ones(3), None], ref, torch.float32, names)[1] == []
    assert "out: error" in _selftest.compare([torch.full((3,), 1.01), None], ref, torch.float32, names)[1][0]
    assert _selftest.compare([torch.tensor([1.0, float("nan"), 1.0]), None], ref, torch.float64,
                             names)[1] == ["out: not finite"]
    assert "shape" in _selftest.compare([torch.ones(2), None], ref, torch.float32, names)[1][0]
    assert _selftest.compare([torch.ones(3), torch.ones(1)], ref, torch.float32, names)[1] == ["grad bias: missing"]


def test_cases_follow_each_backends_capabilities():
    from splinet_cuda import _dispatch

    fake = _dispatch.Backend(lambda: None, lambda: None, ("cuda",), (torch.float32,), (2,), ("cuda",))
    cuda = torch.device("cuda")
    try:
        _dispatch._REGISTRY["_probe"] = fake
        got = _selftest.cases("_probe", cuda)
        quick = _selftest.cases("_probe", cuda, quick=True)
    finally:
        del _dispatch._REGISTRY["_probe"]
    assert {c.name for c in got} == {"dense", "conv2d"}  # conv over 2-D only, no Hamiltonian kernel
    assert any(c.stream for c in got) and any(c.B == 0 for c in got) and not any(c.stream for c in quick)
    assert len(quick) < len(got)
    names = [c.describe() for c in _selftest.TINY]
    assert len(names) == len(set(names)) and all(c.B * c.m <= 6000 for c in _selftest.TINY)


def _run_outside_the_checkout(args, tmp_path, **env):
    """`python -m splinet_cuda ...` with the working directory outside the repository: the
    package imported is the installed one (or the one on PYTHONPATH), never ./splinet_cuda."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(sc.__file__)))
    environ = {**os.environ, **env}
    # Where the install is not this package (a checkout used in place, or an install of
    # another checkout), PYTHONPATH does what the install's path entry would.
    probe = subprocess.run([sys.executable, "-c", "import splinet_cuda; print(splinet_cuda.__file__)"],
                           cwd=tmp_path, env=environ, capture_output=True, text=True)
    if probe.returncode != 0 or os.path.realpath(probe.stdout.strip()) != os.path.realpath(sc.__file__):
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "splinet_cuda", *args], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=300)


def test_info_runs_outside_the_checkout(tmp_path):
    proc = _run_outside_the_checkout(["info"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("splinet_cuda ") and "device cpu:" in proc.stdout


def test_an_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["frobnicate"])
    assert exit_.value.code == 2 and "invalid choice: 'frobnicate'" in capsys.readouterr().err


@needs_cpu
@pytest.mark.slow
def test_selftest_runs_outside_the_checkout(tmp_path):
    proc = _run_outside_the_checkout(["selftest", "--device", "cpu", "--quick", "--backends", "cpu"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " 0 failed" in proc.stdout


@needs_cpu
def test_bench_times_each_backend_against_the_reference():
    lines = []
    rows = _selftest.bench("cpu", seconds=0.4, backends=("cpu",), echo=lines.append)
    assert [(r["backend"], r["case"]) for r in rows] == [("cpu", label) for label, _ in _selftest.BENCH_SIZES["cpu"]]
    assert all(r["ms"] > 0 and r["reference_ms"] > 0 for r in rows) and len(lines) == 1 + len(rows)


def test_selftest_restores_the_callers_backend_flags(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    seen = []
    monkeypatch.setattr(_selftest, "plan_rows", lambda *a: seen.append(torch.backends.cudnn.allow_tf32) or [])
    _selftest.run("cpu", echo=lambda _: None)
    assert seen == [False] and torch.backends.cudnn.allow_tf32 is True


def test_info_without_the_compiled_library(monkeypatch):
    """A library that failed to load (not built, or built against another torch) is named,
    with the loader's error, and every fused backend says so."""
    from splinet_cuda import _dispatch, _ext

    monkeypatch.setattr(_ext, "LOAD_ERROR", ImportError("undefined symbol: _ZN3c10"))
    for name in ("cpu", "cuda"):
        monkeypatch.delitem(_dispatch._REGISTRY, name, raising=False)
    text = _info.info_text()
    assert "extension: not loaded (undefined symbol: _ZN3c10); only the reference backend runs" in text
    assert "    cpu: no (the C++ library did not load (undefined symbol: _ZN3c10))" in text
    assert "backend='auto' takes 'reference' for float32" in text
