"""Committing a save: write the new files, then the manifest, then rename and delete.

A :class:`Job` is everything one evaluation (or several merged ones) must make durable. The
:class:`Committer` carries it out, in the training thread or in the background worker, in the
order that keeps the previous best loadable at every instant:

1. each new file is written under a temporary name in the run's folder and made durable (hard
   links for files that hold the same bytes);
2. the history lines are appended;
3. the manifest that lists the new files and no longer lists the evicted ones replaces the old
   one (the commit point; it also names the temporary files, so a crash here is rolled forward);
4. the new files are renamed into place and their sidecars written;
5. the evicted files are deleted.

A run that replaces an earlier run of the same name writes nothing until its first file: the
earlier run stays whole until then, and its files are deleted as evicted ones are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from bestsave.layout import HISTORY, RunFiles
from bestsave.manifest import Manifest
from bestsave.record import Record
from bestsave.staging import Snapshot
from bestsave.store import HashingFile, Store, file_digest


class Content(Protocol):
    """The bytes of a new checkpoint, captured on the training thread."""

    digest: tuple[int, str] | None
    """Size and sha256 of the written file when they were taken while writing it."""

    def materialize(self, path: str) -> str:
        """Write the checkpoint (to ``path`` if it is not written yet); returns where it is."""

    def release(self) -> None:
        """Free what the capture holds; called once, whether the file was written or not."""


class Abandoned(Exception):
    """A write given up because the job after it deletes the file (see :meth:`Job.abandon`)."""

    def __str__(self) -> str:
        return "a newer checkpoint replaces this one"


class WrittenFile:
    """A checkpoint a plain ``write(path)`` already wrote to a local file."""

    digest: tuple[int, str] | None = None

    def __init__(self, path: str) -> None:
        self.path: str | None = path

    def materialize(self, path: str) -> str:
        written, self.path = self.path, None  # the committer owns the file from here
        assert written is not None
        return written

    def release(self) -> None:
        if self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)


class Captured:
    """A snapshot taken by ``Staged.capture``, serialised when the job runs."""

    def __init__(
        self, serialize: Callable[[Any, Any], Any], snapshot: Any, stream: bool = False
    ) -> None:
        self.serialize = serialize
        self.snapshot = snapshot
        self.stream = stream
        self.digest: tuple[int, str] | None = None
        self._abandoned = False

    def materialize(self, path: str) -> str:
        if not self.stream:
            self.serialize(self.snapshot, path)
            return path
        # The snapshot's buffers stay unchanged while it is written: the file may read them
        # after its write() returns.
        stable = self.snapshot.spans() if isinstance(self.snapshot, Snapshot) else ()
        try:
            with HashingFile(path, stable=stable, interrupt=self._interrupt) as f:
                self.serialize(self.snapshot, f)
        except Exception as e:
            if self._abandoned:  # torch.save ends the archive on the way out, and fails at it
                raise Abandoned from e
            raise
        self.digest = f.digest()
        return path

    def abandon(self) -> None:
        """Stop writing at the next block (a streamed write; others run to the end)."""
        self._abandoned = True

    def _interrupt(self) -> None:
        if self._abandoned:
            raise Abandoned

    def release(self) -> None:
        release = getattr(self.snapshot, "release", None)
        if callable(release):
            release()
        self.snapshot = None


class Lost:
    """Bytes released for a newer snapshot whose capture then failed: never written."""

    digest: tuple[int, str] | None = None

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def materialize(self, path: str) -> str:
        raise RuntimeError(
            "this checkpoint's snapshot was released for a newer one, whose capture failed"
        ) from self.error

    def release(self) -> None:
        pass


@dataclass
class NewFile:
    """One file a job creates: its record, the temporary name, and its bytes or a twin's."""

    record: Record
    tmp: str
    content: Content | None = None
    same_as: str | None = None
    """Name of a file of the same job holding the same bytes (linked, not written again)."""


@dataclass(frozen=True)
class SaverState:
    """What the saver has decided up to an evaluation: restored when a later write fails."""

    policies: dict[str, Any]
    """Each monitor's policy state, as a dict."""
    evaluations: int
    last_epoch: int | None
    kept: tuple[Record, ...]
    last: Record | None
    warned: tuple[str, ...]


@dataclass
class Job:
    """Everything to make durable for one or more evaluations."""

    files: list[NewFile] = field(default_factory=list)
    evict: list[Record] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    state: SaverState | None = None
    best_name: str | None = None

    def release(self) -> None:
        for f in self.files:
            if f.content is not None:
                f.content.release()

    def abandon(self) -> None:
        """Stop writing this job's files where they can be stopped: the job after it deletes
        them all (:meth:`superseded`) and takes over the rest of it (:meth:`absorb`)."""
        for f in self.files:
            if isinstance(f.content, Captured):
                f.content.abandon()

    def superseded(self) -> set[str]:
        """Names of the files this job evicts or replaces (a rolling ``last``)."""
        return {r.name for r in self.evict} | {f.record.name for f in self.files}

    def lost(self, names: set[str], error: BaseException) -> Job:
        """This job with the files in ``names`` lost to ``error``: its write fails as a whole
        (or loses its files, when the saver keeps evaluations)."""
        for f in self.files:
            if f.record.name in names:
                f.content, f.same_as = Lost(error), None
        return self

    def absorb(self, newer: Job) -> Job:
        """This pending job merged with a ``newer`` one: files the newer one supersedes are
        never written (their snapshots are freed now); everything else is kept in order."""
        dropped = newer.superseded()
        files: list[NewFile] = []
        for f in self.files:
            if f.record.name not in dropped:
                files.append(f)
                continue
            twins = [
                t for t in self.files if t.same_as == f.record.name and t.record.name not in dropped
            ]
            if f.content is not None and twins:
                # A surviving twin (a periodic copy of a dropped best) takes over the bytes.
                twins[0].content, twins[0].same_as = f.content, None
                for t in twins[1:]:
                    t.same_as = twins[0].record.name
            elif f.content is not None:
                f.content.release()
        never_written = {f.record.name for f in self.files}
        return Job(
            files=files + newer.files,
            evict=self.evict + [r for r in newer.evict if r.name not in never_written],
            lines=self.lines + newer.lines,
            state=newer.state,
            best_name=newer.best_name,
        )


class Committer:
    """Carries out jobs against a store, and remembers what is committed."""

    def __init__(
        self,
        store: Store,
        files: RunFiles,
        header: dict[str, Any],
        history_bytes: int,
        committed: SaverState,
        keep_evaluations: bool = False,
        replacing: list[str] | None = None,
        replace_at: frozenset[str] = frozenset(),
    ) -> None:
        self.store = store
        self.keep_evaluations = keep_evaluations
        """A failed file write still records its evaluation (training goes on); otherwise the
        job is undone whole, so a resumed run repeats it."""
        self.files = files
        self.replacing = replacing
        """The files of an earlier run this one replaces, deleted at this run's first commit
        (None when there is no earlier run)."""
        self.replace_at = replace_at
        """Kinds of file that the first commit must hold: until this run keeps one, it writes
        nothing, and the earlier run stays whole. Empty: the first job commits."""
        self.header = header
        """run, monitor, mode and policy: the manifest's fixed part."""
        self.history_bytes = history_bytes
        self.committed = committed
        """The state the manifest on disk describes."""
        self.digests: dict[str, tuple[int, str]] = {}
        self.lost: set[str] = set()
        """Files decided on but never written (a failed write): later manifests leave them
        out."""
        self.restored: dict[str, Record] = {}
        """Kept files a failed job would have evicted: they stay until a later job evicts
        them."""
        self._unfinished: dict[str, str] = {}
        """Renames a committed manifest asked for that failed; retried at the next job."""
        self._carry: list[str] = []
        """History lines of a job whose commit failed, written with the next one."""

    def filled(self, record: Record) -> Record:
        """``record`` with its size and sha256, once its file is written."""
        digest = self.digests.get(record.name)
        if digest is None or record.sha256:
            return record
        return replace(record, bytes=digest[0], sha256=digest[1])

    def run(self, job: Job) -> tuple[list[Record], list[Record]]:
        """Make ``job`` durable; returns the records of the files it wrote and of those it
        deleted, with their sizes and checksums.

        A failed file write undoes the job, or with ``keep_evaluations`` loses only its files
        (and the evictions they caused) and records the evaluation, raising once that is
        committed. A failure before the manifest is written leaves the directory as it was
        (with ``keep_evaluations`` the history lines wait for the next job); one after it
        leaves the job committed, its renames finished by the next job or the next start.
        """
        store = self.store
        state = job.state
        assert state is not None
        if (
            self.replacing is not None
            and self.replace_at
            and not any(f.record.kind in self.replace_at for f in job.files)
        ):
            return self._defer(job)
        error: Exception | None = None
        digests = dict(self.digests)
        try:
            pending = self._write_files(job)
        except Abandoned:
            self.digests = digests
            raise
        except Exception as e:
            self._lose(job, digests)
            if not self.keep_evaluations:
                raise
            error, pending = e, {}
            lost = {f.record.name for f in job.files}
            job = Job(lines=_amend(job.lines, lost, str(e)), state=state, best_name=job.best_name)
        lines, self._carry = [*self._carry, *job.lines], []
        history_bytes = self.history_bytes
        files = self.files
        replacing = self.replacing
        try:
            if replacing is not None:
                # The earlier run's history goes with its manifest: renamed in after the commit.
                text = "".join(lines)
                pending[files.history] = files.tmp(HISTORY)
                store.write_text(pending[files.history], text)
                self.history_bytes = len(text.encode("utf-8"))
            elif lines:  # merged jobs: one append, one fsync
                self.history_bytes = store.append_text(files.history, "".join(lines))
            evicting = self._evicting(job, replacing or [])
            manifest = self._manifest(job, state, pending, evicting)
            store.write_text(files.manifest, manifest.to_json())
        except BaseException as e:
            for tmp in pending.values():
                store.delete(tmp)
            pending.pop(files.history, None)
            if replacing is None:
                store.truncate(files.history, history_bytes)
            self.history_bytes = history_bytes
            lost = {f.record.name for f in job.files}
            self._carry = _amend(lines, lost, str(e)) if self.keep_evaluations else []
            self._lose(job, digests)
            raise
        self.lost -= set(pending)
        self.replacing = None
        for r in job.evict:
            self.restored.pop(r.name, None)
        self.committed = state
        # Committed: what follows only tidies up, and a failure leaves the rest to the next
        # job or the next start (the manifest names the temporary files).
        self._unfinished.update(pending)
        for name, tmp in list(self._unfinished.items()):
            try:
                store.rename(tmp, name)
                del self._unfinished[name]
            except OSError as e:
                error = error or e
        written = [self.filled(f.record) for f in job.files]
        evicted = [self.filled(r) for r in job.evict]
        for r in written:
            if r.kind != "last":
                store.write_text(files.sidecar(r.name), sidecar_text(r))
        for name in evicting:
            store.delete(name)
            self.digests.pop(name, None)
        store.sync()
        store.sync(files.folder)
        if error is not None:
            raise error
        return written, evicted

    def _defer(self, job: Job) -> tuple[list[Record], list[Record]]:
        """A job of a run that replaces an earlier one and has kept no checkpoint yet: the
        earlier run stays whole. Its history waits for the first commit; a ``last`` file is
        not written (the earlier run's may be the one to resume); an exception's state is
        written into place, to be listed by that first commit."""
        self._carry += job.lines
        for f in job.files:
            if f.record.kind != "exception" and f.content is not None:
                f.content.release()
                f.content = None
        job.files = [f for f in job.files if f.record.kind == "exception"]
        pending = self._write_files(job)
        for name, tmp in pending.items():
            self.store.rename(tmp, name)
        self.store.sync()
        return [self.filled(f.record) for f in job.files], []

    def _write_files(self, job: Job) -> dict[str, str]:
        """Every new file under its temporary name, durable; returns final name -> temp."""
        store = self.store
        pending: dict[str, str] = {}
        current: NewFile | None = None
        try:
            for current in job.files:
                name = current.record.name
                if current.content is not None:
                    local = current.content.materialize(store.scratch(current.tmp))
                    if not os.path.exists(local):
                        raise FileNotFoundError(f"write() was given {local} but wrote no file")
                    self.digests[name] = current.content.digest or file_digest(local)
                    store.publish(local, current.tmp)
                else:
                    store.link(pending[current.same_as or ""], current.tmp)
                    self.digests[name] = self.digests[current.same_as or ""]
                pending[name] = current.tmp
        except BaseException:
            if current is not None:  # the file being written when it failed, half there
                store.delete(current.tmp)
                scratch = store.scratch(current.tmp)
                if os.path.exists(scratch):
                    os.unlink(scratch)
            for tmp in pending.values():
                store.delete(tmp)
            raise
        finally:
            job.release()
        return pending

    def _lose(self, job: Job, digests: dict[str, tuple[int, str]]) -> None:
        """The job's files were never written: later manifests leave them out, and keep the
        files they would have evicted. ``digests`` are those from before the job: a file of
        the same name (a fixed file name) is still the one they describe."""
        self.digests = digests
        for r in job.evict:
            if r.name not in self.lost and r.kind != "last":
                self.restored[r.name] = self.filled(r)
        self.lost |= {f.record.name for f in job.files}

    def _evicting(self, job: Job, replacing: list[str]) -> list[str]:
        # A new file may reuse an evicted one's name (a fixed file name): the rename replaces
        # it, so it must not be deleted.
        side = self.files.sidecar
        reused = {n for f in job.files for n in (f.record.name, side(f.record.name))}
        evicted = [n for r in job.evict for n in (r.name, side(r.name))]
        return [n for n in dict.fromkeys(evicted + replacing) if n not in reused]

    def _manifest(
        self, job: Job, state: SaverState, pending: dict[str, str], evicting: list[str]
    ) -> Manifest:
        lost = self.lost - set(pending)
        kept = [self.filled(r) for r in state.kept if r.name not in lost]
        gone = {r.name for r in job.evict} | {r.name for r in kept}
        kept += [r for r in self.restored.values() if r.name not in gone]
        best_name = job.best_name
        if best_name in lost:
            best_name = _best_kept(kept, self.header["monitor"], self.header["mode"])
        last = state.last
        if last is not None and last.name in lost:
            last = self.committed.last
        return Manifest(
            dirpath=self.store.url,
            run=self.header["run"],
            monitor=self.header["monitor"],
            mode=self.header["mode"],
            monitors=self.header["monitors"],
            policy=self.header["policy"],
            kept=kept,
            best_name=best_name,
            last=self.filled(last) if last else None,
            state={
                "policies": _ranked_as_kept(state.policies, kept) if lost else state.policies,
                "evaluations": state.evaluations,
                "last_epoch": state.last_epoch,
                "history_bytes": self.history_bytes,
                "warned": list(state.warned),
            },
            pending={**self._unfinished, **pending},
            evicting=evicting,
            name=self.files.name,
        )


_RANKED = ("best", "top_k", "ensemble")


def _amend(lines: list[str], lost: set[str], error: str) -> list[str]:
    """History lines whose files were never written: what they saved and evicted undone."""
    out = []
    for line in lines:
        entry = json.loads(line)
        decision = entry.get("decision", {})
        if lost & set(decision.get("files", [])):
            decision.update(
                saved=False, kind=[], files=[], evicted=[], lost=sorted(lost), error=error
            )
        out.append(json.dumps(entry, default=str, allow_nan=False) + "\n")
    return out


def _ranked_as_kept(policies: dict[str, Any], kept: list[Record]) -> dict[str, Any]:
    """Policy states whose ranked checkpoints are exactly the kept files ranked by score."""
    out = {}
    for monitor, state in policies.items():
        ranked = [r for r in kept if r.monitor == monitor and r.kind in _RANKED]
        known = {c[0]: c for c in state.get("ranked", [])}
        out[monitor] = {**state, "ranked": [known.get(r.id, [r.id, r.score, None]) for r in ranked]}
    return out


def _best_kept(kept: list[Record], monitor: str, mode: str) -> str | None:
    scored = [
        (r.score, r.name)
        for r in kept
        if r.monitor == monitor and r.kind in _RANKED and r.score is not None
    ]
    if not scored:
        return None
    return (max(scored) if mode == "max" else min(scored))[1]


def sidecar_text(record: Record) -> str:
    return json.dumps(record.to_dict(), indent=1, default=str, allow_nan=False) + "\n"
