"""Markdown table of a results file: ``python -m bench.report FILE.json`` prints it to stdout.

The docs build runs exactly this command to generate the benchmarks page from a committed
file under bench/results/, and the README's results table is its output: the command, its
one argument and the table's columns are an interface, to be changed together with the docs.

One row per case and implementation: forward and forward+backward medians, speedup over
the eager reference (and the training step's, from a --train-step run), fraction of the
device's GEMM/convolution throughput, peak memory. Speedup cells are formatted as the
terminal table formats them (bench/results.py speedup_cell: ~ marks a speedup whose
interleaved rounds disagree, ~1x one whose range holds 1). Reads the file only: neither
torch nor the timing code is imported.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script, `python bench/report.py FILE.json`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import OK, SKIPPED, speedup_cell


def markdown(data: dict) -> str:
    """The table of ``data`` (a results file's ``{"meta", "rows"}``): a line naming the
    device, dtype, threads, torch, git commit and date, then one Markdown row per case and
    implementation; rows SKIPPED in fwd+bwd are left out, WRONG/ERROR ones show their status."""
    meta, rows = data["meta"], data["rows"]
    by = {(r["case"], r["impl"], r["mode"]): r for r in rows}
    keys = list(dict.fromkeys((r["case"], r["shape"], r["impl"]) for r in rows))
    train = any(r["mode"] == "train" for r in rows)
    head = "| case | shape | impl | fwd ms | fwd+bwd ms | fwd+bwd speedup |"
    if train:
        head += " train step ms | train speedup |"
    head += " of GEMM | peak MB (vs ref) |"
    lines = [
        f"{meta['device_name']}, {meta['dtype']}, {meta['threads']} threads, torch {meta['torch']}, "
        f"git {meta['git_sha']}, {meta['date'][:10]}" + (", NOISY RUN" if meta.get("noisy_run") else ""),
        "",
        head,
        "|---|---|---|" + "---:|" * (head.count("|") - 4),
    ]
    for case, shape, impl in keys:
        f, fb = by.get((case, impl, "fwd")), by.get((case, impl, "fwd+bwd"))
        if fb is not None and fb["status"] == SKIPPED:
            continue
        if fb is None or fb["status"] != OK:
            status = fb["status"] if fb else "-"
            lines.append(f"| {case} | {shape} | {impl} | {status} |" + " |" * (head.count("|") - 5))
            continue
        mem = ""
        if fb.get("peak_mb") is not None:
            mem = f"{fb['peak_mb']:.1f}" + (f" ({fb['mem_vs_ref']:.2f}x)" if fb.get("mem_vs_ref") else "")
        of_gemm = f"{100 * fb['of_gemm']:.0f}%" if fb.get("of_gemm") else ""
        cells = [f"{f['median_ms']:.3f}", f"{fb['median_ms']:.3f}", speedup_cell(fb)]
        if train:
            t = by.get((case, impl, "train"))
            cells += [f"{t['median_ms']:.3f}", speedup_cell(t)] if t is not None and t["status"] == OK else ["", ""]
        lines.append(f"| {case} | {shape} | {impl} | " + " | ".join(cells) + f" | {of_gemm} | {mem} |")
    compiled = [r for r in rows if r.get("compile_s") and r["mode"] == "fwd"]
    if compiled:
        lines += ["", "torch.compile build time: " + ", ".join(
            f"{r['case']} {r['compile_s']:.0f} s ({r['compile_cache']})" for r in compiled)]
    return "\n".join(lines)


def main(argv=None) -> None:
    """``python -m bench.report FILE.json``: the table of FILE.json on stdout."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m bench.report FILE.json")
    print(markdown(json.loads(Path(args[0]).read_text())))


if __name__ == "__main__":
    main()
