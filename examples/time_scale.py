"""Paper section 4.4 / Fig. 9: learn 10 sin(x) on [-pi, pi] with a tanh SpliNet, the time
scale lambda fixed at 3 against lambda learned from 3. With tanh, |x(1) - x(0)| <= lambda,
so a fixed lambda = 3 cannot reach the target.

    python examples/time_scale.py             # default reduced run (~1-2 min on 2 CPU cores)
    python examples/time_scale.py --runs 100  # the paper's run count
    python examples/time_scale.py --smoke     # seconds (CI)

Writes <out>/time_scale.md and <out>/time_scale.png (Fig. 9 and the learned scales).
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

WIDTH, STEPS, KNOTS, DEGREE = 4, 100, 8, 2
LAMBDA0 = 3.0
LR, LR_SCALE, GAMMA, AMPLITUDE, BATCH = 1e-2, 1e-1, 1e-6, 1.0, 10
N_TRAIN, N_VAL = 100, 200

# Paper section 4.4 (100 runs, 200 epochs): fixed lambda = 3 reaches "a maximum of about 80%";
# learned lambda: mean 13.59, range 10.72 .. 18.47, mean accuracy 98.8%.
PAPER = {"fixed": {"acc": 0.80}, "learned": {"acc": 0.988, "lam_mean": 13.59, "lam_min": 10.72, "lam_max": 18.47}}


def target(x):
    return 10 * torch.sin(x)


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """1 - relative L2 error (the paper does not define 'accuracy' for this regression)."""
    return float(1 - (pred - y).norm() / y.norm())


class SinNet(nn.Module):
    def __init__(self, learn_scale: bool):
        super().__init__()
        self.ode = sc.SplineODE(WIDTH, KNOTS, DEGREE, STEPS, activation="tanh", scale=LAMBDA0,
                                learn_scale=learn_scale, init_amplitude=AMPLITUDE, backend="auto")

    def forward(self, x):
        return self.ode(x[:, None].expand(-1, WIDTH).contiguous()).mean(1)


def train_one(learn_scale: bool, data, epochs: int, seed: int):
    xtr, ytr, xva, yva = data
    torch.manual_seed(seed)
    model = SinNet(learn_scale)
    groups = [{"params": [model.ode.weight, model.ode.bias], "lr": LR}]
    if learn_scale:
        groups.append({"params": [model.ode.scale], "lr": LR_SCALE})
    opt = torch.optim.Adam(groups)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], generator=g)
        for i in range(0, xtr.shape[0], BATCH):
            idx = perm[i:i + BATCH]
            loss = 0.5 * (model(xtr[idx]) - ytr[idx]).square().mean() + GAMMA * sc.tikhonov(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc_tr = accuracy(model(xtr), ytr)
        acc = accuracy(model(xva), yva)
    return {"acc": acc, "acc_train": acc_tr, "lam": float(model.ode.scale.detach()), "model": model}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = common.parse_args(__doc__.splitlines()[0], argv, runs=20, epochs=200, smoke_runs=1, smoke_epochs=2)
    g = torch.Generator().manual_seed(4)
    xtr = (torch.rand(N_TRAIN, generator=g) * 2 - 1) * math.pi
    xva = (torch.rand(N_VAL, generator=g) * 2 - 1) * math.pi
    data = (xtr, target(xtr), xva, target(xva))
    # the best any network with |x(1) - x(0)| <= 3 can do: clip the target to x +- 3
    ideal = accuracy(torch.clamp(target(xva), xva - LAMBDA0, xva + LAMBDA0), target(xva))
    res = {"fixed": [], "learned": []}
    with common.Timer() as timer:
        bar = common.progress(2 * args.runs, "time scale", args)
        for r in range(args.runs):
            for kind in res:
                bar.set_postfix_str(f"run {r + 1} {kind}")
                res[kind].append(train_one(kind == "learned", data, args.epochs, args.seed * 7919 + r))
                bar.update(1)
        bar.close()

    def row(kind):
        a = common.stats([o["acc"] for o in res[kind]])
        lam = np.array([o["lam"] for o in res[kind]])
        p = PAPER[kind]
        lam_ours = f"{lam.mean():.2f} ({lam.min():.2f} .. {lam.max():.2f})" if kind == "learned" else f"{LAMBDA0:g}"
        lam_paper = (f"{p['lam_mean']:.2f} ({p['lam_min']:.2f} .. {p['lam_max']:.2f})" if kind == "learned"
                     else f"{LAMBDA0:g}")
        acc_paper = f"{100 * p['acc']:.1f}%" + (" (max)" if kind == "fixed" else " (mean)")
        return (f"| {kind} lambda | {100 * a['mean']:.1f}% ± {100 * a['std']:.1f}% | {100 * a['min']:.1f}% | "
                f"{100 * a['max']:.1f}% | {acc_paper} | {lam_ours} | {lam_paper} |")

    table = "\n".join([
        "| 10 sin(x), tanh | val. accuracy mean ± std | min | max | paper accuracy | lambda: ours mean (min .. max) "
        "| lambda: paper |",
        "|---|---|---|---|---|---|---|", row("fixed"), row("learned")])
    notes = [
        f"**Accuracy** is 1 - ||pred - y||_2 / ||y||_2 on {N_VAL} random validation points: the paper reports an "
        f"'accuracy' for this regression without defining it, so the percentages are comparable in spirit only. "
        f"Under the bound |x(1) - x(0)| <= lambda = 3 the best possible accuracy by this measure is "
        f"{100 * ideal:.1f}% (the target clipped to x ± 3).",
        f"**Run count**: {args.runs} runs per setting (paper: 100), {args.epochs} epochs (paper: 200), reduced "
        f"for the 2-core CPU.",
        f"**Setup not given in the paper**: width {WIDTH}, input replicated, output = mean over the width "
        f"(as in section 4.1.1), N = {STEPS} Euler steps, L = {KNOTS}, d = {DEGREE}; Adam lr {LR:g}, Tikhonov "
        f"gamma {GAMMA:g} (not on lambda), init amplitude {AMPLITUDE:g}, mini-batches of {BATCH}, {N_TRAIN} "
        f"random training points; only the initial coefficients (seed) vary between runs. lambda is a learnable "
        f"0-dim parameter (`SplineODE(..., scale=3, learn_scale=True)`) in its own Adam parameter group with "
        f"lr {LR_SCALE:g}: with lr {LR:g} for lambda too, or with init amplitude 0.1, lambda stalled near 5 "
        f"within 200 epochs in our trials (the paper gives no optimizer settings for this test).",
        "The paper's Fig. 9 caption says 10 sin(3x) while its text says 10 sin(x); we follow the text.",
        common.machine_line(timer.elapsed),
    ]
    cmd = common.command_line("time_scale.py", argv)
    text = common.write_markdown(os.path.join(args.out, "time_scale.md"),
                                 "Fig. 9 / section 4.4 reproduction: learning the time scale",
                                 [table, "![fig 9](time_scale.png)"], notes, cmd)
    plot(os.path.join(args.out, "time_scale.png"), res)
    print(text)
    return {"results": {k: [{kk: vv for kk, vv in o.items() if kk != "model"} for o in v] for k, v in res.items()},
            "markdown": os.path.join(args.out, "time_scale.md"), "plot": os.path.join(args.out, "time_scale.png")}


def plot(path: str, res) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.linspace(-math.pi, math.pi, 300)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, kind in zip(axes[:2], ("fixed", "learned")):
        best = max(res[kind], key=lambda o: o["acc"])
        with torch.no_grad():
            pred = best["model"](x)
        lam = best["lam"]
        ax.plot(x, target(x), "k--", label="10 sin(x)")
        ax.plot(x, pred, "C0", label=f"prediction (acc. {100 * best['acc']:.1f}%)")
        ax.fill_between(x, x - lam, x + lam, color="C1", alpha=0.15, label=f"x ± lambda, lambda = {lam:.2f}")
        ax.set_title(f"{kind} lambda (best run)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    lam = [o["lam"] for o in res["learned"]]
    axes[2].hist(lam, bins=max(5, len(lam) // 3), color="C2")
    axes[2].axvline(PAPER["learned"]["lam_mean"], color="C3", ls="--", label="paper mean 13.59")
    axes[2].set_title("learned lambda (from 3)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
