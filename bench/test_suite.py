"""pytest-benchmark suite over the same cases and implementations as the CLI.

``make bench-pytest`` runs it (``pytest bench --benchmark-only``) on the ``quick`` case
list. Every implementation is checked against the float64 reference before it is timed.

Legend: B batch, m width, C channels, N steps.
"""
from __future__ import annotations

import pytest
import torch

from bench.cases import CASE_SETS, check_agreement, forward_backward, loss_fn, make_inputs
from bench.impls import default_impls, oracle_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = CASE_SETS["quick"]
IMPLS = default_impls(compile=False)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS, ids=[i.name for i in IMPLS])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layer(benchmark, case, impl, mode):
    reason = impl.skip(case, torch.device(DEVICE))
    if reason is not None:
        pytest.skip(reason)
    inputs = make_inputs(case, DEVICE)
    fn = impl.build(case)
    # The implementation's environment (e.g. "cuda+cublas": SPLINET_DENSE_GEMM=cublas) holds
    # for the check and for every timed call, as in the CLI.
    with impl.environment():
        mismatch = check_agreement(forward_backward(fn, inputs), oracle_outputs(case, inputs), case.torch_dtype,
                                   grads=impl.exact_grads)
        assert mismatch is None, f"{impl.name} disagrees with the reference: {mismatch}"
        benchmark.group = f"{case.name} {mode}"
        sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

        def call():
            if mode == "fwd":
                fn(*inputs)
            else:
                torch.autograd.grad(loss_fn(fn(*inputs)), inputs)
            sync()

        benchmark(call)
