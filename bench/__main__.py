"""``python -m bench``: the benchmark CLI of bench/run.py."""
from bench.run import main

main()
