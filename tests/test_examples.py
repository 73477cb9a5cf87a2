"""The paper reproductions in examples/ run in their --smoke mode and write their results."""
import importlib
import os
import sys

import pytest
import torch

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


def test_digits_smoke(tmp_path):
    # the data ship inside scikit-learn (no download); it is in requirements-dev.txt
    pytest.importorskip("sklearn")
    out = _load("digits").main(["--smoke", "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    md = (tmp_path / "digits.md").read_text()
    assert (tmp_path / "digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Re-discretised" in md and "fused" in md and "reference" in md
    # both training modes, each with its table over every scheme and evaluated step count
    assert len(out["results"]) == 2
    for res in out["results"].values():
        (table,) = res["rediscretised"]
        assert {s for s, _ in table} == {"euler", "midpoint", "rk4"}
        assert all(0.0 <= v <= 1.0 for v in table.values())
    assert out["epoch_times"]["fused"] > 0 and out["epoch_times"]["reference"] > 0


def test_digits_data_split():
    pytest.importorskip("sklearn")
    x_tr, y_tr, x_te, y_te = _load("digits").load_data()
    assert x_tr.shape[1:] == (1, 8, 8) and len(x_tr) + len(x_te) == 1797
    # stratified: every class in the test set in (about) its share
    counts = torch.bincount(y_te, minlength=10)
    assert int(counts.min()) >= 34 and int(counts.max()) <= 38
    assert abs(float(x_tr.mean())) < 1e-5 and abs(float(x_tr.std()) - 1) < 1e-4
