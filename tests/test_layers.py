"""nn.Module wrappers: SplineODE and SplineODEConv1d/2d/3d."""
from __future__ import annotations

import pytest
import torch

import splinet_cuda as sc
from helpers import randomize_layer
from splinet_cuda import reference

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-11)

# name, kwargs
DENSE_LAYERS = [
    ("tanh-euler-standard", dict(activation="tanh", scheme="euler", variant="standard")),
    ("relu-rk4-symmetric", dict(activation="relu", scheme="rk4", variant="symmetric", scale=0.5)),
    ("softplus-midpoint-antisym", dict(activation="softplus", scheme="midpoint", variant="antisymmetric")),
    ("sigmoid-rk4_38-learnscale", dict(activation="sigmoid", scheme="rk4_38", learn_scale=True, scale=2.0)),
    ("identity-euler-reference", dict(activation="identity", backend="reference", learn_scale=True)),
]


_randomize = randomize_layer


def _ref_kwargs(layer, steps, degree, kw):
    out = dict(steps=steps, degree=degree, activation=kw.get("activation", "tanh"),
               scheme=kw.get("scheme", "euler"), variant=kw.get("variant", "standard"))
    if out["variant"] == "antisymmetric":
        out["gamma"] = float(getattr(layer, "gamma", 0.0))
    return out


@pytest.mark.parametrize("name,kw", DENSE_LAYERS, ids=[n for n, _ in DENSE_LAYERS])
def test_dense_layer_parameters_and_forward(name, kw):
    width, knots, degree, steps = 4, 3, 2, 5
    layer = sc.SplineODE(width, knots, degree, steps, **kw).to(DT)
    n = knots + degree
    assert layer.weight.shape == (n, width, width)
    assert layer.bias.shape == (n, width)
    assert isinstance(layer.weight, torch.nn.Parameter) and isinstance(layer.bias, torch.nn.Parameter)
    assert layer.scale.shape == ()
    names = dict(layer.named_parameters())
    buffers = dict(layer.named_buffers())
    assert "weight" in names and "bias" in names
    if kw.get("learn_scale", False):
        assert "scale" in names and isinstance(layer.scale, torch.nn.Parameter)
    else:
        assert "scale" in buffers and "scale" not in names
        assert not layer.scale.requires_grad
    torch.testing.assert_close(layer.scale.detach(), torch.tensor(float(kw.get("scale", 1.0)), dtype=DT))

    _randomize(layer)
    x = torch.randn(6, width, dtype=DT)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == DT
    expect = reference.spline_ode(x, layer.weight, layer.bias, layer.scale,
                                  **_ref_kwargs(layer, steps, degree, kw))
    torch.testing.assert_close(y, expect, **TOL)


@pytest.mark.parametrize("learn_scale", [False, True], ids=["fixed-scale", "learn-scale"])
def test_dense_layer_backward(learn_scale):
    layer = sc.SplineODE(3, 2, 3, 4, learn_scale=learn_scale, scale=0.8).to(DT)
    _randomize(layer, seed=1)
    x = torch.randn(5, 3, dtype=DT, requires_grad=True)
    layer(x).pow(2).sum().backward()
    for t in (x, layer.weight, layer.bias):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    if learn_scale:
        assert layer.scale.grad is not None and layer.scale.grad.shape == () and layer.scale.grad != 0
    else:
        assert layer.scale.grad is None

    # the gradients equal those of the reference with the same tensors
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, layer.weight, layer.bias, layer.scale)]
    reference.spline_ode(*leaves, steps=4, degree=3).pow(2).sum().backward()
    for got, ref in zip((x, layer.weight, layer.bias), leaves[:3]):
        torch.testing.assert_close(got.grad, ref.grad, **TOL)
    if learn_scale:
        torch.testing.assert_close(layer.scale.grad, leaves[3].grad, **TOL)


@pytest.mark.parametrize("learn_scale", [False, True], ids=["fixed-scale", "learn-scale"])
def test_dense_layer_state_dict_roundtrip(learn_scale):
    kw = dict(activation="tanh", scheme="midpoint", learn_scale=learn_scale, scale=1.7)
    a = sc.SplineODE(4, 2, 1, 3, **kw).to(DT)
    _randomize(a, seed=2)
    sd = a.state_dict()
    assert {"weight", "bias", "scale"} <= set(sd)
    b = sc.SplineODE(4, 2, 1, 3, **{**kw, "scale": 1.0}).to(DT)
    b.load_state_dict(sd)
    x = torch.randn(3, 4, dtype=DT)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    torch.testing.assert_close(b.scale, a.scale, rtol=0, atol=0)


def test_dense_layer_dtype_conversion():
    layer = sc.SplineODE(4, 2, 1, 3)
    assert layer.weight.dtype == torch.float32  # default dtype
    y32 = layer(torch.randn(2, 4))
    assert y32.dtype == torch.float32
    layer64 = layer.to(torch.float64)
    assert layer64.weight.dtype == DT and layer64.bias.dtype == DT and layer64.scale.dtype == DT
    assert layer64(torch.randn(2, 4, dtype=DT)).dtype == DT


def test_dense_layer_repr():
    r = repr(sc.SplineODE(5, 3, 2, 7, activation="relu"))
    for token in ("5", "3", "2", "7"):
        assert token in r
    for word in ("width", "knots", "degree", "steps"):
        assert word in r, r


def test_dense_layer_trains():
    torch.manual_seed(0)
    layer = sc.SplineODE(3, 2, 2, 4, activation="tanh", learn_scale=True).to(DT)
    x = torch.randn(64, 3, dtype=DT)
    target = x + 0.5 * torch.tanh(x @ torch.tensor([[0.5, -1.0, 0.3], [0.2, 0.4, -0.7], [1.0, 0.0, 0.5]],
                                                    dtype=DT).T)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --------------------------------------------------------------------------------------
# Convolutional layers
# --------------------------------------------------------------------------------------

CONV_LAYERS = {1: sc.SplineODEConv1d, 2: sc.SplineODEConv2d, 3: sc.SplineODEConv3d}
CONV_CASES = [
    (1, dict(activation="relu", scheme="euler", variant="standard")),
    (1, dict(activation="tanh", scheme="rk4", variant="symmetric", learn_scale=True)),
    (2, dict(activation="softplus", scheme="midpoint", variant="symmetric")),
    (2, dict(activation="sigmoid", scheme="euler", learn_scale=True, scale=0.5)),
    (3, dict(activation="tanh", scheme="rk4_38", variant="standard")),
]


def _conv_id(c):
    dims, kw = c
    return f"conv{dims}d-" + "-".join(f"{v}" for v in kw.values())


@pytest.mark.parametrize("dims,kw", CONV_CASES, ids=[_conv_id(c) for c in CONV_CASES])
def test_conv_layer_parameters_forward_backward(dims, kw):
    channels, kernel, knots, degree, steps = 2, 3, 2, 1, 3
    layer = CONV_LAYERS[dims](channels, kernel, knots, degree, steps, **kw).to(DT)
    n = knots + degree
    assert layer.weight.shape == (n, channels, channels) + (kernel,) * dims
    assert layer.bias.shape == (n, channels)
    assert layer.scale.shape == ()
    _randomize(layer, seed=dims, wscale=0.3)
    x = torch.randn((2, channels) + (4,) * dims, dtype=DT, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    kwr = _ref_kwargs(layer, steps, degree, {"activation": "relu", **kw})
    expect = reference.spline_ode_conv(x, layer.weight, layer.bias, layer.scale, **kwr)
    torch.testing.assert_close(y, expect, **TOL)

    y.pow(2).sum().backward()
    for t in (x, layer.weight, layer.bias):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert layer.weight.grad.abs().sum() > 0
    if kw.get("learn_scale", False):
        assert layer.scale.grad is not None
        assert isinstance(layer.scale, torch.nn.Parameter)
    else:
        assert layer.scale.grad is None
        assert "scale" in dict(layer.named_buffers())

    # state_dict round trip
    fresh = CONV_LAYERS[dims](channels, kernel, knots, degree, steps, **kw).to(DT)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x.detach()), layer(x.detach()), rtol=0, atol=0)

    r = repr(layer)
    assert "channels" in r or str(channels) in r
    assert "kernel" in r


def test_conv_layer_default_activation_is_relu():
    layer = sc.SplineODEConv1d(2, 3, 2, 1, 3).to(DT)
    _randomize(layer, seed=3, wscale=0.3)
    x = torch.randn(2, 2, 6, dtype=DT)
    expect = reference.spline_ode_conv(x, layer.weight, layer.bias, layer.scale, steps=3, degree=1,
                                       activation="relu")
    torch.testing.assert_close(layer(x), expect, **TOL)


def test_conv_layer_kernel_tuple():
    layer = sc.SplineODEConv2d(2, (3, 5), 2, 1, 2).to(DT)
    assert layer.weight.shape == (3, 2, 2, 3, 5)
    x = torch.randn(1, 2, 4, 6, dtype=DT)
    assert layer(x).shape == x.shape


def test_conv_layer_float32_default_and_to_float64():
    layer = sc.SplineODEConv2d(2, 3, 2, 1, 2)
    assert layer.weight.dtype == torch.float32
    assert layer(torch.randn(1, 2, 4, 4)).dtype == torch.float32
    layer = layer.to(torch.float64)
    assert layer.scale.dtype == DT
    assert layer(torch.randn(1, 2, 4, 4, dtype=DT)).dtype == DT


def test_conv_layer_trains():
    torch.manual_seed(1)
    layer = sc.SplineODEConv1d(2, 3, 2, 1, 3, activation="tanh").to(DT)
    x = torch.randn(16, 2, 8, dtype=DT)
    target = torch.roll(x, 1, dims=-1) * 0.5 + x
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# ---- deferred initialisation, the layers' checkpoint / return_trajectory options ----------

def _every_layer(**kw):
    return [sc.SplineODE(4, 2, 1, 3, scale=0.7, **kw), sc.SplineODEConv2d(2, 3, 2, 1, 3, scale=0.7, **kw),
            sc.SplineODEHamiltonian(4, 2, 1, 3, scale=0.7, **kw)]


def _input(layer, dtype=torch.float32):
    shape = (2, 2, 5, 5) if isinstance(layer, sc.SplineODEConv2d) else (3, 4)
    return torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("learn_scale", [False, True])
def test_meta_device_init_then_reset_parameters(learn_scale):
    """Built on the meta device, moved with to_empty and reset: every parameter and buffer is
    set (the scale buffer was left uninitialised, outputs of 1e33), as for nn.Linear."""
    with torch.device("meta"):
        layers = _every_layer(learn_scale=learn_scale)
    for layer in layers:
        assert "scale=<meta>" in repr(layer)
        layer.to_empty(device="cpu")
        with torch.no_grad():
            layer.scale.fill_(1e33)  # what uninitialised memory may hold
        layer.reset_parameters()
        assert layer.scale.item() == pytest.approx(0.7) and layer.learn_scale == learn_scale
        a = layer.init_amplitude
        assert layer.weight.abs().max() <= a and layer.bias.abs().max() <= a
        y = layer(_input(layer))
        assert torch.isfinite(y).all()


def test_validation_reads_no_tensor_value_off_the_cpu():
    """A tensor scale is checked for finiteness only on the CPU (no device-to-host sync): meta
    tensors pass validation and run on the reference (shapes only)."""
    x, w, b = torch.empty(3, 4, device="meta"), torch.empty(3, 4, 4, device="meta"), torch.empty(3, 4, device="meta")
    y = sc.spline_ode(x, w, b, torch.empty((), device="meta"), steps=2, degree=1, backend="reference")
    assert y.device.type == "meta" and y.shape == (3, 4)
    with pytest.raises(ValueError, match="scale"):  # on the CPU the check still holds
        sc.spline_ode(torch.randn(3, 4), torch.randn(3, 4, 4), None, torch.tensor(float("nan")), steps=2, degree=1)


@pytest.mark.parametrize("layer_index", [0, 1, 2], ids=["dense", "conv2d", "hamiltonian"])
def test_layer_checkpoint_and_return_trajectory(layer_index):
    """checkpoint= (constructor) keeps every K-th state for the backward: the same values and
    gradients; return_trajectory=True (forward) gives all N + 1 states, the last = forward()."""
    torch.manual_seed(0)
    plain = _every_layer()[layer_index].double()
    ckpt = _every_layer(checkpoint=2)[layer_index].double()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.checkpoint == 2 and "checkpoint=2" in repr(ckpt)
    x = _input(plain, torch.float64)
    grads = []
    for layer in (plain, ckpt):
        layer.zero_grad()
        y = layer(x)
        y.square().sum().backward()
        grads.append((y.detach(), layer.weight.grad.clone(), layer.bias.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    traj = plain(x, return_trajectory=True)
    assert traj.shape == (plain.steps + 1,) + x.shape
    torch.testing.assert_close(traj[0], x)
    torch.testing.assert_close(traj[-1], grads[0][0])
    traj.sum().backward()  # differentiable through every state


def test_layer_option_validation():
    with pytest.raises(ValueError, match="checkpoint"):
        sc.SplineODE(4, 2, 1, 3, checkpoint=0)
    with pytest.raises(TypeError, match="checkpoint"):
        sc.SplineODEConv1d(2, 3, 2, 1, 3, checkpoint=1.5)
    with pytest.raises(TypeError, match="return_trajectory"):
        sc.SplineODE(4, 2, 1, 3)(torch.randn(2, 4), return_trajectory=1)
    with pytest.raises(TypeError, match="scale"):
        sc.SplineODE(4, 2, 1, 3, scale=torch.tensor(1.0))


def test_channels_last_like_nn_conv2d():
    """model.to(memory_format=torch.channels_last) converts a model holding SplineODEConv2d (its
    5-D weight raised) and a channels_last input gives a channels_last output, as nn.Conv2d;
    values and gradients equal the contiguous model's."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1),
                                       sc.SplineODEConv2d(4, 3, 2, 1, 3, learn_scale=True)).double()
    ref, cl = make(), make()
    cl.load_state_dict(ref.state_dict())
    cl.to(memory_format=torch.channels_last)
    assert cl[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert cl[1].weight.shape == ref[1].weight.shape
    torch.testing.assert_close(cl[1].weight, ref[1].weight, rtol=0, atol=0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    y_ref = ref(x)
    y = cl(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for p, q in zip(cl.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    # A contiguous input still gives a contiguous output; trajectories stay contiguous.
    assert cl[1](torch.randn(2, 4, 6, 5, dtype=torch.float64)).is_contiguous()
    traj = cl[1](torch.randn(2, 4, 6, 5, dtype=torch.float64).to(memory_format=torch.channels_last),
                 return_trajectory=True)
    assert traj.shape == (4, 2, 4, 6, 5)


def test_memory_format_conversions_of_1d_and_3d_layers_match_torch():
    """The 1-D layer's weight is left alone by channels_last, as nn.Conv1d's; the 3-D layer takes
    channels_last_3d and refuses channels_last, as nn.Conv3d does."""
    c1 = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3), sc.SplineODEConv1d(2, 3, 2, 1, 2))
    c1.to(memory_format=torch.channels_last)
    assert c1[1].weight.is_contiguous()
    c3 = sc.SplineODEConv3d(2, 3, 2, 1, 2)
    c3.to(memory_format=torch.channels_last_3d)
    assert c3.weight.shape == (3, 2, 2, 3, 3, 3)
    with pytest.raises(RuntimeError, match="rank 4"):
        torch.nn.Conv3d(2, 2, 3).to(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="rank 4"):
        c3.to(memory_format=torch.channels_last)


# ---- torch.autocast -------------------------------------------------------------------------

def test_autocast_cpu_runs_float32_like_pytorch_fp32_ops():
    """Under torch.autocast a Linear / Conv before the layer hands it bfloat16 (it raised a
    TypeError): the layer runs in float32 and returns float32, as PyTorch's float32-policy ops
    do, with the values and gradients of that float32 run."""
    torch.manual_seed(0)
    for pre, layer, x in (
            (torch.nn.Linear(4, 4), sc.SplineODE(4, 2, 2, 4, learn_scale=True), torch.randn(5, 4)),
            (torch.nn.Conv2d(2, 3, 3, padding=1), sc.SplineODEConv2d(3, 3, 2, 1, 3), torch.randn(2, 2, 5, 5)),
            (torch.nn.Linear(4, 4), sc.SplineODEHamiltonian(4, 2, 1, 3), torch.randn(5, 4))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = pre(x)
            assert h.dtype == torch.bfloat16
            y = layer(h)
        assert y.dtype == torch.float32
        h32 = h.detach().float().requires_grad_()
        torch.testing.assert_close(y, layer(h32))
        y.square().sum().backward()
        assert pre.weight.grad is not None and layer.weight.grad.dtype == torch.float32


def test_autocast_direct_op_call_runs_float32():
    """The forward ops themselves carry the same autocast rule (torch.library.register_autocast)."""
    from splinet_cuda import _ext

    if not _ext.has_kernel("spline_dense_fwd", "CPU"):
        pytest.skip("fused CPU kernels not built")
    x, w, b = torch.randn(3, 4), 0.3 * torch.randn(3, 4, 4), torch.randn(3, 4)
    s = torch.tensor(1.0)
    want = torch.ops.splinet_cuda.spline_dense_fwd(x, w, b, s, 4, 1, "tanh", "euler", "standard", 0.0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.ops.splinet_cuda.spline_dense_fwd(x.bfloat16(), w, b, s, 4, 1, "tanh", "euler", "standard",
                                                     0.0, 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.ops.splinet_cuda.spline_dense_fwd(
        x.bfloat16().float(), w, b, s, 4, 1, "tanh", "euler", "standard", 0.0, 1))
    assert want.shape == got.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_autocast_cuda_runs_float32():
    layer = sc.SplineODE(8, 2, 1, 4).cuda()
    pre = torch.nn.Linear(8, 8).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        y = layer(pre(torch.randn(6, 8, device="cuda")))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    y.sum().backward()
