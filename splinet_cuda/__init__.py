"""splinet_cuda: fused kernels for spline-weighted neural-ODE layers (SpliNet).

A SpliNet layer integrates dx/dt = scale * act(W(t) x + b(t)) over t in [0, 1], where
W(t) and b(t) are B-splines in time (Guenther, Pazner, Qi; SPEC.md).
"""
from . import _ext, continuous, reference
from . import _autograd  # noqa: F401  (registers the fused backends that are built)
from . import _triton  # noqa: F401  (registers the triton backend when triton imports)
from ._basis import basis_grid, bspline_basis
from ._dispatch import available_backends, spline_ode, spline_ode_conv, spline_ode_hamiltonian
from .continuous import plot_spectra, smoothness_in_time, stability_report, step_spectra, tikhonov
from .layers import SplineODE, SplineODEConv1d, SplineODEConv2d, SplineODEConv3d, SplineODEHamiltonian

__version__ = "0.1.0"

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
]
