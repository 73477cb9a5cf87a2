"""Loads the compiled operator library (splinet_cuda._C) and the fake implementations.

The package works without it (the reference backend is pure PyTorch); what is missing
is reported by :func:`splinet_cuda.available_backends` and by the errors of backends
that need it.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # loading the library registers the ops

    LOAD_ERROR = None
    # TORCH_CUDA_ARCH_LIST of a CUDA build, recorded in the library when it was compiled
    # ("" for a CPU-only build); splinet_cuda/_cuda_archs.py checks GPUs against it.
    CUDA_ARCH_LIST: str = getattr(_C, "cuda_arch_list", "")
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = exc
    CUDA_ARCH_LIST = ""


def has_op(name: str) -> bool:
    """Whether ``torch.ops.splinet_cuda.<name>`` is registered."""
    return LOAD_ERROR is None and torch._C._dispatch_has_kernel(f"splinet_cuda::{name}")


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether the op has an implementation for ``dispatch_key`` ("CPU", "CUDA")."""
    return has_op(name) and torch._C._dispatch_has_kernel_for_dispatch_key(f"splinet_cuda::{name}", dispatch_key)


if LOAD_ERROR is None:
    from ._ops import register_cpp_fakes  # noqa: E402

    register_cpp_fakes()  # fake implementations for torch.compile
