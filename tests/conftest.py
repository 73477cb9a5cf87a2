"""Shared test setup. Triton kernels run on CPU tensors under the interpreter here, so
TRITON_INTERPRET must be set before anything imports triton."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import splinet_cuda  # noqa: E402

# float32 CUDA results are compared with true float32 references: TF32 off for cuDNN
# convolutions (PyTorch's default is on) and for cuBLAS matmuls, for the whole session. The
# legacy flags set cuDNN's conv and RNN precision together (mixing them with the newer
# fp32_precision settings makes torch raise on the next read). The cuda backend's cuDNN path
# follows these flags, as torch.nn.functional.conv2d does.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def check_dense_op_rejects_bad_args(fwd) -> None:
    """A dense forward op (C++ or Triton; the schema of spline_dense_fwd) rejects bad
    arguments with a ValueError/TypeError naming them, before any kernel runs."""
    x, w, b, s = torch.randn(3, 4), torch.randn(5, 4, 4), torch.randn(5, 4), torch.tensor(1.0)
    cfg = dict(steps=3, degree=1, activation="tanh", scheme="euler", variant="standard", gamma=0.0, checkpoint=1)
    call = lambda *a, **kw: fwd(*a, *{**cfg, **kw}.values())
    cases = [
        (ValueError, "weight", (x, torch.randn(5, 3, 3), b, s), {}),
        (ValueError, "bias", (x, w, torch.randn(5, 3), s), {}),
        (ValueError, "degree", (x, w, b, s), {"degree": 5}),
        (ValueError, "steps", (x, w, b, s), {"steps": 0}),
        (ValueError, "checkpoint", (x, w, b, s), {"checkpoint": 0}),
        (ValueError, "activation", (x, w, b, s), {"activation": "gelu"}),
        (ValueError, "scheme", (x, w, b, s), {"scheme": "rk5"}),
        (ValueError, "variant", (x, w, b, s), {"variant": "skew"}),
        (TypeError, "dtype", (x, w.double(), b, s), {}),
    ]
    for error, match, args, kwargs in cases:
        with pytest.raises(error, match=match):
            call(*args, **kwargs)


@pytest.fixture
def dense_op_rejects_bad_args():
    return check_dense_op_rejects_bad_args


def randomize_layer(layer, seed=0, wscale=0.4):
    """Fills a SpliNet layer's coefficients with seeded random values (weight * wscale, bias * 0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(wscale * torch.randn(layer.weight.shape, generator=g, dtype=layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(0.5 * torch.randn(layer.bias.shape, generator=g, dtype=layer.bias.dtype))
    return layer


def check_compile_fullgraph(backend: str, device, width: int = 6) -> None:
    """A model using SplineODE(backend=...) gives the same loss and gradients eagerly and
    under torch.compile(fullgraph=True) (aot_eager: graph capture, fakes, autograd)."""
    torch._dynamo.reset()
    layer = splinet_cuda.SplineODE(width, knots=3, degree=2, steps=4, activation="tanh", scheme="rk4",
                                   learn_scale=True, backend=backend, dtype=torch.float64, device=device)
    model = torch.nn.Sequential(layer, torch.nn.Linear(width, 2, dtype=torch.float64, device=device))
    check_model_compiles(model, torch.randn(5, width, dtype=torch.float64, device=device))


def check_model_compiles(model, x):
    """The model's loss and parameter gradients agree eagerly and under
    torch.compile(fullgraph=True, backend="aot_eager")."""

    def loss_and_grads(m):
        model.zero_grad()
        loss = m(x).square().sum()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    eager = loss_and_grads(model)
    compiled = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
