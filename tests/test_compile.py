"""torch.compile of models holding SpliNet layers, as users compile them: the default Inductor
backend, fullgraph=True, dynamic=True (a symbolic float gamma and symbolic sizes once broke
the validator), no graph break, and a new `steps` value reusing the graph on the fused backend
(steps is a SymInt of the ops) instead of recompiling until Dynamo gives up."""
import pytest
import torch

import splinet_cuda as sc


def _fused_cpu():
    if "cpu" not in sc.available_backends():
        pytest.skip("fused CPU kernels not built")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_no_graph_breaks(backend):
    if backend == "cpu":
        _fused_cpu()
    x = torch.randn(6, 4)
    for layer, inp in ((sc.SplineODE(4, 2, 1, 3, variant="antisymmetric", gamma=0.1, backend=backend), x),
                       (sc.SplineODEConv2d(2, 3, 2, 1, 2, backend=backend), torch.randn(2, 2, 4, 4))):
        explained = torch._dynamo.explain(layer)(inp)
        assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]


def test_dynamic_fullgraph_inductor_matches_eager_and_steps_do_not_recompile():
    _fused_cpu()
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), sc.SplineODE(4, 2, 2, 5, variant="antisymmetric", gamma=0.1))
    compiled = torch.compile(lambda x, n: model[1](model[0](x), steps=n), dynamic=True, fullgraph=True)
    for B, n in ((8, 5), (13, 7), (5, 3)):
        x = torch.randn(B, 3)
        got = compiled(x, n)
        want = model[1](model[0](x), steps=n)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        g_got = torch.autograd.grad(got.square().sum(), model[1].weight)[0]
        g_want = torch.autograd.grad(want.square().sum(), model[1].weight)[0]
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
