"""torch.func over the fused layers: per-sample gradients (vmap of grad) and Jacobians (jacrev)
through the autograd Functions' vmap rule, equal to a loop / the reference; double backward
still fails with its reason."""
import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

import splinet_cuda as sc

DT = torch.float64


def _fused():
    if "cpu" not in sc.available_backends():
        pytest.skip("fused CPU kernels not built")


@pytest.mark.parametrize("layer_fn, shape", [
    (lambda: sc.SplineODE(4, 2, 2, 3, variant="symmetric", learn_scale=True), (4,)),
    (lambda: sc.SplineODEConv2d(2, 3, 2, 1, 2), (2, 4, 4)),
    # the one-chunk path (threaded GEMMs) through SplineDenseSavedFunction's vmap rule
    (lambda: sc.SplineODE(128, 1, 1, 2), (128,)),
], ids=["dense", "conv2d", "dense-wide"])
def test_per_sample_gradients(layer_fn, shape):
    _fused()
    torch.manual_seed(0)
    layer = layer_fn().to(DT)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(5, *shape, dtype=DT)

    def loss(p, xi):
        return functional_call(layer, p, (xi[None],)).square().sum()

    with pytest.warns(UserWarning, match="batching rule"):  # the backward op is looped by torch
        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        layer.zero_grad()
        loss(dict(layer.named_parameters()), x[i]).backward()
        for name, p in layer.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12)


def test_jacobian_matches_the_reference():
    _fused()
    torch.manual_seed(1)
    x = torch.randn(3, 4, dtype=DT)
    w, b = 0.4 * torch.randn(4, 4, 4, dtype=DT), 0.2 * torch.randn(4, 4, dtype=DT)
    kw = dict(steps=3, degree=2, scheme="rk4", variant="antisymmetric", gamma=0.1)
    J = jacrev(lambda xx, ww: sc.spline_ode(xx, ww, b, 0.9, backend="cpu", **kw), argnums=(0, 1))(x, w)
    R = jacrev(lambda xx, ww: sc.spline_ode(xx, ww, b, 0.9, backend="reference", **kw), argnums=(0, 1))(x, w)
    for a, r in zip(J, R):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_gradgradcheck_fails_with_the_reason():
    _fused()
    x = torch.randn(2, 3, dtype=DT, requires_grad=True)
    w = (0.3 * torch.randn(3, 3, 3, dtype=DT)).requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.gradgradcheck(lambda xx, ww: sc.spline_ode(xx, ww, None, 1.0, steps=2, degree=1,
                                                                   backend="cpu"), (x, w))
