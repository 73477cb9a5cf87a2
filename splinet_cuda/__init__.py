"""splinet_cuda: fused kernels for spline-weighted neural-ODE layers (SpliNet).

A SpliNet layer integrates dx/dt = scale * act(W(t) x + b(t)) over t in [0, 1], where
W(t) and b(t) are B-splines in time (the SpliNet paper: Guenther, Pazner, Qi, "Spline
parameterization of neural network controls for deep learning").
"""
import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _attach_triton_kernels() -> None:
    """The Triton kernels are the subpackage ``splinet_cuda.triton_kernels`` (installed under
    this package, never as a top-level ``triton_kernels``, a name other projects use). An
    install maps the repository folder ``triton_kernels/`` there (setup.py's package_dir); a
    source checkout used in place (``setup.py build_ext --inplace``, nothing installed) gets the
    same module from that folder."""
    name = __name__ + ".triton_kernels"
    if name in _sys.modules or _importlib_util.find_spec(name) is not None:
        return
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "triton_kernels")
    init = _os.path.join(folder, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _importlib_util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)


_attach_triton_kernels()

from . import _ext, continuous, reference  # noqa: E402
from . import _autograd  # noqa: F401,E402  (registers the fused backends that are built)
from . import _triton  # noqa: F401,E402  (registers the triton backend when triton imports)
from ._basis import basis_grid, bspline_basis  # noqa: E402
from ._dispatch import available_backends, spline_ode, spline_ode_conv, spline_ode_hamiltonian  # noqa: E402
from ._memory import empty_kept_cache, kept_cache_bytes, kept_cache_limit, set_kept_cache_limit  # noqa: E402
from .continuous import plot_spectra, smoothness_in_time, stability_report, step_spectra, tikhonov  # noqa: E402
from .ensemble import StackedAdam  # noqa: E402
from .layers import SplineODE, SplineODEConv1d, SplineODEConv2d, SplineODEConv3d, SplineODEHamiltonian  # noqa: E402

__version__ = "0.1.0"


def info(file=None) -> str:
    """Prints and returns what this installation is: the package, torch, CUDA / cuDNN, Triton
    and Python versions; how the extension was built (CPU only or CUDA, its architecture
    list, release or debug); per visible device, the backends that run there and why each
    other one does not; the instruction-set path and GEMM the CPU kernels take; threads;
    the environment variables that change what the package does.

    The same text as ``python -m splinet_cuda info``, to paste into a bug report. It reads
    properties only (no tensor is created, no kernel runs).

    Args:
        file: where to print (default sys.stdout).

    Returns:
        The text printed.
    """
    from . import _info

    text = _info.info_text()
    print(text, end="", file=file if file is not None else _sys.stdout)
    return text


def selftest(device: str = "all", quick: bool = False) -> bool:
    """Runs every usable fused backend against the float64 reference and prints the table
    of ``python -m splinet_cuda selftest``: dense, conv (the spatial dims each backend
    takes) and Hamiltonian layers in every dtype the backend takes, a few schemes, variants
    and degrees on small shapes, forward and every gradient, a non-contiguous input and
    ``torch.compile``; a row is PASS, FAIL (with the error) or SKIP (with the reason, e.g.
    no GPU visible). The ``torch.compile`` rows reset torch._dynamo's caches.

    Args:
        device: "cpu", "cuda" (every visible GPU) or "all" (both).
        quick: fewer cases per backend.

    Returns:
        True when no row failed.
    """
    import time

    from . import _selftest

    start = time.perf_counter()
    rows = _selftest.run(device, quick)
    return _selftest.summarize(rows, time.perf_counter() - start) == 0


__all__ = [
    "spline_ode",
    "spline_ode_conv",
    "bspline_basis",
    "basis_grid",
    "available_backends",
    "reference",
    "SplineODE",
    "SplineODEConv1d",
    "SplineODEConv2d",
    "SplineODEConv3d",
    "SplineODEHamiltonian",
    "spline_ode_hamiltonian",
    "continuous",
    "step_spectra",
    "stability_report",
    "plot_spectra",
    "tikhonov",
    "smoothness_in_time",
    "info",
    "selftest",
    "kept_cache_bytes",
    "kept_cache_limit",
    "set_kept_cache_limit",
    "empty_kept_cache",
    "StackedAdam",
]
