"""Check a run's directory against its manifest: what ``bestsave verify`` runs.

:func:`verify` compares what ``bestsave.json`` says with what the directory holds and returns the
differences as typed :class:`Problem` objects, an empty list when the run is intact:

- :class:`Missing`: a checkpoint or sidecar the manifest lists is absent;
- :class:`ChecksumMismatch`: a checkpoint's size or sha256 differs from its record;
- :class:`Extra`: a file that looks like one of the run's (a checkpoint with the run's extension,
  a sidecar record) but that the manifest does not list;
- :class:`Leftover`: what an interrupted write left: temporary ``.bestsave-tmp-*`` files, a file
  committed but not renamed into place, an evicted file not yet deleted;
- :class:`Inconsistent`: ``history.jsonl``, the sidecars and the manifest disagree.

It reads files only, so it is safe on a directory a training is writing to (a write landing
during the check may show up as a leftover).

Example:
    >>> import tempfile
    >>> from bestsave import BestSaver
    >>> from bestsave.verify import verify
    >>> d = tempfile.mkdtemp()
    >>> saver = BestSaver(d, monitor="val_loss", extension=".bin", trackers=())
    >>> _ = saver.step(0, {"val_loss": 0.5}, write=lambda p: open(p, "w").write("weights"))
    >>> verify(d)
    []
    >>> _ = open(f"{d}/epoch=000-val_loss=0.5000.bin", "a").write("!")
    >>> [(p.kind, p.name) for p in verify(d)]
    [('checksum', 'epoch=000-val_loss=0.5000.bin')]
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

from bestsave.layout import runs_in
from bestsave.manifest import Manifest, find_run, read_manifest
from bestsave.record import Record, join
from bestsave.store import TMP_PREFIX, Store, files_below, open_store

__all__ = [
    "ChecksumMismatch",
    "Extra",
    "Inconsistent",
    "Leftover",
    "Missing",
    "Problem",
    "load_history",
    "verify",
]

_SIDECAR_KEYS = frozenset({"path", "kind", "epoch", "monitor", "sha256"})


@dataclass(frozen=True)
class Problem:
    """One way a run's directory differs from what its manifest says.

    ``name`` is the file concerned (relative to the run's directory); ``detail`` says what is
    wrong and how to fix it.
    """

    kind: ClassVar[str] = "problem"
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.name}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class Missing(Problem):
    """A file the manifest lists (a checkpoint or its sidecar record) is absent."""

    kind: ClassVar[str] = "missing"


@dataclass(frozen=True)
class ChecksumMismatch(Problem):
    """A checkpoint's bytes differ from its record: modified or truncated after it was saved."""

    kind: ClassVar[str] = "checksum"
    expected_bytes: int = 0
    actual_bytes: int = 0
    expected_sha256: str = ""
    actual_sha256: str = ""


@dataclass(frozen=True)
class Extra(Problem):
    """A file that looks like the run's own but that the manifest does not list."""

    kind: ClassVar[str] = "extra"


@dataclass(frozen=True)
class Leftover(Problem):
    """What an interrupted write left behind; resuming the run in this directory cleans it."""

    kind: ClassVar[str] = "leftover"


@dataclass(frozen=True)
class Inconsistent(Problem):
    """The history, a sidecar and the manifest tell different stories."""

    kind: ClassVar[str] = "history"


def verify(
    dirpath: str | os.PathLike[str],
    run: str | None = None,
    *,
    checksums: bool = True,
    **storage_options: Any,
) -> list[Problem]:
    """The problems of the run in ``dirpath`` (a local path or an fsspec URL); [] when intact.

    Args:
        dirpath: The directory given to the saver.
        run: The run's name, when the directory holds several.
        checksums: Hash every checkpoint and compare it with its record's sha256. False compares
            sizes only, which is quick on large checkpoints and remote storage.
        storage_options: Passed to fsspec for remote URLs.

    Raises:
        FileNotFoundError: ``dirpath`` holds no manifest.
        ValueError: the manifest is not readable.
    """
    store = open_store(os.fspath(dirpath), **storage_options)
    manifest = _manifest(store, run)
    files = manifest.files
    inside = store.names(files.folder) + store.folders(files.folder)
    present = set(store.names()) | {f"{files.folder}/{n}" for n in inside}
    present |= set(store.folders()) & _listed(manifest)  # checkpoints that are folders
    expected = {files.manifest, files.history, files.lock} | _files_of_other_runs(store, manifest)
    problems = _check_records(store, manifest, present, expected, checksums)
    for name in manifest.evicting:
        if name in present and name not in expected:
            expected.add(name)
            problems.append(
                Leftover(
                    name,
                    "evicted but not yet deleted (a crash); resume the "
                    "run (resume=True) to delete it, or delete it",
                )
            )
    problems += _check_unlisted(store, manifest, sorted(present - expected))
    if manifest.best_name is not None and manifest.best is None:
        problems.append(
            Inconsistent(
                files.manifest,
                f"its best, {manifest.best_name}, is not among "
                "its kept checkpoints; the manifest was edited",
            )
        )
    problems += _check_history(store, manifest)
    return problems


def _listed(manifest: Manifest) -> set[str]:
    return {r.name for r in manifest.kept} | ({manifest.last.name} if manifest.last else set())


def _files_of_other_runs(store: Store, manifest: Manifest) -> set[str]:
    """Files other runs in the directory keep: theirs, not extra."""
    names: set[str] = set()
    for other in runs_in(store):
        theirs = read_manifest(store, other) if other != manifest.name else None
        if theirs is not None:
            names |= {r.name for r in theirs.kept} | ({theirs.last.name} if theirs.last else set())
    return names


def _check_records(
    store: Store, manifest: Manifest, present: set[str], expected: set[str], checksums: bool
) -> list[Problem]:
    """The problems of the files ``manifest`` lists; adds their names to ``expected``."""
    problems: list[Problem] = []
    files = manifest.files
    for record in [*manifest.kept, *([manifest.last] if manifest.last else [])]:
        expected.add(record.name)
        if record.kind != "last":  # ``last`` has no sidecar: the manifest holds its record
            side = files.sidecar(record.name)
            expected.add(side)
            problems += _check_sidecar(store, record, side, side in present)
        location = record.name
        tmp = manifest.pending.get(record.name)
        if tmp is not None and tmp in present:
            # Committed but not renamed into place (a crash): the temporary file holds the
            # committed bytes, whatever an older file of that name holds.
            expected.add(tmp)
            location = tmp
            problems.append(
                Leftover(
                    tmp,
                    f"holds {record.name}, committed but not renamed into "
                    "place (a crash); resume the run (resume=True) to finish it",
                )
            )
        elif record.name not in present:
            problems.append(
                Missing(
                    record.name,
                    f"{_what(record)} is listed in the manifest "
                    "but absent; restore it, or load another kept checkpoint",
                )
            )
            continue
        problems += _check_bytes(store, record, location, checksums)
    return problems


def _check_unlisted(store: Store, manifest: Manifest, unlisted: list[str]) -> list[Problem]:
    """The problems of files in the directory that no run lists."""
    folder, extension = manifest.files.folder, manifest.files.extension
    records = [n for n in unlisted if n.startswith(f"{folder}/") and n.endswith(".json")]
    orphans = _orphan_sidecars(store, records)
    problems: list[Problem] = []
    for name in unlisted:
        if name.rsplit("/", 1)[-1].startswith(TMP_PREFIX):
            problems.append(
                Leftover(
                    name,
                    "temporary file of an interrupted write; delete it "
                    "(a run resumed in this directory deletes it)",
                )
            )
        elif name in orphans.values():
            problems.append(
                Extra(
                    name,
                    "a record of a checkpoint the manifest does not list; delete it",
                )
            )
        elif name in orphans or _looks_like_checkpoint(name, extension):
            problems.append(
                Extra(
                    name,
                    "a checkpoint the manifest does not list (bestsave "
                    "never loads it); delete it or move it out of the directory",
                )
            )
    return problems


def load_history(
    dirpath: str | os.PathLike[str], run: str | None = None, **storage_options: Any
) -> list[dict[str, Any]]:
    """The evaluations of the run in ``dirpath``, oldest first, as ``history.jsonl`` holds them.

    Each is a dict with ``epoch``, ``step``, ``time``, ``elapsed_s``, ``score``, ``metrics`` and
    ``decision`` (``saved``, ``is_best``, ``kind``, ``files``, ``evicted``). Lines a crash left
    past the manifest's commit point are not included.

    Raises:
        FileNotFoundError: ``dirpath`` holds no manifest.
        ValueError: a committed line is not JSON.
    """
    store = open_store(os.fspath(dirpath), **storage_options)
    manifest = _manifest(store, run)
    lines, errors, _ = _read_history(store, manifest)
    if errors:
        raise ValueError(
            f"{join(store.url, manifest.files.history)} is damaged ({errors[0]}); "
            f"run 'bestsave verify {store.url}' for details"
        )
    return lines


# -- the checks ------------------------------------------------------------------------------


def _manifest(store: Store, run: str | None) -> Manifest:
    manifest = read_manifest(store, find_run(store, run))
    assert manifest is not None, "find_run names a run with a manifest"
    return manifest


def _what(record: Record) -> str:
    return f"the {record.kind} checkpoint of epoch {record.epoch}"


def _check_bytes(store: Store, record: Record, location: str, checksums: bool) -> list[Problem]:
    if not record.sha256:  # a record from before checksums were kept: nothing to compare
        return []
    if record.parts:
        return _check_parts(store, record, location, checksums)
    if checksums:
        size, sha = store.digest(location)
    else:
        size, sha = _size(store, location), record.sha256
    if (size, sha) == (record.bytes, record.sha256):
        return []
    change = (
        f"{size} bytes instead of {record.bytes}"
        if size != record.bytes
        else f"sha256 {sha[:12]}... instead of {record.sha256[:12]}..."
    )
    return [
        ChecksumMismatch(
            location,
            f"{_what(record)} differs from its record ({change}): it was modified or truncated "
            "after it was saved; restore it, or load another kept checkpoint",
            expected_bytes=record.bytes,
            actual_bytes=size,
            expected_sha256=record.sha256,
            actual_sha256=sha,
        )
    ]


def _check_parts(store: Store, record: Record, location: str, checksums: bool) -> list[Problem]:
    """A folder checkpoint: every part against its recorded size and sha256, and no part
    missing or added."""
    problems: list[Problem] = []
    for part, expected in sorted(record.parts.items()):
        where = f"{location}/{part}"
        if not store.exists(where):
            problems.append(
                Missing(
                    where,
                    f"a part of {_what(record)} is absent; restore it, or load "
                    "another kept checkpoint",
                )
            )
            continue
        one = replace(record, parts={}, bytes=expected[0], sha256=expected[1])
        problems += _check_bytes(store, one, where, checksums)
    for part in sorted(set(files_below(store, location)) - set(record.parts)):
        problems.append(
            Extra(
                f"{location}/{part}",
                f"{_what(record)} holds a file its record does not "
                "list; it was added after the checkpoint was saved",
            )
        )
    return problems


def _size(store: Store, name: str) -> int:
    if store.is_local:
        return os.path.getsize(store.local_file(name))
    return store.digest(name)[0]


def _check_sidecar(store: Store, record: Record, side: str, present: bool) -> list[Problem]:
    if not present:
        return [
            Missing(
                side,
                f"the sidecar record of {record.name} is absent; resume the run "
                "(resume=True) to rewrite it",
            )
        ]
    data = _json(store, side)
    if not isinstance(data, dict):
        return [
            Inconsistent(
                side,
                f"the sidecar record of {record.name} is not readable JSON; "
                "delete it and resume the run (resume=True) to rewrite it",
            )
        ]
    differ = [
        key
        for key in ("path", "kind", "epoch", "score", "bytes", "sha256")
        if data.get(key) != (record.name if key == "path" else getattr(record, key))
    ]
    if differ:
        return [
            Inconsistent(
                side,
                f"the sidecar record disagrees with the manifest on "
                f"{', '.join(differ)}; the manifest is the truth: delete the sidecar "
                "and resume the run (resume=True) to rewrite it",
            )
        ]
    return []


def _json(store: Store, name: str) -> Any:
    try:
        return json.loads(store.read_text(name) or "")
    except ValueError:
        return None


def _orphan_sidecars(store: Store, json_names: list[str]) -> dict[str, str]:
    """Unlisted sidecar records among ``json_names``: the checkpoint each names -> the sidecar."""
    out: dict[str, str] = {}
    for name in json_names:
        data = _json(store, name)
        if isinstance(data, dict) and data.keys() >= _SIDECAR_KEYS:
            out[str(data["path"])] = name
    return out


def _looks_like_checkpoint(name: str, extension: str) -> bool:
    return "/" not in name and bool(extension and name.endswith(extension))


def _read_history(
    store: Store, manifest: Manifest
) -> tuple[list[dict[str, Any]], list[str], list[Problem]]:
    """Committed history lines, parse errors, and problems with the file as a whole (an absent
    history is one)."""
    history = manifest.files.history
    text = store.read_text(history)
    evaluations = manifest.state.get("evaluations")
    if text is None:
        if evaluations:
            return (
                [],
                [],
                [
                    Missing(
                        history,
                        f"the manifest counts {evaluations} evaluations but "
                        "the history is absent; the kept checkpoints are unaffected",
                    )
                ],
            )
        return [], [], []
    problems: list[Problem] = []
    data = text.encode("utf-8")
    committed = manifest.state.get("history_bytes")
    if isinstance(committed, int) and len(data) != committed:
        if len(data) > committed:
            problems.append(
                Leftover(
                    history,
                    f"{len(data) - committed} bytes past the last "
                    "committed evaluation (a crash); resume the run "
                    "(resume=True) to drop them",
                )
            )
            data = data[:committed]
        else:
            problems.append(
                Inconsistent(
                    history,
                    f"{len(data)} bytes where the manifest "
                    f"committed {committed}: it was truncated or edited",
                )
            )
    lines: list[dict[str, Any]] = []
    errors: list[str] = []
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("decision"), dict):
            errors.append(f"line {number} is not an evaluation record")
            continue
        lines.append(entry)
    return lines, errors, problems


def _check_history(store: Store, manifest: Manifest) -> list[Problem]:
    lines, errors, problems = _read_history(store, manifest)
    history = manifest.files.history
    problems += [Inconsistent(history, f"{e}; restore the file or delete the line") for e in errors]
    if any(not isinstance(p, Leftover) for p in problems):
        return problems  # replaying a damaged history would only repeat the same problem
    evaluations = manifest.state.get("evaluations")
    if isinstance(evaluations, int) and len(lines) != evaluations:
        problems.append(
            Inconsistent(
                history,
                f"{len(lines)} evaluations where the manifest "
                f"counts {evaluations}: it was truncated or edited",
            )
        )
        return problems

    # Replay the history's decisions: what it saved and did not evict since must be kept.
    live: dict[str, int] = {}
    for index, line in enumerate(lines):
        decision = line["decision"]
        for name in decision.get("evicted", []):
            live.pop(name, None)
        for name in decision.get("files", []):
            live[name] = index
    kept = {r.name: r for r in manifest.kept if r.kind != "exception"}
    for name in sorted(kept.keys() - live.keys()):
        problems.append(
            Inconsistent(
                name, "the manifest keeps it but history.jsonl never saved it, or evicted it"
            )
        )
    for name in sorted(live.keys() - kept.keys()):
        problems.append(
            Inconsistent(
                name,
                f"history.jsonl saved it at epoch "
                f"{lines[live[name]].get('epoch')} and never evicted it, "
                "but the manifest does not keep it",
            )
        )
    for name in sorted(kept.keys() & live.keys()):
        record, line = kept[name], lines[live[name]]
        if (line.get("epoch"), line.get("score")) != (record.epoch, record.score):
            problems.append(
                Inconsistent(
                    name,
                    f"history.jsonl has epoch {line.get('epoch')} "
                    f"score {line.get('score')}, the manifest epoch "
                    f"{record.epoch} score {record.score}",
                )
            )
    return problems
