"""Handwritten digits with a SpliNet CNN: scikit-learn's load_digits (1797 8x8 images)
classified by a lifting convolution, two SplineODEConv2d blocks with pooling between,
and a linear head, then re-discretised at other step counts and schemes.

The data ship inside scikit-learn (no download). The continuous-depth point of the
SpliNet paper (Günther, Pazner, Qi, section 2) and of ContinuousNet (Queiruga et al.,
*Continuous-in-depth neural networks*): the filters K(t), b(t) are functions of time, so
a network trained with one step count N and scheme can be evaluated with others; the
accuracy should hold once the discretisation resolves the trained dynamics. A network
trained at one step count can lean on that discretisation's error; training with a step
count drawn at random per batch (``--train-steps LO,HI``) asks for dynamics that every
such discretisation resolves.

By default it trains both ways (``--modes fixed,random``), one run each, about 30 seconds on
a 2-core CPU. Writes ``digits.md`` (accuracy, re-discretisation tables, fused vs reference
time per epoch) and ``digits.png`` (training curves, accuracy vs step count per scheme).
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

import common
import splinet_cuda as sc

SCHEMES = ("euler", "midpoint", "rk4")


class SpliNetCNN(nn.Module):
    """lift (Conv2d 1 -> C, 3x3) -> SplineODEConv2d(C) at 8x8 -> AvgPool 2 -> Conv2d 1x1
    C -> 2C -> SplineODEConv2d(2C) at 4x4 -> global average pool -> Linear(2C, 10).
    ``steps``/``scheme`` in forward re-discretise both ODE blocks."""

    def __init__(self, channels: int = 16, knots: int = 4, degree: int = 2, steps: int = 8,
                 scheme: str = "euler", horizon: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        c = channels
        ode = dict(knots=knots, degree=degree, steps=steps, activation="relu", scheme=scheme,
                   scale=horizon, backend=backend)
        self.lift = nn.Conv2d(1, c, 3, padding=1)
        self.block1 = sc.SplineODEConv2d(c, 3, **ode)
        self.widen = nn.Conv2d(c, 2 * c, 1)
        self.block2 = sc.SplineODEConv2d(2 * c, 3, **ode)
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor, steps: Optional[int] = None, scheme: Optional[str] = None) -> torch.Tensor:
        x = F.relu(self.lift(x))
        x = self.block1(x, steps, scheme)
        x = self.widen(F.avg_pool2d(x, 2))
        x = self.block2(x, steps, scheme)
        return self.head(x.mean(dim=(2, 3)))


def load_data(seed: int = 0, test_fraction: float = 0.2):
    """load_digits, a stratified train/test split (fixed by ``seed``), pixels standardised
    with the training set's mean and std. Returns (x_train, y_train, x_test, y_test)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is in requirements-dev.txt
        raise SystemExit("examples/digits.py needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.tensor(d.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for k in range(10):  # stratified: the same test fraction of every class
        idx = np.flatnonzero(d.target == k)
        test[rng.choice(idx, size=int(round(test_fraction * len(idx))), replace=False)] = True
    train = torch.from_numpy(~test)
    test = torch.from_numpy(test)
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps=None, scheme=None) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x, steps, scheme).argmax(1) == y).float().mean())


def train_epoch(model, opt, sched, x, y, batch: int, gen: torch.Generator, train_steps=None) -> float:
    """One pass over the shuffled training set; returns the mean loss. ``train_steps``
    (lo, hi): each batch runs with a step count drawn uniformly from lo..hi."""
    model.train()
    perm = torch.randperm(len(y), generator=gen)
    total = 0.0
    for i in range(0, len(y), batch):
        idx = perm[i:i + batch]
        steps = None
        if train_steps is not None:
            steps = int(torch.randint(train_steps[0], train_steps[1] + 1, (), generator=gen))
        loss = F.cross_entropy(model(x[idx], steps), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total += float(loss.detach()) * len(idx)
    return total / len(y)


def make_optimizer(model, lr: float, epochs: int, batches_per_epoch: int):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * batches_per_epoch,
                                                pct_start=0.15)
    return opt, sched


def epoch_times(model, data, args, rounds: int) -> dict:
    """Seconds per training epoch of the fused backend (``auto``) and of the pure-PyTorch
    reference on copies of ``model``, interleaved (fused, reference, fused, ...) so both
    see the same machine state; median over ``rounds``."""
    x_tr, y_tr = data[0], data[1]
    fused = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    for m in (ref.block1, ref.block2):
        m.backend = "reference"
    times = {"fused": [], "reference": []}
    for _ in range(rounds):
        for name, m in (("fused", fused), ("reference", ref)):
            opt = torch.optim.Adam(m.parameters(), lr=1e-4)
            gen = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            train_epoch(m, opt, None, x_tr, y_tr, args.batch, gen)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def parse_range(text: str):
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--train-steps must be LO,HI (two ints), got {text!r}")
    if not 1 <= lo <= hi:
        raise SystemExit(f"--train-steps needs 1 <= LO <= HI, got {text!r}")
    return lo, hi


def plot(path, results, steps_list):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(results), figsize=(4.6 * (1 + len(results)), 3.8), squeeze=False)
    a = axes[0][0]
    a2 = a.twinx()
    for k, (label, res) in enumerate(results.items()):
        for r, c in enumerate(res["curves"]):
            ep = np.arange(1, len(c["loss"]) + 1)
            a.plot(ep, c["loss"], color=f"C{k}", ls="--", alpha=0.7, label=f"{label}: train loss" if r == 0 else None)
            a2.plot(ep, 100 * np.asarray(c["test_acc"]), color=f"C{k}", alpha=0.8,
                    label=f"{label}: test accuracy" if r == 0 else None)
    a.set_yscale("log")
    a.set_xlabel("epoch")
    a.set_ylabel("train loss (dashed)")
    a2.set_ylabel("test accuracy [%] (solid)")
    a2.set_ylim(80, 100)
    a2.axhline(97, color="grey", ls=":", lw=1)
    a2.legend(fontsize=7, loc="center right")
    a.set_title("training curves")
    for b, (label, res) in zip(axes[0][1:], results.items()):
        for i, scheme in enumerate(SCHEMES):
            acc = np.array([[run[(scheme, n)] for n in steps_list] for run in res["rediscretised"]])
            b.errorbar(steps_list, 100 * acc.mean(0), yerr=100 * acc.std(0) if len(acc) > 1 else None,
                       marker="o", capsize=3, color=f"C{i}", label=scheme)
        b.set_xscale("log", base=2)
        b.set_xticks(steps_list)
        b.set_xticklabels([str(n) for n in steps_list])
        b.set_ylim(80, 100)
        b.set_xlabel("steps N at evaluation")
        b.set_ylabel("test accuracy [%]")
        b.set_title(f"re-discretised; trained: {label}", fontsize=9)
        b.grid(alpha=0.3)
        b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_runs(args, data, train_steps, bar, label):
    """``args.runs`` trainings of one mode; per run the curve, the final test accuracy, the
    epoch at which 97% was first reached, and the re-discretisation table."""
    x_tr, y_tr, x_te, y_te = data
    batches = math.ceil(len(y_tr) / args.batch)
    out = {"finals": [], "curves": [], "rediscretised": [], "train_s": [], "reach97": []}
    model = None
    for run in range(args.runs):
        torch.manual_seed(args.seed + run)
        gen = torch.Generator().manual_seed(args.seed + run)
        model = SpliNetCNN(args.channels, args.knots, args.degree, args.steps, args.scheme)
        opt, sched = make_optimizer(model, args.lr, args.epochs, batches)
        curve = {"loss": [], "test_acc": []}
        t_run = time.perf_counter()
        hit = None
        for ep in range(args.epochs):
            curve["loss"].append(train_epoch(model, opt, sched, x_tr, y_tr, args.batch, gen, train_steps))
            curve["test_acc"].append(accuracy(model, x_te, y_te))
            if hit is None and curve["test_acc"][-1] >= 0.97:
                hit = (ep + 1, time.perf_counter() - t_run)
            bar.set_postfix(mode=label, run=run + 1, loss=f"{curve['loss'][-1]:.3f}",
                            test=f"{100 * curve['test_acc'][-1]:.1f}%")
            bar.update(1)
        out["train_s"].append(time.perf_counter() - t_run)
        out["reach97"].append(hit)
        out["finals"].append(curve["test_acc"][-1])
        out["curves"].append(curve)
        out["rediscretised"].append({(s, n): accuracy(model, x_te, y_te, n, s)
                                     for s in SCHEMES for n in args.steps_list})
    return out, model


def report(label, res, args, n_test, bold=None) -> str:
    acc = common.stats(res["finals"])
    lines = [f"### Trained with {label}", "",
             f"Test accuracy after {args.epochs} epochs, evaluated with the training scheme at N = {args.steps} "
             f"({args.runs} run(s), {n_test} test images): mean {100 * acc['mean']:.2f}%, "
             f"min {100 * acc['min']:.2f}%, max {100 * acc['max']:.2f}%; "
             f"training time per run {statistics.mean(res['train_s']):.0f} s."]
    hits = [h for h in res["reach97"] if h is not None]
    lines.append(f"97% test accuracy first reached in {len(hits)} of {args.runs} run(s)"
                 + (f", after {statistics.mean(h[0] for h in hits):.1f} epochs / "
                    f"{statistics.mean(h[1] for h in hits):.0f} s on average." if hits else "."))
    lines += ["", "Re-discretised: test accuracy at other step counts and schemes (mean over runs"
              + ("; bold: the training discretisation" if bold else "") + "):", "",
              "| scheme | " + " | ".join(f"N = {n}" for n in args.steps_list) + " |",
              "|---|" + "---|" * len(args.steps_list)]
    for s in SCHEMES:
        cells = []
        for n in args.steps_list:
            cell = f"{100 * statistics.mean(r[(s, n)] for r in res['rediscretised']):.1f}%"
            cells.append(f"**{cell}**" if bold == (s, n) else cell)
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    def extra(p):
        p.add_argument("--channels", type=int, default=16, help="channels of the first block (default 16)")
        p.add_argument("--knots", type=int, default=4, help="knot intervals L of each block (default 4)")
        p.add_argument("--degree", type=int, default=2, help="spline degree d (default 2)")
        p.add_argument("--steps", type=int, default=8,
                       help="step count N of the fixed mode, and of every test-accuracy figure (default 8)")
        p.add_argument("--scheme", default="euler", choices=SCHEMES, help="training scheme (default euler)")
        p.add_argument("--train-steps", default="4,16", metavar="LO,HI",
                       help="the random mode draws each batch's step count uniformly from LO..HI (default 4,16)")
        p.add_argument("--modes", default="fixed,random",
                       help="comma list of training modes: fixed (N = --steps), random (--train-steps)")
        p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
        p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
        p.add_argument("--timing-rounds", type=int, default=2,
                       help="interleaved fused/reference epochs timed after training (default 2)")

    args = common.parse_args(__doc__.splitlines()[0], argv, runs=1, epochs=30, smoke_runs=1, smoke_epochs=1,
                             threads=torch.get_num_threads(), threads_help="all cores", extra=extra)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("fixed", "random") for m in modes):
        raise SystemExit(f"--modes must be a comma list of fixed, random; got {args.modes!r}")
    lo, hi = parse_range(args.train_steps)
    timer = common.Timer().__enter__()
    data = load_data()
    if args.smoke:  # seconds: a slice of the data
        data = (data[0][:128], data[1][:128], data[2][:64], data[3][:64])
    args.steps_list = [2, 4, 8, 16, 32] if not args.smoke else [2, 8]
    n_test = len(data[3])

    labels = {"fixed": f"N = {args.steps}, {args.scheme}", "random": f"N ~ U{{{lo}..{hi}}} per batch, {args.scheme}"}
    results, model = {}, None
    bar = common.progress(len(modes) * args.runs * args.epochs, "digits", args)
    for mode in modes:
        results[labels[mode]], model = train_runs(args, data, None if mode == "fixed" else (lo, hi), bar, mode)
    bar.close()
    rounds = 1 if args.smoke else max(1, args.timing_rounds)
    times = epoch_times(model, data, args, rounds)
    elapsed = timer.elapsed

    fused = "cpu" if "cpu" in sc.available_backends() else "reference"
    speed = (f"| backend | s / epoch | vs reference |\n|---|---|---|\n"
             f"| fused (`auto`, here `{fused}`) | {times['fused']:.2f} | {times['reference'] / times['fused']:.2f}x |\n"
             f"| reference (pure PyTorch) | {times['reference']:.2f} | 1.00x |")
    sections = ["## Accuracy and re-discretisation"]
    for mode in modes:
        label = labels[mode]
        sections.append(report(label, results[label], args, n_test,
                               bold=(args.scheme, args.steps) if mode == "fixed" else None))
    sections += [f"## Time per training epoch, fused vs reference\n\nThe same run, interleaved (fused, "
                 f"reference, fused, ...), median of {rounds} epoch(s) each, the whole training step "
                 f"(lift, both blocks, head, loss, Adam).\n\n{speed}",
                 common.machine_line(elapsed)]
    notes = ["Not a reproduction of a table of the paper: a real-data check of the layers and of the "
             "continuous-depth property (the SpliNet paper's section 2; Queiruga et al.'s re-discretisation).",
             "Data: scikit-learn's load_digits (1797 images, 8x8, 16 grey levels), a fixed stratified "
             "80/20 split, pixels standardised with the training set's statistics; no augmentation.",
             f"Model: lift Conv2d(1, {args.channels}, 3) + ReLU, SplineODEConv2d({args.channels}, 3x3, ReLU), "
             f"avg-pool 2, Conv2d 1x1 to {2 * args.channels}, SplineODEConv2d({2 * args.channels}, 3x3, ReLU), "
             f"global average pool, Linear({2 * args.channels}, 10); each block L = {args.knots} knot "
             f"intervals, degree {args.degree}, horizon 1.",
             f"Training: Adam, one-cycle learning rate peaking at {args.lr:g}, batch {args.batch}, "
             f"cross-entropy, {args.epochs} epochs per run and mode."]
    md = common.write_markdown(f"{args.out}/digits.md", "Digits (scikit-learn load_digits) with a SpliNet CNN",
                               sections, notes, common.command_line("digits.py", argv))
    plot(f"{args.out}/digits.png", results, args.steps_list)
    print(md)
    return {"results": results, "epoch_times": times, "wall_s": elapsed}


if __name__ == "__main__":
    main()
