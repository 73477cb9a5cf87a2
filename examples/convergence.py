"""Paper Fig. 4: error of the discretised network against the continuous ODE as the step
h = 1/N shrinks, on fixed random spline coefficients (the sin(5x) setting of section
4.1.1: width 4, input replicated, tanh), for the euler, midpoint and rk4 schemes. The same
layer is re-discretised with ``layer(x, steps=N, scheme=...)``; the "continuous" solution
is rk4 with N = 2^14 steps in float64.

    python examples/convergence.py            # default (~10-30 s)
    python examples/convergence.py --smoke    # seconds (CI)

Writes <out>/convergence.md (errors and fitted orders) and <out>/convergence.png (log-log).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import sc  # noqa: E402

WIDTH, KNOTS, SCALE, AMPLITUDE = 4, 8, 5.0, 1.0
SCHEMES = {"euler": 1, "midpoint": 2, "rk4": 4}
DEGREES = (1, 2, 3)
N_REF = 2 ** 14


def fitted_order(hs: np.ndarray, errs: np.ndarray) -> float:
    """Least-squares slope of log(err) against log(h) over the asymptotic range: points whose
    error is above 1e-12 (float64 round-off floor), using the finest half of those."""
    ok = errs > 1e-12
    h, e = hs[ok], errs[ok]
    if h.size < 2:
        return math.nan
    k = max(2, h.size // 2)
    idx = np.argsort(h)[:k]
    return float(np.polyfit(np.log(h[idx]), np.log(e[idx]), 1)[0])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = common.parse_args(__doc__.splitlines()[0], argv, runs=5, epochs=1, smoke_runs=1, smoke_epochs=1)
    max_pow = 6 if args.smoke else 11
    Ns = [KNOTS * 2 ** k for k in range(0, max_pow - 2)] if args.smoke else [2 ** k for k in range(1, max_pow + 1)]
    n_ref = 2 ** 10 if args.smoke else N_REF
    x = torch.linspace(-math.pi, math.pi, 101, dtype=torch.float64)[:, None].expand(-1, WIDTH).contiguous()
    errs = {d: {s: np.zeros(len(Ns)) for s in SCHEMES} for d in DEGREES}
    with common.Timer() as timer:
        bar = common.progress(len(DEGREES) * args.runs, "convergence", args)
        for d in DEGREES:
            for r in range(args.runs):
                torch.manual_seed(args.seed * 7919 + 31 * d + r)
                layer = sc.SplineODE(WIDTH, KNOTS, d, 100, activation="tanh", scale=SCALE,
                                     init_amplitude=AMPLITUDE, dtype=torch.float64, backend="auto")
                with torch.no_grad():
                    ref = layer(x, steps=n_ref, scheme="rk4").mean(1)
                    for s in SCHEMES:
                        for i, N in enumerate(Ns):
                            y = layer(x, steps=N, scheme=s).mean(1)
                            # network output error (eq. 25's averaged output), max over the inputs;
                            # geometric mean over the random coefficient draws
                            errs[d][s][i] += math.log(max(float((y - ref).abs().max()), 1e-300)) / args.runs
                bar.update(1)
        bar.close()
    hs = 1.0 / np.array(Ns, dtype=float)
    errs = {d: {s: np.exp(v) for s, v in es.items()} for d, es in errs.items()}
    orders = {d: {s: fitted_order(hs, errs[d][s]) for s in SCHEMES} for d in DEGREES}

    order_table = "\n".join(
        ["| fitted order | " + " | ".join(SCHEMES) + " |", "|---|" + "---|" * len(SCHEMES)]
        + [f"| degree {d} | " + " | ".join(f"{orders[d][s]:.2f}" for s in SCHEMES) + " |" for d in DEGREES]
        + ["| expected | " + " | ".join(str(p) for p in SCHEMES.values()) + " |"])
    dshow = DEGREES[-1]
    err_table = "\n".join(
        [f"| N (h = 1/N), degree {dshow} | " + " | ".join(f"{s} error" for s in SCHEMES) + " |",
         "|---|" + "---|" * len(SCHEMES)]
        + [f"| {N} | " + " | ".join(f"{errs[dshow][s][i]:.2e}" for s in SCHEMES) + " |" for i, N in enumerate(Ns)])
    notes = [
        "The paper's Fig. 4 shows forward Euler only (first order, its only scheme); midpoint and rk4 are the "
        "library's other schemes, evaluated on the same coefficients (re-discretising one trained network with "
        "another scheme: the 'manifestation' of Queiruga et al.'s continuous-in-depth networks, ContinuousNet).",
        f"Setting: width {WIDTH}, input x in [-pi, pi] (101 points) replicated, tanh, L = {KNOTS} knot intervals, "
        f"scale {SCALE:g}, coefficients uniform in [-{AMPLITUDE:g}, {AMPLITUDE:g}] (the paper's 'randomized network "
        f"control functions'; its values are not given), float64, {args.runs} random draws per degree (errors are "
        f"their geometric mean). Error: max over the inputs of |mean_j x_j(1) - reference|; reference: rk4 with "
        f"N = {n_ref}.",
        "Orders are least-squares slopes over the finest half of the points above 1e-12. Step counts are powers "
        f"of two; for N >= L = {KNOTS} every knot is a step boundary, so the spline's reduced smoothness at knots "
        "(C^(d-1)) does not lower the order. For N < L, steps straddle knots, which can lower the order of the "
        "higher-order schemes on coarse grids, more so for degree 1.",
        common.machine_line(timer.elapsed),
    ]
    cmd = common.command_line("convergence.py", argv)
    text = common.write_markdown(os.path.join(args.out, "convergence.md"), "Fig. 4 reproduction: error against step size",
                                 [order_table, err_table, "![convergence](convergence.png)"], notes, cmd)
    plot(os.path.join(args.out, "convergence.png"), hs, errs, orders)
    print(text)
    return {"orders": orders, "markdown": os.path.join(args.out, "convergence.md"),
            "plot": os.path.join(args.out, "convergence.png")}


def plot(path, hs, errs, orders) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(errs), figsize=(4.2 * len(errs), 3.8), squeeze=False, sharey=True)
    for ax, (d, es) in zip(axes[0], errs.items()):
        for i, (s, e) in enumerate(es.items()):
            ax.loglog(hs, e, "o-", color=f"C{i}", ms=4, label=f"{s} (order {orders[d][s]:.2f})")
            p = SCHEMES[s]
            ax.loglog(hs, e[-1] * (hs / hs[-1]) ** p, ":", color=f"C{i}", lw=1)
        ax.set_xlabel("h = 1/N")
        ax.set_title(f"degree {d} (dotted: slopes 1, 2, 4)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("max |output - continuous|")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
