"""Paper section 4.1.2 / Table 2: classify points of [-3, 3]^2 into five level-set bands
of the peaks function with a ResNet, an ODEnet and SpliNets of degree 1, 2, 3 (width 5,
ReLU, softmax cross-entropy) over the paper's hyperparameter study, with the settings of the
authors' own code; validation accuracy statistics.

    python examples/peaks.py                       # default: 20 runs, ~4.5 min on one core
    python examples/peaks.py --runs 100 --jobs 2   # the paper's run count: 11 min on 2 cores
    python examples/peaks.py --smoke               # seconds (CI)
    python examples/peaks.py --together            # the runs of a network sharing L trained together

``--together`` groups the runs of each network by their knot count L (every other shape is
common to a network) and trains each group as one vmapped model: one fused kernel call per
step for all its runs, ``splinet_cuda.StackedAdam`` with each run's learning rate, and its
``active`` mask for each run's early stop. Each run keeps its seed (initialisation, batch
order), Tikhonov weight, amplitude and stopping, and ends where it ends trained alone, to
rounding (``tests/test_examples.py``). L is sampled from {2, ..., 15}, so 100 runs make 14
groups of 7-8. ``--max-steps S`` stops every run after S Adam steps and prints the training
steps per second, e.g. the study of the authors' driver over its first 2000 steps, one run
at a time against together:

    python examples/peaks.py --runs 100 --batch 5 --epochs 1000 --nets "SpliNet, d = 2" --max-steps 2000
    python examples/peaks.py --runs 100 --batch 5 --epochs 1000 --nets "SpliNet, d = 2" --max-steps 2000 --together

Writes <out>/peaks.md, <out>/peaks.png (accuracy statistics) and <out>/peaks_data.png
(the classes and the best SpliNet's prediction).

Where each setting comes from ("paper": the SpliNet paper; file names: the authors' public
Julia code, splinenetwork/splinet):

- data: five classes = five equal-width value bands of MATLAB's peaks function between its
  minimum and maximum on a 256 x 256 grid of [-3, 3]^2; 1000 grid points per class (the
  authors' data set, examples/data/peaks, holds such 5000 points, balanced); shuffled, the
  first 1000 train and the next 1000 test (peaks.jl; paper: 1000 random training points);
- network: opening Dense(2, 5) and closing Dense(5, 5) layers with weights and biases
  amplitude * uniform[0, 1) (peaks.jl; the paper speaks of replication and a softmax), width
  5, ReLU, softmax cross-entropy (paper 4.1.2; peaks.jl);
- T = 1, h = 0.01, N = 100 for the SpliNets (paper 4.1.2: x(T = 1); hyperopt.jl's
  ``spline_hyperparam_tune(T=1.0, stepsize=0.01)``), learned time scale from 1 for ODEnet and
  SpliNets; ODEnet N = L, h = T/L; ResNet N = L, h = 1, scale not learned (hyperopt.jl);
- SpliNet and ODEnet: 100 epochs of batch 40, shuffled (peaks.jl's ``train_network``
  defaults; hyperopt.jl's ``main_hyperopt`` passes 1000 epochs of batch 5, 200 000 steps a run,
  which this 2-core machine cannot afford 400 times); ResNet: 100 epochs of batch 20
  (hyperopt.jl's ``resnet_hyperparam_tune``);
- accuracy: the best test accuracy over the epochs of a run; early stop when the epoch's mean
  gradient norm drops below 1e-4 (train.jl, peaks.jl);
- Adam; Tikhonov weight times the mean 2-norm of the parameter arrays (train.jl);
- hyperparameters: learning rate in [1e-3, 1e-1], Tikhonov weight in [1e-10, 1e-4], init
  amplitude in [1e-3, 1] (paper 4.2), Latin hypercube over log-spaced grids (hyperopt.jl), L
  in {2, ..., 15} (paper 4.2); SpliNet initialisation as in unified_spline_network.jl.

Neither gives the random seeds; we train in float32 (the authors' spline layers are Float64).
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import sc  # noqa: E402

WIDTH = 5
CLASSES = 5
T = 1.0             # paper 4.1.2: x(T = 1)
STEPS = 100         # h = 0.01 (paper 4.1.1; hyperopt.jl)
GRID = 256          # the authors' data: points of a 256 x 256 grid of [-3, 3]^2
PER_CLASS = 1000
N_TRAIN = N_TEST = 1000
EPOCHS, BATCH = 100, 40            # peaks.jl train_network
RESNET_EPOCHS, RESNET_BATCH = 100, 20   # hyperopt.jl (ResNet)
GNORM_TOL = 1e-4                   # peaks.jl

# Table 2 of the paper: validation accuracy over 100 runs (mean, std, min, max).
PAPER = {"Peaks": {
    "ResNet": [0.959, 0.017, 0.885, 0.982], "ODEnet": [0.964, 0.016, 0.893, 0.983],
    "SpliNet, d = 1": [0.970, 0.008, 0.937, 0.987], "SpliNet, d = 2": [0.971, 0.011, 0.908, 0.986],
    "SpliNet, d = 3": [0.970, 0.010, 0.929, 0.985]}}


def peaks(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MATLAB's peaks function."""
    return (3 * (1 - x) ** 2 * torch.exp(-x ** 2 - (y + 1) ** 2)
            - 10 * (x / 5 - x ** 3 - y ** 5) * torch.exp(-x ** 2 - y ** 2)
            - torch.exp(-(x + 1) ** 2 - y ** 2) / 3)


def band_edges() -> torch.Tensor:
    """Five equal-width value bands between min and max of peaks on the 256 x 256 grid."""
    g = torch.linspace(-3, 3, GRID, dtype=torch.float64)
    z = peaks(g[:, None], g[None, :])
    return torch.linspace(float(z.min()), float(z.max()), CLASSES + 1, dtype=torch.float64)


def labels(p: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    z = peaks(p[:, 0].double(), p[:, 1].double())
    return torch.bucketize(z, edges[1:-1]).long()


def make_data(seed: int = 0):
    """The authors' construction: 1000 grid points per class (with replacement), shuffled;
    returns (train points, train labels), (test points, test labels), edges."""
    edges = band_edges()
    g1 = torch.linspace(-3, 3, GRID, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g1, g1, indexing="ij"), -1).reshape(-1, 2)
    lab = labels(grid, edges)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(lab == c).flatten()[
        torch.randint(int((lab == c).sum()), (PER_CLASS,), generator=gen)] for c in range(CLASSES)])
    idx = idx[torch.randperm(idx.numel(), generator=gen)]
    p, y = grid[idx].float(), lab[idx]
    return (p[:N_TRAIN], y[:N_TRAIN]), (p[N_TRAIN:N_TRAIN + N_TEST], y[N_TRAIN:N_TRAIN + N_TEST]), edges


class PeaksNet(nn.Module):
    """(x, y) -> Dense(2, 5) -> SpliNet ODE (ReLU) -> Dense(5, 5) -> logits."""

    def __init__(self, knots: int, degree: int, steps: int, scale: float, learn_scale: bool, amplitude: float):
        super().__init__()
        self.lift = nn.Linear(2, WIDTH)
        self.ode = sc.SplineODE(WIDTH, knots, degree, steps, activation="relu", scale=scale,
                                learn_scale=learn_scale, backend="auto")
        self.head = nn.Linear(WIDTH, CLASSES)
        common.authors_init(self.ode, amplitude)
        with torch.no_grad():  # peaks.jl: amplitude .* rand(...)
            for p in (*self.lift.parameters(), *self.head.parameters()):
                p.uniform_(0.0, amplitude)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return self.head(self.ode(self.lift(p)))


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y).float().mean()


def make_model(name: str, hp: dict, seed: int) -> PeaksNet:
    """A run's network, initialised from its seed and amplitude."""
    arch = common.architectures(hp["L"], STEPS, T)[name]
    torch.manual_seed(seed)
    return PeaksNet(arch["knots"], arch["degree"], arch["steps"], arch["scale"], arch["learn_scale"],
                    hp["amplitude"])


def budget(name: str, epochs: int, batch: int):
    """(epochs, batch) of a network: ResNet runs hyperopt.jl's own."""
    return (min(epochs, RESNET_EPOCHS), RESNET_BATCH) if name == "ResNet" else (epochs, batch)


def train_one(name: str, hp: dict, epochs: int, batch: int, seed: int, max_steps: Optional[int] = None):
    """One training run; returns (best validation accuracy or nan, epochs run, seconds,
    the model's state for SpliNets)."""
    t0 = time.perf_counter()
    model = make_model(name, hp, seed)
    train, test, _ = make_data()
    epochs, batch = budget(name, epochs, batch)
    acc, ran = common.train_authors(
        model, nn.functional.cross_entropy, accuracy, train, test, epochs=epochs, batch=batch,
        lr=hp["lr"], gamma=hp["gamma"], gnorm_tol=GNORM_TOL, shuffle=True, seed=seed, maximise=True,
        max_steps=max_steps)
    state = model.state_dict() if name.startswith("SpliNet") else None
    return acc, ran, time.perf_counter() - t0, state


def train_group(name: str, hps: Sequence[dict], epochs: int, batch: int, seeds: Sequence[int],
                max_steps: Optional[int] = None):
    """The runs of one network that share L (so every shape) trained together, each with its
    own seed, learning rate, Tikhonov weight, amplitude and stopping
    (``common.train_authors_together``); returns ``train_one``'s tuple per run, the seconds
    being the group's wall time shared out evenly."""
    t0 = time.perf_counter()
    models = [make_model(name, hp, seed) for hp, seed in zip(hps, seeds)]
    train, test, _ = make_data()
    epochs, batch = budget(name, epochs, batch)
    out = common.train_authors_together(
        models, nn.functional.cross_entropy, accuracy, train, test, epochs=epochs, batch=batch,
        lr=[hp["lr"] for hp in hps], gamma=[hp["gamma"] for hp in hps], gnorm_tol=GNORM_TOL, shuffle=True,
        seeds=list(seeds), maximise=True, max_steps=max_steps)
    share = (time.perf_counter() - t0) / len(hps)
    return [(acc, ran, share, state if name.startswith("SpliNet") else None) for acc, ran, state in out]


def groups(tasks: Sequence[tuple]):
    """The tasks of one network and one L (so of one shape): (the task indices of each group,
    one ``train_group`` task per group)."""
    by_shape = {}
    for i, (name, hp, *_rest) in enumerate(tasks):
        by_shape.setdefault((name, hp["L"]), []).append(i)
    idx = list(by_shape.values())
    return idx, [(tasks[g[0]][0], [tasks[i][1] for i in g], tasks[g[0]][2], tasks[g[0]][3],
                  [tasks[i][4] for i in g], tasks[g[0]][5]) for g in idx]


def plot_data(path: str, edges, model: Optional[nn.Module], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.linspace(-3, 3, 200)
    P = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    fig, axes = plt.subplots(1, 2 if model is not None else 1, figsize=(8 if model is not None else 4, 3.6),
                             squeeze=False)
    kw = dict(origin="lower", extent=(-3, 3, -3, 3), cmap="viridis", vmin=0, vmax=CLASSES - 1)
    axes[0][0].imshow(labels(P, edges).reshape(200, 200).numpy(), **kw)
    axes[0][0].set_title("peaks: five equal value bands")
    if model is not None:
        with torch.no_grad():
            pred = model(P).argmax(1).reshape(200, 200).numpy()
        axes[0][1].imshow(pred, **kw)
        axes[0][1].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    all_names = list(common.architectures(2, STEPS, T))

    def extra(p):
        p.add_argument("--batch", type=int, default=BATCH,
                       help=f"SpliNet/ODEnet mini-batch (default {BATCH}, peaks.jl; the authors' study driver: 5)")
        p.add_argument("--together", action="store_true",
                       help="train the runs of a network that share L together: one vmapped model per group, "
                            "one fused kernel call a step for all its runs, StackedAdam with per-run settings "
                            "and early stopping (each run as it trains alone, to rounding)")
        p.add_argument("--max-steps", type=int, default=None, metavar="S",
                       help="stop every run after S Adam steps (for timing; prints training steps per second)")
        p.add_argument("--nets", nargs="+", default=all_names, choices=all_names, metavar="NAME",
                       help="networks to train (default all five: " + ", ".join(repr(n) for n in all_names) + ")")

    args = common.parse_args(__doc__.splitlines()[0], argv, runs=20, epochs=EPOCHS, smoke_runs=1, smoke_epochs=1,
                             jobs=True, extra=extra)
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    hps = common.latin_hypercube_hparams(args.runs, np.random.default_rng(args.seed))
    names = [n for n in all_names if n in args.nets]
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    tasks = [(name, hp, args.epochs, args.batch, args.seed * 7919 + r, args.max_steps)
             for r, hp in enumerate(hps) for name in names]
    with common.Timer() as timer:
        if args.together:
            idx, group_tasks = groups(tasks)
            bar = common.progress(len(group_tasks), "peaks (groups of runs sharing L)", args)
            out = [None] * len(tasks)
            for g, res in zip(idx, common.run_tasks(train_group, group_tasks, args.jobs, bar)):
                for i, r in zip(g, res):
                    out[i] = r
        else:
            bar = common.progress(len(tasks), "peaks", args)
            out = common.run_tasks(train_one, tasks, args.jobs, bar)
        bar.close()
    # Adam steps taken (a run that diverged mid-epoch is counted to its last full epoch)
    steps = 0
    for t, o in zip(tasks, out):
        e, b = budget(t[0], t[2], t[3])
        per_epoch = math.ceil(N_TRAIN / b)
        steps += min(o[1] * per_epoch, t[5] if t[5] is not None else e * per_epoch)
    rate = f"{steps} training steps in {timer.elapsed:.1f} s: {steps / timer.elapsed:.1f} steps/s " + \
        ("(runs sharing L trained together)" if args.together else "(one run at a time)")
    print(rate)
    accs = {name: [o[0] for t, o in zip(tasks, out) if t[0] == name] for name in names}
    ours = {name: common.stats(v) for name, v in accs.items()}
    best_i = max((i for i, (t, o) in enumerate(zip(tasks, out)) if o[3] is not None and math.isfinite(o[0])),
                 key=lambda i: out[i][0], default=None)
    best_model, best_title = None, ""
    if best_i is not None:
        name, hp = tasks[best_i][0], tasks[best_i][1]
        arch = common.architectures(hp["L"], STEPS, T)[name]
        best_model = PeaksNet(arch["knots"], arch["degree"], arch["steps"], arch["scale"], arch["learn_scale"], 1.0)
        best_model.load_state_dict(out[best_i][3])
        best_title = f"best SpliNet run ({name}, L = {hp['L']}: val. acc. {100 * out[best_i][0]:.1f}%)"
    early = sum(1 for t, o in zip(tasks, out) if o[1] < min(t[2], RESNET_EPOCHS if t[0] == "ResNet" else t[2]))
    paper = {n: v for n, v in PAPER["Peaks"].items() if n in names}
    cpu_s = sum(o[2] for o in out)
    spline_s = [o[2] for t, o in zip(tasks, out) if t[0].startswith("SpliNet")]
    (_, ytr), _, edges = make_data()
    counts = torch.bincount(ytr, minlength=CLASSES).tolist()
    table = common.stats_table("Peaks validation accuracy", ours, paper, fmt=common.fmt_pct)
    failed = sum(s["failed"] for s in ours.values())
    notes = [
        f"**Runs**: {args.runs} per network (paper: 100), the five networks of a run trained with the same "
        f"Latin-hypercube draw of learning rate, Tikhonov weight, init amplitude and L (a paired comparison) and "
        f"the same seed." + (f" Min, max and std over {args.runs} runs are noisier than over 100."
                             if args.runs < 100 else ""),
        f"**Settings**: the authors' (module docstring of `examples/peaks.py`, each with its source): Dense(2, 5) "
        f"lift, width 5, ReLU, Dense(5, 5) head, T = 1, N = {STEPS} SpliNet steps, learned time scale from 1, "
        f"SpliNet/ODEnet {args.epochs} epochs of batch {args.batch}, ResNet {min(args.epochs, RESNET_EPOCHS)} epochs "
        f"of batch {RESNET_BATCH}, Adam, Tikhonov weight times the mean 2-norm of the parameter arrays, early "
        f"stop at mean gradient norm < {GNORM_TOL:g} ({early} of {len(tasks)} runs stopped early)."
        + ("" if (args.epochs, args.batch) == (1000, 5) else
           f" The authors' hyperparameter driver trains 1000 epochs of batch 5 (200 000 Adam steps a run); "
           f"this run takes {args.epochs * math.ceil(N_TRAIN / args.batch)} steps a run."),
        f"**Data**: five equal-width value bands of peaks on a {GRID} x {GRID} grid (edges "
        f"{', '.join(f'{e:.2f}' for e in edges.tolist())}), {PER_CLASS} grid points per class drawn with "
        f"replacement, shuffled; {N_TRAIN} train (class counts {counts}) and {N_TEST} test points.",
        "**Accuracy** is, as in the authors' code, the best test accuracy over the epochs of a run.",
        "**Not given by the paper or its code**: the random seeds (and so the exact points drawn).",
        f"**Diverged** runs (non-finite loss before the first epoch ended) are left out and counted ({failed}).",
        f"**Time**: {timer.elapsed:.0f} s wall with {args.jobs} worker process(es) of one thread, "
        + ("the runs of a network that share L trained together (`--together`; a run's time below is its "
           "share of its group's), " if args.together else "")
        + f"{rate}; "
        f"{cpu_s:.0f} s of training in all; a SpliNet run ({args.epochs} epochs at N = {STEPS}) took "
        f"{sum(spline_s) / max(len(spline_s), 1):.1f} s on average.",
        common.machine_line(timer.elapsed),
    ]
    cmd = common.command_line("peaks.py", argv)
    text = common.write_markdown(os.path.join(args.out, "peaks.md"), "Table 2 reproduction: Peaks, validation accuracy",
                                 [table, "![accuracy](peaks.png)  ![data](peaks_data.png)"], notes, cmd)
    common.stats_plot(os.path.join(args.out, "peaks.png"), {"Peaks": ours}, ylabel="validation accuracy",
                      log=False, paper={"Peaks": paper})
    plot_data(os.path.join(args.out, "peaks_data.png"), edges, best_model, best_title)
    print(text)
    return {"results": ours, "wall": timer.elapsed, "markdown": os.path.join(args.out, "peaks.md"),
            "plot": os.path.join(args.out, "peaks.png")}


if __name__ == "__main__":
    main()
