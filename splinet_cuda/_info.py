"""``python -m splinet_cuda info``: what this installation is, as plain text for a bug report.

Versions, how the extension was built, which backend runs on each visible device (and why
the others will not), the CPU kernels' instruction-set path and GEMM, threads and the
environment variables the package reads. It reads properties only: no tensor is created
and no kernel runs, so it works on a machine where the kernels would crash.
"""
from __future__ import annotations

import os
import platform
from typing import List, Optional

import torch

# Environment variables that change what the package does (name: what it controls), then
# those of PyTorch / Triton that matter to it; `info` lists the ones that are set.
ENV_VARS = (
    ("SPLINET_CPU_GEMM", "float32 GEMM of the dense CPU kernels: aten or avx512"),
    ("SPLINET_KEPT_CACHE_MB", "bound of the CPU kernels' kept-tensor cache in MiB (0: off)"),
    ("SPLINET_DENSE_GEMM", "the cuda backend's large-width dense GEMM (e.g. cublas)"),
    ("SPLINET_TRITON_OPS", "interp: the Triton ops' interpreter registration"),
    ("TRITON_INTERPRET", "1: Triton kernels run in its CPU interpreter"),
    ("TRITON_CACHE_DIR", "where Triton caches compiled kernels"),
    ("TORCHINDUCTOR_CACHE_DIR", "where torch.compile caches kernels"),
    ("TORCH_CUDA_ARCH_LIST", "the architectures a source build compiles for"),
    ("CUDA_VISIBLE_DEVICES", "the GPUs torch sees"),
    ("OMP_NUM_THREADS", "CPU threads (torch.get_num_threads)"),
    ("MKL_NUM_THREADS", "MKL's threads (ATen's GEMM on x86)"),
)


def _version(module: str) -> Optional[str]:
    import importlib.metadata

    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_flags() -> tuple:
    """(vendor id, set of CPU flags) from /proc/cpuinfo; ("", empty) where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(1 << 16)
    except OSError:
        return "", frozenset()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("vendor_id", ""), frozenset(fields.get("flags", "").split())


def _build_type(path: Optional[str]) -> str:
    """Release builds carry no debug information (setup.py strips it unless SPLINET_DEBUG=1):
    the section-name table of the ELF file says which."""
    if not path or not os.path.isfile(path):
        return "unknown"
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"\x7fELF"):
        return "unknown (not an ELF file)"
    return "debug (debug info kept, SPLINET_DEBUG=1)" if b".debug_info" in data else "release (no debug info)"


def cpu_kernel_paths() -> List[str]:
    """The paths the C++ CPU kernels take on this CPU, as they decide them at run time
    (csrc/cpu: direct_isa() in conv_direct.h, tanh_f32() in vec_activations.h,
    use_sgemm_avx512() in sgemm_avx512.cpp), read from the same CPU flags; the vectorised
    paths exist only in x86-64 builds."""
    vendor, flags = _cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64"):
        return [f"{platform.machine()}: the portable C++ loops (the AVX paths are x86-64 only)"]
    if not flags:
        return ["CPU flags unknown (no /proc/cpuinfo): the kernels choose at run time"]
    avx512, avx2 = "avx512f" in flags, "avx2" in flags and "fma" in flags
    conv = "AVX-512" if avx512 else ("AVX2 + FMA" if avx2 else "baseline (no AVX2)")
    env = os.environ.get("SPLINET_CPU_GEMM")
    if not avx512:
        gemm = "ATen (no AVX-512 on this CPU)"
    elif env == "aten":
        gemm = "ATen (SPLINET_CPU_GEMM=aten)"
    elif env == "avx512":
        gemm = "splinet AVX-512 sgemm (SPLINET_CPU_GEMM=avx512)"
    elif vendor == "GenuineIntel":
        gemm = "ATen (an Intel CPU: MKL takes its AVX-512 kernels itself)"
    else:
        gemm = f"splinet AVX-512 sgemm ({vendor or 'non-Intel'} CPU with AVX-512, where MKL runs AVX2)"
    return [f"conv kernels: {conv}", f"tanh: {'AVX2 + FMA' if avx2 else 'scalar'}",
            f"float32 dense GEMM: {gemm}"]


def backend_unavailable(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Optional[str]:
    """Why backend ``name`` ("cpu", "triton", "cuda") will not run on ``device`` in ``dtype``,
    or None when it will: the dispatcher's registry and device checks, in words."""
    from . import _dispatch, _ext, _triton

    impl = _dispatch._REGISTRY.get(name)
    if impl is None:
        if _ext.LOAD_ERROR is not None and name != "triton":
            return f"the C++ library did not load ({_ext.LOAD_ERROR})"
        if name == "cuda":
            return "extension built without CUDA"
        if name == "cpu":
            return "the C++ library has no CPU kernels"
        if _triton.IMPORT_ERROR is not None:
            first = (str(_triton.IMPORT_ERROR).splitlines() or [""])[0]
            return f"triton does not import ({type(_triton.IMPORT_ERROR).__name__}: {first})"
        return "compiled Triton needs a GPU; TRITON_INTERPRET=1 runs its CPU interpreter"
    if device.type not in impl.device_types:
        return f"runs on {'/'.join(impl.device_types)} tensors"
    if dtype not in impl.dtypes:
        return f"takes {', '.join(str(d).replace('torch.', '') for d in impl.dtypes)}"
    err = impl.device_check(device, dtype) if impl.device_check else None
    return None if err is None else str(err)


def cache_dirs() -> List[str]:
    """Where compiled kernels are cached: Triton's JIT (the triton backend's first call per
    configuration compiles) and torch.compile's (Inductor's default, not imported here: it
    takes seconds)."""
    out = []
    try:
        import triton

        out.append(f"triton: {triton.knobs.cache.dir}")
    except ImportError:
        out.append("triton: not installed")
    except AttributeError:  # a Triton before its knobs module
        out.append("triton: " + os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache (default)"))
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        out.append(f"torch.compile: {os.environ['TORCHINDUCTOR_CACHE_DIR']}")
    else:
        import getpass
        import tempfile

        try:
            user = getpass.getuser()
        except Exception:  # no user name in a container
            user = "unknown"
        out.append(f"torch.compile: {os.path.join(tempfile.gettempdir(), 'torchinductor_' + user)} (default)")
    return out


def _device_lines(device: torch.device, title: str) -> List[str]:
    """The backends that run on ``device`` and why each other one does not."""
    from . import _dispatch

    lines = [title]
    for name in ("cpu", "triton", "cuda"):
        why = backend_unavailable(name, device)
        if why is not None:
            lines.append(f"    {name}: no ({why})")
            continue
        impl = _dispatch._REGISTRY[name]
        dtypes = [str(d).replace("torch.", "") for d in impl.dtypes if backend_unavailable(name, device, d) is None]
        kinds = ["dense"] + [f"conv {','.join(map(str, impl.conv_dims))}-D"] * (impl.spline_ode_conv is not None) \
            + ["hamiltonian"] * (impl.spline_ode_hamiltonian is not None)
        lines.append(f"    {name}: yes ({', '.join(kinds)}; {', '.join(dtypes)})")
    auto = next((n for n in _dispatch._AUTO_ORDER if n in _dispatch.available_backends(device)
                 and device.type in _dispatch._REGISTRY[n].auto_device_types), "reference")
    lines.append(f"    reference: yes (pure PyTorch); backend='auto' takes {auto!r} for float32")
    return lines


def info_text() -> str:
    """The report as one string (see :func:`splinet_cuda.info`)."""
    import splinet_cuda as sc

    from . import _ext, _memory

    lines = [f"splinet_cuda {sc.__version__} ({os.path.dirname(os.path.abspath(sc.__file__))})",
             f"python {platform.python_version()} ({platform.python_implementation()}) on {platform.platform()}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
             f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}, "
             f"debug {torch.version.debug})",
             f"triton {_version('triton') or 'not installed'}", ""]

    so = getattr(getattr(_ext, "_C", None), "__file__", None)
    if _ext.LOAD_ERROR is not None:
        lines.append(f"extension: not loaded ({_ext.LOAD_ERROR}); only the reference backend runs")
    else:
        archs = _ext.CUDA_ARCH_LIST
        lines += [f"extension: {os.path.basename(so) if so else '_C'}, "
                  + (f"CPU + CUDA, built for TORCH_CUDA_ARCH_LIST={archs}" if archs else "CPU only (no CUDA kernels)"),
                  f"    build: {_build_type(so)}"]
    try:
        from . import _emulation  # noqa: F401  (test builds only)

        lines.append("    test build: the CUDA emulation library is present (SPLINET_EMULATION=1)")
    except ImportError:
        pass
    lines.append(f"backends: {', '.join(sc.available_backends())}")
    lines.append("")

    lines += _device_lines(torch.device("cpu"), "device cpu:")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines += _device_lines(torch.device("cuda", i),
                                   f"device cuda:{i}: {p.name}, compute capability {p.major}.{p.minor}, "
                                   f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
    else:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        lines.append(f"device cuda: none visible ({why})")
    lines.append("")

    lines.append("CPU kernels (csrc/cpu):")
    lines += [f"    {p}" for p in cpu_kernel_paths()]
    lines.append(f"    torch CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    lines.append(f"    threads: {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
                 f"{os.cpu_count()} logical CPUs")
    lines.append("")

    lines.append("caches:")
    lines += [f"    {c}" for c in cache_dirs()]
    lines.append(f"    {_memory.describe()}")
    lines.append("")

    set_vars = [(k, os.environ[k], what) for k, what in ENV_VARS if k in os.environ]
    lines.append("environment:" + ("" if set_vars else " none of " + ", ".join(k for k, _ in ENV_VARS) + " is set"))
    lines += [f"    {k}={v}  ({what})" for k, v, what in set_vars]
    return "\n".join(lines) + "\n"

