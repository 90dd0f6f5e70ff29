"""Lightning's own tests that build a ``ModelCheckpoint``, run against ``BestCheckpoint``.

Extracts ``tests/tests_pytorch`` (its conftest.py files and helper packages included) and the
repository's ``pyproject.toml`` (Lightning's pytest settings) at a git ref of the Lightning
repository into a temporary directory. Unless ``--stock`` is given, every *constructor call*
``ModelCheckpoint(...)`` (also ``callbacks.ModelCheckpoint(...)``,
``pl.callbacks.ModelCheckpoint(...)``) in every Python file of that tree is rewritten to
``BestCheckpoint(...)``, imported as ``from bestsave.adapters.lightning import BestCheckpoint``.
Found with the tokenizer, so subclass definitions (``class X(ModelCheckpoint):``), imports,
``isinstance`` checks, ``mock.patch.object(ModelCheckpoint, ...)``, strings and comments are left
alone. BestCheckpoint subclasses ModelCheckpoint, so isinstance checks and patches of
ModelCheckpoint's methods still reach it.

Then pytest runs the chosen modules (default: ``checkpointing/test_model_checkpoint.py`` and every
other module under tests_pytorch that calls ``ModelCheckpoint(``; modules that need a GPU,
DeepSpeed and so on skip their tests through Lightning's ``RunIf``), with
``-p no:cacheprovider``, pytest-timeout, and a junit XML report in ``--out``. It prints each
module's passed/failed/skipped/error counts. ``--compare STOCK.xml OURS.xml`` lists the tests that
pass with the stock class and fail with ours, with the key line of each failure.

Nothing of Lightning's code is in this file: their test files are read from the repository.

Packages Lightning's tests need beyond bestsave's test environment (from Lightning's
``requirements/pytorch/test.txt``; install into the interpreter that runs this)::

    pip install pytest-timeout pytest-xdist pytest-rerunfailures psutil tensorboard \
        huggingface-hub "omegaconf>=2.2.3,<2.4.0" "hydra-core>=1.2.0,<1.4.0" \
        "tensorboardX>=2.2,<2.7.0"
    # pytest-rerunfailures registers the `flaky` marker some modules use (--strict-markers);
    # tensorboardX: Lightning's extra requirements (some tests use it directly).
    # already there in .nox/tests: cloudpickle scikit-learn pandas fastapi uvicorn
    #   jsonargparse torchmetrics torchvision wandb mlflow
    # not needed by the modules run here: onnx onnxruntime onnxscript (their tests skip
    #   or are in other modules), pytest-rerunfailures, pytest-random-order, pytest-cov

Usage::

    python tests/dropin/lightning_suite.py --repo /path/to/pytorch-lightning --ref 2.6.5 \\
        --stock --out /tmp/lt-stock -n 2
    python tests/dropin/lightning_suite.py --repo ... --ref 2.6.5 --out /tmp/lt-ours -n 2
    python tests/dropin/lightning_suite.py --compare /tmp/lt-stock/junit.xml \\
        /tmp/lt-ours/junit.xml
    python tests/dropin/lightning_suite.py ... --modules checkpointing/test_model_checkpoint.py \\
        -- -k top_k -x     # anything after -- goes to pytest

``--repo`` is a bare git directory or a checkout (read with ``git archive``), or with
``--ref ''`` a plain directory holding ``tests/tests_pytorch``.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tokenize
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

OURS_NAME = "BestCheckpoint"
OURS_IMPORT = "from bestsave.adapters.lightning import BestCheckpoint\n"
STOCK_NAME = "ModelCheckpoint"
TESTS = "tests/tests_pytorch"
MAIN_MODULE = "checkpointing/test_model_checkpoint.py"
# Loaded with -p: tensorboard's TensorFlow stub instead of TensorFlow (see main()).
# tensorboard.compat.tf() takes its stub when the marker module tensorboard.compat.notf imports.
PLUGIN = """\
import sys
import types

sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
"""


# -- extracting ---------------------------------------------------------------------------------


def extract(repo: Path, ref: str, dest: Path) -> Path:
    """Lay ``tests/tests_pytorch`` and ``pyproject.toml`` of ``repo`` at ``ref`` in ``dest``."""
    if not ref:
        shutil.copytree(repo / TESTS, dest / TESTS)
        if (repo / "pyproject.toml").is_file():
            shutil.copy(repo / "pyproject.toml", dest / "pyproject.toml")
        return dest
    proc = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", ref, TESTS, "pyproject.toml"],
        capture_output=True,
    )
    if proc.returncode != 0 or not proc.stdout:
        sys.exit(f"git archive {ref} failed: {proc.stderr.decode(errors='replace')}")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


# -- rewriting ----------------------------------------------------------------------------------


def constructor_calls(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Spans (start, end) of ``[a.b.]ModelCheckpoint`` where it is called (followed by ``(``)."""
    tokens = [
        t
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type not in (tokenize.NL, tokenize.COMMENT)
    ]
    spans = []
    for i, tok in enumerate(tokens):
        if tok.type != tokenize.NAME or tok.string != STOCK_NAME:
            continue
        if i + 1 >= len(tokens) or tokens[i + 1].string != "(":
            continue
        prev = tokens[i - 1] if i else None
        if prev is not None and prev.string in ("def", "class"):
            continue  # `def ModelCheckpoint(` / `class ModelCheckpoint(`: not a call
        # Take a dotted prefix along: `pl.callbacks.ModelCheckpoint(` -> `BestCheckpoint(`.
        j = i
        while j >= 2 and tokens[j - 1].string == "." and tokens[j - 2].type == tokenize.NAME:
            j -= 2
        spans.append((tokens[j].start, tok.end))
    return spans


def first_import_line(tree: ast.Module) -> int:
    """1-based line before which our import goes: after the docstring and __future__ imports."""
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        return (
            node.lineno
            if not getattr(node, "decorator_list", None)
            else min([node.lineno] + [d.lineno for d in node.decorator_list])
        )
    return 1


def rewrite(source: str, header: str = OURS_IMPORT) -> tuple[str, int]:
    """``source`` with every ``ModelCheckpoint(`` call made ``BestCheckpoint(``, and the count."""
    spans = constructor_calls(source)
    if not spans:
        return source, 0
    lines = source.splitlines(keepends=True)
    for (srow, scol), (erow, ecol) in reversed(spans):
        assert srow == erow, "a dotted name across lines"
        line = lines[srow - 1]
        lines[srow - 1] = line[:scol] + OURS_NAME + line[ecol:]
    at = first_import_line(ast.parse(source)) - 1
    lines.insert(at, header)
    out = "".join(lines)
    compile(out, "<rewritten>", "exec")  # still Python
    return out, len(spans)


def rewrite_tree(root: Path, header: str = OURS_IMPORT) -> dict[str, int]:
    counts = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if STOCK_NAME not in text:
            continue
        new, n = rewrite(text, header)
        if n:
            path.write_text(new)
            counts[path.relative_to(root).as_posix()] = n
    return counts


def shim_header(defaults: dict[str, object]) -> str:
    """Our import, then a subclass of the same name that fills in constructor defaults.

    Diagnostic only (``--defaults``): shows what fails behind an early refusal, e.g.
    ``{"mode": "min"}`` (ModelCheckpoint's default mode) behind ``mode='auto'`` refusing a name.
    Defaults apply to keywords the call leaves out and that are not given positionally.
    """
    order = ["dirpath", "filename", "monitor", "verbose", "save_last", "save_top_k",
             "save_on_exception", "save_weights_only", "mode"]  # fmt: skip
    return (
        "from bestsave.adapters.lightning import BestCheckpoint as _DropinBestCheckpoint\n"
        "class BestCheckpoint(_DropinBestCheckpoint):\n"
        "    def __init__(self, *args, **kwargs):\n"
        f"        for _key, _value in {defaults!r}.items():\n"
        f"            if _key not in {order!r}[: len(args)]:\n"
        "                kwargs.setdefault(_key, _value)\n"
        "        super().__init__(*args, **kwargs)\n"
    )


def calling_modules(root: Path) -> list[str]:
    """Test modules (``test_*.py``) under ``root`` that call ``ModelCheckpoint(``."""
    found = []
    for path in sorted(root.rglob("test_*.py")):
        text = path.read_text()
        if STOCK_NAME in text and constructor_calls(text):
            found.append(path.relative_to(root).as_posix())
    return found


# -- reading results ----------------------------------------------------------------------------


def outcomes(junit: Path, details: dict[str, str] | None = None) -> dict[str, tuple[str, str, str]]:
    """Test id -> (module file, outcome, key message) from a junit XML report (xunit1).

    ``details``, when given, receives each failure's full text (the short traceback).
    """
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        file = case.get("file") or classname.replace(".", "/") + ".py"
        test_id = f"{classname}::{name}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = key_line(child.get("message", ""), child.text or "")
                if details is not None:
                    details[f"{classname}::{name}"] = (child.text or "")[-6000:]
                break
            if child.tag == "skipped":
                outcome = "skipped"
                message = (child.get("message") or "")[:200]
        if test_id in out and out[test_id][1] != "passed" and outcome == "error":
            # An error in teardown after a failure: keep the failure, note the error.
            outcome = out[test_id][1]
        elif test_id in out and outcome == "error":
            outcome = "error"
        out[test_id] = (file, outcome, message)
    return out


def key_line(message: str, text: str) -> str:
    """The line that says what went wrong: the exception line ``E   ...`` of the traceback."""
    errors = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    if errors and errors[0] in ("AssertionError: assert False", "assert False", "AssertionError"):
        return " | ".join(errors[:3])[:300]
    if errors:
        # The first "E" line names the assertion; take the exception line if there is one.
        named = [
            e for e in errors if ("Error" in e.split(":")[0] or "Exception" in e.split(":")[0])
        ]
        return (named[-1] if named else errors[0])[:300]
    return (message.splitlines()[0] if message else "")[:300]


def per_module(results: dict[str, tuple[str, str, str]]) -> dict[str, Counter]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for file, outcome, _ in results.values():
        counts[file][outcome] += 1
    return counts


def print_counts(results: dict[str, tuple[str, str, str]], label: str) -> None:
    counts = per_module(results)
    total: Counter = Counter()
    print(f"\n{label}: per module (passed / failed / skipped / error)")
    width = max((len(m) for m in counts), default=10)
    for module in sorted(counts):
        c = counts[module]
        total.update(c)
        print(
            f"  {module:<{width}}  {c['passed']:4d} {c['failed']:4d} {c['skipped']:4d} "
            f"{c['error']:4d}"
        )
    print(
        f"  {'TOTAL':<{width}}  {total['passed']:4d} {total['failed']:4d} {total['skipped']:4d} "
        f"{total['error']:4d}"
    )


def compare(stock_xml: Path, ours_xml: Path) -> int:
    stock, ours = outcomes(stock_xml), outcomes(ours_xml)
    print_counts(stock, "stock")
    print_counts(ours, "ours")
    passed = [t for t, (_, o, _) in stock.items() if o == "passed" and t in ours]
    regressions = sorted(t for t in passed if ours[t][1] not in ("passed", "skipped"))
    share = 1 - len(regressions) / len(passed) if passed else 1.0
    print(
        f"\nof {len(passed)} tests that pass with ModelCheckpoint (and ran with ours), "
        f"{len(passed) - len(regressions)} pass with BestCheckpoint ({share:.1%})"
    )
    print(f"{len(regressions)} tests pass with ModelCheckpoint and fail with BestCheckpoint:")
    for t in regressions:
        _, outcome, msg = ours.get(t, ("", "missing", ""))
        print(f"  {t}  [{outcome}]\n      {msg}")
    gained = sorted(
        t
        for t, (_, o, _) in ours.items()
        if o == "passed" and stock.get(t, ("", "", ""))[1] in ("failed", "error")
    )
    if gained:
        print(f"\n{len(gained)} tests fail with ModelCheckpoint and pass with BestCheckpoint:")
        for t in gained:
            print(f"  {t}")
    return 1 if regressions else 0


# -- running ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, help="Lightning repository: bare git dir or checkout")
    parser.add_argument("--ref", default="2.6.5", help="git ref to take the tests from")
    parser.add_argument("--stock", action="store_true", help="keep Lightning's ModelCheckpoint")
    parser.add_argument("--out", type=Path, default=Path("lightning-suite-out"))
    parser.add_argument("--modules", nargs="*", help="paths relative to tests_pytorch")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("-n", dest="workers", help="pytest-xdist workers (needs pytest-xdist)")
    parser.add_argument("--timeout", type=int, default=300, help="per-test timeout, seconds")
    parser.add_argument(
        "--defaults",
        type=json.loads,
        default=None,
        metavar="JSON",
        help='diagnostic: constructor defaults for ours, e.g. \'{"mode": "min"}\'',
    )
    parser.add_argument("--keep", action="store_true", help="keep the extracted tree in --out")
    parser.add_argument("--list", action="store_true", help="list the default modules and exit")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("STOCK_XML", "OURS_XML"))
    args, unknown = parser.parse_known_args(argv)
    extra = unknown + extra

    if args.compare:
        return compare(*args.compare)
    if args.repo is None:
        parser.error("--repo is required")

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lightning-suite-"))
    try:
        root = extract(args.repo, args.ref, work)
        tests = root / TESTS
        modules = args.modules or sorted({MAIN_MODULE, *calling_modules(tests)})
        if args.list:
            print("\n".join(modules))
            return 0
        header = shim_header(args.defaults) if args.defaults else OURS_IMPORT
        rewritten = {} if args.stock else rewrite_tree(tests, header)
        label = "stock" if args.stock else "ours"
        (args.out / "rewritten.json").write_text(json.dumps(rewritten, indent=1))
        if not args.stock:
            calls = sum(rewritten.values())
            print(f"rewrote {calls} ModelCheckpoint( calls in {len(rewritten)} files")
        junit = args.out / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", *[f"tests_pytorch/{m}" for m in modules],
               "-p", "dropin_no_tf", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
               f"--junitxml={junit}", f"--timeout={args.timeout}", "-q", "--tb=short", "-rN",
               "--color=no"]  # fmt: skip
        if args.keyword:
            cmd += ["-k", args.keyword]
        if args.workers:
            cmd += ["-n", str(args.workers)]
        cmd += extra
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))  # fmt: skip
        # bestsave's test environment holds TensorFlow and JAX (for Keras); when a test first
        # imports them (through tensorboard) they set these, and Lightning's conftest fails that
        # test for "leaking environment variables". Set them beforehand, to the values they set.
        env.update(HDF5_PLUGIN_PATH="disable", TPU_SKIP_MDS_QUERY="1")
        # With TensorFlow importable, tensorboard writes through tf.io.gfile, which knows no
        # fsspec URL (memory://): Lightning's CI has no TensorFlow, so tensorboard's own stub
        # writes. A plugin loaded first (in every xdist worker too) makes tensorboard use it.
        plugins = work / "dropin_plugins"
        plugins.mkdir()
        (plugins / "dropin_no_tf.py").write_text(PLUGIN)
        env["PYTHONPATH"] = str(plugins)
        print(" ".join(cmd), flush=True)
        with open(args.out / "pytest.log", "w") as log:
            proc = subprocess.run(cmd, cwd=root / "tests", env=env, stdout=log,
                                  stderr=subprocess.STDOUT)  # fmt: skip
        print(
            (args.out / "pytest.log").read_text().splitlines()[-1:] or "", f"rc={proc.returncode}"
        )
        if not junit.is_file():
            print("no junit report: see pytest.log")
            return 2
        details: dict[str, str] = {}
        results = outcomes(junit, details)
        print_counts(results, label)
        summary = {
            t: {"module": f, "outcome": o, "message": m, "details": details.get(t, "")}
            for t, (f, o, m) in results.items()
        }
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return 0 if proc.returncode == 0 else 1
    finally:
        if args.keep:
            shutil.copytree(work, args.out / "tree", dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
