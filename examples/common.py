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

# Paper section 4.2: the hyperparameter ranges of the random search.
LR_RANGE = (1e-3, 1e-1)
GAMMA_RANGE = (1e-10, 1e-4)
AMPLITUDE_RANGE = (1e-3, 1.0)
L_RANGE = (2, 15)  # inclusive


def parse_args(description: str, argv: Optional[Sequence[str]], *, runs: int, epochs: int,
               smoke_runs: int = 2, smoke_epochs: int = 3, threads: int = 1,
               threads_help: str = "the problems are tiny, threads only add overhead",
               extra=None) -> argparse.Namespace:
    """--runs, --epochs, --smoke, --out, --seed, --threads (+ ``extra(parser)``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--runs", type=int, default=None, help=f"training runs per model (default {runs}; paper: 100)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default {epochs})")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny run for CI: {smoke_runs} runs, {smoke_epochs} epochs (seconds)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default examples/results)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hyperparameter draws and initialisations")
    p.add_argument("--threads", type=int, default=threads,
                   help=f"torch CPU threads (default {threads}: {threads_help})")
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
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    return a


def progress(total: int, desc: str, args):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=args.no_progress, dynamic_ncols=True, leave=True)


def sample_hparams(rng: np.random.Generator) -> Dict[str, float]:
    """One draw of the paper's section 4.2 search: learning rate, Tikhonov gamma and init
    amplitude log-uniform in their ranges, L uniform in {2, ..., 15}."""
    def logu(lo, hi):
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return {"lr": logu(*LR_RANGE), "gamma": logu(*GAMMA_RANGE), "amplitude": logu(*AMPLITUDE_RANGE),
            "L": int(rng.integers(L_RANGE[0], L_RANGE[1] + 1))}


def architectures(L: int, steps: int, T: float) -> Dict[str, dict]:
    """The five networks of Tables 1-2 as SplineODE settings (paper section 4.2, Remark 1):
    ResNet: one weight per layer (d = 1, knots = steps = L) and step h*scale = 1 (scale = L);
    ODEnet: the same with time horizon T (h = T/L); SpliNet d = 1, 2, 3: L knot intervals,
    ``steps`` time steps, horizon T."""
    return {
        "ResNet": dict(knots=L, degree=1, steps=L, scale=float(L)),
        "ODEnet": dict(knots=L, degree=1, steps=L, scale=float(T)),
        "SpliNet, d = 1": dict(knots=L, degree=1, steps=steps, scale=float(T)),
        "SpliNet, d = 2": dict(knots=L, degree=2, steps=steps, scale=float(T)),
        "SpliNet, d = 3": dict(knots=L, degree=3, steps=steps, scale=float(T)),
    }


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
