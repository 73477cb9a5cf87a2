"""Benchmark cases as data: which layer calls to time, on what inputs, and when a result agrees.

A case is one SpliNet layer call at fixed sizes and dtype; the named case lists are what
``--sizes`` picks. Beside them: the inputs of a case, the loss and the training step
around the layer, and the tolerance check against the float64 reference. The ways to run it (fused backends, the
eager reference, torch.compile, torchdiffeq) are in bench/impls.py; the CLI that times
them is bench/run.py, the pytest-benchmark suite bench/test_suite.py.

Legend: B batch, m width (dense), C channels (conv), W/H/D spatial sizes, k kernel size,
L knot intervals, d degree, n = L + d coefficients, N steps.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

import splinet_cuda as sc

__all__ = [
    "Case", "Inputs", "MODES", "TRAIN", "DTYPES", "TOLERANCES", "CASE_SETS", "CASE_SET_DOCS",
    "make_inputs", "loss_fn", "forward_backward", "train_step_fn", "check_agreement",
]

# "fwd": the forward of a training step (inputs require grad, so whatever a backend saves
# for its backward is included); "bwd": the gradients wrt x, weight, bias of one retained
# forward; "fwd+bwd": forward, loss and gradients.
MODES = ("fwd", "bwd", "fwd+bwd")
# --train-step adds this mode: one whole optimizer step of a small model around the layer.
TRAIN = "train"

DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# (rtol, atol) of an implementation against the float64 reference, after both tensors are
# divided by the reference's largest magnitude (so atol is relative to the tensor's scale,
# and gradients of a mean-reduced loss, which are tiny, are not waved through).
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (5e-2, 2e-2),
    torch.bfloat16: (1e-1, 5e-2),
}


@dataclass(frozen=True)
class Case:
    """One benchmarked layer call.

    Dense cases set ``m`` (x is (B, m), weight (n, m, m)); conv cases set ``C``,
    ``spatial`` (1 to 3 sizes) and ``kernel`` (x is (B, C, *spatial), weight
    (n, C, C, k, ...)). ``compile`` says whether the slow-to-build ``compiled``
    implementation runs on this case.
    """

    name: str
    kind: str  # "dense" or "conv"
    B: int
    m: int = 0
    C: int = 0
    spatial: Tuple[int, ...] = ()
    kernel: int = 3
    L: int = 8
    d: int = 2
    N: int = 10
    activation: str = "tanh"
    scheme: str = "euler"
    variant: str = "standard"
    scale: float = 1.0
    dtype: str = "float32"
    compile: bool = True
    memory: bool = False  # measure the peak memory of the forward+backward (slow on CPU)
    # torch.func.vmap cases (one call, many models; see run): "models", an ensemble of `models`
    # dense layers (each its own weight and bias, x shared); "samples", each of the B samples
    # alone (a (1, m) batch, the weights shared), whose backward computes every sample's own
    # gradients (the per-sample gradients' work) before autograd sums them.
    vmap: str = ""
    models: int = 1

    def __post_init__(self) -> None:
        if self.kind == "dense":
            if self.m < 1 or self.C or self.spatial:
                raise ValueError(f"dense case {self.name!r} needs m >= 1 and no C/spatial")
        elif self.kind == "conv":
            if self.C < 1 or not 1 <= len(self.spatial) <= 3 or self.kernel % 2 == 0:
                raise ValueError(f"conv case {self.name!r} needs C >= 1, 1-3 spatial sizes and an odd kernel")
        else:
            raise ValueError(f"case {self.name!r}: kind must be 'dense' or 'conv', got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"case {self.name!r}: dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.vmap not in ("", "models", "samples") or (self.vmap and self.kind != "dense"):
            raise ValueError(f"case {self.name!r}: vmap must be '', 'models' or 'samples' (dense cases), "
                             f"got {self.vmap!r}")

    @property
    def n(self) -> int:
        return self.L + self.d

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def x_shape(self) -> Tuple[int, ...]:
        return (self.B, self.m) if self.kind == "dense" else (self.B, self.C, *self.spatial)

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        if self.kind == "dense":
            return (self.n, self.m, self.m)
        return (self.n, self.C, self.C) + (self.kernel,) * len(self.spatial)

    @property
    def shape(self) -> str:
        """A short description of the sizes, for tables and plots."""
        if self.kind == "dense":
            size = f"B={self.B} m={self.m}"
        else:
            size = f"B={self.B} C={self.C} {'x'.join(map(str, self.spatial))} k={self.kernel}"
        extra = "" if self.scheme == "euler" else f" {self.scheme}"
        extra += "" if self.variant == "standard" else f" {self.variant}"
        extra += "" if self.dtype == "float32" else f" {self.dtype}"
        extra += {"": "", "models": f" vmap over {self.models} models", "samples": " vmap over samples"}[self.vmap]
        return f"{size} L={self.L} d={self.d} N={self.N} {self.activation}{extra}"

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            fn: Optional[Callable] = None, *, loop: bool = False, **kwargs) -> torch.Tensor:
        """Calls ``fn`` (default: ``sc.spline_ode`` or ``sc.spline_ode_conv``) with this case's
        settings; a vmap case under torch.func.vmap (its models' outputs stacked, (M, B, m) or
        (B, m)), or with ``loop`` in a Python loop over its models."""
        if fn is None:
            fn = sc.spline_ode if self.kind == "dense" else sc.spline_ode_conv
        call = lambda x, weight, bias: fn(x, weight, bias, self.scale, steps=self.N, degree=self.d,
                                          activation=self.activation, scheme=self.scheme, variant=self.variant,
                                          **kwargs)
        if self.vmap == "models":
            weights, biases = self.ensemble(weight, bias)
            if loop:
                return torch.stack([call(x, weights[i], None if biases is None else biases[i])
                                    for i in range(self.models)])
            return torch.func.vmap(lambda w, b: call(x, w, b), in_dims=(0, None if biases is None else 0))(weights,
                                                                                                         biases)
        if self.vmap == "samples":
            if loop:
                return torch.cat([call(x[i:i + 1], weight, bias) for i in range(x.shape[0])])
            return torch.func.vmap(lambda xi: call(xi[None], weight, bias)[0])(x)
        return call(x, weight, bias)

    def ensemble(self, weight: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The ensemble's weights (M, n, m, m) and biases (M, n, m): the case's coefficients,
        each model's scaled by its own factor in [0.9, 1.1] (distinct models, one set of
        inputs; the factors are part of the graph, so gradients reach the case's tensors)."""
        f = torch.linspace(0.9, 1.1, self.models, dtype=weight.dtype, device=weight.device)
        return f[:, None, None, None] * weight, None if bias is None else f[:, None, None] * bias


def _dense(name: str, B: int, m: int, N: int, activation: str = "tanh", **kw) -> Case:
    return Case(name, "dense", B, m=m, N=N, activation=activation, **kw)


def _conv(name: str, B: int, C: int, spatial: Tuple[int, ...], N: int, activation: str = "relu", **kw) -> Case:
    return Case(name, "conv", B, C=C, spatial=spatial, N=N, activation=activation, **kw)


# Paper sizes (SpliNet paper, section 4): sin(fx) is m = 4, N = 100, tanh; Peaks is 1000 points,
# m = 5, ReLU. Building torch.compile graphs of N unrolled steps takes about a minute a
# case on a small CPU, so --quick compiles only Peaks.
QUICK: List[Case] = [
    _dense("sin", 256, 4, 100, compile=False),
    _dense("peaks", 1000, 5, 50, "relu"),
    _dense("dense64", 512, 64, 50, compile=False, memory=True),
    _dense("dense256", 256, 256, 20, compile=False),
    _conv("conv1d", 16, 32, (64,), 10, compile=False),
    _conv("conv2d", 8, 8, (16, 16), 10, compile=False),
]

# Larger sizes for a GPU or a patient CPU. indian_pines takes the paper's 220 channels
# (SpliNet paper, section 4.1.3); its spatial length of 16 is an assumption, the paper does not say.
FULL: List[Case] = [replace(c, compile=True, memory=True) for c in QUICK] + [
    _dense("dense256_rk4", 1024, 256, 20, scheme="rk4"),
    _dense("dense1024", 2048, 1024, 20),
    _dense("dense1024_d3", 4096, 1024, 16, d=3, L=8),  # the large-width target of the CUDA kernels
    _dense("dense256_d3", 4096, 256, 50, d=3, L=16),
    _conv("indian_pines", 64, 220, (16,), 20),
    _conv("conv2d_64", 64, 64, (32, 32), 16),
    _conv("conv2d_16", 64, 16, (32, 32), 32),
    _conv("conv2d_256", 64, 256, (32, 32), 16),
    _conv("conv3d", 4, 16, (16, 16, 16), 10),
]

# Sweeps: one parameter varied around the paper's dense layer, named "<parameter>-<value>"
# so the plots can put the value on their x axis.
SWEEP: List[Case] = (
    [_dense(f"width-{m}", 256, m, 10, compile=False) for m in (4, 16, 64, 256, 1024)]
    + [_dense(f"steps-{n}", 256, 16, n, compile=False) for n in (10, 50, 200)]
    + [_dense(f"degree-{d}", 256, 16, 20, d=d, compile=False) for d in (0, 1, 2, 3)]
    + [_dense(f"batch-{b}", b, 16, 20, compile=False) for b in (1, 64, 4096)]
    + [_dense(f"scheme-{s}", 256, 16, 20, scheme=s, compile=False) for s in ("euler", "midpoint", "rk4", "rk4_38")]
    + [_conv(f"channels-{c}", 8, c, (16, 16), 10, compile=False) for c in (4, 16, 64)]
)
# The GPU's sweep adds the large widths.
SWEEP_FULL: List[Case] = SWEEP + [_dense(f"width-{m}", 1024, m, 10, compile=False) for m in (2048, 4096)]

# The GPU benchmark's short list (`make gpu-check`; planned for about a minute on an H200, not
# yet measured): the CUDA and Triton backends' performance targets in priority order, each
# case in its own dtype:
# - dense1024_d3_bf16: the fused forward against N cuBLAS GEMMs of the same shape (the
#   "of GEMM" column, target 80%), fwd+bwd against eager (2x); cuda vs cuda+cublas vs triton;
#   torch.compile with CUDA graphs as the peer;
# - width-4/16/64: m = 4-64, B = 4096, N = 100, fp32 fwd+bwd against eager (20x), backward
#   peak memory against eager (a third);
# - conv2d_16: fp32 fwd+bwd against eager (10x); conv2d_64_bf16: Triton conv2d fwd+bwd
#   against eager (2x); conv2d_256: the forward against N cuDNN convolutions (within 1.2x).
GPU: List[Case] = [
    _dense("dense1024_d3_bf16", 4096, 1024, 16, d=3, L=8, dtype="bfloat16", memory=True),
    *[_dense(f"width-{m}", 4096, m, 100, compile=False, memory=True) for m in (4, 16, 64)],
    _conv("conv2d_16", 64, 16, (32, 32), 32, compile=False, memory=True),
    _conv("conv2d_64_bf16", 64, 64, (32, 32), 16, dtype="bfloat16", compile=False),
    _conv("conv2d_256", 64, 256, (32, 32), 16, compile=False),
]

# The CPU backend's targets, each against torch.compile (compile time in the table): the
# paper's sizes (sin(fx) at B = 256 and 20, Peaks at B = 1000 and N = 100), widths 64, 256 and
# 1024 (where the "of GEMM" column is the 3-GEMMs-a-step limit of fwd+bwd), and the small-
# channel convolutions; peak memory at width 64.
CPU: List[Case] = [
    _dense("sin", 256, 4, 100),
    _dense("sin_b20", 20, 4, 100),
    _dense("peaks_n100", 1000, 5, 100, "relu"),
    _dense("dense64", 512, 64, 50, memory=True),
    _dense("dense256_b512", 512, 256, 20),
    _dense("dense1024_b256", 256, 1024, 10),
    _conv("conv1d", 16, 32, (64,), 10),
    _conv("conv2d", 8, 8, (16, 16), 10),
]

# torch.func.vmap: many models in one kernel call. peaks_ensemble64: 64 Peaks-sized layers
# (B = 40, m = 5, N = 100, relu) as a hyperparameter study or an ensemble trains them; sin_per_sample:
# the per-sample gradients' work at the sin size (B = 256, m = 4, N = 100). Compare the fused
# backend ("cpu": one call of the model-dim ops) with its Python loop over the models
# ("cpu+loop") and the per-slice vmap rule ("cpu+per-slice"); the reference row is vmap of the
# eager reference (--backends cpu,cpu+loop,cpu+per-slice).
VMAP: List[Case] = [
    _dense("peaks_ensemble64", 40, 5, 100, "relu", compile=False, vmap="models", models=64),
    _dense("sin_per_sample", 256, 4, 100, compile=False, vmap="samples"),
]

# Seconds in total, for tests of the harness itself.
TINY: List[Case] = [
    _dense("tiny_dense", 8, 4, 4, L=2, d=1, memory=True),
    _conv("tiny_conv1d", 2, 3, (8,), 3, L=2, d=2),
    _conv("tiny_conv2d", 2, 2, (5, 5), 2, L=1, d=3, activation="tanh"),
]

CASE_SETS: Dict[str, List[Case]] = {"tiny": TINY, "quick": QUICK, "full": FULL, "sweep": SWEEP,
                                    "sweep-full": SWEEP_FULL, "gpu": GPU, "cpu": CPU, "vmap": VMAP}

# What each --sizes value is for (`python -m bench --help` and `--list` print these).
CASE_SET_DOCS: Dict[str, str] = {
    "quick": "the default: the paper's dense sizes (sin, peaks), widths 64 and 256, a 1-D and a 2-D "
             "convolution; torch.compile on peaks only; about 2-3 minutes on a 2-core CPU",
    "full": "quick with torch.compile and peak memory on every case, plus GPU-scale dense (m = 256-1024, "
            "B up to 4096) and convolution (C = 16-256, 2-D/3-D, the paper's Indian Pines) cases; "
            "for a GPU or a patient CPU",
    "sweep": "one parameter at a time around B=256 m=16: width, steps, degree, batch, scheme, channels; "
             "plotted against the parameter (-sweeps.png)",
    "sweep-full": "sweep plus widths 2048 and 4096 (a GPU's)",
    "gpu": "the short GPU list of make gpu-check: the CUDA and Triton performance targets, each case "
           "in its own dtype (bf16 large-width dense, fp32 small widths, conv2d)",
    "cpu": "the CPU backend's targets, all with torch.compile: the paper's sizes, widths 64-1024 "
           "(the 'of GEMM' column: fwd+bwd against 3 GEMMs a step), the small-channel convolutions; "
           "about 6 minutes on a 2-core CPU",
    "tiny": "three tiny cases, seconds: tests of the harness itself",
    "vmap": "torch.func.vmap over many models in one call: a 64-model Peaks ensemble, per-sample "
            "gradients at the sin size; with --backends cpu,cpu+loop,cpu+per-slice (the reference row "
            "is vmap of the eager reference)",
}
assert set(CASE_SET_DOCS) == set(CASE_SETS)


# --------------------------------------------------------------------------------------
# Inputs, the measured calls and the agreement check
# --------------------------------------------------------------------------------------

class Inputs(NamedTuple):
    """The tensors of one call: x (B, m) or (B, C, *spatial), weight, bias (n, m) or (n, C)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor


def make_inputs(case: Case, device, *, requires_grad: bool = True) -> Inputs:
    """Deterministic inputs of ``case`` in ``case.dtype`` on ``device``.

    Seeded by the case's name, drawn on the CPU in float64 and then cast, so every device
    and dtype sees the same values (up to rounding). Weights are scaled by 1/sqrt(fan_in)
    so that the N steps neither blow up nor vanish.
    """
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    fan_in = math.prod(case.weight_shape[2:])
    width = case.weight_shape[1]
    tensors = (
        torch.randn(case.x_shape, generator=gen, dtype=torch.float64),
        torch.randn(case.weight_shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in),
        0.1 * torch.randn((case.n, width), generator=gen, dtype=torch.float64),
    )
    return Inputs(*(t.to(device=device, dtype=case.torch_dtype).requires_grad_(requires_grad) for t in tensors))


TRAIN_CLASSES = 10


def train_step_fn(case: Case, fn: Callable, inputs: Inputs) -> Callable[[], object]:
    """One optimizer step of a small classifier around the layer, as a training loop runs
    it: a lift (Linear m -> m, or a 1x1 convolution C -> C), the layer ``fn`` with its
    coefficients as parameters, a head (global average pool for convolutions, Linear to 10
    classes), cross-entropy on fixed labels, backward, Adam. Built the same way, with the
    same seeds, for every implementation; the learning rate is small so that the timed
    steps leave the problem as it was."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()) + 1)
    dev, dtype = inputs.x.device, inputs.x.dtype
    width = case.m if case.kind == "dense" else case.C
    torch.manual_seed(zlib.crc32(case.name.encode()))
    if case.kind == "dense":
        lift = torch.nn.Linear(width, width)
    else:
        lift = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[len(case.spatial)](width, width, 1)
    head = torch.nn.Linear(width, TRAIN_CLASSES)
    lift, head = lift.to(dev, dtype), head.to(dev, dtype)
    weight = inputs.weight.detach().clone().requires_grad_()
    bias = inputs.bias.detach().clone().requires_grad_()
    params = [*lift.parameters(), weight, bias, *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-5)
    x = inputs.x.detach()
    labels = torch.randint(0, TRAIN_CLASSES, (case.B,), generator=gen).to(dev)
    spatial = tuple(range(2, 2 + len(case.spatial)))

    def step():
        opt.zero_grad(set_to_none=True)
        h = fn(lift(x), weight, bias)
        if spatial:
            h = h.mean(dim=spatial)
        logits = head(h).float()
        if logits.dim() == 3:  # an ensemble's (M, B, classes): every model on the same labels
            logits = logits.flatten(0, 1)
        # (a repeat on every step would cost a non-ensemble step at the paper's sizes ~10%)
        target = labels if logits.shape[0] == case.B else labels.repeat(logits.shape[0] // case.B)
        loss = torch.nn.functional.cross_entropy(logits, target)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def loss_fn(y: torch.Tensor) -> torch.Tensor:
    """The scalar every backward benchmark differentiates."""
    return y.square().mean()


def forward_backward(fn: Callable, inputs: Inputs) -> Tuple[torch.Tensor, ...]:
    """(y, dloss/dx, dloss/dweight, dloss/dbias) of ``fn`` on ``inputs``, detached."""
    y = fn(*inputs)
    grads = torch.autograd.grad(loss_fn(y), inputs)
    return (y.detach(),) + tuple(g.detach() for g in grads)


_OUTPUT_NAMES = ("output", "grad x", "grad weight", "grad bias")


def check_agreement(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                    dtype: torch.dtype, grads: bool = True) -> Optional[str]:
    """None when ``actual`` (from :func:`forward_backward`) matches the float64 ``expected``
    within the tolerance of ``dtype`` (:data:`TOLERANCES`), else what differs. With
    ``grads=False`` only the output is compared."""
    rtol, atol = TOLERANCES[dtype]
    for name, a, e in list(zip(_OUTPUT_NAMES, actual, expected))[: None if grads else 1]:
        if a.shape != e.shape:
            return f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        scale = e.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        try:
            torch.testing.assert_close(a.to(torch.float64) / scale, e / scale, rtol=rtol, atol=atol)
        except AssertionError as err:
            return f"{name} (divided by its max {float(scale):.3g}): {err}"
    return None
