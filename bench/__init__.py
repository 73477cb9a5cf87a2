"""Benchmarks of splinet_cuda: shared cases (bench/cases.py) and the CLI (bench/run.py,
``python -m bench``)."""
