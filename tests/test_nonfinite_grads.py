"""The backward of a non-finite input: the gradients' NaN / Inf pattern is the reference's, on
every CPU kernel path the forward's test (tests/test_properties.py) covers. The forward's
pattern is pinned there; a NaN or an infinity in one sample reaches the weight, bias and
scale gradients (sums over the batch) and that sample's input gradient as it does in eager
autograd."""
import pytest
import torch

import splinet_cuda as sc
from helpers import conv_inputs, dense_inputs, hamiltonian_inputs

CASES = {
    "dense": (sc.spline_ode, lambda: dense_inputs(6, 4, 2, 2), {"scheme": "rk4"}),
    "dense-soa": (sc.spline_ode, lambda: dense_inputs(300, 3, 2, 1), {}),
    "dense-gemm": (sc.spline_ode, lambda: dense_inputs(5, 20, 2, 1), {"scheme": "midpoint"}),
    "conv": (sc.spline_ode_conv, lambda: conv_inputs(2, B=3), {}),
    "conv-aten": (sc.spline_ode_conv, lambda: conv_inputs(1, B=2, C=33, spatial=(4,)), {}),
    "hamiltonian": (sc.spline_ode_hamiltonian, lambda: hamiltonian_inputs(4, 3, 2, 1), {}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_gradients_like_the_reference(case, value):
    fn, make, kw = CASES[case]
    args = list(make())
    x = args[0].detach().clone()
    x.view(-1)[x[0].numel() // 2] = value  # one value of the first sample
    args[0] = x
    kw = dict(steps=3, degree=1, activation="tanh", **kw)
    grads = {}
    for backend in ("cpu", "reference"):
        leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                  else a for a in args]
        out = fn(*leaves, backend=backend, **kw)
        outs = out if isinstance(out, tuple) else (out,)
        grads[backend] = torch.autograd.grad(sum(o.sum() for o in outs),
                                             [t for t in leaves if isinstance(t, torch.Tensor)])
    for g, r in zip(grads["cpu"], grads["reference"]):
        assert torch.equal(g.isnan(), r.isnan()), "NaN pattern differs from the reference's"
        assert torch.equal(g.isinf(), r.isinf()), "Inf pattern differs from the reference's"
        finite = r.isfinite()
        torch.testing.assert_close(g[finite], r[finite], rtol=1e-9, atol=1e-9)
