"""The write pipeline: capture what an evaluation keeps, on the training thread, then commit it
in the background (or at once), at most one write in flight and one pending.

A :class:`Staged` writer's ``capture`` copies the state into host buffers; the rest (serialise,
hash, fsync, commit the manifest, rename, evict) runs in the background. A :class:`WriteNow`
writer writes its file on the training thread, and the rest follows in the background. A plain
``write(path)`` callable writes and commits before the evaluation returns. An error is handed
back to the caller at the next submit or flush.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bestsave.background import BackgroundWriter
from bestsave.commit import Committer
from bestsave.jobs import Captured, Content, Job, NewFile, Spooled, WrittenFile
from bestsave.layout import RunFiles
from bestsave.messages import warn
from bestsave.record import Record
from bestsave.sharded import Sharded, ShardWriteError, ShardWriter, describe
from bestsave.staging import Snapshot
from bestsave.state import RunState
from bestsave.store import Store, remove_local

Writer = Callable[[str], Any]
"""Writes a checkpoint to the local path it is given."""


@dataclass(frozen=True)
class Staged:
    """A checkpoint writer in two parts, so the training loop pays only for the first.

    ``capture()`` runs on the training thread when a save is decided and returns a snapshot
    that no later training step changes (tensors copied into host memory); ``serialize(snapshot,
    path)`` writes it, in a background thread when the saver writes asynchronously. Called as
    ``staged(path)`` it does both at once. With ``stream=True``, ``serialize`` is given a binary
    file object open for writing instead of a path (``torch.save`` takes either): the saver
    checksums the bytes as they go by instead of reading the file back.

    >>> import json, tempfile, os
    >>> state = {"w": [1, 2]}
    >>> write = Staged(lambda: json.dumps(state), lambda snap, path: open(path, "w").write(snap))
    >>> path = os.path.join(tempfile.mkdtemp(), "x.json")
    >>> _ = write(path); open(path).read()
    '{"w": [1, 2]}'
    """

    capture: Callable[[], Any]
    serialize: Callable[[Any, Any], Any]
    stream: bool = False

    def __call__(self, path: str) -> None:
        if not self.stream:
            self.serialize(self.capture(), path)
            return
        with open(path, "wb") as f:
            self.serialize(self.capture(), f)


@dataclass(frozen=True)
class WriteNow:
    """A writer that must write its file at once, because it reads live state no copy holds
    (a whole Keras model's ``.keras`` file); hashing, syncing and committing the file still run
    in the background."""

    write: Writer


AnyWriter = Writer | Staged | WriteNow | Sharded
"""What ``BestSaver.step`` accepts as ``write=``."""


class WriteError(OSError, RuntimeError):
    """Writing a checkpoint failed; the previous best is intact. ``__cause__`` says why.

    An ``OSError``, as code written for the frameworks' own callbacks expects around ``fit``
    for a full disk; ``errno`` is the cause's when it had one (``errno.ENOSPC``)."""


class WritePipeline:
    """Captures jobs and commits them through a :class:`Committer`."""

    def __init__(
        self,
        store: Store,
        files: RunFiles,
        committer: Committer,
        *,
        background: bool,
        keep_going: bool,
        committed: Callable[[list[Record], list[Record]], None],
        writing: bool = True,
    ) -> None:
        self.store = store
        self.files = files
        self.committer = committer
        self.background = background
        self.keep_going = keep_going
        """After an error, later jobs still run (``on_write_error="warn"``)."""
        self.committed = committed
        """Told of the files each job wrote and deleted, once it is committed."""
        self._worker: BackgroundWriter | None = None
        self._error: BaseException | None = None
        self._held: dict[tuple[int, str], Snapshot] = {}  # the latest save's, by record
        self._shards: ShardWriter | None = None
        self.writing = writing
        """This process commits what it captures; others only write their shards."""

    def capture(
        self,
        job: Job,
        records: list[Record],
        last: Record | None,
        write: AnyWriter | None,
        write_last: AnyWriter | None,
    ) -> Job:
        """Take what ``job`` must write, on the training thread: each distinct content once.
        Returns the job to submit, which may hold a pending job taken back from the worker.

        Files holding the same bytes (a best that is also periodic, ``last`` beside a kept file)
        become hard links to one written file.
        """
        if not records:
            return job
        shared: NewFile | None = None
        for r in records:
            own = r is last and write_last is not None
            twin = shared.record.name if shared is not None and not own else None
            job.files.append(NewFile(r, self.files.tmp(r.name), same_as=twin))
            if shared is None and not own:
                shared = job.files[-1]
        held = self._hold_pending(job)
        merged = held.absorb(job) if held is not None else job
        try:
            for f in job.files:
                if f.same_as is None:
                    own = f.record is last and write_last is not None
                    writer = write_last if own else write
                    assert writer is not None, "the saver checks that a writer was given"
                    f.content = self._content(writer, f.tmp)
        except BaseException as e:
            job.release()
            if held is not None:  # its superseded snapshots are gone: those files are lost
                assert self._worker is not None
                self._worker.submit(held.lost(job.superseded(), e))
            raise
        self._held = _snapshots(job)
        return merged

    def _hold_pending(self, job: Job) -> Job | None:
        """Keep at most two snapshots (one being written, one pending) while ``job`` captures.

        A pending job whose files ``job`` supersedes is taken back from the worker and merged
        now, so its snapshot is freed before the new one is taken; any other pending job must
        start first.
        """
        worker = self._worker
        if worker is None:
            return None
        if worker.pending_files() <= job.superseded():
            return worker.take_pending()
        worker.wait_for_room()
        return None

    def _content(self, write: AnyWriter, tmp: str) -> Content:
        if isinstance(write, Staged):
            snapshot = write.capture()
            if isinstance(snapshot, Snapshot) and snapshot.live:
                return self._write_live(write, snapshot, tmp)
            return Captured(write.serialize, snapshot, write.stream)
        if isinstance(write, Sharded):
            if self.keep_going:
                raise ValueError(
                    "a sharded checkpoint that fails on one process fails on all of them, so "
                    "training cannot go on without it: use on_write_error='raise'"
                )
            if self._shards is None:
                self._shards = ShardWriter(self.store, write.group, self.writing)
            return self._shards.capture(write, tmp)
        local = self.store.scratch(tmp)
        try:
            (write.write if isinstance(write, WriteNow) else write)(local)
        except BaseException:
            WrittenFile(local).release()
            raise
        return WrittenFile(local, background=isinstance(write, WriteNow))

    def _write_live(self, write: Staged, snapshot: Snapshot, tmp: str) -> Content:
        """A snapshot of training's own tensors, too large for host buffers: written before
        training goes on, all but a spool's worth (chunked) or all of it (streaming)."""
        local = self.store.scratch(tmp)
        if snapshot.staging == "chunked" and write.stream:
            return Spooled(write.serialize, snapshot, local, snapshot.spool)
        now = Captured(write.serialize, snapshot, write.stream)
        try:
            now.materialize(local)
        except BaseException:
            remove_local(local)
            raise
        return WrittenFile(local, background=True, digest=now.digest, staging="streaming")

    def submit(self, job: Job) -> None:
        """Commit ``job``: in the background, or at once (after any job in the background,
        keeping the order). Raises what an earlier background job raised, or this job's error
        when it runs at once."""
        contents = [f.content for f in job.files if f.content is not None]
        # An evaluation that keeps nothing only appends history and rewrites the manifest: the
        # worker does that too, so such steps cost the loop the decision alone.
        if not (self.background and all(c.background for c in contents)):
            self.raise_error(self.flush())
            self.run(job)
            return
        self.raise_error(self.take_error())
        if self._worker is None:
            self._worker = BackgroundWriter(self.run, keep_going=self.keep_going)
        for f in job.files:  # with the writer now: a later snapshot may wait for their buffers
            if isinstance(f.content, Captured) and isinstance(f.content.snapshot, Snapshot):
                f.content.snapshot.hand_over()
        self._worker.submit(job)

    def run(self, job: Job) -> None:
        written, evicted = self.committer.run(job)
        self.committed(written, evicted)

    def flush(self, stop: bool = False) -> BaseException | None:
        """Wait for the jobs in the background; returns the error one raised, if any. With
        ``stop`` the worker thread ends (a later submit starts a new one)."""
        if self._shards is not None:
            self._shards.flush(stop)
        worker = self._worker
        if worker is None:
            return self.take_error()
        worker.flush()
        if stop:
            worker.stop()
            self._worker = None
        error = worker.take_error()
        return error or self.take_error()

    def settle(self, error: BaseException | None) -> BaseException | None:
        """After a flush on every process of a sharded run: each learns whether the committing
        process's commits failed (``error`` there), so that all raise, and none reads the
        manifest before the last commit."""
        if self._shards is None:
            return error
        shared = self._shards.group.all_gather(describe(error) if self.writing else None)
        if error is None and shared[0] is not None:
            error = ShardWriteError(
                f"committing a sharded checkpoint failed on rank 0 ({shared[0]})"
            )
        return error

    def keep_error(self, error: BaseException | None) -> None:
        """Keep a background error seen during a quiet flush, for the next submit."""
        self._error = self._error or error

    def take_error(self) -> BaseException | None:
        error, self._error = self._error, None
        if error is None and self._worker is not None:
            error = self._worker.take_error()
        if error is None and self._shards is not None:
            error = self._shards.take_error()
        return error

    @staticmethod
    def raise_error(error: BaseException | None) -> None:
        if error is not None:
            raise error

    def failed(
        self, error: BaseException, state: RunState, roll_back: bool = True
    ) -> tuple[RunState, BaseException | None]:
        """What a failed write leaves: the state to go on from, and the error to raise (None
        when training goes on, with ``keep_going``, after a warning). Stopping forgets what
        was decided since the last commit (with ``roll_back``); either way the records of
        files never written are forgotten."""
        stop = isinstance(error, (KeyboardInterrupt, SystemExit)) or not self.keep_going
        if roll_back and stop:
            state = self.committer.committed
        state = self.committer.forget_lost(state)
        where = self.store.url
        if not stop:
            warn(
                f"writing a checkpoint to {where} failed ({type(error).__name__}: {error}); "
                "training goes on and the previous best is intact"
            )
            return state, None
        if isinstance(error, WriteError) or not isinstance(error, Exception):
            return state, error
        message = (
            f"writing a checkpoint to {where} failed ({type(error).__name__}: {error}); the "
            "previous best is intact. Fix the cause and resume, or pass "
            "on_write_error='warn' to train on without that checkpoint"
        )
        code = getattr(error, "errno", None)
        raised = WriteError(code, message) if code else WriteError(message)
        raised.__cause__ = error
        return state, raised

    def held(self, record: Record) -> Any | None:
        """The state ``record``'s file was written from, while its buffers still hold it."""
        snapshot = self._held.get((record.id, record.name))
        return snapshot.state if snapshot is not None and snapshot.intact else None


def _snapshots(job: Job) -> dict[tuple[int, str], Snapshot]:
    """The stager snapshot each of ``job``'s files is written from (a twin's for a link), by
    evaluation and name: a fixed file name is written again by later evaluations."""
    files = {f.record.name: f for f in job.files}
    out = {}
    for f in job.files:
        content = files[f.same_as].content if f.same_as else f.content
        if isinstance(content, Captured) and isinstance(content.snapshot, Snapshot):
            out[(f.record.id, f.record.name)] = content.snapshot
    return out
