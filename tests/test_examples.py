"""The paper reproductions in examples/ run in their --smoke mode and write their results."""
import importlib
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    return importlib.import_module(name)


@pytest.mark.parametrize("script, files", [
    ("sin_fx", ["sin_fx.md", "sin_fx.png"]),
    ("peaks", ["peaks.md", "peaks.png", "peaks_data.png"]),
    ("time_scale", ["time_scale.md", "time_scale.png"]),
    ("convergence", ["convergence.md", "convergence.png"]),
])
def test_example_smoke(script, files, tmp_path):
    out = _load(script).main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    for f in files:
        p = tmp_path / f
        assert p.is_file() and p.stat().st_size > 0, f
    md = (tmp_path / files[0]).read_text()
    assert "| paper" in md or "paper" in md
    assert "Notes" in md
    assert (tmp_path / files[1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(out, dict)


def test_convergence_orders_smoke(tmp_path):
    orders = _load("convergence").main(["--smoke", "--out", str(tmp_path), "--no-progress"])["orders"]
    for d in orders:
        assert 0.7 < orders[d]["euler"] < 1.5
        assert orders[d]["rk4"] > 3.0
