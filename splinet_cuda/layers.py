"""nn.Module wrappers of the SpliNet layers.

Legend: m width, C channels, n = L + d coefficients, d degree, N steps.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import continuous
from ._dispatch import spline_ode, spline_ode_conv, spline_ode_hamiltonian
from ._validate import ACTIVATIONS, CONV_VARIANTS, VARIANTS, _choice, _int_arg, as_number, check_checkpoint
from ._schemes import TABLEAUS

__all__ = ["SplineODE", "SplineODEConv1d", "SplineODEConv2d", "SplineODEConv3d", "SplineODEHamiltonian"]


class _SplineODEBase(nn.Module):
    def _setup(self, weight_shape, bias_shape, fan_in: int, knots: int, degree: int, steps: int,
               activation: str, scheme: str, variant: str, variants, scale: float, learn_scale: bool,
               gamma: float, bias: bool, init_amplitude: Optional[float], backend: str, device, dtype,
               checkpoint: Optional[int] = None) -> None:
        self.knots = _int_arg("knots", knots, 1)
        self.degree = _int_arg("degree", degree, 0)
        self.steps = _int_arg("steps", steps, 1)
        self.activation = _choice("activation", activation, ACTIVATIONS)
        self.scheme = _choice("scheme", scheme, TABLEAUS)
        self.variant = _choice("variant", variant, variants)
        scale, checkpoint = as_number(scale), as_number(checkpoint)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
        check_checkpoint(checkpoint)
        self.checkpoint = checkpoint
        self.scale_init = float(scale)  # what reset_parameters() restores
        self.gamma = float(gamma)
        self.backend = backend
        self.init_amplitude = 1.0 / math.sqrt(fan_in) if init_amplitude is None else float(init_amplitude)
        factory = {"device": device, "dtype": dtype}
        n = self.knots + self.degree
        self.weight = nn.Parameter(torch.empty((n,) + tuple(weight_shape), **factory))
        self.bias = nn.Parameter(torch.empty((n,) + tuple(bias_shape), **factory)) if bias else None
        scale_t = torch.empty((), **factory)
        if learn_scale:
            self.scale = nn.Parameter(scale_t)
        else:
            self.register_buffer("scale", scale_t)
        self.reset_parameters()

    @property
    def learn_scale(self) -> bool:
        return isinstance(self.scale, nn.Parameter)

    def reset_parameters(self) -> None:
        """Every coefficient uniform in [-a, a], a = ``init_amplitude`` (default
        1/sqrt(fan_in)): the paper initialises with small random amplitudes and searches
        a in [1e-3, 1] (its section 4.2); ``scale`` back to the constructor's value. Every
        parameter and buffer is set, so deferred initialisation works as for ``nn.Linear``:
        build under ``torch.device("meta")``, then ``to_empty(device=...)`` and this."""
        a = self.init_amplitude
        nn.init.uniform_(self.weight, -a, a)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -a, a)
        with torch.no_grad():
            self.scale.fill_(self.scale_init)

    def _kwargs(self, steps: Optional[int] = None, scheme: Optional[str] = None,
                return_trajectory: bool = False) -> dict:
        # steps / scheme: per-call re-discretisation of the same W(t), b(t) at another step count or
        # scheme (the "manifestation" of continuous-in-depth networks, Queiruga et al.'s ContinuousNet).
        return dict(steps=self.steps if steps is None else steps, degree=self.degree, activation=self.activation,
                    scheme=self.scheme if scheme is None else scheme, variant=self.variant, gamma=self.gamma,
                    backend=self.backend, return_trajectory=return_trajectory, checkpoint=self.checkpoint)

    # ---- continuous-depth features (the math is in splinet_cuda.continuous) ----

    def weights_at(self, t) -> torch.Tensor:
        """W(t) = sum_j B_j(t) weight[j] for t a float in [0, 1] (-> weight.shape[1:]) or a
        1-D tensor of T times (-> (T,) + weight.shape[1:]). Differentiable. For the
        antisymmetric variant this is W(t); what acts is A(t) = W - W^T - gamma I."""
        return continuous.evaluate(self.weight, t, self.degree)

    def bias_at(self, t) -> Optional[torch.Tensor]:
        """b(t), like :meth:`weights_at` ((m,) or (T, m)); None without bias."""
        return None if self.bias is None else continuous.evaluate(self.bias, t, self.degree)

    def _replace_coefficients(self, fn, knots: int, degree: int) -> "_SplineODEBase":
        with torch.no_grad():
            for name in ("weight", "bias"):
                p = getattr(self, name)
                if p is not None:
                    setattr(self, name, nn.Parameter(fn(p.detach()).to(p.dtype), requires_grad=p.requires_grad))
        self.knots, self.degree = knots, degree
        return self

    def refine(self, knots: int) -> "_SplineODEBase":
        """Exact knot insertion: the same W(t), b(t) on ``knots`` = L' uniform intervals, L'
        a multiple of L (else ValueError; use :meth:`project`). Replaces ``weight`` and
        ``bias`` by new Parameters (same requires_grad, device, dtype): re-create the
        optimizer afterwards. Returns self."""
        knots = _int_arg("knots", knots, 1)
        return self._replace_coefficients(
            lambda c: continuous.refine_coefficients(c, self.knots, self.degree, knots), knots, self.degree)

    def project(self, knots: int, degree: Optional[int] = None) -> "_SplineODEBase":
        """L2 projection (on [0, 1]) of W(t), b(t) onto the uniform basis with ``knots``
        intervals and ``degree`` (default unchanged); exact when the spline already lies in
        that space. Replaces the Parameters like :meth:`refine` (re-create the optimizer)."""
        knots = _int_arg("knots", knots, 1)
        degree = self.degree if degree is None else _int_arg("degree", degree, 0)
        return self._replace_coefficients(
            lambda c: continuous.project_coefficients(c, self.knots, self.degree, knots, degree), knots, degree)

    def extra_repr(self) -> str:
        s = (f"knots={self.knots}, degree={self.degree}, steps={self.steps}, activation={self.activation!r}, "
             f"scheme={self.scheme!r}, variant={self.variant!r}, scale={self._scale_repr()}, "
             f"learn_scale={self.learn_scale}, bias={self.bias is not None}, backend={self.backend!r}")
        s += f", checkpoint={self.checkpoint}" if self.checkpoint is not None else ""
        return s + (f", gamma={self.gamma:g}" if self.variant == "antisymmetric" else "")

    def _scale_repr(self) -> str:
        return "<meta>" if self.scale.device.type == "meta" else f"{self.scale.item():g}"


class SplineODE(_SplineODEBase):
    """Dense SpliNet layer: integrates dx/dt = scale * f(x, W(t), b(t)) over t in [0, 1]
    with B-spline weights W(t) = sum_j B_j(t) weight[j] (paper eqs. 12-15, 24).

    Args:
        width: m, the state size.
        knots: L, the number of uniform knot intervals on [0, 1].
        degree: d, the B-spline degree (n = L + d coefficient matrices).
        steps: N, the number of time steps.
        activation: as in :func:`splinet_cuda.spline_ode`.
        scheme: as in :func:`splinet_cuda.spline_ode`.
        variant: as in :func:`splinet_cuda.spline_ode`.
        scale: lam, the time scale (paper eq. 24).
        learn_scale: make ``scale`` a Parameter (else a buffer).
        backend: as in :func:`splinet_cuda.spline_ode`.
        gamma: the diagonal shift of the "antisymmetric" variant.
        bias: learn bias coefficients.
        init_amplitude: see :meth:`reset_parameters`.
        checkpoint: as in :func:`splinet_cuda.spline_ode`.
        device: where the parameters are created.
        dtype: the parameters' dtype.

    Shapes: input (B, m) -> output (B, m). Parameters: ``weight`` (n, m, m),
    ``bias`` (n, m), ``scale`` (0-dim; a buffer unless ``learn_scale``).
    """

    def __init__(self, width: int, knots: int, degree: int, steps: int, activation: str = "tanh",
                 scheme: str = "euler", variant: str = "standard", scale: float = 1.0,
                 learn_scale: bool = False, backend: str = "auto", *, gamma: float = 0.0, bias: bool = True,
                 init_amplitude: Optional[float] = None, checkpoint: Optional[int] = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.width = _int_arg("width", width, 1)
        self._setup((width, width), (width,), width, knots, degree, steps, activation, scheme, variant,
                    VARIANTS, scale, learn_scale, gamma, bias, init_amplitude, backend, device, dtype, checkpoint)

    def forward(self, x: torch.Tensor, steps: Optional[int] = None, scheme: Optional[str] = None, *,
                return_trajectory: bool = False) -> torch.Tensor:
        """x (B, m) -> x_N (B, m), or all N + 1 states (N + 1, B, m) with ``return_trajectory``;
        any leading dims in place of B, as nn.Linear; ``steps``/``scheme`` override the layer's
        for this call."""
        return spline_ode(x, self.weight, self.bias, self.scale, **self._kwargs(steps, scheme, return_trajectory))

    def extra_repr(self) -> str:
        return f"width={self.width}, " + super().extra_repr()


class _SplineODEConvNd(_SplineODEBase):
    _dims = 0

    def __init__(self, channels: int, kernel_size: Union[int, Sequence[int]], knots: int, degree: int,
                 steps: int, activation: str = "relu", scheme: str = "euler", variant: str = "standard",
                 scale: float = 1.0, learn_scale: bool = False, backend: str = "auto", *, bias: bool = True,
                 init_amplitude: Optional[float] = None, checkpoint: Optional[int] = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.channels = _int_arg("channels", channels, 1)
        ks = (kernel_size,) * self._dims if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(ks) != self._dims or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"kernel_size must be a positive int or {self._dims} of them, got {kernel_size!r}")
        if any(k % 2 == 0 for k in ks):
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size!r}")
        self.kernel_size = ks
        fan_in = channels * math.prod(ks)
        self._setup((channels, channels) + ks, (channels,), fan_in, knots, degree, steps, activation, scheme,
                    variant, CONV_VARIANTS, scale, learn_scale, 0.0, bias, init_amplitude, backend, device, dtype,
                    checkpoint)

    def forward(self, x: torch.Tensor, steps: Optional[int] = None, scheme: Optional[str] = None, *,
                return_trajectory: bool = False) -> torch.Tensor:
        """x ``(B, C, *spatial)`` -> same shape, or all N + 1 states ``(N + 1, B, C, *spatial)`` with
        ``return_trajectory``; ``steps``/``scheme`` override the layer's for this call."""
        if x.dim() != self._dims + 2:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, C, {self._dims} spatial dims), "
                             f"got {tuple(x.shape)}")
        return spline_ode_conv(x, self.weight, self.bias, self.scale, **self._kwargs(steps, scheme, return_trajectory))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, " + super().extra_repr()

    def _apply(self, fn, recurse=True):
        # The weight (n, C, C, *kernel) is n stacked ConvNd filters. Conversions see it as
        # the ConvNd weight (n C, C, *kernel) it stacks, so model.to(memory_format=
        # torch.channels_last) treats a SplineODEConv2d as it treats an nn.Conv2d (a 5-D
        # tensor cannot be channels_last; it raised), and the 1-D / 3-D layers as nn.Conv1d
        # / nn.Conv3d. The shape stays (n, C, C, *kernel).
        rank = self._dims + 3

        def as_conv_weight(t):
            if t.dim() != rank:
                return fn(t)
            out = fn(t.reshape((-1,) + tuple(t.shape[2:])))
            return out.view(t.shape) if out.dim() == rank - 1 else out
        return super()._apply(as_conv_weight, recurse)


class SplineODEConv1d(_SplineODEConvNd):
    """Convolutional SpliNet layer over 1 spatial dim: x (B, C, W) -> (B, C, W).

    Integrates dx/dt = scale * f(x, K(t), b(t)) with B-spline filters
    K(t) = sum_j B_j(t) weight[j] (paper eqs. 12-15, 24), stride 1 and "same" zero padding
    (the paper's Indian Pines case: 220 channels, kernel width 3).

    Args:
        channels: C, the number of channels (in and out).
        kernel_size: an odd int, or one odd int per spatial dim.
        knots: L, the number of uniform knot intervals on [0, 1].
        degree: d, the B-spline degree (n = L + d coefficient filters).
        steps: N, the number of time steps.
        activation: as in :func:`splinet_cuda.spline_ode_conv` (default "relu").
        scheme: as in :func:`splinet_cuda.spline_ode`.
        variant: "standard" or "symmetric" (see :func:`splinet_cuda.spline_ode_conv`).
        scale: lam, the time scale (paper eq. 24).
        learn_scale: make ``scale`` a Parameter (else a buffer).
        backend: as in :func:`splinet_cuda.spline_ode_conv`.
        bias: learn bias coefficients.
        init_amplitude: see :meth:`SplineODE.reset_parameters` (default 1/sqrt(C prod(kernel_size))).
        checkpoint: as in :func:`splinet_cuda.spline_ode`.
        device: where the parameters are created.
        dtype: the parameters' dtype.

    Parameters: ``weight`` ``(n, C, C, *kernel_size)``, ``bias`` (n, C), ``scale`` (0-dim).
    """

    _dims = 1


class SplineODEConv2d(_SplineODEConvNd):
    """Convolutional SpliNet layer over 2 spatial dims: x (B, C, H, W) -> (B, C, H, W).

    Arguments and parameters as in :class:`SplineODEConv1d`, with two spatial dims."""

    _dims = 2


class SplineODEConv3d(_SplineODEConvNd):
    """Convolutional SpliNet layer over 3 spatial dims: x (B, C, D, H, W) -> same shape.

    Arguments and parameters as in :class:`SplineODEConv1d`, with three spatial dims."""

    _dims = 3


class SplineODEHamiltonian(_SplineODEBase):
    """Hamiltonian SpliNet layer (Ruthotto & Haber, "Deep neural networks motivated by partial
    differential equations", section "Hamiltonian CNNs"): the input features are partitioned
    into two states, x = [y | z] (each of width/2), integrated with their symplectic Verlet
    scheme (see
    :func:`splinet_cuda.reference.spline_ode_hamiltonian` for the exact form)::

        y_{j+1} = y_j - h scale K1(t_j)^T act(K1(t_j) z_j + b1(t_j))
        z_{j+1} = z_j + h scale K2(t_j)^T act(K2(t_j) y_{j+1} + b2(t_j))

    The step is reversible: :meth:`inverse` recovers x_0 from x_N.

    Args:
        width: m, the (even) feature size of x; y and z have m/2 each.
        knots: L, as in :class:`SplineODE`.
        degree: d, as in :class:`SplineODE`.
        steps: N, as in :class:`SplineODE`.
        activation: as in :class:`SplineODE`.
        scale: lam, as in :class:`SplineODE`.
        learn_scale: as in :class:`SplineODE`.
        backend: "auto" (the fused CPU kernels for float32/float64 CPU tensors when built,
            else the reference), "reference" or "cpu"; see
            :func:`splinet_cuda.spline_ode_hamiltonian`. :meth:`inverse` always runs on
            the reference.
        bias: learn bias coefficients.
        init_amplitude: see :meth:`SplineODE.reset_parameters`.
        checkpoint: as in :class:`SplineODE`.
        device: where the parameters are created.
        dtype: the parameters' dtype.

    Parameters: ``weight`` (n, 2, m/2, m/2) ([:, 0] = K1, [:, 1] = K2), ``bias`` (n, 2, m/2), ``scale``.
    """

    def __init__(self, width: int, knots: int, degree: int, steps: int, activation: str = "tanh",
                 scale: float = 1.0, learn_scale: bool = False, backend: str = "auto", *, bias: bool = True,
                 init_amplitude: Optional[float] = None, checkpoint: Optional[int] = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.width = _int_arg("width", width, 2)
        if width % 2:
            raise ValueError(f"width must be even (x is split into two states y, z of width/2), got {width}")
        if backend not in ("auto", "reference", "cpu"):
            raise ValueError(f"SplineODEHamiltonian runs on backend 'auto', 'reference' or 'cpu' (no Triton/CUDA "
                             f"kernel for it), got {backend!r}")
        half = width // 2
        self._setup((2, half, half), (2, half), half, knots, degree, steps, activation, "euler", "hamiltonian",
                    ("hamiltonian",), scale, learn_scale, 0.0, bias, init_amplitude, backend, device, dtype,
                    checkpoint)
        self.scheme = "verlet"

    def _run(self, x: torch.Tensor, steps: Optional[int], reverse: bool, return_trajectory: bool = False) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.width:
            raise ValueError(f"SplineODEHamiltonian expects x of shape (B, {self.width}), "
                             f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        half = self.width // 2
        # The reversed steps have no fused kernel: inverse() runs on the reference.
        y, z = spline_ode_hamiltonian(x[:, :half], x[:, half:], self.weight, self.bias, self.scale,
                                      steps=self.steps if steps is None else steps, degree=self.degree,
                                      activation=self.activation, reverse=reverse,
                                      return_trajectory=return_trajectory, checkpoint=self.checkpoint,
                                      backend="reference" if reverse else self.backend)
        return torch.cat([y, z], dim=-1)

    def forward(self, x: torch.Tensor, steps: Optional[int] = None, scheme: Optional[str] = None, *,
                return_trajectory: bool = False) -> torch.Tensor:
        """x = [y_0 | z_0] (B, m) -> [y_N | z_N] (B, m), or all N + 1 states (N + 1, B, m) with
        ``return_trajectory``; ``steps`` overrides the layer's; ``scheme`` may only be None or "verlet"."""
        if scheme not in (None, "verlet"):
            raise ValueError(f"SplineODEHamiltonian integrates with 'verlet' only, got scheme={scheme!r}")
        return self._run(x, steps, reverse=False, return_trajectory=return_trajectory)

    def inverse(self, x: torch.Tensor, steps: Optional[int] = None) -> torch.Tensor:
        """[y_N | z_N] -> [y_0 | z_0]: the Verlet steps run backwards (time-reversibility)."""
        return self._run(x, steps, reverse=True)

    def extra_repr(self) -> str:
        return f"width={self.width}, " + super().extra_repr()
