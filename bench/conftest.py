"""pytest configuration of the pytest-benchmark suite (bench/test_suite.py)."""
import sys
from pathlib import Path

# bench/ is not installed: make `import bench` work when pytest collects this folder.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
