"""setup.py's extension: the CPU build always, the CUDA build (every csrc/cuda/*.cu, WITH_CUDA)
when asked for. The CUDA build itself needs a CUDA build of torch; this checks the
configuration that pip would hand to it, which runs anywhere a CUDA toolkit is found."""
import glob
import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_setup(monkeypatch, **env):
    for k in ("FORCE_CUDA", "FORCE_ONLY_CPU"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    spec = importlib.util.spec_from_file_location("splinet_setup", REPO / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: setup() does not run
    return mod


def test_cpu_extension(monkeypatch):
    ext = load_setup(monkeypatch, FORCE_ONLY_CPU="1")._extension()
    assert ext.name == "splinet_cuda._C"
    assert not any(s.endswith(".cu") for s in ext.sources)
    assert "csrc/splinet_ops.cpp" in ext.sources and any(s.startswith("csrc/cpu/") for s in ext.sources)


def cuda_toolkit():
    """A CUDA toolkit's root: torch's CUDA_HOME, $CUDA_HOME, or /usr/local/cuda*."""
    from torch.utils import cpp_extension

    roots = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME")]
    roots += [str(Path(p).parent.parent) for p in sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True)]
    return next((r for r in roots if r and (Path(r) / "bin" / "nvcc").exists()), None)


def test_cuda_extension_configuration(monkeypatch):
    """The configuration of the CUDA build (a CPU torch and no GPU are enough to check it;
    a broken one once made `pip install .` fail on every GPU machine)."""
    from torch.utils import cpp_extension

    root = cuda_toolkit()
    if root is None:
        pytest.skip("no CUDA toolkit found")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", root)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    ext = load_setup(monkeypatch, FORCE_CUDA="1")._extension()
    cu = sorted(s for s in ext.sources if s.endswith(".cu"))
    assert cu == sorted(str(p.relative_to(REPO)) for p in (REPO / "csrc" / "cuda").glob("*.cu"))
    assert any(s.startswith("csrc/cpu/") for s in ext.sources)  # the CPU kernels too
    assert ("WITH_CUDA", None) in ext.define_macros
    assert "-DWITH_CUDA" in ext.extra_compile_args["cxx"] and "nvcc" in ext.extra_compile_args


def test_cuda_units_define_each_instantiation_once():
    """The CUDA build is split into units that compile in parallel (csrc/cuda/cuda_instances.h):
    the op files see `extern` declarations of every (layer, direction, dtype) body, and each
    must be defined in exactly one .cu file, or the extension fails to load (undefined symbol)
    or to link (duplicate) on a GPU machine, which the nvcc check without a linker cannot see."""
    import re

    cuda = REPO / "csrc" / "cuda"
    header = (cuda / "cuda_instances.h").read_text()
    declared = re.findall(r"^extern (SPLINET_\w+\([\w:]+\));", header, re.M)
    assert len(declared) == 16, declared
    defined = {}
    for cu in sorted(cuda.glob("*.cu")):
        for inst in re.findall(r"^(SPLINET_\w+\([\w:]+\));", cu.read_text(), re.M):
            defined.setdefault(inst, []).append(cu.name)
    assert [d for d in declared if d not in defined] == [], "declared but defined nowhere"
    assert {d: f for d, f in defined.items() if len(f) > 1} == {}, "defined more than once"
    assert sorted(defined) == sorted(declared), "defined but not declared"
    for ops_file in ("dense_cuda.cu", "conv_cuda.cu"):
        assert '#include "cuda_instances.h"' in (cuda / ops_file).read_text()


def test_cuda_check_finds_contracted_float64():
    """tools/cuda_check.py's PTX rule (run by `make cuda-check` where nvcc exists): a float64
    fused multiply-add fails every kernel but the float64 ones of the activations built on
    libdevice's FMAs (tanh, sigmoid, softplus); the old device basis was contracted so."""
    import shutil
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    import cuda_check

    entry = ".visible .entry {}(\n.param .align 8 .b8 p[8]\n)\n{{\n\t{} \t%fd3, %fd1, %fd2, %fd0;\n\tret;\n}}\n"
    identity64 = "_ZN7splinet12block_kernelINS_12SmallBwdBodyIddLNS_3ActE1EEEdEEvT_"
    tanh64 = "_ZN7splinet12block_kernelINS_12SmallBwdBodyIddLNS_3ActE2EEEdEEvT_"
    tanh32 = "_ZN7splinet12block_kernelINS_12SmallBwdBodyIffLNS_3ActE2EEEfEEvT_"
    ptx = "".join(entry.format(n, "fma.rn.f64") for n in (identity64, tanh64, tanh32))
    entries = cuda_check.ptx_entries(ptx)
    assert [n for n, _ in entries] == [identity64, tanh64, tanh32]
    bad = cuda_check.contracted_f64(entries)
    if shutil.which("c++filt"):
        assert len(bad) == 2 and "(splinet::Act)1" in bad[0] and "float" in bad[1]
    else:  # undemangled names: every fma.rn.f64 counts
        assert len(bad) == 3
    fine = "".join(entry.format(n, "add.rn.f64") for n in (identity64, tanh32))
    assert cuda_check.contracted_f64(cuda_check.ptx_entries(fine)) == []


# --- the architecture list of the CUDA build (setup.py: cuda_arch_list) --------------------

NVCC13 = [(7, 5), (8, 0), (8, 6), (8, 7), (8, 8), (8, 9), (9, 0), (10, 0), (11, 0), (10, 3), (12, 0), (12, 1)]
NVCC12_4 = [(5, 0), (5, 2), (6, 0), (6, 1), (7, 0), (7, 2), (7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0)]


def arch_setup(monkeypatch, *, env=None, gpus=(), nvcc=NVCC13):
    """setup.py with a faked TORCH_CUDA_ARCH_LIST, visible GPUs and nvcc architecture list."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")  # recorded, so that what setup.py sets is undone
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    mod = load_setup(monkeypatch, **({"TORCH_CUDA_ARCH_LIST": env} if env is not None else {}))
    monkeypatch.setattr(mod, "_visible_capabilities", lambda: list(gpus))
    monkeypatch.setattr(mod, "_nvcc_archs", lambda: list(nvcc))
    return mod


def test_arch_list_without_a_gpu_covers_turing_to_blackwell(monkeypatch):
    """No GPU visible (FORCE_CUDA=1 on a build box): the documented list that nvcc supports,
    PTX of the newest; nvcc 13 has no Volta, nvcc 12.4 no Blackwell (PTX of Hopper covers it)."""
    assert arch_setup(monkeypatch).cuda_arch_list() == "7.5;8.0;9.0;10.0;12.0+PTX"
    assert arch_setup(monkeypatch, nvcc=NVCC12_4).cuda_arch_list() == "7.0;7.5;8.0;9.0+PTX"


def test_arch_list_for_visible_gpus(monkeypatch):
    """GPUs visible: exactly theirs (PyTorch's default), capped at what nvcc knows, PTX of the newest."""
    assert arch_setup(monkeypatch, gpus=[(9, 0)]).cuda_arch_list() == "9.0+PTX"
    assert arch_setup(monkeypatch, gpus=[(8, 6), (7, 5), (8, 6)]).cuda_arch_list() == "7.5;8.6+PTX"
    assert arch_setup(monkeypatch, gpus=[(12, 0)], nvcc=NVCC12_4).cuda_arch_list() == "9.0+PTX"


def test_arch_list_from_the_environment(monkeypatch):
    """An explicit TORCH_CUDA_ARCH_LIST wins over visible GPUs; "native" means the visible
    ones; an entry that cannot be read fails setup.py with its name."""
    assert arch_setup(monkeypatch, env="8.0 9.0a", gpus=[(7, 5)]).cuda_arch_list() == "8.0 9.0a"
    assert arch_setup(monkeypatch, env="native", gpus=[(8, 9)]).cuda_arch_list() == "8.9+PTX"
    with pytest.raises(ValueError, match="sm_90"):
        arch_setup(monkeypatch, env="8.0;sm_90").cuda_arch_list()


def test_cuda_extension_records_its_arch_list(monkeypatch):
    """The CUDA extension hands the list to torch's builder (TORCH_CUDA_ARCH_LIST, which it turns
    into -gencode flags) and records it in the library (csrc/splinet_ops.cpp: cuda_arch_list)."""
    from torch.utils import cpp_extension

    root = cuda_toolkit()
    if root is None:
        pytest.skip("no CUDA toolkit found")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", root)
    mod = arch_setup(monkeypatch)
    monkeypatch.setenv("FORCE_CUDA", "1")
    ext = mod._extension()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5;8.0;9.0;10.0;12.0+PTX"
    assert "-DSPLINET_CUDA_ARCHS=7.5,8.0,9.0,10.0,12.0+PTX" in ext.extra_compile_args["cxx"]
    # torch's builder accepts every entry (it raises on an architecture it does not know)
    if hasattr(cpp_extension, "_get_cuda_arch_flags"):
        flags = cpp_extension._get_cuda_arch_flags()
        assert "-gencode=arch=compute_75,code=sm_75" in flags and "-gencode=arch=compute_120,code=compute_120" in flags


def test_recorded_arch_list_reaches_python():
    """splinet_cuda._C.cuda_arch_list: "" in a CPU build, the build's list in a CUDA one."""
    from splinet_cuda import _cuda_archs, _ext

    if _ext.LOAD_ERROR is not None:
        pytest.skip(f"splinet_cuda._C not built: {_ext.LOAD_ERROR}")
    from splinet_cuda import _C

    assert _C.cuda_arch_list == _ext.CUDA_ARCH_LIST == _cuda_archs.compiled_arch_list()
    assert (_C.cuda_arch_list != "") == _ext.has_kernel("spline_dense_fwd", "CUDA")
    _cuda_archs.parse(_C.cuda_arch_list)  # readable


# --- release build and the test-only emulation extension ------------------------------------

def test_release_extension_is_lean(monkeypatch):
    """The shipped library holds no test-only code (the CUDA emulation was 79 of the 95 s of the
    CPU build and put cuda_*_emulated ops in the public namespace) and no debug info or symbol
    table (31.5 MB unstripped, 3.4 MB stripped); SPLINET_DEBUG=1 keeps them."""
    mod = load_setup(monkeypatch, FORCE_ONLY_CPU="1")
    ext = mod._extension()
    assert not [s for s in ext.sources if "emulat" in s]
    assert "-g0" in ext.extra_compile_args["cxx"] and "-s" in ext.extra_link_args
    assert [e.name for e in mod.extensions()] == ["splinet_cuda._C"]
    monkeypatch.setenv("SPLINET_DEBUG", "1")
    ext = mod._extension()
    assert "-g0" not in ext.extra_compile_args["cxx"] and "-s" not in ext.extra_link_args


def test_emulation_extension_only_on_request(monkeypatch):
    mod = load_setup(monkeypatch, FORCE_ONLY_CPU="1", SPLINET_EMULATION="1")
    names = [e.name for e in mod.extensions()]
    assert names == ["splinet_cuda._C", "splinet_cuda._emulation"]
    assert mod.extensions()[1].sources == ["tests/cpp/cuda_emulated.cpp"]
    # It includes the drivers as cuda/*_driver.h, through csrc/ on the include path.
    assert REPO / "csrc" in [Path(d).resolve() for d in mod.extensions()[1].include_dirs]


def test_emulation_needs_a_checkout(monkeypatch, tmp_path):
    """The emulation's source is test code (tests/cpp/), which the source distribution leaves
    out: SPLINET_EMULATION=1 there fails with a clear message, not a compiler error."""
    mod = load_setup(monkeypatch, FORCE_ONLY_CPU="1", SPLINET_EMULATION="1")
    monkeypatch.setattr(mod, "ROOT", str(tmp_path))
    with pytest.raises(RuntimeError, match="repository checkout"):
        mod.extensions()


def test_public_op_namespace_holds_no_test_ops():
    from splinet_cuda import _ext

    if _ext.LOAD_ERROR is not None:
        pytest.skip(f"splinet_cuda._C not built: {_ext.LOAD_ERROR}")
    import torch

    for op in ("cuda_dense_fwd_emulated", "cuda_conv_bwd_emulated"):
        assert not torch._C._dispatch_has_kernel(f"splinet_cuda::{op}")
