"""fastai's own SaveModelCallback checks, run against ``SaveBestModelCallback``.

fastai tests its tracker callbacks in the notebook ``nbs/17_callback.tracker.ipynb``, which is
in neither the wheel nor the sdist: pass a copy with ``--notebook``. From it this script takes

- the setup cells: ``#|export`` and other cells that only import (``from fastai.basics import
  *``, ``from fastai.test_utils import *``), without their ``nbdev`` imports;
- the target cells: every code cell that uses ``SaveModelCallback``, except the ``#|export``
  cell that defines it;
- the helper cells the targets need: cells that define a name a target (or another needed
  helper) uses;

and runs them in notebook order as one script, in a fresh process whose working directory is
an empty temporary folder (the cells write ``./tmp``). Before each non-setup cell the name
``SaveModelCallback`` is bound to fastai's class (``--stock``) or to ``SaveBestModelCallback``
from ``bestsave.adapters.fastai``. A failing cell is recorded with the line that failed, and
the next cells run all the same. Cells that need nbdev (``show_doc``, ``notebook2script``),
shell or magic lines, and cells marked ``#skip`` or ``#|eval: false`` are left out.

Nothing of fastai's code is in this file: the cells are read from the notebook given.

Usage::

    python tests/dropin/fastai_suite.py --notebook 17_callback.tracker.ipynb            # ours
    python tests/dropin/fastai_suite.py --notebook 17_callback.tracker.ipynb --stock    # fastai's
    python tests/dropin/fastai_suite.py --notebook 17_callback.tracker.ipynb --compare

The exit status is 0 when every target cell passed (with ``--compare``: when ours passed every
target cell the stock class passed).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLASS = "SaveModelCallback"
STOCK_IMPORT = "from fastai.callback.tracker import SaveModelCallback as _dropin_class"
OURS_IMPORT = "from bestsave.adapters.fastai import SaveBestModelCallback as _dropin_class"
NBDEV_USES = ("show_doc", "notebook2script", "nbdev_export")


@dataclass
class Cell:
    index: int  # position among the notebook's cells (markdown included), from 0
    source: str
    role: str  # "setup", "helper" or "target"

    @property
    def label(self) -> str:
        lines = [line for line in self.source.splitlines() if line and not line.startswith("#")]
        first = lines[0] if lines else ""
        return f"cell {self.index} ({self.role}): {first[:60]}"


def _directives(source: str) -> list[str]:
    """The cell's leading comment lines, where nbdev puts its directives (``#|export``,
    ``#|hide``, ``#skip``, ``#|eval: false``), without their marks."""
    out = []
    for line in source.splitlines():
        text = line.strip()
        if not text.startswith("#"):
            break
        out.append(text.lstrip("#|").strip().lower())
    return out


def _exported(source: str) -> bool:
    return any(d.split()[:1] in (["export"], ["exports"], ["exporti"]) for d in _directives(source))


def _without_nbdev(source: str) -> str:
    return "\n".join(
        line
        for line in source.splitlines()
        if not line.lstrip().startswith(("from nbdev", "import nbdev"))
    )


def _runnable(source: str) -> str | None:
    """The cell as plain Python, or None when it cannot run outside a notebook with nbdev."""
    for directive in _directives(source):
        words = directive.replace(":", " ").split()
        if words[:1] in (["skip"], ["default_exp"]) or words == ["eval", "false"]:
            return None
    source = _without_nbdev(source)
    if any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()):
        return None
    if any(use in source for use in NBDEV_USES):
        return None
    try:
        ast.parse(source)
    except SyntaxError:
        return None
    return source


def _only_imports(source: str) -> bool:
    body = ast.parse(source).body
    return bool(body) and all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in body)


_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _bound(tree: ast.AST) -> set[str]:
    """Every name ``tree`` binds: assignments, loop targets, functions, classes, imports."""
    names = {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }
    for node in ast.walk(tree):
        if isinstance(node, _DEFINITIONS):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _free(source: str) -> set[str]:
    """Names the cell reads but does not bind itself: what it needs from earlier cells."""
    tree = ast.parse(source)
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return read - _bound(tree)


def _definitions(source: str, wanted: set[str]) -> str | None:
    """The cell's top-level functions and classes named in ``wanted``, without the rest of
    the cell (its own checks, which may need fastai's classes from #|export cells)."""
    parts = [
        ast.get_source_segment(source, s, padded=True) or ""
        for s in ast.parse(source).body
        if isinstance(s, _DEFINITIONS) and s.name in wanted
    ]
    return "\n\n".join(parts) if parts else None


def select(notebook: dict[str, Any]) -> list[Cell]:
    """The setup, helper and target cells, in notebook order."""
    candidates: list[tuple[int, str, bool]] = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        raw = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        source = _runnable(raw)
        if source is not None and source.strip():
            candidates.append((index, source, _exported(raw)))

    chosen: dict[int, Cell] = {}
    for index, source, exported in candidates:
        if _only_imports(source):
            chosen[index] = Cell(index, source, "setup")
        elif not exported and CLASS in _free(source) | _bound(ast.parse(source)):
            chosen[index] = Cell(index, source, "target")
    # Helpers: the functions and classes of other cells that the targets (or helpers) read.
    # fastai's own code (#|export cells) is never taken: the classes under test come from the
    # installed packages.
    needed = set().union(*(_free(c.source) for c in chosen.values() if c.role == "target"))
    while True:
        helpers = {
            i: _definitions(s, needed)
            for i, s, exported in candidates
            if i not in chosen and not exported
        }
        helpers = {i: d for i, d in helpers.items() if d}
        more = needed.union(*(_free(d) for d in helpers.values()))
        if more == needed:
            break
        needed = more
    chosen.update({i: Cell(i, d, "helper") for i, d in helpers.items()})
    return sorted(chosen.values(), key=lambda c: c.index)


# -- running the cells (in the child process) ---------------------------------------------------


def run_cells(cells_file: Path, results_file: Path, stock: bool) -> None:
    """Run the cells in one namespace, appending one JSON line per cell to ``results_file``."""
    cells = [Cell(**c) for c in json.loads(cells_file.read_text())]
    namespace: dict[str, Any] = {"__name__": "__main__"}
    with open(results_file, "a") as out:
        for cell in cells:
            entry: dict[str, Any] = {"index": cell.index, "role": cell.role, "label": cell.label}
            try:
                if cell.role != "setup":
                    exec(STOCK_IMPORT if stock else OURS_IMPORT, namespace)
                    namespace[CLASS] = namespace.pop("_dropin_class")
                exec(compile(cell.source, f"<cell {cell.index}>", "exec"), namespace)
                entry["outcome"] = "passed"
            except Exception as error:
                entry["outcome"] = "failed"
                entry["error"] = f"{type(error).__name__}: {error}".strip()
                frames = traceback.extract_tb(error.__traceback__)
                ours = [f for f in frames if f.filename == f"<cell {cell.index}>"]
                if ours:
                    line = cell.source.splitlines()[ours[-1].lineno - 1]
                    entry["line"] = f"line {ours[-1].lineno}: {line.strip()}"
                entry["traceback"] = traceback.format_exception(error)[-12:]
            out.write(json.dumps(entry) + "\n")
            out.flush()


# -- the driver ---------------------------------------------------------------------------------


def run(cells: list[Cell], stock: bool, verbose: bool) -> list[dict[str, Any]]:
    """Run ``cells`` in a fresh process in an empty folder; every cell's outcome."""
    with tempfile.TemporaryDirectory(prefix="fastai-dropin-") as work:
        cells_file, results_file = Path(work, "cells.json"), Path(work, "results.jsonl")
        cells_file.write_text(json.dumps([c.__dict__ for c in cells]))
        cwd = Path(work, "cwd")
        cwd.mkdir()
        command = [sys.executable, os.path.abspath(__file__), "--run-cells", str(cells_file)]
        command += ["--results", str(results_file)] + (["--stock"] if stock else [])
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
        results = (
            [json.loads(line) for line in results_file.read_text().splitlines()]
            if results_file.exists()
            else []
        )
        if verbose or done.returncode != 0:
            print(done.stdout[-4000:] + done.stderr[-4000:])
        ran = {r["index"] for r in results}
        for cell in cells:  # the process died before reaching them
            if cell.index not in ran:
                results.append(
                    {"index": cell.index, "role": cell.role, "label": cell.label,
                     "outcome": "not run", "error": f"exit status {done.returncode}"}
                )  # fmt: skip
        return results


def report(name: str, results: list[dict[str, Any]], verbose: bool) -> tuple[int, int]:
    """Print each cell's outcome; the passed and total counts of the target cells."""
    print(f"\n== {name}")
    for r in results:
        print(f"  {r['outcome'].upper():8} {r['label']}")
        if r["outcome"] != "passed":
            if "line" in r:
                print(f"           {r['line']}")
            print(f"           {r.get('error', '')}")
            if verbose:
                print("".join("           " + t for t in r.get("traceback", [])))
    targets = [r for r in results if r["role"] == "target"]
    passed = sum(r["outcome"] == "passed" for r in targets)
    print(f"  {name}: {passed}/{len(targets)} target cells passed")
    return passed, len(targets)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebook", type=Path, help="a copy of nbs/17_callback.tracker.ipynb")
    parser.add_argument("--stock", action="store_true", help="fastai's own SaveModelCallback")
    parser.add_argument("--compare", action="store_true", help="stock and ours, side by side")
    parser.add_argument("-v", "--verbose", action="store_true", help="output and tracebacks")
    parser.add_argument("--run-cells", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_cells:
        run_cells(args.run_cells, args.results, args.stock)
        return 0
    if args.notebook is None:
        parser.error("--notebook PATH is required (fastai's nbs/17_callback.tracker.ipynb)")
    cells = select(json.loads(args.notebook.read_text(encoding="utf-8")))
    if not any(c.role == "target" for c in cells):
        sys.exit(f"{args.notebook} has no cell that uses {CLASS}")
    print(f"{args.notebook}: {len(cells)} cells to run:")
    for cell in cells:
        print(f"  {cell.label}")

    modes = [True, False] if args.compare else [args.stock]
    outcomes = {}
    for stock in modes:
        name = "stock SaveModelCallback" if stock else "SaveBestModelCallback"
        results = run(cells, stock, args.verbose)
        outcomes[stock] = {r["index"]: r["outcome"] for r in results if r["role"] == "target"}
        report(name, results, args.verbose)
    if args.compare:
        lost = [i for i, o in outcomes[True].items() if o == "passed" and outcomes[False][i] != o]
        print(f"\ncells the stock class passes and ours does not: {lost or 'none'}")
        return 1 if lost else 0
    return 0 if all(o == "passed" for o in outcomes[modes[0]].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
