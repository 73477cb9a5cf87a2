"""Benchmarks of splinet_cuda (not installed with the package; run from the repository root).

Modules, each importing only those above it:

- ``cases``: the cases as data (sizes, dtypes, tolerances, the ``--sizes`` lists), their
  inputs, the loss and training step around them, the agreement check;
- ``impls``: the implementations of a case: fused backends, the eager reference (and the
  float64 oracle), torch.compile, torchdiffeq;
- ``results``: row statuses, speedup cells, results files, regression comparison, the
  terminal table and plots (no torch);
- ``metrics``: FLOPs, the device's GEMM floor, peak memory;
- ``report``: ``python -m bench.report FILE.json``, a results file as a Markdown table;
- ``run``: timing and the CLI, ``python -m bench``;
- ``test_suite``: the same cases under pytest-benchmark (``make bench-pytest``).
"""
