"""A run's place on disk: taking it (the lock), and opening it — new, resumed, or replacing an
earlier run — after finishing whatever a crash interrupted there.

One process writes a run at a time. In one process a newer saver of the same run takes it over
from an older one (a notebook cell run again); the older one then refuses to step.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from bestsave import lock
from bestsave.layout import RunFiles
from bestsave.manifest import Manifest, ManifestError, read_manifest
from bestsave.messages import warn
from bestsave.record import RANKED, join
from bestsave.store import Store


class RunExistsError(FileExistsError):
    """The directory holds another run's manifest; resume it, overwrite it, or choose another."""


@dataclass(frozen=True)
class Opened:
    """What opening a run found."""

    manifest: Manifest | None
    """The run to continue (with ``resume``), else None."""
    history_bytes: int = 0
    """The committed size of the run's history."""
    replacing: list[str] | None = None
    """The files of an earlier run this one replaces, deleted at its first commit."""
    replace_at: frozenset[str] = frozenset()
    """Kinds of file this run's first commit must hold for that (empty: its first commit)."""


_OWNERS: dict[str, RunDirectory] = {}
"""The run directory each run (by its folder) is written through in this process, while it
holds the run's lock. Held strongly: a saver dropped unclosed (a ``fit`` stopped by a
KeyboardInterrupt, its callback left to the garbage collector) may still have writes pending in
its background thread, and a newer saver of the run must wait for them
(:attr:`RunDirectory.before_takeover`)."""


class RunDirectory:
    """One run's files in a store: its lock, its manifest, and the names its files may take."""

    def __init__(self, store: Store, files: RunFiles, run_id: str) -> None:
        self.store = store
        self.files = files
        self.run_id = run_id
        self.locked = False
        self.superseded = False
        self.replaced: set[str] = set()
        """Files of an earlier run that this one replaces."""
        """A newer saver of this run, in this process, has taken it over."""
        self.before_takeover: Callable[[], None] = lambda: None
        """Called when a newer saver takes the run over: finish what is pending."""
        self.claimed: Callable[[], set[str]] = set
        """The names this run's files hold, for other runs of the directory (set by the
        saver)."""

    @property
    def url(self) -> str:
        return self.store.url

    def lock(self) -> None:
        """Take the run's lock, or raise naming the process that holds it."""
        key = join(self.url, self.files.folder)
        older = _OWNERS.get(key)
        if older is not None and older is not self and older.locked:
            older.before_takeover()
            older.locked, older.superseded = False, True
            del _OWNERS[key]
        try:
            lock.acquire(self.store, self.files.lock, self.run_id)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise PermissionError(
                e.errno,
                f"cannot write in {self.url} ({e.strerror}): bestsave keeps the run's records "
                f"in {join(self.url, self.files.folder)}; make the directory writable or "
                "choose another",
            ) from e
        _OWNERS[key] = self
        self.locked = True

    def retake(self, writer: bool) -> None:
        """Before an evaluation: lock the run again after a close, unless a newer saver in this
        process has taken it over."""
        if self.superseded:
            raise RuntimeError(
                f"another saver in this process has since opened run {self.files.name!r} in "
                f"{self.url}, and two savers cannot write one run: give each its own "
                "dirpath or file name template"
            )
        if writer and not self.locked:
            self.lock()

    def release(self) -> None:
        if not self.locked:
            return
        self.locked = False
        key = join(self.url, self.files.folder)
        if _OWNERS.get(key) is self:
            del _OWNERS[key]
        try:
            lock.release(self.store, self.files.lock)
        except OSError as e:  # a directory that turned read-only: the lock goes stale
            warn(
                f"could not remove the lock in {self.url} ({e}); the next run takes it over once "
                "this process has ended"
            )

    def take(
        self,
        monitors: dict[str, str],
        resume: bool,
        overwrite: bool,
        keeps_files: bool,
        writer: bool,
    ) -> Opened:
        """Lock the run and :meth:`open` it. A process that does not write (a distributed rank
        other than 0) locks nothing and only reads the run to resume, to reach the same
        decisions as the one that writes."""
        if not writer:
            manifest = self.read() if resume else None
            return Opened(manifest if manifest and manifest.monitors == monitors else None)
        self.lock()
        try:
            opened = self.open(monitors, resume, overwrite, keeps_files)
        except BaseException:
            self.release()
            raise
        self.replaced = set(opened.replacing or ())
        return opened

    def foreign(self) -> set[str]:
        """Names of the directory's files that are not this run's nor replaced by it."""
        return set(self.store.names()) - self.replaced

    def read(self) -> Manifest | None:
        return read_manifest(self.store, self.files.name)

    def open(
        self, monitors: dict[str, str], resume: bool, overwrite: bool, keeps_files: bool
    ) -> Opened:
        """Take the run over: finish what a crash interrupted, then continue it (``resume``),
        replace an earlier run, or start a new one.

        Args:
            monitors: This run's monitors and modes: a run to resume must have the same.
            resume: Continue the run of this name.
            overwrite: Replace an earlier run that kept a checkpoint for its score.
            keeps_files: This run keeps files for their score or their epoch; if not, it
                replaces an earlier best at its first ``last`` file.
        """
        store, files = self.store, self.files
        manifest = self.read()
        if manifest is not None:
            self._finish(manifest)
        elif records := files.records(store):
            raise ManifestError(  # the run's records are there, its manifest is gone
                join(self.url, files.manifest),
                f"it is missing, but {len(records)} records of the run's checkpoints are beside it",
            )
        for name in files.leftovers(store):
            store.delete(name)
        if manifest is None:
            # History written before a first commit that never came belongs to no run.
            store.truncate(files.history, 0)
            return Opened(None)
        if resume and manifest.monitors == monitors:
            return Opened(manifest, int(manifest.state.get("history_bytes", 0)))
        if overwrite or manifest.best is None:
            self._warn_replacing(manifest)
            # Its best stays until this run keeps a checkpoint that stands for something:
            # one for its score or its epoch, or a last one if it keeps no other.
            kinds = (*RANKED, "periodic") if keeps_files else ("last",)
            return Opened(
                None,
                replacing=_names_of(manifest),
                replace_at=frozenset(kinds) if manifest.best is not None else frozenset(),
            )
        if resume:
            raise RunExistsError(
                f"cannot resume {self.describe(manifest)}: it monitors {manifest.monitors}, "
                f"this saver {monitors}. Use the same monitors and modes to resume it, "
                "overwrite=True to start a new run in its place, or another directory."
            )
        raise RunExistsError(
            f"{self.describe(manifest)}. Pass resume=True to continue it, overwrite=True to "
            "start a new run in its place, or choose another directory."
        )

    def describe(self, manifest: Manifest) -> str:
        """The earlier run in words: where, when, and its best."""
        best = manifest.best
        what = (
            f"its best is {best.name} ({manifest.monitor}={best.score})"
            if best
            else "it kept no checkpoint for its score"
        )
        run = manifest.run
        return (
            f"{self.url} holds run {run.get('id', '?')} ({self.files.name!r}, started "
            f"{run.get('started', '?')} on {run.get('host', '?')}); {what}"
        )

    def _warn_replacing(self, manifest: Manifest) -> None:
        files = [r.name for r in manifest.kept] + ([manifest.last.name] if manifest.last else [])
        gone = (
            f"its files ({', '.join(files)}) are deleted, but for those this run writes again"
            if files
            else "its records are deleted"
        )
        warn(
            f"{self.describe(manifest)}. Starting a new run there: the earlier run stays whole "
            f"until this one keeps its first checkpoint, then {gone}. Pass resume=True to "
            "continue it instead, or choose another directory."
        )

    def _finish(self, manifest: Manifest) -> None:
        """Finish what a crash interrupted in ``manifest``'s run: the manifest is the truth,
        files follow it."""
        store, files = self.store, manifest.files
        for final, tmp in manifest.pending.items():
            if store.exists(tmp):
                store.rename(tmp, final)
        for name in manifest.evicting:
            store.delete(name)
        for r in manifest.kept:
            if not store.exists(files.sidecar(r.name)):
                store.write_text(files.sidecar(r.name), r.to_json())
        store.truncate(files.history, int(manifest.state.get("history_bytes", 0)))

    def names_elsewhere(self) -> set[str]:
        """Names other runs of this directory being written in this process keep: a file
        written in the background is not on disk yet, but its name is taken."""
        return {
            name
            for other in list(_OWNERS.values())
            if other is not self and other.locked and other.url == self.url
            and other.files.name != self.files.name
            for name in other.claimed()
        }  # fmt: skip


def _names_of(manifest: Manifest) -> list[str]:
    """Every file of ``manifest``'s run and their records (its history is replaced)."""
    files = manifest.files
    names: list[str] = []
    for r in manifest.kept:
        names += [r.name, files.sidecar(r.name)]
    if manifest.last:
        names.append(manifest.last.name)
    return names
