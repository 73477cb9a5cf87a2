"""A GPU the CUDA build does not cover, or cannot run a dtype on, gets a clear error before
any launch (explicit backend) or a one-time warning and the next backend (backend="auto").
No GPU is needed: the device capability and the build's architecture list are faked."""
import warnings

import pytest
import torch

import splinet_cuda as sc
from splinet_cuda import _cuda_archs, _dispatch
from splinet_cuda._cuda_archs import Arch, image_for, parse

DEFAULT = "7.5;8.0;9.0;10.0;12.0+PTX"


@pytest.mark.parametrize("cap, expected", [
    ((7, 0), None),  # Volta: no SASS of major 7 at or below 7.0, and PTX only from 12.0
    ((7, 5), ("7.5", "sass")), ((8, 0), ("8.0", "sass")), ((8, 6), ("8.0", "sass")), ((8, 9), ("8.0", "sass")),
    ((9, 0), ("9.0", "sass")), ((10, 0), ("10.0", "sass")), ((10, 3), ("10.0", "sass")),
    ((11, 0), None), ((12, 0), ("12.0+PTX", "sass")), ((12, 1), ("12.0+PTX", "sass")), ((13, 0), ("12.0+PTX", "ptx")),
])
def test_image_for_the_default_list(cap, expected):
    got = image_for(cap, parse(DEFAULT))
    assert (None if got is None else (str(got[0]), got[1])) == expected


def test_image_rules():
    """SASS runs on its major version from its minor on ("a": only its own GPU); PTX is
    JIT-compiled for any later GPU."""
    assert image_for((9, 0), parse("8.0;8.6")) is None
    assert image_for((9, 0), parse("8.0;8.6+PTX")) == (Arch(8, 6, "", True), "ptx")
    assert image_for((9, 0), parse("9.0a")) == (Arch(9, 0, "a", False), "sass")
    assert image_for((10, 0), parse("9.0a+PTX")) is None
    assert image_for((8, 9), parse("8.6;9.0")) == (Arch(8, 6, "", False), "sass")
    assert image_for((8, 0), parse("8.6;9.0+PTX")) is None
    assert [str(a) for a in parse("Ampere Hopper")] == ["8.0", "8.6+PTX", "9.0+PTX"]
    with pytest.raises(ValueError, match="'sm_90'"):
        parse("sm_90")


def test_coverage_error_names_capability_and_rebuild():
    err = _cuda_archs.coverage_error((7, 0), "8.0;9.0", "Tesla V100-SXM2-16GB")
    assert isinstance(err, RuntimeError)
    msg = str(err)
    assert "7.0" in msg and "Tesla V100" in msg and 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in msg
    assert 'TORCH_CUDA_ARCH_LIST="7.0" FORCE_CUDA=1 pip install' in msg
    assert _cuda_archs.coverage_error((9, 0), "8.0;9.0") is None


@pytest.mark.parametrize("cap", [(7, 0), (7, 5)])
def test_bfloat16_below_sm80_is_a_type_error(cap):
    err = _cuda_archs.dtype_error("cuda", torch.bfloat16, cap)
    assert isinstance(err, TypeError) and "bfloat16" in str(err) and f"{cap[0]}.{cap[1]}" in str(err)
    for dt in (torch.float16, torch.float32, torch.float64):
        assert _cuda_archs.dtype_error("cuda", dt, cap) is None
    assert _cuda_archs.dtype_error("cuda", torch.bfloat16, (8, 0)) is None


@pytest.fixture
def fake_gpu(monkeypatch):
    """A "cuda" backend that runs CPU tensors standing in for a GPU of a chosen capability, the
    CUDA build's recorded list set by the test; the real registry is restored afterwards."""
    state = {"cap": (9, 0), "archs": DEFAULT}
    calls = []

    def fused(x, *args, **kwargs):
        calls.append(x.dtype)
        return x

    monkeypatch.setattr(_cuda_archs, "device_capability", lambda d: (state["cap"], "Fake GPU"))
    monkeypatch.setattr(_cuda_archs, "compiled_arch_list", lambda: state["archs"])

    def check(device, dtype):  # the real check, on the faked GPU and build
        return _cuda_archs.cuda_backend_error(torch.device("cuda", 0), dtype)

    monkeypatch.setattr(_dispatch, "_REGISTRY", dict(_dispatch._REGISTRY))
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    _dispatch.register_backend("cuda", dense=fused, conv=None, device_types=("cpu",), device_check=check,
                               dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
    monkeypatch.setattr(_dispatch, "_AUTO_ORDER", ("cuda", "cpu"))
    return state, calls


def layer_args(dtype=torch.float32):
    x = torch.randn(3, 4, dtype=dtype)
    w = 0.1 * torch.randn(4, 4, 4, dtype=dtype)
    b = torch.zeros(4, 4, dtype=dtype)
    return x, w, b


def test_covered_gpu_runs_the_cuda_backend(fake_gpu):
    state, calls = fake_gpu
    x, w, b = layer_args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sc.spline_ode(x, w, b, 1.0, steps=2, degree=1, backend="cuda")
        sc.spline_ode(x, w, b, 1.0, steps=2, degree=1, backend="auto")
    assert calls == [torch.float32, torch.float32]
    assert "cuda" in sc.available_backends("cpu")


def test_uncovered_gpu_raises_before_any_launch(fake_gpu):
    state, calls = fake_gpu
    state["cap"], state["archs"] = (7, 0), DEFAULT
    x, w, b = layer_args()
    with pytest.raises(RuntimeError, match=r"compute capability 7\.0.*TORCH_CUDA_ARCH_LIST=\"7\.0\""):
        sc.spline_ode(x, w, b, 1.0, steps=2, degree=1, backend="cuda")
    assert calls == []
    assert "cuda" not in sc.available_backends("cpu")


def test_auto_falls_back_with_one_warning(fake_gpu):
    state, calls = fake_gpu
    state["cap"], state["archs"] = (12, 0), "8.0;9.0"  # a Blackwell card, a build without PTX
    x, w, b = layer_args()
    want = sc.spline_ode(x, w, b, 1.0, steps=2, degree=1, backend="reference")
    with pytest.warns(RuntimeWarning, match=r"skips 'cuda'.*compute capability 12\.0"):
        got = sc.spline_ode(x, w, b, 1.0, steps=2, degree=1, backend="auto")
    torch.testing.assert_close(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        sc.spline_ode(x, w, b, 1.0, steps=2, degree=1, backend="auto")
    assert calls == []


def test_bfloat16_on_turing(fake_gpu):
    """sm_75: bfloat16 is a TypeError naming dtype and capability; float16 and float32 run."""
    state, calls = fake_gpu
    state["cap"] = (7, 5)
    for dt in (torch.float16, torch.float32):
        x, w, b = layer_args(dt)
        sc.spline_ode(x, w, b, 1.0, steps=2, degree=1, backend="cuda")
    x, w, b = layer_args(torch.bfloat16)
    with pytest.raises(TypeError, match=r"bfloat16.*7\.5"):
        sc.spline_ode(x, w, b, 1.0, steps=2, degree=1, backend="cuda")
    with pytest.warns(RuntimeWarning, match="bfloat16"):
        sc.spline_ode(x, w, b, 1.0, steps=2, degree=1, backend="auto")  # the reference runs it
    assert calls == [torch.float16, torch.float32]


@pytest.mark.gpu
def test_real_gpus_against_this_build():
    """Where a GPU and a CUDA build are present: every visible GPU is either covered (cuda among
    its backends) or named in the error, never a failed launch."""
    if not torch.cuda.is_available() or "cuda" not in sc.available_backends():
        pytest.skip("needs a GPU and the CUDA build")
    for i in range(torch.cuda.device_count()):
        cap, _ = _cuda_archs.device_capability(torch.device("cuda", i))
        covered = image_for(cap, parse(_cuda_archs.compiled_arch_list())) is not None
        assert ("cuda" in sc.available_backends(f"cuda:{i}")) == covered
