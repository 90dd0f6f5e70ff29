"""The ``bestsave`` command: look at a run, check it, plot it, average it, export it.

Usage::

    bestsave ls runs/a                  # kept checkpoints, best first (--all adds evicted ones)
    bestsave show runs/a [FILE]         # the full record of the best (or the given) checkpoint
    bestsave plot runs/a -o curve.png   # the monitored metric per epoch, the kept ones marked
    bestsave verify runs/a              # files against the manifest; exit code 0 only when clean
    bestsave repair runs/a              # rebuild a lost or damaged manifest from the records
    bestsave soup runs/a -o soup.pth    # the average of the kept checkpoints' weights (--top N)
    bestsave export runs/a best.pth     # the best as one file (a sharded one consolidated)
    bestsave compare runs/a runs/b      # the best of several runs side by side

``python -m bestsave`` is the same command. Tables use ``rich`` when it is installed
(``pip install 'bestsave[cli]'``, which brings matplotlib for ``plot`` too), aligned plain text
otherwise; ``--json`` prints what ``ls``, ``show``, ``verify`` and ``compare`` found as JSON.
Errors are one line, ``bestsave: error: ...``, saying how to fix them, with exit code 2, or 1
when the run itself is damaged (``verify`` found problems, a checkpoint fails its checksum).

Example:
    >>> import tempfile
    >>> from bestsave import BestSaver
    >>> from bestsave.cli import main
    >>> run = tempfile.mkdtemp()
    >>> saver = BestSaver(run, monitor="val_acc", trackers=())
    >>> _ = saver.step(0, {"val_acc": 0.8}, write=lambda p: open(p, "w").write("weights"))
    >>> main(["verify", run])  # doctest: +ELLIPSIS
    ok: ... 1 kept checkpoint matches its record
    0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from bestsave.layout import META, runs_in
from bestsave.manifest import ChecksumError, Manifest, fetch, load_manifest
from bestsave.memory import format_size
from bestsave.metrics import MissingMetricError, as_number
from bestsave.monitor import Monitor, resolve_mode
from bestsave.record import Record
from bestsave.store import open_store

__all__ = ["main"]

_EVAL_PREFIXES = ("val", "valid", "validation", "test")
_KEY_METRICS = 4
"""Metric columns ``ls`` and ``compare`` show when no ``--metric`` is given."""


# -- entry point -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (``sys.argv[1:]`` by default); returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return int(args.command(args))
    except BrokenPipeError:  # ``bestsave ls runs/a | head``: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ChecksumError as e:
        return _error(str(e), 1)
    except (OSError, ValueError, MissingMetricError, ImportError) as e:
        return _error(str(e), 2)
    except KeyboardInterrupt:
        return 130


def _error(message: str, code: int) -> int:
    print(f"bestsave: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bestsave",
        description="Look at, check, plot, average and export the checkpoints bestsave kept.",
        epilog="Run 'bestsave COMMAND -h' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_views(commands)
    _add_tools(commands)
    _add_export(commands)
    return parser


def _command(commands: Any, name: str, run: Any, help: str) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = commands.add_parser(name, help=help, description=help)
    sub.set_defaults(command=run)
    return sub


def _run_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--run",
        "-r",
        metavar="NAME",
        help="the run to read, when the directory holds several (each saver's is named "
        "after its file name template)",
    )


def _metric_option(sub: argparse.ArgumentParser, what: str) -> None:
    sub.add_argument(
        "--metric",
        "-m",
        action="append",
        default=[],
        metavar="NAME",
        help=f"a logged metric to {what} (repeat for more)",
    )


def _add_views(commands: Any) -> None:
    """The commands that show what a run kept: ls, show, plot."""
    ls = _command(commands, "ls", _ls, "List the kept checkpoints, best first.")
    ls.add_argument("dir", help="the run's directory (the saver's dirpath)")
    _run_option(ls)
    ls.add_argument(
        "--all",
        "-a",
        action="store_true",
        help="also list the checkpoints evicted since, from history.jsonl",
    )
    _metric_option(ls, "show as a column")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")

    show = _command(
        commands, "show", _show, "Show the full record of the best (or the given) checkpoint."
    )
    show.add_argument("dir", help="the run's directory, or a checkpoint file in it")
    _run_option(show)
    show.add_argument("file", nargs="?", help="a kept checkpoint's file name (default: the best)")
    show.add_argument("--json", action="store_true", help="print the record as JSON")

    plot = _command(
        commands, "plot", _plot, "Plot the monitored metric per epoch, the kept ones marked."
    )
    plot.add_argument("dir", help="the run's directory")
    _run_option(plot)
    plot.add_argument(
        "-o",
        "--output",
        default="curve.png",
        help="the image to write: .png, .svg or .pdf (default: curve.png)",
    )
    _metric_option(plot, "plot in its own panel")
    plot.add_argument("--title", help="the figure's title")


def _add_tools(commands: Any) -> None:
    """The commands that mend, check, average and compare runs."""
    repair = _command(
        commands,
        "repair",
        _repair,
        "Rebuild a lost or damaged manifest from the run's records and history.",
    )
    repair.add_argument("dir", help="the run's directory")
    _run_option(repair)

    verify = _command(
        commands,
        "verify",
        _verify,
        "Check files against the manifest; exit code 0 only when clean.",
    )
    verify.add_argument("dir", nargs="+", help="the run's directory (several may be given)")
    _run_option(verify)
    verify.add_argument(
        "--no-checksums",
        action="store_true",
        help="compare sizes only, not sha256 (quick on large checkpoints)",
    )
    verify.add_argument("--json", action="store_true", help="print the problems as JSON")

    soup = _command(
        commands, "soup", _soup, "Average the weights of the kept checkpoints into one file."
    )
    soup.add_argument("dir", help="the run's directory")
    _run_option(soup)
    soup.add_argument(
        "-o",
        "--output",
        required=True,
        help="the file to write, in the run's format (e.g. soup.pth, soup.ckpt, soup.weights.h5)",
    )
    soup.add_argument(
        "--top",
        type=_positive_int,
        metavar="N",
        help="average the N best only (default: every checkpoint kept for its score)",
    )

    compare = _command(commands, "compare", _compare, "Show the best of several runs side by side.")
    compare.add_argument("dir", nargs="+", help="the runs' directories")
    _run_option(compare)
    _metric_option(compare, "show as a column")
    compare.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_export(commands: Any) -> None:
    """The command that turns a kept checkpoint into one ordinary file."""
    export = _command(
        commands,
        "export",
        _export,
        "Write a kept checkpoint as one file; a sharded one is consolidated on this process.",
    )
    export.add_argument("dir", help="the run's directory")
    export.add_argument(
        "output",
        help="the file to write: .safetensors (the model's weights) or any other name "
        "(torch.save of the whole checkpoint)",
    )
    _run_option(export)
    export.add_argument("--file", help="a kept checkpoint's file name (default: the best)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return value


def _version() -> str:
    try:
        return metadata.version("bestsave")
    except metadata.PackageNotFoundError:
        return "unknown"


# -- commands --------------------------------------------------------------------------------


def _ls(args: argparse.Namespace) -> int:
    manifest = _load(args.dir, args.run)
    rows = [_row(r, manifest, "kept") for r in manifest.kept]
    if manifest.last is not None:
        rows.append(_row(manifest.last, manifest, "kept"))
    if args.all:
        rows += _evicted(manifest)
    if args.json:
        _print_json(
            {
                "dir": manifest.dirpath,
                "monitor": manifest.monitor,
                "mode": manifest.mode,
                "best": manifest.best_name if manifest.best else None,
                "run": manifest.run,
                "checkpoints": rows,
            }
        )
        return 0
    if not rows:
        print(f"{manifest.dirpath}: no checkpoint kept yet ({_policy(manifest)})")
        return 0
    names = _key_metrics(
        [r["metrics"] for r in rows if r["kind"] != "exception"], manifest.monitor, args.metric
    )
    # A record's kind says why it was saved: an earlier best stays "best" after it is beaten.
    columns = ["", "file", "saved as", "epoch", "step", manifest.monitor, *names, "size", "age"]
    if args.all:
        columns.insert(3, "status")
    table = _Table(
        columns, title=_title(manifest), numeric={"epoch", "step", "size", manifest.monitor, *names}
    )
    for row in rows:
        cells = [
            "*" if row["best"] else "",
            row["file"],
            row["kind"],
            _num(row["epoch"]),
            _num(row["step"]),
            _num(row["score"], 5),
            *[_num(row["metrics"].get(n), 5) for n in names],
            _bytes(row["bytes"]),
            _age(row["time"]),
        ]
        if args.all:
            cells.insert(3, row["status"])
        table.add(cells, highlight=row["best"], dim=row["status"] != "kept")
    table.print()
    return 0


_STAGED = {
    "two sets": "copied into host memory (two sets fit)",
    "one set": "copied into host memory (one set fits)",
    "chunked": "chunked (no copy fits in staging_memory)",
    "streaming": "written from the live state (no copy fits in staging_memory)",
}


def _show(args: argparse.Namespace) -> int:
    directory, file, run = args.dir, args.file, args.run
    if file is None and _is_checkpoint(directory):  # ``bestsave show runs/a/epoch=003.pth``
        directory, file = os.path.dirname(directory) or ".", os.path.basename(directory)
        folder, name = os.path.split(os.path.abspath(directory))
        if os.path.basename(folder) == META:  # a record: ``runs/a/.bestsave/<run>/x.json``
            directory, run = os.path.dirname(folder), name
    manifest = _load(directory, run)
    record = _find(manifest, file)
    is_best = record.name == manifest.best_name
    if args.json:
        _print_json({**record.to_dict(), "path": record.path, "best": is_best})
        return 0

    header = _Table(
        ["", ""], title=f"{record.name}{'  (best)' if is_best else ''}", show_header=False
    )
    elapsed = f", {record.elapsed_s:.1f} s into the run" if record.elapsed_s else ""
    for key, value in (
        ("kind", record.kind),
        ("epoch", _num(record.epoch)),
        ("step", _num(record.step)),
        (record.monitor, f"{_num(record.score, 8)} ({record.mode})"),
        ("saved", f"{_when(record.time)} ({_age(record.time)} ago){elapsed}"),
        ("size", _bytes(record.bytes)),
        ("sha256", record.sha256 or "-"),
        ("parts", f"{len(record.parts)} files (a sharded checkpoint)" if record.parts else "-"),
        ("staged", _STAGED.get(record.staging, "-")),
        ("path", record.path),
    ):
        header.add([key, value])
    header.print()

    if record.metrics:
        metrics = _Table(
            ["metric", "value"], title=f"metrics at epoch {record.epoch}", numeric={"value"}
        )
        for key, value in record.metrics.items():
            metrics.add([key, _num(value, 8) if as_number(value) is not None else str(value)])
        metrics.print()

    run = _Table(["", ""], title="run", show_header=False)
    for key, value in _flatten(record.run or manifest.run):
        run.add([key, value])
    run.print()
    return 0


def _is_checkpoint(path: str) -> bool:
    """A file, or a folder checkpoint (a sharded one) beside a run's ``.bestsave`` folder."""
    if os.path.isfile(path):
        return True
    parent = os.path.dirname(os.path.abspath(path))
    return (
        os.path.isdir(path)
        and not os.path.isdir(os.path.join(path, META))
        and (os.path.isdir(os.path.join(parent, META)))
    )


def _plot(args: argparse.Namespace) -> int:
    from bestsave.plot import plot_history

    manifest = _load(args.dir, args.run)
    out = plot_history(args.dir, args.output, args.metric, title=args.title, run=manifest.name)
    print(f"wrote {out}")
    return 0


def _repair(args: argparse.Namespace) -> int:
    from bestsave.repair import repair

    done = repair(args.dir, args.run)
    manifest = done.manifest
    best = manifest.best
    what = f"best {best.name} ({manifest.monitor}={_num(best.score, 5)})" if best else "no best"
    n = len(done.kept)
    print(
        f"rebuilt {manifest.files.manifest} in {manifest.dirpath}: {n} checkpoint"
        f"{'s' * (n != 1)} checked against their records, {what}"
    )
    for line in done.lost:
        print(f"  lost: {line}")
    return 1 if done.lost else 0


def _verify(args: argparse.Namespace) -> int:
    from bestsave.verify import verify

    found = []
    for directory in args.dir:
        for manifest in _load_all(directory, args.run):
            problems = verify(directory, manifest.name, checksums=not args.no_checksums)
            found.append((manifest, problems))
    if args.json:
        _print_json(
            [
                {"dir": m.dirpath, "ok": not p, "problems": [x.to_dict() for x in p]}
                for m, p in found
            ]
        )
    else:
        for manifest, problems in found:
            if not problems:
                n = len(manifest.kept) + (manifest.last is not None)
                what = (
                    "kept checkpoint matches its record"
                    if n == 1
                    else ("kept checkpoints match their records")
                )
                print(f"ok: {manifest.dirpath}: {n} {what}")
                continue
            print(f"{manifest.dirpath}: {len(problems)} problem{'s' * (len(problems) != 1)}")
            for problem in problems:
                print(f"  {problem.kind:<9} {problem.name}: {problem.detail}")
    return 1 if any(p for _, p in found) else 0


def _soup(args: argparse.Namespace) -> int:
    from bestsave.soup import members, soup

    manifest = _load(args.dir, args.run)
    available = len(members(args.dir, run=manifest.name))
    chosen = soup(args.dir, args.output, top=args.top, run=manifest.name)
    table = _Table(
        ["", "file", "kind", "epoch", manifest.monitor],
        title=f"averaged {len(chosen)} checkpoint{'s' * (len(chosen) != 1)}",
        numeric={"epoch", manifest.monitor},
    )
    for r in chosen:
        best = r.name == manifest.best_name
        table.add(
            ["*" if best else "", r.name, r.kind, _num(r.epoch), _num(r.score, 5)], highlight=best
        )
    table.print()
    if available == 1:
        print(
            "note: the run keeps one checkpoint for its score, so the soup is the best "
            "itself; keep more with top_k or delta",
            file=sys.stderr,
        )
    elif args.top and args.top > available:
        print(
            f"note: --top {args.top} asked for more than the {available} checkpoints kept; "
            "all were averaged",
            file=sys.stderr,
        )
    print(f"wrote {args.output}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from bestsave.adapters.torch import export  # torch checkpoints are the torch adapter's

    manifest = _load(args.dir, args.run)
    record = _find(manifest, args.file)
    export(fetch(record), args.output)
    print(f"wrote {args.output}: {record.name} (epoch {record.epoch}, "
          f"{record.monitor}={_num(record.score)})")  # fmt: skip
    return 0


def _compare(args: argparse.Namespace) -> int:
    manifests = [_load(d, args.run) for d in args.dir]
    labels = _labels(args.dir)
    monitors = {(m.monitor, m.mode) for m in manifests}
    winner = _winner(manifests) if len(monitors) == 1 else None
    rows: list[dict[str, Any]] = []
    for label, m in zip(labels, manifests, strict=True):
        best = m.best
        git = m.run.get("git") or {}
        rows.append(
            {
                "run": label,
                "dir": m.dirpath,
                "id": m.run.get("id"),
                "monitor": m.monitor,
                "mode": m.mode,
                "best": best.name if best else None,
                "score": best.score if best else None,
                "epoch": best.epoch if best else None,
                "step": best.step if best else None,
                "metrics": best.metrics if best else {},
                "framework": m.run.get("framework"),
                "commit": git.get("commit"),
                "dirty": git.get("dirty"),
                "winner": m is winner,
            }
        )
    if args.json:
        _print_json(rows)
        return 0
    names = _key_metrics(
        [r["metrics"] for r in rows if r["metrics"]], {m.monitor for m in manifests}, args.metric
    )
    table = _Table(
        ["", "run", "monitor", "best", "epoch", "step", *names, "framework", "run id", "commit"],
        title="best of each run",
        numeric={"best", "epoch", "step", *names},
    )
    for row in rows:
        commit = (row["commit"] or "-")[:10] + ("+dirty" if row["dirty"] else "")
        table.add(
            [
                "*" if row["winner"] else "",
                row["run"],
                f"{row['monitor']} ({row['mode']})",
                _num(row["score"], 5),
                _num(row["epoch"]),
                _num(row["step"]),
                *[_num(row["metrics"].get(n), 5) for n in names],
                str(row["framework"] or "-"),
                str(row["id"] or "-"),
                commit,
            ],
            highlight=row["winner"],
        )
    table.print()
    return 0


# -- what the commands share -------------------------------------------------------------------


def _load(directory: str, run: str | None) -> Manifest:
    """The run's manifest; when there is none, name the runs in the folders below, if any."""
    if os.path.isfile(directory):
        raise FileNotFoundError(
            f"{directory} is a file; pass the directory that holds it "
            f"({os.path.dirname(directory) or '.'})"
        )
    try:
        return load_manifest(directory, run)
    except FileNotFoundError:
        if os.path.isdir(directory):
            runs = sorted(
                e.name for e in os.scandir(directory) if e.is_dir() and runs_in(open_store(e.path))
            )
            if runs:
                shown = ", ".join(runs[:5]) + (", ..." if len(runs) > 5 else "")
                raise FileNotFoundError(
                    f"{directory} is not a bestsave run, but the folders in it hold runs "
                    f"({shown}); pass one of them, or compare them: bestsave compare "
                    f"{os.path.join(directory, '*')}"
                ) from None
        raise


def _load_all(directory: str, run: str | None) -> list[Manifest]:
    """The manifest of ``run``, or of every run in the directory."""
    if run is not None:
        return [_load(directory, run)]
    names = runs_in(open_store(directory))
    return [load_manifest(directory, name) for name in names] or [_load(directory, None)]


def _winner(manifests: list[Manifest]) -> Manifest | None:
    """The run whose best is best (the first listed on a tie), when they monitor one metric."""
    scored = [(m, m.best.score) for m in manifests if m.best and m.best.score is not None]
    if not scored:
        return None
    monitor = Monitor(manifests[0].monitor, resolve_mode(manifests[0].monitor, manifests[0].mode))
    return min(scored, key=lambda pair: monitor.rank_key(pair[1]))[0]


def _row(record: Record, manifest: Manifest, status: str) -> dict[str, Any]:
    data = record.to_dict()
    data.pop("run", None)  # the same for every checkpoint: printed once, as the run's
    return {
        **data,
        "file": record.name,
        "path": record.path,
        "status": status,
        "best": status == "kept" and record.name == manifest.best_name,
    }


def _evicted(manifest: Manifest) -> list[dict[str, Any]]:
    """Checkpoints saved then evicted, rebuilt from the history's decisions, best first."""
    from bestsave.verify import load_history

    open_: dict[str, dict[str, Any]] = {}
    gone: list[dict[str, Any]] = []
    for index, line in enumerate(load_history(manifest.dirpath, manifest.name)):
        decision = line["decision"]
        for name in decision.get("evicted", []):
            if name in open_:
                gone.append({**open_.pop(name), "evicted_at_epoch": line.get("epoch")})
        files, kinds = decision.get("files", []), decision.get("kind", [])
        for name, kind in zip(files, kinds, strict=False):
            open_[name] = {
                "path": name,
                "file": name,
                "kind": kind,
                "epoch": line.get("epoch"),
                "step": line.get("step"),
                "monitor": manifest.monitor,
                "mode": manifest.mode,
                "score": line.get("score"),
                "metrics": line.get("metrics", {}),
                "time": line.get("time", ""),
                "elapsed_s": line.get("elapsed_s"),
                "bytes": None,
                "sha256": None,
                "id": index,
                "status": "evicted",
                "best": False,
            }

    def rank(row: dict[str, Any]) -> tuple[bool, float]:
        score = row["score"]
        if not isinstance(score, (int, float)):
            return True, 0.0
        return False, -score if manifest.mode == "max" else score

    return sorted(gone, key=rank)


def _find(manifest: Manifest, file: str | None) -> Record:
    records = [*manifest.kept, *([manifest.last] if manifest.last else [])]
    if file is None:
        best = manifest.best
        if best is None:
            raise FileNotFoundError(
                f"the run in {manifest.dirpath} has kept no best checkpoint yet; "
                f"'bestsave ls {manifest.dirpath}' lists what it kept"
            )
        return best
    name = os.path.basename(file)
    for record in records:
        if name in (record.name, manifest.files.sidecar(record.name).rsplit("/", 1)[-1]):
            return record
    kept = ", ".join(r.name for r in records) or "none"
    raise FileNotFoundError(
        f"{name} is not kept in {manifest.dirpath} (kept: {kept}); "
        f"'bestsave ls --all {manifest.dirpath}' lists evicted ones too"
    )


def _key_metrics(
    metrics: Sequence[dict[str, Any]], monitor: str | set[str], chosen: Sequence[str]
) -> list[str]:
    """The metric columns: ``chosen``, else a few logged as numbers by every row, the
    validation and test ones first."""
    if chosen:
        logged = list(dict.fromkeys(k for m in metrics for k in m))
        for name in chosen:
            if name not in logged:
                raise MissingMetricError(name, logged, what="metric")
        return list(dict.fromkeys(chosen))
    if not metrics:
        return []
    skip = {monitor} if isinstance(monitor, str) else set(monitor)
    common = [k for k in metrics[0] if k not in skip and all(_is_number(m.get(k)) for m in metrics)]
    common.sort(key=lambda k: not k.lower().startswith(_EVAL_PREFIXES))
    return common[:_KEY_METRICS]


def _is_number(value: Any) -> bool:
    return as_number(value) is not None and not isinstance(value, bool)


def _labels(directories: Sequence[str]) -> list[str]:
    """Short names for runs: the folder's name, or the path given when names repeat."""
    names = [os.path.basename(os.path.normpath(d)) for d in directories]
    return names if len(set(names)) == len(names) else list(directories)


def _title(manifest: Manifest) -> str:
    return f"{manifest.dirpath}: {manifest.monitor} ({manifest.mode}), {_policy(manifest)}"


def _policy(manifest: Manifest) -> str:
    p = manifest.policy
    parts = [
        f"{k}={p[k]}"
        for k in ("top_k", "delta", "keep_every_n_epochs", "patience", "min_delta")
        if p.get(k)
    ]
    return ", ".join(parts) or "best only"


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, str]]:
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", str(value)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# -- formatting --------------------------------------------------------------------------------


def _num(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return "-"
    number = as_number(value)
    if number is None:
        return str(value)
    if isinstance(number, (bool, int)):
        return str(number)
    if not math.isfinite(number):
        return str(number)
    return f"{number:.{digits}g}"


def _bytes(size: Any) -> str:
    return format_size(size) if isinstance(size, int) else "-"


def _parse_time(text: Any) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _age(text: Any) -> str:
    when = _parse_time(text)
    if when is None:
        return "-"
    seconds = max(0.0, (datetime.now(timezone.utc) - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _when(text: Any) -> str:
    when = _parse_time(text)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC") if when else "-"


class _Table:
    """Rows of text cells: a rich table when rich is installed, aligned plain text otherwise."""

    def __init__(
        self,
        columns: Sequence[str],
        *,
        title: str | None = None,
        numeric: Iterable[str] = (),
        show_header: bool = True,
    ) -> None:
        self.columns = list(columns)
        self.title = title
        self.numeric = set(numeric)
        self.show_header = show_header
        self.rows: list[tuple[list[str], bool, bool]] = []

    def add(self, cells: Sequence[str], *, highlight: bool = False, dim: bool = False) -> None:
        self.rows.append(([str(c) for c in cells], highlight, dim))

    def print(self) -> None:
        try:
            import rich  # noqa: F401  (an optional extra: plain text without it)
        except ImportError:
            self._print_plain()
        else:
            self._print_rich()

    def _print_rich(self) -> None:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        console = Console(file=sys.stdout, highlight=False)
        if not console.is_terminal:  # piped or captured: never wrap or cut file names
            console = Console(file=sys.stdout, highlight=False, width=10_000)
        table = Table(title=self.title, show_header=self.show_header, title_justify="left")
        for column in self.columns:
            table.add_column(
                column, justify="right" if column in self.numeric else "left", no_wrap=True
            )
        for cells, highlight, dim in self.rows:
            style = "bold green" if highlight else "dim" if dim else None
            table.add_row(*(Text(c) for c in cells), style=style)
        console.print(table)

    def _print_plain(self) -> None:
        lines = [self.columns] if self.show_header else []
        lines += [cells for cells, _, _ in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(self.columns))]
        if self.title:
            print(self.title)
        for line in lines:
            cells = [
                c.rjust(w) if name in self.numeric else c.ljust(w)
                for c, w, name in zip(line, widths, self.columns, strict=True)
            ]
            print("  ".join(cells).rstrip())
