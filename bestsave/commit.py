"""Committing a save: write the new files, then the manifest, then rename and delete.

A :class:`Job` is everything one evaluation (or several merged ones) must make durable. The
:class:`Committer` carries it out, in the training thread or in the background worker, in the
order that keeps the previous best loadable at every instant:

1. each new file is written under a temporary name and made durable (hard links for files that
   hold the same bytes);
2. the history lines are appended;
3. the manifest that lists the new files and no longer lists the evicted ones replaces the old
   one (the commit point; it also names the temporary files, so a crash here is rolled forward);
4. the new files are renamed into place and their sidecars written;
5. the evicted files are deleted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from bestsave.manifest import Manifest
from bestsave.naming import HISTORY, MANIFEST, sidecar_name
from bestsave.record import Record
from bestsave.store import Store, file_digest


class Content(Protocol):
    """The bytes of a new checkpoint, captured on the training thread."""

    def materialize(self, path: str) -> str:
        """Write the checkpoint (to ``path`` if it is not written yet); returns where it is."""

    def release(self) -> None:
        """Free what the capture holds; called once, whether the file was written or not."""


class WrittenFile:
    """A checkpoint a plain ``write(path)`` already wrote to a local file."""

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

    def __init__(self, serialize: Callable[[Any, str], Any], snapshot: Any) -> None:
        self.serialize = serialize
        self.snapshot = snapshot

    def materialize(self, path: str) -> str:
        self.serialize(self.snapshot, path)
        return path

    def release(self) -> None:
        release = getattr(self.snapshot, "release", None)
        if callable(release):
            release()
        self.snapshot = None


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

    def absorb(self, newer: Job) -> Job:
        """This pending job merged with a ``newer`` one: files the newer one evicts or replaces
        (a rolling ``last``) are never written; everything else is kept in order."""
        dropped = {r.name for r in newer.evict} | {f.record.name for f in newer.files}
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
        extension: str,
        header: dict[str, Any],
        history_bytes: int,
        committed: SaverState,
    ) -> None:
        self.store = store
        self.extension = extension
        self.header = header
        """run, monitor, mode and policy: the manifest's fixed part."""
        self.history_bytes = history_bytes
        self.committed = committed
        self.digests: dict[str, tuple[int, str]] = {}

    def filled(self, record: Record) -> Record:
        """``record`` with its size and sha256, once its file is written."""
        digest = self.digests.get(record.name)
        if digest is None or record.sha256:
            return record
        return replace(record, bytes=digest[0], sha256=digest[1])

    def run(self, job: Job) -> tuple[list[Record], list[Record]]:
        """Make ``job`` durable; returns the records of the files it wrote and of those it
        deleted, with their sizes and checksums."""
        store = self.store
        pending: dict[str, str] = {}
        try:
            for f in job.files:
                name = f.record.name
                if f.content is not None:
                    local = f.content.materialize(store.scratch(f.tmp))
                    if not os.path.exists(local):
                        raise FileNotFoundError(f"write() was given {local} but wrote no file")
                    self.digests[name] = file_digest(local)
                    store.publish(local, f.tmp)
                else:
                    store.link(pending[f.same_as or ""], f.tmp)
                    self.digests[name] = self.digests[f.same_as or ""]
                pending[name] = f.tmp
        except BaseException:
            for tmp in pending.values():
                store.delete(tmp)
            raise
        finally:
            job.release()

        state = job.state
        assert state is not None
        for line in job.lines:
            self.history_bytes = store.append_text(HISTORY, line)
        # A new file may reuse an evicted one's name (a fixed file name): the rename replaced
        # it, so it must not be deleted.
        reused = {
            n
            for f in job.files
            for n in (f.record.name, sidecar_name(f.record.name, self.extension))
        }
        evicting = [
            n
            for r in job.evict
            for n in (r.name, sidecar_name(r.name, self.extension))
            if n not in reused
        ]
        manifest = Manifest(
            dirpath=store.url,
            run=self.header["run"],
            monitor=self.header["monitor"],
            mode=self.header["mode"],
            monitors=self.header["monitors"],
            policy=self.header["policy"],
            kept=[self.filled(r) for r in state.kept],
            best_name=job.best_name,
            last=self.filled(state.last) if state.last else None,
            state={
                "policies": state.policies,
                "evaluations": state.evaluations,
                "last_epoch": state.last_epoch,
                "history_bytes": self.history_bytes,
                "warned": list(state.warned),
            },
            pending=pending,
            evicting=evicting,
        )
        store.write_text(MANIFEST, manifest.to_json())
        written = [self.filled(f.record) for f in job.files]
        evicted = [self.filled(r) for r in job.evict]
        for name, tmp in pending.items():
            store.rename(tmp, name)
        for r in written:
            if r.kind != "last":
                store.write_text(sidecar_name(r.name, self.extension), sidecar_text(r))
        for name in evicting:
            store.delete(name)
        store.sync()
        for r in job.evict:
            if r.name not in reused:
                self.digests.pop(r.name, None)
        self.committed = state
        return written, evicted


def sidecar_text(record: Record) -> str:
    return json.dumps(record.to_dict(), indent=1, default=str, allow_nan=False) + "\n"
