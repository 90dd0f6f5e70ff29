"""The manifest, ``bestsave.json``: the one file that says what a directory holds.

It is the commit point of every save. A checkpoint exists for bestsave once the manifest lists
it; files are renamed into place after the manifest that names them is durable, and evicted files
are deleted after the manifest that no longer names them is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from bestsave.layout import RunFiles, runs_in
from bestsave.record import Record, join
from bestsave.store import Store, open_store, path_digest

FORMAT = 2
"""2: bestsave's files in ``.bestsave/<run>/``; 1 had them beside the checkpoints."""


@dataclass
class Manifest:
    """What a run's directory holds. Read it with :func:`load_manifest`.

    >>> import tempfile
    >>> from bestsave import BestSaver, load_manifest
    >>> d = tempfile.mkdtemp()
    >>> saver = BestSaver(d, monitor="val_acc")
    >>> _ = saver.step(0, {"val_acc": 0.5}, write=lambda p: open(p, "w").write("weights"))
    >>> m = load_manifest(d)
    >>> m.monitor, m.mode, m.best.epoch, len(m.kept)
    ('val_acc', 'max', 0, 1)
    """

    dirpath: str
    run: dict[str, Any]
    monitor: str
    mode: str
    policy: dict[str, Any]
    kept: list[Record] = field(default_factory=list)
    """Records kept now, best first (ranked by score; periodic and exception ones after)."""
    best_name: str | None = None
    last: Record | None = None
    state: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    """Files committed by this manifest that may still sit under their temporary names."""
    evicting: list[str] = field(default_factory=list)
    """Files this manifest no longer lists that may not be deleted yet."""
    format: int = FORMAT
    monitors: dict[str, str] = field(default_factory=dict)
    """Every monitored metric and its mode; the first is :attr:`monitor`."""
    name: str = ""
    """The run's name in its directory (its folder in ``.bestsave``)."""

    def __post_init__(self) -> None:
        if not self.monitors:
            self.monitors = {self.monitor: self.mode}

    @property
    def files(self) -> RunFiles:
        """Where the run's own files are (manifest, history, sidecars)."""
        return RunFiles(self.name, str(self.policy.get("extension", "")))

    def best_for(self, monitor: str) -> Record | None:
        """The best checkpoint by one of the run's monitors."""
        state = self.state.get("policies", {}).get(monitor, {})
        best_id = state.get("best_id")
        return next(
            (r for r in self.kept if r.id == best_id and r.monitor == monitor and r.ranked), None
        )

    @property
    def best(self) -> Record | None:
        """The best checkpoint's record, or None when nothing is kept for its score."""
        # A record located at its temporary file (see load_manifest) is named by that file.
        pending = self.pending.get(self.best_name or "")
        names = {self.best_name, pending.rsplit("/", 1)[-1] if pending else None}
        return next((r for r in self.kept if r.name in names), None)

    def to_json(self) -> str:
        data = {
            "format": self.format,
            "run": self.run,
            "monitor": self.monitor,
            "mode": self.mode,
            "monitors": self.monitors,
            "policy": self.policy,
            "best": self.best_name,
            "kept": [r.to_dict() for r in self.kept],
            "last": self.last.to_dict() if self.last else None,
            "state": self.state,
            "pending": self.pending,
            "evicting": self.evicting,
        }
        return json.dumps(data, indent=1, default=str, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str, dirpath: str, name: str) -> Manifest:
        """The manifest ``text`` holds; :class:`ManifestError` says what is wrong with it."""
        where = join(dirpath, RunFiles(name).manifest)
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ManifestError(where, f"it is not JSON ({e})") from None
        if not isinstance(data, dict):
            raise ManifestError(where, f"it holds a JSON {type(data).__name__}, not an object")
        if not isinstance(data.get("format", 0), int) or data.get("format", 0) > FORMAT:
            raise ManifestError(
                where,
                f"it was written by a newer bestsave (format {data.get('format')!r})",
                fix="upgrade bestsave to read it",
            )
        missing = [k for k in ("monitor", "mode", "kept", "state") if k not in data]
        if missing:
            raise ManifestError(where, f"it lacks {', '.join(map(repr, missing))}")
        try:
            last = data.get("last")
            return cls(
                dirpath=dirpath,
                run=dict(data.get("run") or {}),
                monitor=str(data["monitor"]),
                mode=str(data["mode"]),
                policy=dict(data.get("policy") or {}),
                kept=[Record.from_dict(r, dirpath) for r in data["kept"]],
                best_name=data.get("best"),
                last=Record.from_dict(last, dirpath) if last else None,
                state=dict(data["state"]),
                pending=dict(data.get("pending") or {}),
                evicting=list(data.get("evicting") or []),
                format=data.get("format", FORMAT),
                monitors=dict(data.get("monitors") or {}),
                name=name,
            )
        except (TypeError, ValueError, AttributeError, KeyError) as e:
            raise ManifestError(where, f"a field holds what bestsave never writes ({e})") from None


class ManifestError(ValueError):
    """A manifest bestsave cannot read. Nothing was changed; the message says how to recover
    (usually ``bestsave repair DIR``, which rebuilds it from the records and the history)."""

    def __init__(self, where: str, what: str, fix: str | None = None) -> None:
        folder = where.rsplit("/", 1)[0]
        directory = folder.rsplit("/", 2)[0]
        run = folder.rsplit("/", 1)[-1]
        fix = fix or (
            f"rebuild it from the run's records and history with 'bestsave repair {directory} "
            f"--run {run}' (bestsave.repair.repair in Python), then resume"
        )
        super().__init__(f"{where} is not a readable bestsave manifest: {what}. Nothing was "
                         f"changed; {fix}.")  # fmt: skip


def read_manifest(store: Store, name: str) -> Manifest | None:
    """The manifest of run ``name`` in ``store``'s directory, or None when there is none."""
    text = store.read_text(RunFiles(name).manifest)
    if text is None:
        return None
    return Manifest.from_json(text, store.url, name)


def find_run(
    store: Store, run: str | None = None, runs: list[str] | None = None, verb: str = "read"
) -> str:
    """The name of the run to ``verb`` in ``store``'s directory: ``run``, or the only one there.
    ``runs`` are the runs to choose from: by default those with a manifest."""
    runs = runs_in(store) if runs is None else runs
    if run is not None:
        if run in runs:
            return run
        raise FileNotFoundError(
            f"no bestsave run named {run!r} in {store.url}; "
            + (f"its runs: {', '.join(map(repr, runs))}" if runs else "it holds none")
        )
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise FileNotFoundError(
            f"no bestsave run in {store.url}. Pass the directory given to the saver (dirpath)."
        )
    raise ValueError(
        f"{store.url} holds {len(runs)} runs ({', '.join(map(repr, runs))}); "
        f"name the one to {verb}: run={runs[0]!r} (--run {runs[0]} on the command line)"
    )


def load_manifest(
    dirpath: str | os.PathLike[str], run: str | None = None, **storage_options: Any
) -> Manifest:
    """The manifest of the run in ``dirpath`` (a local path or an fsspec URL).

    A directory holding several runs (several savers, each with its own file name template)
    needs ``run``, the run's name (``bestsave ls`` lists them). Record paths are loadable:
    ``dirpath`` joined with the file name. A file committed by the manifest but not yet renamed
    into place (a crash in between) is named by its temporary path.
    """
    store = open_store(os.fspath(dirpath), **storage_options)
    manifest = read_manifest(store, find_run(store, run))
    assert manifest is not None, "find_run names a run with a manifest"

    def located(record: Record) -> Record:
        # Committed but not yet renamed (a crash in between): the temporary file holds the
        # committed bytes, and the final name may still hold an older version.
        tmp = manifest.pending.get(record.name)
        if tmp and store.exists(tmp):
            return replace(record, path=join(store.url, tmp))
        return record

    manifest.kept = [located(r) for r in manifest.kept]
    if manifest.last:
        manifest.last = located(manifest.last)
    return manifest


class ChecksumError(ValueError):
    """A checkpoint's bytes differ from what its record says: it was changed or truncated."""


def fetch(record: Record, **storage_options: Any) -> str:
    """A local path to ``record``'s file (or folder), checked against its size and sha256.

    Remote files are downloaded first. A mismatch raises :class:`ChecksumError` naming the file.
    """
    dirpath, _, name = record.path.replace("\\", "/").rpartition("/")
    store = open_store(dirpath or ".", **storage_options)
    if not store.exists(name):
        raise FileNotFoundError(
            f"{record.path} is missing; run 'bestsave verify {dirpath or '.'}' to check the run"
        )
    local = store.local_file(name)
    if record.sha256:
        (size, sha), _ = path_digest(local)
        if (size, sha) != (record.bytes, record.sha256):
            raise ChecksumError(
                f"{record.path} does not match its record (sha256 {sha[:12]}... != "
                f"{record.sha256[:12]}..., {size} vs {record.bytes} bytes): it was modified or "
                "truncated after it was saved; load another kept checkpoint instead"
            )
    return local


def load_best(
    dirpath: str | os.PathLike[str], run: str | None = None, **storage_options: Any
) -> Record:
    """The best checkpoint's record in ``dirpath``; ``.path`` is the file to load.

    ``run`` names the run when the directory holds several (see :func:`load_manifest`).

    >>> import tempfile
    >>> from bestsave import BestSaver, load_best
    >>> d = tempfile.mkdtemp()
    >>> saver = BestSaver(d, monitor="val_loss")
    >>> for epoch, loss in enumerate([0.9, 0.4, 0.6]):
    ...     _ = saver.step(epoch, {"val_loss": loss}, write=lambda p: open(p, "w").write("w"))
    >>> load_best(d).epoch
    1
    """
    manifest = load_manifest(dirpath, run, **storage_options)
    best = manifest.best
    if best is None:
        raise FileNotFoundError(
            f"the run in {manifest.dirpath} has kept no best checkpoint yet "
            f"(no valid {manifest.monitor!r} score, or top_k=0)"
        )
    return best
