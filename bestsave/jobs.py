"""What one or more evaluations must make durable: new files, evictions, history lines.

Each new file's bytes are captured on the training thread (:class:`Captured`, a snapshot
serialised later; :class:`WrittenFile`, a file a plain ``write(path)`` already wrote) and
written when the job runs, in the background or at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bestsave.hashing import HashingFile
from bestsave.history import HistoryLine
from bestsave.record import Record
from bestsave.spool import Spool
from bestsave.staging import Snapshot
from bestsave.state import RunState
from bestsave.store import Parts, remove_local


class Content(Protocol):
    """The bytes of a new checkpoint, captured on the training thread."""

    digest: tuple[int, str] | None
    """Size and sha256 of the written file when they were taken while writing it."""
    parts: Parts
    """With ``digest``, for a folder: size and sha256 of each file in it."""
    background: bool
    """The rest of the save may run in the background."""
    staging: str
    """How the bytes were staged in host memory (:data:`bestsave.memory.Staging`), or "" for
    a file its writer wrote."""

    def materialize(self, path: str) -> str:
        """Write the checkpoint (to ``path`` if it is not written yet); returns where it is."""

    def release(self) -> None:
        """Free what the capture holds; called once, whether the file was written or not."""


class Abandoned(Exception):
    """A write given up because the job after it deletes the file (see :meth:`Job.abandon`)."""

    def __str__(self) -> str:
        return "a newer checkpoint replaces this one"


class WrittenFile:
    """A checkpoint a writer already wrote to a local file (with its size and sha256 when they
    were taken while writing it)."""

    parts: Parts = {}  # noqa: RUF012 - read only

    def __init__(
        self,
        path: str,
        background: bool = False,
        digest: tuple[int, str] | None = None,
        staging: str = "",
    ) -> None:
        self.path: str | None = path
        self.background = background
        self.digest = digest
        self.staging = staging

    def materialize(self, path: str) -> str:
        written, self.path = self.path, None  # the committer owns the file from here
        assert written is not None
        return written

    def release(self) -> None:
        if self.path is not None:
            remove_local(self.path)


class Captured:
    """A snapshot taken by ``Staged.capture``, serialised when the job runs."""

    background = True

    def __init__(
        self, serialize: Callable[[Any, Any], Any], snapshot: Any, stream: bool = False
    ) -> None:
        self.serialize = serialize
        self.snapshot = snapshot
        self.stream = stream
        self.staging: str = snapshot.staging if isinstance(snapshot, Snapshot) else ""
        self.digest: tuple[int, str] | None = None
        self.parts: Parts = {}
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


class Spooled:
    """A checkpoint too large for host buffers, serialised on the training thread through a
    :class:`~bestsave.spool.Spool` of ``capacity`` bytes into the local file ``path``: the
    constructor returns once all but the spool's bytes are written, and :meth:`materialize`
    waits for the rest."""

    parts: Parts = {}  # noqa: RUF012 - read only
    background = True
    staging = "chunked"

    def __init__(
        self, serialize: Callable[[Any, Any], Any], state: Any, path: str, capacity: int
    ) -> None:
        self.path: str | None = path
        self.digest: tuple[int, str] | None = None
        self._file = HashingFile(path)
        self._spool = Spool(self._file, capacity)
        try:
            serialize(state, self._spool)
        except BaseException:
            cause = self._spool.error
            self.release()
            if cause is not None:  # the serialiser's own error only follows from it
                raise cause from None
            raise

    def materialize(self, path: str) -> str:
        self._spool.finish()
        self._file.close()
        self.digest = self._file.digest()
        written, self.path = self.path, None  # the committer owns the file from here
        assert written is not None
        return written

    def release(self) -> None:
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            self._spool.finish()
        self._file.discard()
        self._file.close()
        remove_local(self.path)
        self.path = None


class Lost:
    """Bytes released for a newer snapshot whose capture then failed: never written."""

    digest: tuple[int, str] | None = None
    parts: Parts = {}  # noqa: RUF012 - read only
    background = True
    staging = ""

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


@dataclass
class Job:
    """Everything to make durable for one or more evaluations."""

    files: list[NewFile] = field(default_factory=list)
    evict: list[Record] = field(default_factory=list)
    lines: list[HistoryLine] = field(default_factory=list)
    state: RunState | None = None

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
        )
