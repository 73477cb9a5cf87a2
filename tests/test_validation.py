"""Bad input gets a ValueError/TypeError that names the argument."""
from __future__ import annotations

import pytest
import torch

import splinet_cuda as sc
from helpers import conv_inputs, dense_inputs
from splinet_cuda import reference

DT = torch.float64
B, M, L, D, N = 3, 4, 2, 1, 3
NCOEF = L + D
C = 2


def dense_args():
    return dense_inputs(B, M, NCOEF, 0, wscale=1.0, bscale=1.0, requires_grad=False)[:3]


def conv_args(dims=2, k=3):
    return conv_inputs(dims, B=B, C=C, spatial=(5,) * dims, k=k, L=NCOEF, d=0, wscale=0.3, bscale=1.0,
                       requires_grad=False)[:3]


DENSE_FNS = {"public": sc.spline_ode, "reference": reference.spline_ode}
CONV_FNS = {"public": sc.spline_ode_conv, "reference": reference.spline_ode_conv}

X = r"\bx\b"
WEIGHT = r"\bweight\b"
BIAS = r"\bbias\b"


def _call(fn, x, W, b, scale=1.0, **kw):
    base = dict(steps=N, degree=D)
    base.update(kw)
    return fn(x, W, b, scale, **base)


def _dense_cases():
    x, W, b = dense_args()
    cases = {
        # name: (exception types, match, (x, W, b, scale), kwargs)
        "x-3d": (ValueError, X, (x[..., None], W, b, 1.0), {}),
        "x-0d": (ValueError, X, (x[0, 0], W, b, 1.0), {}),
        "x-width-mismatch": (ValueError, f"{X}|{WEIGHT}", (torch.randn(B, M + 1, dtype=DT), W, b, 1.0), {}),
        "weight-not-square": (ValueError, WEIGHT, (x, torch.randn(NCOEF, M, M + 1, dtype=DT), b, 1.0), {}),
        "weight-not-square-rows": (ValueError, WEIGHT, (x, torch.randn(NCOEF, M + 1, M, dtype=DT), b, 1.0), {}),
        "weight-2d": (ValueError, WEIGHT, (x, W[0], b, 1.0), {}),
        "weight-4d": (ValueError, WEIGHT, (x, W[..., None], b, 1.0), {}),
        "bias-width": (ValueError, BIAS, (x, W, torch.randn(NCOEF, M + 1, dtype=DT), 1.0), {}),
        "bias-count": (ValueError, BIAS, (x, W, torch.randn(NCOEF + 1, M, dtype=DT), 1.0), {}),
        "bias-1d": (ValueError, BIAS, (x, W, b[0], 1.0), {}),
        "dtype-x-float32": ((ValueError, TypeError), f"dtype|{X}", (x.float(), W, b, 1.0), {}),
        "dtype-weight-float32": ((ValueError, TypeError), f"dtype|{WEIGHT}", (x, W.float(), b, 1.0), {}),
        "dtype-bias-float32": ((ValueError, TypeError), f"dtype|{BIAS}", (x, W, b.float(), 1.0), {}),
        "integer-dtype": (TypeError, f"dtype|{X}|integer|float", (x.long(), W.long(), b.long(), 1.0), {}),
        "bool-dtype": (TypeError, f"dtype|{X}|bool|float", (x > 0, W > 0, b > 0, 1.0), {}),
        "steps-0": (ValueError, "steps", (x, W, b, 1.0), {"steps": 0}),
        "steps-negative": (ValueError, "steps", (x, W, b, 1.0), {"steps": -2}),
        "steps-float": (TypeError, "steps", (x, W, b, 1.0), {"steps": 3.0}),
        "steps-str": (TypeError, "steps", (x, W, b, 1.0), {"steps": "3"}),
        "degree-negative": (ValueError, "degree", (x, W, b, 1.0), {"degree": -1}),
        "n-equals-degree": (ValueError, f"{WEIGHT}|degree", (x, W, b, 1.0), {"degree": NCOEF}),
        "n-below-degree": (ValueError, f"{WEIGHT}|degree", (x, W[:2], b[:2], 1.0), {"degree": 3}),
        "activation-unknown": (ValueError, "activation|gelu", (x, W, b, 1.0), {"activation": "gelu"}),
        "scheme-unknown": (ValueError, "scheme|rk45", (x, W, b, 1.0), {"scheme": "rk45"}),
        "variant-unknown": (ValueError, "variant|skew", (x, W, b, 1.0), {"variant": "skew"}),
        "scale-nan": (ValueError, "scale", (x, W, b, float("nan")), {}),
        "scale-inf": (ValueError, "scale", (x, W, b, float("inf")), {}),
        "scale-neg-inf": (ValueError, "scale", (x, W, b, float("-inf")), {}),
        "scale-tensor-nan": (ValueError, "scale", (x, W, b, torch.tensor(float("nan"), dtype=DT)), {}),
        "scale-tensor-inf": (ValueError, "scale", (x, W, b, torch.tensor(float("inf"), dtype=DT)), {}),
        "scale-tensor-1d": (ValueError, "scale", (x, W, b, torch.tensor([1.0], dtype=DT)), {}),
        "scale-tensor-2elems": (ValueError, "scale", (x, W, b, torch.tensor([1.0, 2.0], dtype=DT)), {}),
        "scale-str": (TypeError, "scale", (x, W, b, "1.0"), {}),
        "scale-none": (TypeError, "scale", (x, W, b, None), {}),
        "gamma-nan": ((ValueError, TypeError), "gamma", (x, W, b, 1.0), {"variant": "antisymmetric", "gamma": float("nan")}),
        "x-not-tensor": (TypeError, X, (x.tolist(), W, b, 1.0), {}),
        "weight-not-tensor": (TypeError, WEIGHT, (x, W.tolist(), b, 1.0), {}),
        "bias-not-tensor": (TypeError, BIAS, (x, W, b.tolist(), 1.0), {}),
    }
    return cases


DENSE_CASES = _dense_cases()


@pytest.mark.parametrize("api", list(DENSE_FNS))
@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_dense_bad_input(case, api):
    exc, match, (x, W, b, s), kw = DENSE_CASES[case]
    with pytest.raises(exc, match=match):
        _call(DENSE_FNS[api], x, W, b, s, **kw)


def test_backend_unknown():
    x, W, b = dense_args()
    with pytest.raises(ValueError, match="backend|warp"):
        sc.spline_ode(x, W, b, 1.0, steps=N, degree=D, backend="warp")
    xc, Wc, bc = conv_args()
    with pytest.raises(ValueError, match="backend|warp"):
        sc.spline_ode_conv(xc, Wc, bc, 1.0, steps=N, degree=D, backend="warp")


@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu"])
def test_backend_not_built(backend):
    if backend in sc.available_backends():
        pytest.skip(f"backend {backend!r} is available here")
    x, W, b = dense_args()
    with pytest.raises((RuntimeError, ValueError), match=r"(?i)build|built|install|available"):
        sc.spline_ode(x, W, b, 1.0, steps=N, degree=D, backend=backend)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backend_with_cpu_tensors(backend):
    """A GPU backend asked for CPU tensors: an error, never a silent answer or a crash."""
    if backend in sc.available_backends():
        pytest.skip(f"backend {backend!r} is available here (it may run CPU tensors, e.g. the Triton interpreter)")
    x, W, b = dense_args()
    with pytest.raises((RuntimeError, ValueError, TypeError),
                       match=rf"(?i)build|built|install|available|device|cuda|{backend}"):
        sc.spline_ode(x, W, b, 1.0, steps=N, degree=D, backend=backend)


def test_mismatched_devices():
    x, W, b = dense_args()
    with pytest.raises((ValueError, TypeError), match=rf"device|{X}|{WEIGHT}"):
        sc.spline_ode(x, W.to("meta"), b, 1.0, steps=N, degree=D)
    with pytest.raises((ValueError, TypeError), match=rf"device|{X}|{WEIGHT}|{BIAS}"):
        reference.spline_ode(x, W, b.to("meta"), 1.0, steps=N, degree=D)


def _conv_cases():
    x, W, b = conv_args(2)
    x1, W1, b1 = conv_args(1)
    cases = {
        "x-2d": (ValueError, X, (x[:, :, 0, 0], W, b, 1.0), {}),
        "x-6d": (ValueError, f"{X}|{WEIGHT}", (torch.randn(B, C, 2, 2, 2, 2, dtype=DT), W, b, 1.0), {}),
        "x-channels": (ValueError, f"{X}|{WEIGHT}", (torch.randn(B, C + 1, 5, 5, dtype=DT), W, b, 1.0), {}),
        "weight-1d-kernel-for-2d-x": (ValueError, WEIGHT, (x, W1, b, 1.0), {}),
        "weight-2d-kernel-for-1d-x": (ValueError, WEIGHT, (x1, W, b1, 1.0), {}),
        "weight-channels-not-square": (ValueError, WEIGHT,
                                       (x, torch.randn(NCOEF, C, C + 1, 3, 3, dtype=DT), b, 1.0), {}),
        "kernel-even": (ValueError, "kernel", (x, torch.randn(NCOEF, C, C, 2, 2, dtype=DT), b, 1.0), {}),
        "kernel-even-one-dim": (ValueError, "kernel", (x, torch.randn(NCOEF, C, C, 3, 4, dtype=DT), b, 1.0), {}),
        "kernel-even-1d": (ValueError, "kernel", (x1, torch.randn(NCOEF, C, C, 4, dtype=DT), b1, 1.0), {}),
        "bias-channels": (ValueError, BIAS, (x, W, torch.randn(NCOEF, C + 1, dtype=DT), 1.0), {}),
        "bias-count": (ValueError, BIAS, (x, W, torch.randn(NCOEF + 1, C, dtype=DT), 1.0), {}),
        "dtype-mismatch": ((ValueError, TypeError), f"dtype|{WEIGHT}", (x, W.float(), b, 1.0), {}),
        "integer-dtype": (TypeError, f"dtype|{X}|integer|float", (x.long(), W.long(), b.long(), 1.0), {}),
        "steps-0": (ValueError, "steps", (x, W, b, 1.0), {"steps": 0}),
        "steps-float": (TypeError, "steps", (x, W, b, 1.0), {"steps": 2.5}),
        "degree-negative": (ValueError, "degree", (x, W, b, 1.0), {"degree": -1}),
        "n-equals-degree": (ValueError, f"{WEIGHT}|degree", (x, W, b, 1.0), {"degree": NCOEF}),
        "activation-unknown": (ValueError, "activation|gelu", (x, W, b, 1.0), {"activation": "gelu"}),
        "scheme-unknown": (ValueError, "scheme|rk45", (x, W, b, 1.0), {"scheme": "rk45"}),
        "variant-unknown": (ValueError, "variant|skew", (x, W, b, 1.0), {"variant": "skew"}),
        "variant-antisymmetric": (ValueError, "variant|antisymmetric", (x, W, b, 1.0), {"variant": "antisymmetric"}),
        "scale-nan": (ValueError, "scale", (x, W, b, float("nan")), {}),
        "scale-tensor-inf": (ValueError, "scale", (x, W, b, torch.tensor(float("inf"), dtype=DT)), {}),
        "scale-tensor-1d": (ValueError, "scale", (x, W, b, torch.tensor([1.0], dtype=DT)), {}),
    }
    return cases


CONV_CASES = _conv_cases()


@pytest.mark.parametrize("api", list(CONV_FNS))
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_bad_input(case, api):
    exc, match, (x, W, b, s), kw = CONV_CASES[case]
    with pytest.raises(exc, match=match):
        _call(CONV_FNS[api], x, W, b, s, **kw)


@pytest.mark.parametrize("api", list(CONV_FNS))
def test_conv_backend_not_built(api):
    if api == "reference":
        pytest.skip("the reference function has no backend choice beyond its own")
    x, W, b = conv_args(1)
    for backend in ("cuda", "triton", "cpu"):
        if backend in sc.available_backends():
            continue
        with pytest.raises((RuntimeError, ValueError), match=r"(?i)build|built|install|available"):
            sc.spline_ode_conv(x, W, b, 1.0, steps=N, degree=D, backend=backend)


def test_valid_input_is_accepted():
    """The base arguments used above are valid (so every failure above is about the one change)."""
    x, W, b = dense_args()
    for fn in DENSE_FNS.values():
        assert _call(fn, x, W, b).shape == x.shape
        assert _call(fn, x, W, None).shape == x.shape
        assert _call(fn, x, W, b, torch.tensor(2.0, dtype=DT)).shape == x.shape
    for dims in (1, 2):
        xc, Wc, bc = conv_args(dims)
        for fn in CONV_FNS.values():
            assert _call(fn, xc, Wc, bc).shape == xc.shape


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(activation="gelu"), "activation|gelu"),
        (dict(scheme="rk45"), "scheme|rk45"),
        (dict(variant="skew"), "variant|skew"),
        (dict(backend="warp"), "backend|warp"),
        (dict(scale=float("nan")), "scale"),
    ],
    ids=["activation", "scheme", "variant", "backend", "scale"],
)
def test_layer_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layer = sc.SplineODE(4, 2, 1, 3, **kwargs)
        layer(torch.randn(2, 4))


@pytest.mark.parametrize(
    "args,match",
    [((4, 0, 1, 3), "knots"), ((4, 2, -1, 3), "degree"), ((4, 2, 1, 0), "steps"), ((0, 2, 1, 3), "width")],
    ids=["knots-0", "degree-neg", "steps-0", "width-0"],
)
def test_layer_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        sc.SplineODE(*args)


def test_conv_layer_even_kernel():
    with pytest.raises(ValueError, match="kernel"):
        sc.SplineODEConv2d(2, 4, 2, 1, 3)


# ---- what PyTorch's own functions accept -------------------------------------------------------

def test_numpy_scalars_are_accepted_like_python_numbers():
    """steps / degree / scale / checkpoint as numpy scalars (e.g. from a config array) work as
    the Python numbers they hold ("steps must be an int, got int64" before); bools do not."""
    np = pytest.importorskip("numpy")
    x, W, b = dense_args()
    want = sc.spline_ode(x, W, b, 0.5, steps=N, degree=D, checkpoint=2)
    got = sc.spline_ode(x, W, b, np.float32(0.5), steps=np.int64(N), degree=np.int32(D), checkpoint=np.int64(2))
    torch.testing.assert_close(got, want)
    layer = sc.SplineODE(np.int64(M), np.int64(2), np.int64(1), np.int64(3), scale=np.float64(0.5),
                         checkpoint=np.int16(2))
    assert isinstance(layer.steps, int) and layer.scale.item() == 0.5 and layer.checkpoint == 2
    with pytest.raises(TypeError, match="steps"):
        sc.spline_ode(x, W, b, 1.0, steps=np.bool_(True), degree=D)
    with pytest.raises(TypeError, match="steps"):
        sc.spline_ode(x, W, b, 1.0, steps=True, degree=D)


def test_dense_takes_any_leading_dims_like_nn_linear():
    """x (*, m): (B, T, m) sequences and a single (m,) vector, as nn.Linear takes them; x_N and
    the trajectory keep the leading dims."""
    x, W, b = dense_args()
    flat = sc.spline_ode(x, W, b, 1.0, steps=N, degree=D)
    x3 = x.reshape(2, -1, M) if x.shape[0] % 2 == 0 else x[None]
    y3 = sc.spline_ode(x3, W, b, 1.0, steps=N, degree=D)
    assert y3.shape == x3.shape
    torch.testing.assert_close(y3.reshape(-1, M), flat)
    traj = sc.spline_ode(x3, W, b, 1.0, steps=N, degree=D, return_trajectory=True)
    assert traj.shape == (N + 1,) + tuple(x3.shape)
    one = sc.spline_ode(x[0], W, b, 1.0, steps=N, degree=D)
    assert one.shape == (M,)
    torch.testing.assert_close(one, flat[0])
    layer = sc.SplineODE(M, 2, 1, 3).to(DT)
    assert layer(torch.randn(2, 3, M, dtype=DT)).shape == (2, 3, M)


def test_auto_says_when_a_dtype_has_no_fused_cpu_kernel(monkeypatch):
    """bfloat16 on the CPU under backend="auto" runs the reference, with a one-time warning
    instead of silently."""
    from splinet_cuda import _dispatch

    if "cpu" not in sc.available_backends():
        pytest.skip("fused CPU kernels not built")
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    x, W, b = (t.bfloat16() for t in dense_args())
    with pytest.warns(RuntimeWarning, match="bfloat16.*reference"):
        sc.spline_ode(x, W, b, 1.0, steps=N, degree=D)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sc.spline_ode(x, W, b, 1.0, steps=N, degree=D)  # once


def test_plot_spectra_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    import sys

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install matplotlib"):
        sc.plot_spectra(torch.zeros(3, dtype=torch.complex128), str(tmp_path / "x.png"))
