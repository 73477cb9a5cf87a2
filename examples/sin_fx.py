"""Paper section 4.1.1 / Table 1: learn sin(f x) on [-pi, pi], f = 1, 2, 5, with a ResNet,
an ODEnet and SpliNets of degree 1, 2, 3 over random hyperparameters (section 4.2);
statistics of the validation error.

    python examples/sin_fx.py                 # default reduced run (~3-4 min on 2 CPU cores)
    python examples/sin_fx.py --runs 100      # the paper's run count
    python examples/sin_fx.py --smoke         # seconds (CI)

Writes <out>/sin_fx.md (tables beside the paper's) and <out>/sin_fx.png.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import sc  # noqa: E402

WIDTH = 4          # paper: m = 4, input replicated x(0) = [1, 1, 1, 1]^T x
STEPS = 100        # paper: h = 0.01, N = 100 for the spline-based networks
T = 5.0            # horizon of ODEnet / SpliNet (not given in the paper; see the notes)
BATCH = 10         # mini-batch size (paper: "mini-batches of various sizes")
N_VAL = 200        # validation points (not given in the paper)
FREQS = (1, 2, 5)

# Table 1 of the paper: mean, std, min, max of the validation error over 100 runs.
PAPER = {
    "sin(x)": {
        "ResNet": [1.8e-2, 4.7e-2, 4.2e-7, 2.0e-1], "ODEnet": [3.5e-5, 1.2e-4, 2.1e-6, 1.1e-3],
        "SpliNet, d = 1": [2.4e-5, 2.2e-5, 2.9e-6, 1.3e-4], "SpliNet, d = 2": [2.2e-5, 2.0e-5, 6.8e-7, 1.1e-4],
        "SpliNet, d = 3": [2.8e-5, 3.4e-5, 2.4e-6, 2.6e-4]},
    "sin(2x)": {
        "ResNet": [8.9e-2, 2.2e-1, 2.3e-6, 6.6e-2], "ODEnet": [4.1e-4, 8.3e-4, 1.8e-6, 3.2e-3],
        "SpliNet, d = 1": [4.5e-5, 8.8e-5, 1.4e-6, 7.6e-4], "SpliNet, d = 2": [3.8e-5, 8.3e-5, 7.9e-7, 6.7e-4],
        "SpliNet, d = 3": [4.6e-5, 2.2e-4, 9.3e-7, 1.2e-3]},
    "sin(5x)": {
        "ResNet": [4.7e-2, 1.0e-1, 9.5e-6, 3.5e-1], "ODEnet": [1.0e-2, 2.9e-2, 8.5e-6, 1.8e-1],
        "SpliNet, d = 1": [1.2e-3, 1.8e-3, 6.5e-7, 1.8e-2], "SpliNet, d = 2": [7.4e-3, 4.7e-2, 7.2e-7, 4.2e-1],
        "SpliNet, d = 3": [7.1e-3, 4.6e-2, 6.4e-7, 4.3e-1]},
}


class SinNet(nn.Module):
    """x (B,) -> replicate to (B, 4) -> SpliNet ODE (tanh) -> mean over the width (eq. 25)."""

    def __init__(self, knots: int, degree: int, steps: int, scale: float, amplitude: float):
        super().__init__()
        self.ode = sc.SplineODE(WIDTH, knots, degree, steps, activation="tanh", scale=scale,
                                init_amplitude=amplitude, backend="auto")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ode(x[:, None].expand(-1, WIDTH).contiguous()).mean(1)


def loss_fn(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (pred - y).square().mean()  # eq. 25, averaged over the points


def train_one(arch: dict, hp: dict, xtr, ytr, xva, yva, epochs: int, seed: int) -> float:
    """Adam on mini-batches + gamma * Tikhonov; returns the validation error (eq. 25 mean)
    or nan when training diverged."""
    torch.manual_seed(seed)
    model = SinNet(arch["knots"], arch["degree"], arch["steps"], arch["scale"], hp["amplitude"])
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    g = torch.Generator().manual_seed(seed)
    n = xtr.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, BATCH):
            idx = perm[i:i + BATCH]
            loss = loss_fn(model(xtr[idx]), ytr[idx]) + hp["gamma"] * sc.tikhonov(model)
            if not torch.isfinite(loss):
                return math.nan
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        err = float(loss_fn(model(xva), yva))
    return err if math.isfinite(err) else math.nan


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = common.parse_args(__doc__.splitlines()[0], argv, runs=10, epochs=400, smoke_runs=1, smoke_epochs=2,
                             extra=lambda p: p.add_argument("--freqs", type=int, nargs="+", default=list(FREQS)))
    rng = np.random.default_rng(args.seed)
    hps = [common.sample_hparams(rng) for _ in range(args.runs)]
    results = {}
    with common.Timer() as timer:
        bar = common.progress(len(args.freqs) * args.runs * 5, "sin(fx)", args)
        for f in args.freqs:
            case = "sin(x)" if f == 1 else f"sin({f}x)"
            gen = torch.Generator().manual_seed(1000 + f)
            xtr = (torch.rand(20 * f, generator=gen) * 2 - 1) * math.pi   # paper: 20 f uniformly distributed points
            xva = (torch.rand(N_VAL, generator=gen) * 2 - 1) * math.pi
            ytr, yva = torch.sin(f * xtr), torch.sin(f * xva)
            errs = {name: [] for name in common.architectures(2, STEPS, T)}
            for r, hp in enumerate(hps):
                for name, arch in common.architectures(hp["L"], STEPS, T).items():
                    bar.set_postfix_str(f"{case} run {r + 1} {name}")
                    errs[name].append(train_one(arch, hp, xtr, ytr, xva, yva, args.epochs, args.seed * 7919 + r))
                    bar.update(1)
            results[case] = {name: common.stats(v) for name, v in errs.items()}
            results[case]["_raw"] = errs
        bar.close()

    sections, panels = [], {}
    for case, res in results.items():
        ours = {k: v for k, v in res.items() if not k.startswith("_")}
        panels[case] = ours
        sections.append(common.stats_table(f"{case} validation error", ours, PAPER.get(case, {})))
    sections.append("![validation error](sin_fx.png)")
    failed = sum(s["failed"] for res in panels.values() for s in res.values())
    notes = [
        f"**Run count**: {args.runs} training runs per network and frequency (paper: 100), each with "
        f"{args.epochs} epochs; the paper does not state its epoch count. Reduced so that the script runs in a "
        f"few minutes on a 2-core CPU: means, std and especially min/max over {args.runs} runs are noisy "
        f"(the paper's max is the worst of 100 draws).",
        "**Hyperparameters**: each run draws learning rate in [1e-3, 1e-1], Tikhonov gamma in [1e-10, 1e-4], "
        "init amplitude in [1e-3, 1] (all log-uniform; the paper gives only the ranges) and L in {2..15}; "
        "the same draw (and seed) is used for all five networks of a run, so the comparison is paired.",
        f"**Networks** (paper section 4.2, Remark 1): ResNet = SplineODE(d=1, knots=steps=L, scale=L), i.e. h = 1; "
        f"ODEnet = the same with scale T = {T:g} (h = T/L); SpliNet d = 1, 2, 3: L knot intervals, N = {STEPS} "
        f"forward-Euler steps, scale T = {T:g}. Width 4, input replicated, tanh, output = mean over the width "
        f"(eq. 25), no output layer, biases in time like the weights.",
        f"**Time horizon T = {T:g}**: the paper does not state T. With tanh the output can move by at most T "
        f"from the input (its section 4.4), and |sin(fx) - x| reaches pi + 1 ~ 4.14, so T must exceed that.",
        f"**Training**: Adam (PyTorch defaults betas=(0.9, 0.999)) on mini-batches of {BATCH} (paper: 'various "
        f"sizes'), loss eq. 25 averaged over the batch + gamma * sum of squared spline coefficients "
        f"(`splinet_cuda.tikhonov`), float32, no learning-rate schedule. Training data: 20f points uniform random "
        f"in [-pi, pi]; validation error: eq. 25 averaged over {N_VAL} further random points (the paper does not "
        f"describe its validation set).",
        f"**Diverged** runs (non-finite loss; typical for the ResNet at large amplitude and L, whose step is h = 1) "
        f"are left out of the statistics and counted in the last column ({failed} in total).",
        f"**Under-training, the main difference**: {args.epochs} epochs are a few hundred to a few thousand Adam "
        f"steps. Runs that drew a small learning rate and a small init amplitude have barely left the initial "
        f"output (errors ~1e-1), and these dominate our means, std and max; even the best runs (min) stop around "
        f"1e-4. The paper's means of 1e-5..1e-3 imply that nearly all of its runs converged, so it trained far "
        f"longer. At this budget the differences between the five networks are within the noise of "
        f"{args.runs} runs, and the paper's ranking (SpliNet < ODEnet < ResNet in mean and std) is not "
        f"reproduced; `--runs 100 --epochs 5000` (hours on this CPU) is the setting that could test it.",
        "The paper's sin(2x) ResNet row has max 6.6e-2 below its mean 8.9e-2; copied as printed.",
        common.machine_line(timer.elapsed),
    ]
    cmd = common.command_line("sin_fx.py", argv)
    text = common.write_markdown(os.path.join(args.out, "sin_fx.md"),
                                 "Table 1 reproduction: sin(fx), validation error", sections, notes, cmd)
    common.stats_plot(os.path.join(args.out, "sin_fx.png"), panels, ylabel="validation error", log=True,
                      paper=PAPER)
    print(text)
    return {"results": panels, "markdown": os.path.join(args.out, "sin_fx.md"),
            "plot": os.path.join(args.out, "sin_fx.png")}


if __name__ == "__main__":
    main()
