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
