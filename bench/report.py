"""Markdown table of a results file, for the README: ``python -m bench.report FILE.json``.

One row per case and implementation: forward and forward+backward medians, speedup over
the eager reference (and the training step's, from a --train-step run), fraction of the
device's GEMM/convolution throughput, peak memory.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def speedup(r: dict) -> str:
    """As the terminal table prints it (bench/run.py speedup_cell): ~ marks a speedup whose
    interleaved rounds disagree, ~1x one whose range holds 1."""
    from bench.run import speedup_cell

    return speedup_cell(r)


def markdown(data: dict) -> str:
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
        if fb is not None and fb["status"] == "SKIPPED":
            continue
        if fb is None or fb["status"] != "ok":
            status = fb["status"] if fb else "-"
            lines.append(f"| {case} | {shape} | {impl} | {status} |" + " |" * (head.count("|") - 5))
            continue
        mem = ""
        if fb.get("peak_mb") is not None:
            mem = f"{fb['peak_mb']:.1f}" + (f" ({fb['mem_vs_ref']:.2f}x)" if fb.get("mem_vs_ref") else "")
        of_gemm = f"{100 * fb['of_gemm']:.0f}%" if fb.get("of_gemm") else ""
        cells = [f"{f['median_ms']:.3f}", f"{fb['median_ms']:.3f}", speedup(fb)]
        if train:
            t = by.get((case, impl, "train"))
            cells += [f"{t['median_ms']:.3f}", speedup(t)] if t is not None and t["status"] == "ok" else ["", ""]
        lines.append(f"| {case} | {shape} | {impl} | " + " | ".join(cells) + f" | {of_gemm} | {mem} |")
    compiled = [r for r in rows if r.get("compile_s") and r["mode"] == "fwd"]
    if compiled:
        lines += ["", "torch.compile build time: " + ", ".join(
            f"{r['case']} {r['compile_s']:.0f} s ({r['compile_cache']})" for r in compiled)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
