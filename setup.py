"""Builds splinet_cuda: the C++ CPU extension always, the CUDA kernels when a CUDA
toolkit and a CUDA build of PyTorch are present.

    pip install --no-build-isolation .          # or -e . for development
    FORCE_CUDA=1 pip install --no-build-isolation .     # CUDA even without a visible GPU
    FORCE_ONLY_CPU=1 pip install --no-build-isolation . # skip CUDA

TORCH_CUDA_ARCH_LIST picks the GPU architectures (default here: 8.0 and 9.0).
"""
import glob
import os
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


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    # -fno-trapping-math lets the compiler vectorise compare-and-select loops (ReLU masks);
    # it does not change any computed value.
    # No -std flag: torch's BuildExtension adds the C++ standard its headers need (C++20 from
    # torch 2.13 on; torch 2.14's headers do not compile as C++17).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if sys.platform == "darwin":
        cxx.remove("-fopenmp")
    kwargs = dict(
        name="splinet_cuda._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=[] if sys.platform == "darwin" else ["-fopenmp"],
        py_limited_api=False,
    )
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["sources"] = sources + rel("csrc/cuda/*.cu")
        return CUDAExtension(
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    return CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)


if __name__ == "__main__":  # tests/test_build.py imports this file to check _extension()
    setup(
        name="splinet_cuda",
        version="0.1.0",
        description="Fused CPU, CUDA and Triton kernels for spline-weighted neural-ODE layers (SpliNet)",
        packages=["splinet_cuda", "triton_kernels"],
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        python_requires=">=3.9",
        install_requires=["torch>=2.11", "numpy"],
        extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "scipy"],
                        "bench": ["pytest-benchmark", "matplotlib"]},
        zip_safe=False,
    )
