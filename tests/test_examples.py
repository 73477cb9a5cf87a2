"""The paper reproductions in examples/ run in their --smoke mode and write their results;
runs trained together (one vmapped model per shape) equal the same runs trained alone."""
import importlib
import math
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


def test_peaks_together_smoke(tmp_path, capsys):
    out = _load("peaks").main(["--smoke", "--together", "--out", str(tmp_path), "--no-progress"])
    md = (tmp_path / "peaks.md").read_text()
    assert "--together" in md and "steps/s" in md
    assert "steps/s (runs sharing L trained together)" in capsys.readouterr().out
    assert all(0.0 <= s["mean"] <= 1.0 for s in out["results"].values())


def test_peaks_together_equals_alone():
    """Four SpliNet runs sharing L, with their own seed (initialisation, batch order),
    learning rate, Tikhonov weight, amplitude and stopping tolerance, trained together in
    float64, end where each ends trained alone by the authors' loop: the same epochs run (the
    second stops after its first epoch, the fourth diverges at its first step), the same best
    accuracy, the parameters to rounding (not bit for bit: the vmapped linear layers, loss and
    norms sum in other orders, and train_authors steps with torch's fused Adam)."""
    common, peaks = _load("common"), _load("peaks")
    from torch import nn
    (xtr, ytr), (xte, yte), _ = peaks.make_data()
    train, test = (xtr[:60].double(), ytr[:60]), (xte[:200].double(), yte[:200])
    runs = [dict(lr=3e-2, gamma=1e-5, amplitude=0.5, seed=1, tol=1e-4),
            dict(lr=1e-2, gamma=1e-8, amplitude=0.1, seed=2, tol=1e3),  # stops after epoch 1
            dict(lr=5e-2, gamma=1e-4, amplitude=1.0, seed=3, tol=1e-4),
            dict(lr=1e-2, gamma=math.inf, amplitude=0.3, seed=4, tol=1e-4)]  # diverges at its first step

    def make(r):
        return peaks.make_model("SpliNet, d = 2", {"L": 4, "amplitude": r["amplitude"]}, r["seed"]).double()

    kw = dict(epochs=3, batch=5, shuffle=True, maximise=True)
    together = common.train_authors_together(
        [make(r) for r in runs], nn.functional.cross_entropy, peaks.accuracy, train, test,
        lr=[r["lr"] for r in runs], gamma=[r["gamma"] for r in runs], gnorm_tol=[r["tol"] for r in runs],
        seeds=[r["seed"] for r in runs], **kw)
    for r, (acc, ran, state) in zip(runs, together):
        model = make(r)
        acc1, ran1 = common.train_authors(model, nn.functional.cross_entropy, peaks.accuracy, train, test,
                                          lr=r["lr"], gamma=r["gamma"], gnorm_tol=r["tol"], seed=r["seed"], **kw)
        if math.isinf(r["gamma"]):  # stopped before its first step, as alone: no accuracy, no update
            assert ran == ran1 == 0 and math.isnan(acc) and math.isnan(acc1)
            assert all(torch.equal(state[k], v) for k, v in make(r).state_dict().items())
            continue
        assert (ran, acc) == (ran1, acc1)
        assert ran == (1 if r["tol"] > 1 else 3)
        alone = model.state_dict()
        assert state.keys() == alone.keys()
        for k in alone:
            torch.testing.assert_close(state[k], alone[k], rtol=1e-12, atol=1e-13, msg=k)
        assert not torch.equal(state["ode.weight"], make(r).state_dict()["ode.weight"])  # it trained


def test_peaks_max_steps_counts(tmp_path, capsys):
    """--max-steps S: every run stops after S Adam steps, alone or together."""
    for mode in ([], ["--together"]):
        _load("peaks").main(["--smoke", "--max-steps", "7", "--nets", "SpliNet, d = 1", "ResNet",
                             "--out", str(tmp_path), "--no-progress"] + mode)
        assert "14 training steps in" in capsys.readouterr().out


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
