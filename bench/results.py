"""Results of a benchmark run: results files, the regression comparison, tables and plots.

The row statuses, the speedup cell and noise flags that every table prints, the results
files (JSON, CSV, plots), the comparison with an earlier file, and the terminal table.

Kept free of torch and of the timing code (bench/run.py), so that bench/report.py, which
the docs build runs to format a committed results file, loads quickly and anywhere.

A results file is ``{"meta": {...}, "rows": [...]}``, one row per case x implementation x
mode (long format); the CSV holds the same rows with the metadata repeated on each.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

# Row status: timed; disagreed with the reference (not timed); raised; does not apply.
OK, WRONG, ERROR, SKIPPED = "ok", "WRONG", "ERROR", "SKIPPED"

# Round speedups further apart than this fraction of the median mark a row noisy; a run
# with more than NOISY_RUN of its rows noisy is flagged as a whole.
ROUND_SPREAD = 0.15
NOISY_RUN = 0.2
# Every run times this mode first (bench/cases.py MODES); a row that was not timed repeats
# its note in each mode, so the terminal table prints the note of this one. Spelled out
# rather than imported, to keep this module free of torch.
FIRST_MODE = "fwd"


# --------------------------------------------------------------------------------------
# Speedups: rounds, noise, the cell every table prints
# --------------------------------------------------------------------------------------

def round_spread(row: dict, base: dict) -> None:
    """The speedup of each interleaved round (the reference's round median over this
    row's, both timed within the same round) and their range: ``speedup_lo``/``speedup_hi``.
    A row whose round speedups differ by more than ROUND_SPREAD of the median is ``noisy``:
    the machine's load changed between rounds, and a speedup whose range holds 1 says
    nothing (printed as ~1x)."""
    mine, theirs = row.get("round_ms") or [], base.get("round_ms") or []
    if len(mine) < 2 or len(mine) != len(theirs):
        return
    ratios = [b / a for a, b in zip(mine, theirs)]
    row["speedup_lo"], row["speedup_hi"] = min(ratios), max(ratios)
    row["noisy"] = (row["speedup_hi"] - row["speedup_lo"]) > ROUND_SPREAD * row["speedup"]


def noise(rows: List[dict]):
    """The rows marked noisy ("case/impl/mode") and whether the run as a whole is:
    more than NOISY_RUN of the rows with a speedup range."""
    ranged = [r for r in rows if r["status"] == OK and r.get("noisy") is not None]
    noisy = [f"{r['case']}/{r['impl']}/{r['mode']}" for r in ranged if r["noisy"]]
    return noisy, bool(ranged) and len(noisy) > NOISY_RUN * len(ranged)


def speedup_cell(r: dict) -> str:
    """``2.14x``; ``1.30x ~`` when its rounds disagree; ``~1x`` when they disagree and
    their range holds 1 (a 0.96x that is the machine's load, not the implementation)."""
    if r["speedup"] is None:
        return "-"
    if not r.get("noisy"):
        return f"{r['speedup']:.2f}x"
    if r["speedup_lo"] <= 1.0 <= r["speedup_hi"]:
        return "~1x"
    return f"{r['speedup']:.2f}x ~"


# --------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------

def results_stem(meta: dict) -> str:
    """``<device>-<dtype>-<YYYYMMDD>`` for the default case list, with ``-<sizes>`` before
    the date for the others (so a sweep does not overwrite the day's quick results)."""
    sizes = "" if meta["sizes"] == "quick" else f"-{meta['sizes']}"
    return f"{meta['device']}-{meta['dtype']}{sizes}-{meta['date'][:10].replace('-', '')}"


CSV_FIELDS = ["case", "kind", "shape", "impl", "mode", "status", "agrees", "median_ms", "p20_ms", "p80_ms",
              "speedup", "speedup_lo", "speedup_hi", "noisy", "gflops", "gemm_ms", "of_gemm", "peak_mb", "mem_vs_ref",
              "regression", "compile_s", "compile_cache", "case_s", "device", "device_name", "dtype", "threads",
              "torch", "git_sha", "date", "note"]


def write_results(rows: List[dict], meta: dict, out: Path) -> Dict[str, Path]:
    """``<device>-<dtype>-<YYYYMMDD>`` .json ({meta, rows}), .csv (long format, the
    metadata repeated on every row) and .png (speedups) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(meta)
    paths = {ext: out / f"{stem}.{ext}" for ext in ("json", "csv", "png")}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**meta, **r})
    plot_speedups(rows, meta, paths["png"])
    sweeps = plot_sweeps(rows, meta, out / f"{stem}-sweeps.png")
    if sweeps is not None:
        paths["sweeps"] = sweeps
    return paths


# --------------------------------------------------------------------------------------
# Regression comparison with an earlier file
# --------------------------------------------------------------------------------------

REGRESSION = 0.10  # a median this much above the earlier file's is flagged


def earlier_results(out: Path, meta: dict, exclude: Path) -> Optional[Path]:
    """The newest results file in ``out`` for the same device, dtype and case list, other
    than ``exclude``."""
    def same_kind(path: Path) -> bool:
        try:
            other = json.loads(path.read_text())["meta"]
        except (OSError, ValueError, KeyError):
            return False
        return all(other.get(k) == meta[k] for k in ("device", "dtype", "sizes"))

    found = sorted((p for p in out.glob(f"{meta['device']}-{meta['dtype']}-*.json") if p != exclude and same_kind(p)),
                   key=lambda p: json.loads(p.read_text())["meta"]["date"])
    return found[-1] if found else None


def compare(rows: List[dict], earlier: Path) -> int:
    """Marks rows whose median is more than REGRESSION above the same (case, impl, mode)
    in ``earlier``; returns how many."""
    old = {(r["case"], r["impl"], r["mode"]): r for r in json.loads(earlier.read_text())["rows"]}
    flagged = 0
    for r in rows:
        before = old.get((r["case"], r["impl"], r["mode"]))
        if r["status"] != OK or before is None or not before.get("median_ms"):
            continue
        change = r["median_ms"] / before["median_ms"] - 1.0
        if change > REGRESSION:
            r["regression"] = f"+{100 * change:.0f}% vs {earlier.name}"
            flagged += 1
    return flagged


# --------------------------------------------------------------------------------------
# Terminal table
# --------------------------------------------------------------------------------------

def format_table(rows: List[dict]) -> str:
    """The rows as an aligned text table."""
    header = ["case", "shape", "impl", "mode", "median ms", "p20-p80 ms", "speedup", "GFLOP/s", "of GEMM",
              "peak MB (vs ref)", "compile s (cache)"]
    lines = []
    for r in rows:
        if r["status"] == OK:
            median, spread = f"{r['median_ms']:.3f}", f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
        else:
            median, spread = r["status"], ""
        speedup = speedup_cell(r)
        if r.get("regression"):
            speedup += " !"
        gflops = f"{r['gflops']:.2f}" if r.get("gflops") is not None else ""
        of_gemm = f"{100 * r['of_gemm']:.0f}%" if r.get("of_gemm") is not None else ""
        mem = ""
        if r.get("peak_mb") is not None:
            mem = f"{r['peak_mb']:.1f}" + (f" ({r['mem_vs_ref']:.2f}x)" if r.get("mem_vs_ref") is not None else "")
        compile_s = f"{r['compile_s']:.1f} ({r['compile_cache']})" if r["compile_s"] is not None else ""
        lines.append([r["case"], r["shape"], r["impl"], r["mode"], median, spread, speedup, gflops, of_gemm, mem,
                      compile_s])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]

    def fmt(cells: Sequence[str]) -> str:  # numbers right-aligned
        return "  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines]
    notes = [f"  {r['case']}/{r['impl']}: {r['status']}: {r['note']}" for r in rows
             if r["status"] != OK and r["mode"] == FIRST_MODE and r["note"]]
    notes = [n if len(n) <= 240 else n[:237] + "..." for n in notes]  # the JSON keeps the whole message
    noisy, noisy_run = noise(rows)
    if noisy:
        # the rounds a row was timed in (bench/run.py ROUNDS), read from the rows themselves
        rounds = max(len(r.get("round_ms") or ()) for r in rows if r.get("noisy"))
        notes.append(f"  ~ noisy: the speedups of the {rounds} interleaved rounds differ by more than "
                     f"{100 * ROUND_SPREAD:.0f}% (range in the JSON's speedup_lo/hi; ~1x: the range holds 1, "
                     f"no difference measured): {', '.join(noisy)}")
    if noisy_run:
        notes.insert(0, f"  NOISY RUN: {len(noisy)} of {sum(r['status'] == OK for r in rows)} timed rows changed "
                        f"between rounds: the machine was busy. Rerun it quiet (or with --threads 1) "
                        f"before reading small speedups.")
    slower = [f"{r['case']}/{r['impl']}/{r['mode']} ({r['regression']})" for r in rows if r.get("regression")]
    if slower:
        notes.append(f"  ! slower than the earlier results by more than {100 * REGRESSION:.0f}%: {', '.join(slower)}")
    if notes:
        out += ["", "notes:"] + notes
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------

def plot_speedups(rows: List[dict], meta: dict, path: Path) -> None:
    """Grouped bars of speedup vs the reference, one panel per mode, cases along x."""
    import matplotlib  # imported here: only writing a run's files needs it, not bench.report

    matplotlib.use("Agg")  # files only, no display (CI, a GPU machine over ssh)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(max(6.0, 1.3 * len(cases)) * len(modes), 4.5), squeeze=False)
    width = 0.8 / max(1, len(impls))
    legend = [Patch(color=f"C{j}", label=impl) for j, impl in enumerate(impls)]
    for ax, mode in zip(axes[0], modes):
        by_key = {(r["case"], r["impl"]): r for r in rows if r["mode"] == mode}
        for j, impl in enumerate(impls):
            xs = np.arange(len(cases)) + (j - (len(impls) - 1) / 2) * width
            for x, case in zip(xs, cases):
                r = by_key.get((case, impl))
                if r is None or r["status"] == SKIPPED:
                    continue
                if r["speedup"] is not None:
                    ax.bar(x, r["speedup"], width, color=f"C{j}")
                else:  # WRONG or ERROR: no bar, but say so where it would be
                    ax.text(x, 1.0, r["status"], rotation=90, ha="center", va="bottom", fontsize=7, color=f"C{j}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(cases)), cases, rotation=30, ha="right")
        ax.set_ylabel("speedup vs reference (higher is better)")
        ax.set_title(mode)
        ax.legend(handles=legend, fontsize=8)
    fig.suptitle(f"splinet_cuda on {meta['device_name']}, {meta['dtype']}, torch {meta['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweeps(rows: List[dict], meta: dict, path: Path) -> Optional[Path]:
    """For cases named "<parameter>-<number>" (bench/cases.py SWEEP): fwd+bwd speedup
    against the parameter per implementation, one panel per parameter, plus the peak
    memory of every case that measured it. None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: Dict[str, Dict[str, list]] = {}
    for r in rows:
        head, _, value = r["case"].rpartition("-")
        if r["mode"] != "fwd+bwd" or r["speedup"] is None or not head or not value.isdigit():
            continue
        series.setdefault(head, {}).setdefault(r["impl"], []).append((int(value), r["speedup"]))
    memory = [r for r in rows if r.get("peak_mb") is not None]
    panels = len(series) + (1 if memory else 0)
    if panels == 0:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4), squeeze=False)
    for ax, (param, by_impl) in zip(axes[0], sorted(series.items())):
        for impl, points in by_impl.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel(param)
        ax.set_ylabel("fwd+bwd speedup vs reference")
        ax.legend(fontsize=7)
    if memory:
        ax = axes[0][-1]
        labels = [f"{r['case']}\n{r['impl']}" for r in memory]
        ax.bar(range(len(memory)), [r["peak_mb"] for r in memory], color="C2")
        ax.set_xticks(range(len(memory)), labels, rotation=90, fontsize=6)
        ax.set_ylabel("peak MB of fwd+bwd")
    fig.suptitle(f"splinet_cuda on {meta['device_name']}, {meta['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

