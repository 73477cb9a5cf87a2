"""Sphinx configuration of the splinet_cuda documentation (``make docs``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
# The package is imported from the source tree (its extension built in place by `make build`
# or `make build-test`), so autodoc documents the checkout, not some other install.
sys.path.insert(0, str(REPO))

project = "splinet_cuda"
author = "splinet_cuda contributors"
copyright = "the splinet_cuda contributors, BSD-3-Clause"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
# _generated/ holds text that pages include (the results table), not pages of its own.
exclude_patterns = ["_generated"]
# Equations are written in Unicode text, not TeX: MathJax would load from a CDN, and these
# pages must read right offline (an air-gapped GPU machine, a local build).
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = "splinet_cuda"
html_static_path = ["_static"]
html_css_files = ["custom.css"]

# Public API: the docstrings are Google style ("Args:", "Returns:"); type hints stay in the
# signature, where they read as in the source.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"undoc-members": False}

# Nitpicky: every cross-reference must resolve. The only ones that cannot are names of other
# projects (torch, numpy, typing), which would resolve through intersphinx; the docs build
# offline (no network for intersphinx inventories), so those names are accepted here, and
# only those: a broken reference to a splinet_cuda name still fails the build.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|np|nn|F)(\..*)?"),
    (r"py:.*", r"(typing\.)?(Optional|Union|Tuple|List|Dict|Sequence|Callable|Any|Iterable|Mapping)"),
    (r"py:.*", r"(Tensor|NDArray|Module|Scale|ndarray)"),
    # The layers' refine()/project() return the layer itself, annotated with the layers'
    # private base class, which is not documented (the page shows nn.Module as the base).
    (r"py:class", r"splinet_cuda\.layers\._\w+"),
]


# --------------------------------------------------------------------------------------
# The benchmark table of docs/benchmarks.md, generated at build time from the newest results
# file of each device by the project's own report (`python -m bench.report FILE.json`), so
# the page always shows a committed results file as the tool prints it, never a pasted copy.
# --------------------------------------------------------------------------------------

RESULTS = REPO / "bench" / "results"
GENERATED = DOCS / "_generated"
# Case lists that are not a device's headline table: sweeps plot one parameter at a time,
# `tiny` exists for the harness's own tests.
NOT_HEADLINE = {"sweep", "sweep-full", "tiny"}


def newest_results() -> list[Path]:
    """The newest results file (by the run date it records) for each device, CPU first.
    SPLINET_DOCS_RESULTS=FILE.json picks one file instead."""
    forced = os.environ.get("SPLINET_DOCS_RESULTS")
    if forced:
        return [Path(forced).resolve()]
    newest: dict[str, tuple[str, Path]] = {}
    for path in sorted(RESULTS.glob("*.json")):
        meta = json.loads(path.read_text())["meta"]
        if meta.get("sizes") in NOT_HEADLINE:
            continue
        device = meta.get("device", "cpu")
        if device not in newest or meta["date"] > newest[device][0]:
            newest[device] = (meta["date"], path)
    return [newest[d][1] for d in sorted(newest, key=lambda d: (d != "cpu", d))]


def split_by_case(report: str) -> str:
    """bench.report's output with its one wide table cut into one table per case, the case
    and shape as the table's heading: ten columns with a shape in each row do not fit a page.
    Anything that is not a table row (the provenance line, compile times) is kept as is."""
    lines = report.splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    if len(rows) < 3:
        return report
    cells = [[c.strip() for c in lines[i].strip("|").split("|")] for i in rows]
    head, align, body = cells[0], cells[1], cells[2:]
    if head[:2] != ["case", "shape"]:
        return report
    out = lines[:rows[0]]
    case = None
    for row in body:
        if row[0] != case:
            case = row[0]
            out += ["", f"**{case}**: {row[1]}", "", "| " + " | ".join(head[2:]) + " |",
                    "|" + "|".join(align[2:]) + "|"]
        out.append("| " + " | ".join(row[2:]) + " |")
    return "\n".join(out + [""] + lines[rows[-1] + 1:])


def write_results_page(app) -> None:
    GENERATED.mkdir(exist_ok=True)
    parts = []
    for path in newest_results():
        meta = json.loads(path.read_text())["meta"]
        report = subprocess.run([sys.executable, "-m", "bench.report", str(path)], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout.strip()
        rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        parts.append(
            f"### {meta['device_name']}, {meta['dtype']}, `--sizes {meta['sizes']}`\n\n"
            f"File `{rel}` (written by `python -m bench --sizes {meta['sizes']}"
            f"{' --train-step' if _has_train(path) else ''} --out bench/results`), "
            f"rendered by `python -m bench.report {rel}`:\n\n"
            f":::{{container}} results\n{split_by_case(report)}\n:::\n")
    text = "\n".join(parts) if parts else "No results file in `bench/results/` yet.\n"
    target = GENERATED / "results.md"
    if not target.exists() or target.read_text() != text:  # unchanged: no rebuild of the page
        target.write_text(text)


def _has_train(path: Path) -> bool:
    return any(r.get("mode") == "train" for r in json.loads(path.read_text())["rows"])


def public_bases(app, name, obj, options, bases) -> None:
    """A layer's private base class (shared plumbing of the layers) is not public API: show
    the nn.Module it derives from instead, as a user would subclass or isinstance-check it."""
    bases[:] = [b for b in bases if not b.__name__.startswith("_")] or [b for b in bases[0].__mro__
                                                                        if not b.__name__.startswith("_")][:1]


def setup(app):
    app.connect("builder-inited", write_results_page)
    app.connect("autodoc-process-bases", public_bases)
