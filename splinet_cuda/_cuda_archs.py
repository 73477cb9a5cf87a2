"""Which GPUs a CUDA build of splinet_cuda runs on: the architecture list chosen at build
time (setup.py loads this file by path, before the package exists, so it imports nothing
but the standard library at module level) and the check of a device against it at run time.

A build holds, per entry of TORCH_CUDA_ARCH_LIST, machine code (SASS) for ``X.Y`` and, for
``X.Y+PTX``, also PTX. The driver runs SASS built for X.Y on a GPU of the same major
version X and minor >= Y (``X.Ya``: on X.Y only, ``X.Yf``: the X family from Y on), and
JIT-compiles PTX for any GPU of capability >= X.Y. Anything else fails at the first launch
with "no kernel image is available for execution on the device"; this module turns that
into an error before the first launch.
"""
from __future__ import annotations

import functools
import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

# The architectures a build without a visible GPU covers, those the installed nvcc knows,
# with PTX of the newest so that later GPUs JIT-compile it. One SASS per major version
# suffices for these kernels (no sm_86 / sm_89-only features): 8.0 runs on 8.6 and 8.9.
#   7.0 Volta (V100; nvcc 13 dropped it)   7.5 Turing (T4, RTX 20)
#   8.0 Ampere (A100; runs on A10, RTX 30, L4 / L40, RTX 40)   9.0 Hopper (H100, H200)
#   10.0 Blackwell data centre (B200, GB200)   12.0 Blackwell workstation (RTX 50, RTX PRO)
DEFAULT_ARCHS: Tuple[str, ...] = ("7.0", "7.5", "8.0", "9.0", "10.0", "12.0")

# Named entries that torch's TORCH_CUDA_ARCH_LIST accepts, expanded as torch expands them.
_NAMED = (("Kepler+Tesla", "3.7"), ("Kepler", "3.5+PTX"), ("Maxwell+Tegra", "5.3"), ("Maxwell", "5.0;5.2+PTX"),
          ("Pascal", "6.0;6.1+PTX"), ("Volta+Tegra", "7.2"), ("Volta", "7.0+PTX"), ("Turing", "7.5+PTX"),
          ("Ampere+Tegra", "8.7"), ("Ampere", "8.0;8.6+PTX"), ("Ada", "8.9+PTX"), ("Hopper", "9.0+PTX"),
          ("Blackwell+Tegra", "11.0"), ("Blackwell", "10.0;10.3;12.0;12.1+PTX"))

# Lowest compute capability of each feature the kernels use (the tensor-core GEMM's wmma
# fragments: float16 from sm_70, bfloat16 from sm_80; csrc/cuda/blend_gemm.h guards the same).
BF16_MIN_CAPABILITY = (8, 0)


class Arch(NamedTuple):
    major: int
    minor: int
    suffix: str  # "", "a" (this GPU only) or "f" (the family)
    ptx: bool  # "+PTX": PTX is embedded too

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}{self.suffix}" + ("+PTX" if self.ptx else "")


def parse(arch_list: str) -> List[Arch]:
    """The entries of a TORCH_CUDA_ARCH_LIST value ("8.0;9.0+PTX", spaces or commas also
    separate, torch's names such as "Hopper" expand). ValueError on anything else."""
    text = arch_list
    for name, value in _NAMED:
        text = text.replace(name, value)
    out = []
    for item in filter(None, re.split(r"[;,\s]+", text.strip())):
        m = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", item)
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot read {item!r} in {arch_list!r} "
                             f"(entries look like 8.0, 9.0a or 9.0+PTX)")
        out.append(Arch(int(m.group(1)), int(m.group(2)), m.group(3), m.group(4) is not None))
    return out


def default_arch_list(nvcc_archs: Sequence[Tuple[int, int]]) -> str:
    """TORCH_CUDA_ARCH_LIST for a build without a visible GPU: the DEFAULT_ARCHS that the
    installed nvcc supports (``nvcc_archs``, from ``nvcc --list-gpu-arch``), PTX of the newest."""
    known = {(int(a), int(b)) for a, b in nvcc_archs}
    chosen = [a for a in DEFAULT_ARCHS if tuple(int(p) for p in a.split(".")) in known]
    if not chosen:
        raise ValueError(f"nvcc supports none of the default architectures {list(DEFAULT_ARCHS)}; "
                         f"set TORCH_CUDA_ARCH_LIST")
    chosen[-1] += "+PTX"
    return ";".join(chosen)


def visible_arch_list(capabilities: Sequence[Tuple[int, int]], nvcc_archs: Sequence[Tuple[int, int]]) -> str:
    """TORCH_CUDA_ARCH_LIST for the visible GPUs (PyTorch's own default): each capability,
    capped at the newest nvcc supports, and PTX of the newest."""
    newest = max((int(a), int(b)) for a, b in nvcc_archs)
    caps = sorted({min((int(c[0]), int(c[1])), newest) for c in capabilities})
    return ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"


def image_for(capability: Tuple[int, int], archs: Sequence[Arch]) -> Optional[Tuple[Arch, str]]:
    """The code of a build that a GPU of ``capability`` runs: (entry, "sass" or "ptx"),
    preferring machine code as the driver does; None when the build cannot run there."""
    major, minor = int(capability[0]), int(capability[1])
    sass = [a for a in archs if a.major == major and (a.minor == minor if a.suffix == "a" else a.minor <= minor)]
    if sass:
        return max(sass, key=lambda a: a.minor), "sass"
    ptx = [a for a in archs if a.ptx and ((a.major, a.minor) == (major, minor) if a.suffix == "a"
                                          else (a.major, a.minor) <= (major, minor))]
    if ptx:
        return max(ptx, key=lambda a: (a.major, a.minor)), "ptx"
    return None


@functools.lru_cache(maxsize=64)
def _covered(capability: Tuple[int, int], arch_list: str) -> bool:
    return image_for(capability, parse(arch_list)) is not None


def coverage_error(capability: Tuple[int, int], arch_list: str, name: str = "") -> Optional[RuntimeError]:
    """The error for a GPU that a build of ``arch_list`` cannot run, or None."""
    if _covered((int(capability[0]), int(capability[1])), arch_list):
        return None
    cap = f"{int(capability[0])}.{int(capability[1])}"
    gpu = f"{name} " if name else ""
    return RuntimeError(
        f"backend 'cuda': this splinet_cuda build has no kernels for the GPU {gpu}(compute capability {cap}, "
        f"sm_{cap.replace('.', '')}): it was built with TORCH_CUDA_ARCH_LIST=\"{arch_list}\". Rebuild for it with "
        f"TORCH_CUDA_ARCH_LIST=\"{cap}\" FORCE_CUDA=1 pip install --no-build-isolation . "
        f"(or use backend='triton' or 'reference')")


def dtype_error(backend: str, dtype, capability: Tuple[int, int]) -> Optional[TypeError]:
    """bfloat16 needs compute capability 8.0 (its arithmetic and tensor-core fragments)."""
    import torch

    if dtype == torch.bfloat16 and tuple(capability) < BF16_MIN_CAPABILITY:
        cap = f"{int(capability[0])}.{int(capability[1])}"
        return TypeError(f"backend {backend!r}: x has dtype torch.bfloat16, which needs a GPU of compute capability "
                         f">= 8.0, but {cap} was found; use float16 or float32 there")
    return None


# ---- run time -------------------------------------------------------------------------------

_CAPABILITY: Dict[int, Tuple[Tuple[int, int], str]] = {}


def device_capability(device) -> Tuple[Tuple[int, int], str]:
    """(compute capability, name) of a CUDA device, queried once per device index."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    hit = _CAPABILITY.get(index)
    if hit is None:
        props = torch.cuda.get_device_properties(index)
        hit = _CAPABILITY[index] = ((props.major, props.minor), props.name)
    return hit


def compiled_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST the loaded CUDA build was compiled with ("" without one)."""
    from . import _ext

    return _ext.CUDA_ARCH_LIST


def cuda_backend_error(device, dtype) -> Optional[Exception]:
    """Why the cuda backend cannot run on this GPU in this dtype (RuntimeError: the build has
    no kernels for it; TypeError: bfloat16 below sm_80), or None. Device properties only."""
    if device.type != "cuda":
        return None
    capability, name = device_capability(device)
    archs = compiled_arch_list()
    err = coverage_error(capability, archs, name) if archs else None
    return err or dtype_error("cuda", dtype, capability)


def triton_backend_error(device, dtype) -> Optional[Exception]:
    """bfloat16 below sm_80 for the Triton kernels, or None (and on the interpreter's CPU tensors)."""
    if device.type != "cuda":
        return None
    return dtype_error("triton", dtype, device_capability(device)[0])

