"""Builds splinet_cuda: the C++ CPU extension always, the CUDA kernels when a CUDA
toolkit and a CUDA build of PyTorch are present.

    pip install --no-build-isolation .          # or -e . for development
    FORCE_CUDA=1 pip install --no-build-isolation .     # CUDA even without a visible GPU
    FORCE_ONLY_CPU=1 pip install --no-build-isolation . # skip CUDA
    SPLINET_EMULATION=1 pip install ...   # also the test-only extension (make build-test; a checkout only)
    SPLINET_DEBUG=1 pip install ...       # keep debug info and symbols (a release build strips them)

TORCH_CUDA_ARCH_LIST picks the GPU architectures. Unset, the build covers the visible GPUs
(PyTorch's own default) or, with no GPU visible, the list in splinet_cuda/_cuda_archs.py
(Turing through Hopper and Blackwell as far as the installed nvcc goes, PTX of the newest).
The list is recorded in the library, and a GPU it does not cover gets a clear error.
"""
import functools
import glob
import importlib.util
import os
import re
import subprocess
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("FORCE_ONLY_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    # Built when a toolkit and a CUDA build of torch are present, whether or not a GPU is visible.
    return CUDA_HOME is not None and torch.version.cuda is not None


@functools.lru_cache(maxsize=None)
def _load_archs():
    """splinet_cuda/_cuda_archs.py, loaded by path: the package cannot be imported before it is built."""
    spec = importlib.util.spec_from_file_location("splinet_cuda_archs", os.path.join(ROOT, "splinet_cuda", "_cuda_archs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _nvcc_archs():
    """(major, minor) of every virtual architecture the nvcc that torch will use supports."""
    nvcc = os.path.join(CUDA_HOME or "", "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    found = [(int(n) // 10, int(n) % 10) for n in re.findall(r"compute_(\d+)", out)]
    if not found:  # an nvcc without --list-gpu-arch (before CUDA 11.1): what torch was built for
        found = [(int(n) // 10, int(n) % 10) for n in re.findall(r"sm_(\d+)", " ".join(torch.cuda.get_arch_list()))]
    return found or [(7, 5), (8, 0), (9, 0)]


def _visible_capabilities():
    if not torch.cuda.is_available():
        return []
    return [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]


def cuda_arch_list() -> str:
    """The TORCH_CUDA_ARCH_LIST of the CUDA build: the environment's when set; else the
    visible GPUs' (PyTorch's default), PTX of the newest; else, with no GPU visible, the
    documented default list (splinet_cuda/_cuda_archs.py: DEFAULT_ARCHS) that nvcc supports."""
    archs = _load_archs()
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env and env != "native":
        archs.parse(env)  # a ValueError naming the entry it cannot read
        return env
    caps = _visible_capabilities()
    if caps:
        return archs.visible_arch_list(caps, _nvcc_archs())
    return archs.default_arch_list(_nvcc_archs())


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cxx_flags():
    # -fno-trapping-math lets the compiler vectorise compare-and-select loops (ReLU masks);
    # it does not change any computed value.
    # No -std flag: torch's BuildExtension adds the C++ standard its headers need (C++20 from
    # torch 2.13 on; torch 2.14's headers do not compile as C++17).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if sys.platform == "darwin":
        cxx.remove("-fopenmp")
    return cxx


def _release_flags():
    """(compile, link) flags of a release build: no debug info (Python's own CFLAGS add -g) and
    stripped symbols, which make the library about 10x smaller; SPLINET_DEBUG=1 keeps both."""
    if _flag("SPLINET_DEBUG"):
        return [], []
    return ["-g0"], ([] if sys.platform == "darwin" else ["-s"])


def _extension():
    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    release_cxx, release_link = _release_flags()
    cxx = _cxx_flags() + release_cxx
    kwargs = dict(
        name="splinet_cuda._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=([] if sys.platform == "darwin" else ["-fopenmp"]) + release_link,
        py_limited_api=False,
    )
    if _want_cuda():
        arch_list = cuda_arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # what torch's builder turns into -gencode flags
        recorded = ",".join(str(a) for a in _load_archs().parse(arch_list))
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["sources"] = sources + _rel("csrc/cuda/*.cu")
        return CUDAExtension(
            define_macros=[("WITH_CUDA", None)],
            # The list is recorded in the library (splinet_cuda._C.cuda_arch_list, csrc/splinet_ops.cpp).
            extra_compile_args={"cxx": cxx + ["-DWITH_CUDA", f"-DSPLINET_CUDA_ARCHS={recorded}"], "nvcc": nvcc},
            **kwargs,
        )
    return CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)


# The emulation's one source: test code, so it lives beside the tests, not in csrc/ with
# what ships; it includes the CUDA drivers through csrc/ on the include path.
EMULATION_SOURCE = "tests/cpp/cuda_emulated.cpp"


def _emulation_extension():
    """splinet_cuda._emulation, test-only: the CUDA drivers and block programs run on the CPU
    (tests/cpp/cuda_emulated.cpp), how the tests reach the CUDA kernels' arithmetic without a
    GPU. Built only with SPLINET_EMULATION=1 (make build-test, which make test runs); never
    part of a user's install. It needs a repository checkout: the source distribution holds
    no tests."""
    if not os.path.isfile(os.path.join(ROOT, EMULATION_SOURCE)):
        raise RuntimeError(f"SPLINET_EMULATION=1 builds {EMULATION_SOURCE}, which is not here: the test-only "
                           "emulation is built from a repository checkout (the source distribution holds no tests)")
    release_cxx, release_link = _release_flags()
    return CppExtension(
        name="splinet_cuda._emulation",
        sources=[EMULATION_SOURCE],
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": _cxx_flags() + release_cxx},
        extra_link_args=([] if sys.platform == "darwin" else ["-fopenmp"]) + release_link,
        py_limited_api=False,
    )


def extensions():
    """The release extension, and the test-only one when SPLINET_EMULATION=1."""
    return [_extension()] + ([_emulation_extension()] if _flag("SPLINET_EMULATION") else [])


if __name__ == "__main__":  # tests/test_build.py imports this file to check _extension()
    setup(
        name="splinet_cuda",
        version="0.1.0",
        description="Fused CPU, CUDA and Triton kernels for spline-weighted neural-ODE layers (SpliNet)",
        long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        license="BSD-3-Clause",
        # The Triton kernels install inside the package (splinet_cuda.triton_kernels), not as a
        # top-level `triton_kernels` (PyPI's triton-kernels and Triton's own library use that name).
        packages=["splinet_cuda", "splinet_cuda.triton_kernels"],
        package_dir={"splinet_cuda.triton_kernels": "triton_kernels"},
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        python_requires=">=3.9",
        install_requires=["torch>=2.11", "numpy"],
        extras_require={"triton": ["triton>=3.6"], "plot": ["matplotlib"], "test": ["pytest", "scipy"],
                        "bench": ["pytest-benchmark", "matplotlib"]},
        zip_safe=False,
    )
