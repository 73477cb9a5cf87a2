"""Shared helpers of the paper reproductions in examples/ (argument parsing, the random
hyperparameter search of the paper's section 4.2, statistics, markdown tables beside the
paper's numbers, plots).

Every script exposes ``main(argv=None) -> dict`` so that tests can call it in-process.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(HERE))

import splinet_cuda as sc  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results")

# Paper section 4.2: the hyperparameter ranges of the random search. The authors' driver of
# that study (src/hyperopt.jl of their public code, splinenetwork/splinet) samples each range
# on a grid of log-spaced points, 10 .^ LinRange(lo, hi, runs), with Hyperopt.jl's Latin
# hypercube sampler (CLHSampler): every grid value is used exactly once over the runs.
LR_RANGE = (1e-3, 1e-1)
GAMMA_RANGE = (1e-10, 1e-4)
AMPLITUDE_RANGE = (1e-3, 1.0)
L_VALUES = tuple(range(2, 16))  # paper section 4.2: L in {2, ..., 15} for sin(fx) and Peaks


def parse_args(description: str, argv: Optional[Sequence[str]], *, runs: int, epochs: int,
               smoke_runs: int = 2, smoke_epochs: int = 3, threads: int = 1,
               threads_help: str = "the problems are tiny, threads only add overhead",
               extra=None, jobs: bool = False) -> argparse.Namespace:
    """--runs, --epochs, --smoke, --out, --seed, --threads (+ --jobs, + ``extra(parser)``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--runs", type=int, default=None, help=f"training runs per model (default {runs}; paper: 100)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default {epochs})")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny run for CI: {smoke_runs} runs, {smoke_epochs} epochs (seconds)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default examples/results)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hyperparameter draws and initialisations")
    p.add_argument("--threads", type=int, default=threads,
                   help=f"torch CPU threads (default {threads}: {threads_help})")
    if jobs:
        p.add_argument("--jobs", type=int, default=1,
                       help="training runs in parallel worker processes of one thread each (default 1; "
                            "the authors ran their study on 4 workers)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    if extra is not None:
        extra(p)
    a = p.parse_args(argv)
    if a.runs is None:
        a.runs = smoke_runs if a.smoke else runs
    if a.epochs is None:
        a.epochs = smoke_epochs if a.smoke else epochs
    if a.runs < 1 or a.epochs < 1:
        p.error("--runs and --epochs must be >= 1")
    if jobs and a.jobs < 1:
        p.error("--jobs must be >= 1")
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    return a


def progress(total: int, desc: str, args):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=args.no_progress, dynamic_ncols=True, leave=True)


def _log_grid(lo: float, hi: float, n: int) -> np.ndarray:
    if n == 1:
        return np.array([math.sqrt(lo * hi)])
    return np.logspace(math.log10(lo), math.log10(hi), n)


def latin_hypercube_hparams(runs: int, rng: np.random.Generator,
                            L_values: Sequence[int] = L_VALUES) -> List[Dict[str, float]]:
    """The authors' sampling of the study (hyperopt.jl): ``runs`` draws in which every value of
    the log-spaced grids of learning rate (1e-3..1e-1), Tikhonov weight (1e-10..1e-4) and init
    amplitude (1e-3..1) appears exactly once, in independent random orders (a Latin
    hypercube), and the categorical L cycles through ``L_values`` in random order."""
    lr = rng.permutation(_log_grid(*LR_RANGE, runs))
    gamma = rng.permutation(_log_grid(*GAMMA_RANGE, runs))
    amp = rng.permutation(_log_grid(*AMPLITUDE_RANGE, runs))
    Ls = rng.permutation(np.resize(np.asarray(L_values), runs))
    return [{"lr": float(lr[i]), "gamma": float(gamma[i]), "amplitude": float(amp[i]), "L": int(Ls[i])}
            for i in range(runs)]


def architectures(L: int, steps: int, T: float) -> Dict[str, dict]:
    """The five networks of Tables 1-2 as SplineODE settings (paper section 4.2, Remark 1,
    and the authors' hyperopt.jl):

    - ResNet: one weight per layer (d = 1, knots = steps = L) and step h = 1, i.e. horizon
      ``scale = L``, not learned (hyperopt.jl: "Don't learn init_lambda for this one");
    - ODEnet: the same layers with horizon T (h = T/L) and a learned time scale;
    - SpliNet d = 1, 2, 3: L knot intervals, ``steps`` time steps over horizon T, learned time
      scale (the authors' lambda, initialised to 1, is trainable in their code)."""
    return {
        "ResNet": dict(knots=L, degree=1, steps=L, scale=float(L), learn_scale=False),
        "ODEnet": dict(knots=L, degree=1, steps=L, scale=float(T), learn_scale=True),
        "SpliNet, d = 1": dict(knots=L, degree=1, steps=steps, scale=float(T), learn_scale=True),
        "SpliNet, d = 2": dict(knots=L, degree=2, steps=steps, scale=float(T), learn_scale=True),
        "SpliNet, d = 3": dict(knots=L, degree=3, steps=steps, scale=float(T), learn_scale=True),
    }


def authors_init(ode: torch.nn.Module, amplitude: float) -> None:
    """The authors' initialisation (unified_spline_network.jl, ``glorot_uniform_tensor`` times
    the amplitude): weight coefficients uniform in +-amplitude * sqrt(3 / m), bias
    coefficients in +-amplitude * sqrt(6 / m), m the width."""
    m = ode.weight.shape[-1]
    with torch.no_grad():
        ode.weight.uniform_(-amplitude * math.sqrt(3.0 / m), amplitude * math.sqrt(3.0 / m))
        if ode.bias is not None:
            ode.bias.uniform_(-amplitude * math.sqrt(6.0 / m), amplitude * math.sqrt(6.0 / m))


def authors_regulariser(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The authors' Tikhonov term (train.jl: ``mean(norm, Flux.params(model))``): the mean over
    the trainable arrays of each one's 2-norm (not squared, unlike the paper's text)."""
    return torch.stack([p.norm() for p in params]).mean()


def train_authors(model: torch.nn.Module, loss_fn, metric_fn, train, test, *, epochs: int, batch: int,
                  lr: float, gamma: float, gnorm_tol: float, shuffle: bool, seed: int, maximise: bool,
                  max_steps: Optional[int] = None):
    """The authors' training loop (train.jl): Adam on mini-batches of ``loss_fn + gamma *
    authors_regulariser``; after every epoch the test metric is evaluated and the best value
    over the epochs is what the run reports; training stops early once the epoch's mean over
    batches of the summed gradient 2-norms falls below ``gnorm_tol``. ``max_steps`` (not the
    authors'; for timing) ends the run after that many Adam steps, the cut epoch's metric
    counted. Returns (best metric or nan when no epoch ended finite, epochs run)."""
    xtr, ytr = train
    xte, yte = test
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # builds without the fused CPU Adam
        opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = xtr.shape[0]
    best = math.nan
    steps = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        gnorm, batches = 0.0, 0
        for i in range(0, n, batch):
            if max_steps is not None and steps >= max_steps:
                break
            idx = order[i:i + batch]
            loss = loss_fn(model(xtr[idx]), ytr[idx]) + gamma * authors_regulariser(params)
            if not torch.isfinite(loss):
                return best, epoch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm += float(torch.stack([p.grad.norm() for p in params]).sum())
            opt.step()
            batches += 1
            steps += 1
        with torch.no_grad():
            metric = float(metric_fn(model(xte), yte))
        if math.isfinite(metric) and (math.isnan(best) or (metric > best if maximise else metric < best)):
            best = metric
        if gnorm / batches < gnorm_tol or (max_steps is not None and steps >= max_steps):
            return best, epoch + 1
    return best, epochs


def train_authors_together(models: Sequence[torch.nn.Module], loss_fn, metric_fn, train, test, *, epochs: int,
                           batch: int, lr: Sequence[float], gamma: Sequence[float], gnorm_tol, shuffle: bool,
                           seeds: Sequence[int], maximise: bool, max_steps: Optional[int] = None):
    """``train_authors`` for M models of one shape at once, each with its own learning rate,
    Tikhonov weight, seed (batch order) and stopping (``gnorm_tol`` a float or M values): the
    models are stacked (``torch.func.stack_module_state``), every step is one vmapped
    forward/backward of all of them (one fused kernel call of the SpliNet layer) and one
    :class:`splinet_cuda.StackedAdam` step whose ``active`` mask leaves the stopped runs as
    they stopped. Each run sees the batches, loss, stopping rule and best-metric bookkeeping of
    ``train_authors``, so it ends where it would alone, to rounding, not bit for bit (the
    vmapped linear layers, loss and norms, and torch's fused Adam against StackedAdam, round
    differently in the last bits). Returns a list of (best metric or nan, epochs run, final
    state_dict) per model."""
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    M = len(models)
    if not (len(lr) == len(gamma) == len(seeds) == M):
        raise ValueError("lr, gamma and seeds need one value per model")
    tols = [float(gnorm_tol)] * M if isinstance(gnorm_tol, (int, float)) else [float(t) for t in gnorm_tol]
    names = [k for k, p in models[0].named_parameters() if p.requires_grad]  # train_authors' params, in order
    params, buffers = stack_module_state(list(models))
    # parameters that do not train (none in the scripts' networks) go with the buffers
    buffers = {**buffers, **{k: v.detach() for k, v in params.items() if k not in names}}
    params = {k: v for k, v in params.items() if k in names}
    base = copy.deepcopy(models[0]).to("meta")
    xtr, ytr = train
    xte, yte = test
    gammas = torch.tensor([float(gm) for gm in gamma], dtype=torch.float64)

    def objective(p, b, gm, x, y):
        # gamma rounded to the parameters' dtype times the regulariser, as train_authors'
        # Python float times a tensor computes it
        reg = authors_regulariser([p[k] for k in names])
        return loss_fn(functional_call(base, (p, b), (x,)), y) + gm.to(reg.dtype) * reg

    batched = vmap(objective)  # every argument mapped: each run its own batch
    evaluate = vmap(lambda p, b: metric_fn(functional_call(base, (p, b), (xte,)), yte))
    opt = sc.StackedAdam(list(params.values()), lr=list(lr))
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    n = xtr.shape[0]
    active = [True] * M
    best = [math.nan] * M
    ran = [epochs] * M
    steps = 0
    for epoch in range(epochs):
        if not any(active):
            break
        order = torch.stack([torch.randperm(n, generator=g) if shuffle else torch.arange(n) for g in gens])
        gnorm, batches = [0.0] * M, 0
        for i in range(0, n, batch):
            if max_steps is not None and steps >= max_steps:
                break
            idx = order[:, i:i + batch]
            losses = batched(params, buffers, gammas, xtr[idx], ytr[idx])
            finite = torch.isfinite(losses).tolist()
            for r in range(M):
                if active[r] and not finite[r]:  # train_authors: return before this step
                    active[r], ran[r] = False, epoch
            if not any(active):
                break
            mask = torch.tensor(active)
            opt.zero_grad(set_to_none=True)
            torch.where(mask, losses, torch.zeros_like(losses)).sum().backward()
            norms = torch.stack([params[k].grad.reshape(M, -1).norm(dim=1) for k in names]).sum(0).tolist()
            for r in range(M):
                gnorm[r] += norms[r]
            opt.step(active=mask)
            batches += 1
            steps += 1
        if batches == 0:
            break
        with torch.no_grad():
            metrics = evaluate(params, buffers).tolist()
        for r in range(M):
            if not active[r]:
                continue
            m = float(metrics[r])
            if math.isfinite(m) and (math.isnan(best[r]) or (m > best[r] if maximise else m < best[r])):
                best[r] = m
            if gnorm[r] / batches < tols[r] or (max_steps is not None and steps >= max_steps):
                active[r], ran[r] = False, epoch + 1
    states = [{k: v[r].detach().clone() for k, v in {**params, **buffers}.items()} for r in range(M)]
    return [(best[r], ran[r], states[r]) for r in range(M)]


def run_tasks(fn, tasks: Sequence[tuple], jobs: int, bar) -> List:
    """``[fn(*t) for t in tasks]``, in ``jobs`` worker processes of one thread each when
    jobs > 1 (spawned: a forked OpenMP runtime can hang); updates the progress bar."""
    if jobs <= 1:
        out = []
        for t in tasks:
            out.append(fn(*t))
            bar.update(1)
        return out
    import concurrent.futures as cf
    import multiprocessing as mp
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = [pool.submit(fn, *t) for t in tasks]
        for _ in cf.as_completed(futures):
            bar.update(1)
        return [f.result() for f in futures]


def stats(values: Sequence[float]) -> Dict[str, float]:
    """mean/std/min/max over the finite values; ``failed`` counts the non-finite ones."""
    v = np.asarray(values, dtype=float)
    ok = v[np.isfinite(v)]
    if ok.size == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "failed": int(v.size)}
    return {"mean": float(ok.mean()), "std": float(ok.std(ddof=1)) if ok.size > 1 else 0.0,
            "min": float(ok.min()), "max": float(ok.max()), "failed": int(v.size - ok.size)}


def fmt_sci(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.1e}"


def fmt_pct(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{100 * x:.1f}%"


def stats_table(title: str, ours: Dict[str, Dict[str, float]], paper: Dict[str, Sequence[float]],
                fmt=fmt_sci, show_failed: bool = True) -> str:
    """A markdown table: per model our mean/std/min/max beside the paper's."""
    head = "| " + title + " | mean | std | min | max | paper mean | paper std | paper min | paper max |"
    if show_failed:
        head += " diverged |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in ours.items():
        p = paper.get(name, [math.nan] * 4)
        row = f"| {name} | " + " | ".join(fmt(s[k]) for k in ("mean", "std", "min", "max")) + " | "
        row += " | ".join(fmt(v) for v in p) + " |"
        if show_failed:
            row += f" {s.get('failed', 0)} |"
        lines.append(row)
    return "\n".join(lines)


def machine_line(elapsed: float) -> str:
    return (f"Run on {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
            f"backend `{'cpu' if 'cpu' in sc.available_backends() else 'reference'}` (via auto), {elapsed:.0f} s wall.")


def write_markdown(path: str, title: str, sections: List[str], notes: List[str], command: str) -> str:
    text = f"# {title}\n\nCommand: `{command}`\n\n" + "\n\n".join(sections)
    text += "\n\n## Notes: how this reproduction differs from the paper\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    with open(path, "w") as fh:
        fh.write(text)
    return text


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the output folder is machine-specific; leave it out of the recorded command
    clean, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if a.startswith("--out="):
            continue
        clean.append(a)
    return " ".join(["python", f"examples/{script}"] + clean)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __exit__(self, *exc):
        return False


def stats_plot(path: str, panels: Dict[str, Dict[str, Dict[str, float]]], *, ylabel: str, log: bool,
               paper: Optional[Dict[str, Dict[str, Sequence[float]]]] = None) -> None:
    """One panel per case: mean with std error bar and min/max band per model (like the
    paper's Fig. 5 left), the paper's means as crosses."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (case, ours) in zip(axes[0], panels.items()):
        names = list(ours)
        xs = np.arange(len(names))
        mean = np.array([ours[n]["mean"] for n in names])
        std = np.array([ours[n]["std"] for n in names])
        lo = np.array([ours[n]["min"] for n in names])
        hi = np.array([ours[n]["max"] for n in names])
        ax.fill_between(xs, lo, hi, color="C0", alpha=0.2, label="min-max (ours)")
        lower = np.minimum(std, mean * 0.999) if log else std
        ax.errorbar(xs, mean, yerr=[lower, std], fmt="o", color="C0", capsize=3, label="mean ± std (ours)")
        if paper is not None and case in paper:
            pm = [paper[case].get(n, [math.nan])[0] for n in names]
            ax.plot(xs, pm, "x", color="C3", ms=8, label="mean (paper)")
        ax.set_xticks(xs)
        ax.set_xticklabels([n.replace("SpliNet, ", "") for n in names], rotation=30)
        if log:
            ax.set_yscale("log")
        ax.set_title(case)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
