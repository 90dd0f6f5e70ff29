"""Keras's own ModelCheckpoint tests, run against ``BestModelCheckpoint``.

Takes ``keras/src/callbacks/model_checkpoint_test.py`` from the installed Keras wheel, writes a
copy to a temporary directory in which every ``callbacks.ModelCheckpoint(`` constructor call is
``BestModelCheckpoint(`` from ``bestsave.adapters.keras`` (``--stock`` keeps Keras's class), and
runs it with pytest once per backend (``KERAS_BACKEND`` = tensorflow, jax, torch).

Keras's tests are two long functions made of numbered cases (``# Case 5: ...``). So that one
failing case does not hide the ones after it, each case is run inside a ``with`` block that
records its outcome and carries on; the test still fails when any of its cases failed. Cases
after a failed one run on whatever state it left behind (a file it did not remove, say).

Nothing of Keras's code is in this file: the test module is read from the installed wheel.

Usage::

    python tests/dropin/keras_suite.py                    # ours, every backend
    python tests/dropin/keras_suite.py --stock            # Keras's own ModelCheckpoint
    python tests/dropin/keras_suite.py --compare          # both, side by side
    python tests/dropin/keras_suite.py --backends jax -v  # traceback key lines of failures

The exit status is 0 when every case passed (with ``--compare``: when ours passed every case
the stock class passed), a case listed in ``ACCEPTED`` failing the way it lists aside: there
bestsave differs from Keras on purpose.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("tensorflow", "jax", "torch")
TEST_MODULE = ("src", "callbacks", "model_checkpoint_test.py")
STOCK_CALL = "callbacks.ModelCheckpoint("
OURS_CALL = "BestModelCheckpoint("
OURS_IMPORT = "from bestsave.adapters.keras import BestModelCheckpoint"
ANCHOR_IMPORT = "from keras.src import callbacks"
# A case starts at a comment such as "# Case 8a: ..." or "# Model Checkpoint load model ...".
CASE_LABEL = re.compile(r"^\s+#\s*(?P<label>Case\s+\w+|Model Checkpoint\b[^:]*)")
TEST_DEF = re.compile(r"^(?P<indent>\s*)def (?P<name>test_\w+)\(")
# Cases where bestsave differs from Keras on purpose: the error that shows it, and why.
ACCEPTED = {
    ("test_model_checkpoint_options", "Case 5"): (
        "bestsave.metrics.MissingMetricError",
        "a monitor missing with save_best_only=True is an error, where Keras warns and saves "
        "every epoch: a misspelt name would keep the last epoch, not the best",
    ),
}

# Put at the top of the generated module: records each case's outcome and carries on.
PRELUDE = '''\
import json as _dropin_json, os as _dropin_os, traceback as _dropin_tb


class _dropin_case:
    """Runs one case of a test; records how it ended and swallows its failure."""

    failed = {}

    def __init__(self, test, label):
        self.test, self.label = test, label

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            return False
        entry = {"test": self.test, "case": self.label, "outcome": "passed"}
        if kind is not None:
            entry["outcome"] = "failed"
            entry["error"] = f"{kind.__module__}.{kind.__qualname__}: {error}"
            entry["frames"] = [
                [frame.filename, frame.lineno, frame.name, frame.line or ""]
                for frame in _dropin_tb.extract_tb(tb)
            ]
            # What was raised inside (pytest.warns reports only "DID NOT WARN", say).
            inner = error.__cause__ or error.__context__
            if inner is not None:
                entry["inner"] = {
                    "error": f"{type(inner).__module__}.{type(inner).__qualname__}: {inner}",
                    "frames": [
                        [frame.filename, frame.lineno, frame.name, frame.line or ""]
                        for frame in _dropin_tb.extract_tb(inner.__traceback__)
                    ],
                }
            type(self).failed.setdefault(self.test, []).append(self.label)
        with open(_dropin_os.environ["DROPIN_CASES"], "a") as out:
            out.write(_dropin_json.dumps(entry) + "\\n")
        return True

    @classmethod
    def finish(cls, test):
        failed = cls.failed.pop(test, [])
        assert not failed, f"cases failed: {', '.join(failed)}"


'''


def keras_test_file() -> Path:
    spec = importlib.util.find_spec("keras")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("keras is not installed in this interpreter")
    path = Path(next(iter(spec.submodule_search_locations)), *TEST_MODULE)
    if not path.is_file():
        sys.exit(f"{path} is not in the installed Keras wheel")
    return path


@dataclass
class Generated:
    source: str
    lines: dict[int, int]  # generated line -> line of Keras's file
    replaced: int
    cases: list[tuple[str, str]] = field(default_factory=list)


def generate(original: str, stock: bool) -> Generated:
    """Keras's test module, with our class swapped in and each case wrapped."""
    replaced = original.count(STOCK_CALL)
    if not stock:
        if replaced == 0 or original.count(ANCHOR_IMPORT + "\n") != 1:
            sys.exit("Keras's test file changed: no `callbacks.ModelCheckpoint(` to replace")
        original = original.replace(STOCK_CALL, OURS_CALL)
    src = original.splitlines()
    out: list[tuple[str, int | None]] = [(line, None) for line in PRELUDE.splitlines()]
    cases: list[tuple[str, str]] = []

    # Where each test function's body ends (first non-blank line back at its indentation or less).
    i = 0
    while i < len(src):
        line = src[i]
        out.append((line, i + 1))
        if line == ANCHOR_IMPORT and not stock:
            out.append((OURS_IMPORT, None))
        match = TEST_DEF.match(line)
        if not match:
            i += 1
            continue
        name, def_indent = match["name"], len(match["indent"])
        # The signature may span lines; the body starts after the line ending with "):".
        while not src[i].rstrip().endswith(":"):
            i += 1
            out.append((src[i], i + 1))
        end = i + 1
        while end < len(src) and (
            not src[end].strip() or len(src[end]) - len(src[end].lstrip()) > def_indent
        ):
            end += 1
        while end > i + 1 and not src[end - 1].strip():
            end -= 1
        body = list(range(i + 1, end))
        starts = [j for j in body if CASE_LABEL.match(src[j])]
        body_indent = None
        for j in body:
            if src[j].strip():
                body_indent = src[j][: len(src[j]) - len(src[j].lstrip())]
                break
        assert body_indent is not None
        # The part before the first case (the model, the data) is left as it is.
        first = starts[0] if starts else end
        for j in range(i + 1, first):
            out.append((src[j], j + 1))
        for k, start in enumerate(starts):
            stop = starts[k + 1] if k + 1 < len(starts) else end
            m = CASE_LABEL.match(src[start])
            label = m["label"].strip()
            cases.append((name, label))
            out.append((f"{body_indent}with _dropin_case({name!r}, {label!r}):", start + 1))
            for j in range(start, stop):
                text = src[j]
                out.append((("    " + text) if text.strip() else text, j + 1))
        out.append((f"{body_indent}_dropin_case.finish({name!r})", None))
        i = end
    mapping = {n + 1: orig for n, (_, orig) in enumerate(out) if orig is not None}
    source = "\n".join(text for text, _ in out) + "\n"
    return Generated(source, mapping, replaced, cases)


@dataclass
class Run:
    backend: str
    stock: bool
    tests: dict[str, str]  # test name -> passed / failed / skipped / error
    cases: list[dict]
    summary: str
    output: str


def run_backend(backend: str, gen: Generated, workdir: Path, stock: bool, timeout: int) -> Run:
    variant = "stock" if stock else "ours"
    folder = workdir / f"{variant}-{backend}"
    folder.mkdir(parents=True, exist_ok=True)
    test_file = folder / "model_checkpoint_test.py"
    test_file.write_text(gen.source)
    # Its own rootdir: neither bestsave's pytest settings nor Keras's conftest apply.
    (folder / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    requires_trainable_backend: Keras's marker\n"
    )
    cases_file = folder / "cases.jsonl"
    cases_file.unlink(missing_ok=True)
    report = folder / "report.xml"
    env = dict(os.environ, KERAS_BACKEND=backend, DROPIN_CASES=str(cases_file),
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONDONTWRITEBYTECODE="1")  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", str(test_file), "-p", "no:cacheprovider",
           "--rootdir", str(folder), "-c", str(folder / "pytest.ini"), "-q", "--tb=short",
           "-W", "ignore::DeprecationWarning", f"--junitxml={report}"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        output = f"timed out after {timeout}s\n{exc.stdout or ''}"
    tests = parse_junit(report) if report.exists() else {}
    cases = []
    if cases_file.exists():
        cases = [json.loads(line) for line in cases_file.read_text().splitlines() if line]
    tail = [line for line in output.splitlines() if line.strip()]
    return Run(backend, stock, tests, cases, tail[-1] if tail else "(no output)", output)


def parse_junit(report: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    tests = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
        tests[case.get("name", "?")] = outcome
    return tests


def key_lines(entry: dict, gen: Generated, test_path: str) -> list[str]:
    """The failing line of Keras's test, the deepest frames in bestsave, and the error."""
    lines = []
    frames = entry.get("frames", [])
    in_test = [f for f in frames if os.path.basename(f[0]) == os.path.basename(test_path)]
    if in_test:
        _, lineno, _, text = in_test[-1]
        lines.append(f"    test line {gen.lines.get(lineno, '?')}: {text}")
    ours = [f for f in frames if "/bestsave/" in f[0] or "/adapters/" in f[0]]
    for filename, lineno, func, text in ours[-3:]:
        short = re.sub(r".*/(bestsave|adapters)/", r"\1/", filename)
        lines.append(f"    {short}:{lineno} in {func}: {text}")
    if frames and frames[-1] not in in_test and frames[-1] not in ours:
        filename, lineno, func, text = frames[-1]
        short = re.sub(r".*/site-packages/", "", filename)
        lines.append(f"    {short}:{lineno} in {func}: {text}")
    error = " ".join(entry.get("error", "").split())
    lines.append("    " + (error if len(error) < 400 else error[:400] + " ..."))
    if "inner" in entry:
        lines.append("    raised inside it:")
        lines += ["  " + line for line in key_lines(entry["inner"], gen, test_path)]
    return lines


def accepted(entry: dict) -> str | None:
    """Why ``entry``, a failed case, differs from Keras on purpose; None if it should pass."""
    error, why = ACCEPTED.get((entry["test"], entry["case"]), ("", None))
    return why if why and entry.get("error", "").startswith(error + ":") else None


def print_run(run: Run, gen: Generated, verbose: bool, test_path: str) -> None:
    variant = "stock ModelCheckpoint" if run.stock else "BestModelCheckpoint"
    print(f"\n== {run.backend}: {variant}  ({run.summary})")
    if not run.tests:
        print("  pytest produced no report:")
        print("\n".join("  " + line for line in run.output.splitlines()[-30:]))
        return
    for test, outcome in run.tests.items():
        print(f"  {outcome.upper():7} {test}")
        for entry in (e for e in run.cases if e["test"] == test):
            why = accepted(entry) if entry["outcome"] == "failed" and not run.stock else None
            print(f"      {entry['outcome']:7} {entry['case']}")
            if why:
                print(f"          accepted: {why}")
            elif entry["outcome"] == "failed" and verbose:
                print("\n".join(key_lines(entry, gen, test_path)))
            elif entry["outcome"] == "failed":
                inner = entry.get("inner", entry)
                error = " ".join(inner.get("error", "").split())
                print(f"          {error[:150]}{' ...' if len(error) > 150 else ''}")
    seen = {(e["test"], e["case"]) for e in run.cases}
    for test, label in gen.cases:
        if (test, label) not in seen and run.tests.get(test) not in ("skipped", None):
            print(f"      {'not run':7} {label}  ({test} stopped before it)")
    failed_tests = [t for t, o in run.tests.items() if o in ("failed", "error")]
    if failed_tests and verbose and not any(e["outcome"] == "failed" for e in run.cases):
        print("\n".join("  " + line for line in run.output.splitlines()[-40:]))


def regressed(run: Run, baseline: Run | None) -> bool:
    """Whether ``run`` failed where ``baseline`` (the stock class's run) passed, or anywhere
    without one; a case of ours failing as ``ACCEPTED`` lists does not count."""
    if not run.tests:
        return True
    passed = (
        {(e["test"], e["case"]) for e in baseline.cases if e["outcome"] == "passed"}
        if baseline
        else None
    )
    for entry in run.cases:
        if entry["outcome"] != "failed" or (not run.stock and accepted(entry)):
            continue
        if passed is None or (entry["test"], entry["case"]) in passed:
            return True
    # A test that failed outside its cases (in its set-up, say).
    with_cases = {e["test"] for e in run.cases}
    return any(
        outcome in ("failed", "error")
        and test not in with_cases
        and (baseline is None or baseline.tests.get(test) == "passed")
        for test, outcome in run.tests.items()
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--stock", action="store_true", help="run Keras's own ModelCheckpoint")
    which.add_argument("--compare", action="store_true", help="run the stock class and ours")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("-v", "--verbose", action="store_true", help="traceback key lines")
    parser.add_argument("--keep", metavar="DIR", help="write the generated files here")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per pytest run")
    args = parser.parse_args()

    test_path = keras_test_file()
    original = test_path.read_text()
    variants = [True, False] if args.compare else [args.stock]
    print(f"Keras test module: {test_path}")
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="keras-dropin-"))
    runs: list[Run] = []
    for stock in variants:
        gen = generate(original, stock)
        if not stock:
            print(f"{gen.replaced} `{STOCK_CALL}` calls replaced by `{OURS_CALL}`")
        for backend in args.backends:
            run = run_backend(backend, gen, workdir, stock, args.timeout)
            print_run(run, gen, args.verbose, test_path.name)
            runs.append(run)

    print("\nSummary (tests passed / run; cases passed / run):")
    status = 0
    for run in runs:
        passed = sum(o == "passed" for o in run.tests.values())
        cases_passed = sum(e["outcome"] == "passed" for e in run.cases)
        variant = "stock" if run.stock else "ours "
        failed = [e for e in run.cases if e["outcome"] == "failed"]
        names = [e["case"] + (" (accepted)" if not run.stock and accepted(e) else "")
                 for e in failed]  # fmt: skip
        print(f"  {variant} {run.backend:10} tests {passed}/{len(run.tests)}  "
              f"cases {cases_passed}/{len(run.cases)}"
              + (f"  failed: {', '.join(names)}" if names else ""))  # fmt: skip
    for run in runs:
        if args.compare and run.stock:
            continue
        stock = next((r for r in runs if r.stock and r.backend == run.backend), None)
        if regressed(run, None if run.stock else stock):
            status = 1
    if args.keep:
        print(f"\nGenerated files and pytest reports: {workdir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
