"""``python -m bench``: runs the benchmark CLI of bench/run.py."""
from bench.run import main

if __name__ == "__main__":  # not when multiprocessing re-imports this module in a child
    main()
