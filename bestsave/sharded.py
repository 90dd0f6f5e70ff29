"""Checkpoints written by every process of a run: each writes its own shards of the model into
one shared folder, in the background, and the checkpoint exists only once all of them are done.

Every process decides alike (the same metrics reach the same decisions), so every process
captures the same checkpoints in the same order. Each hands its capture to a
:class:`ShardWriter`, whose thread writes the captures one by one, in step with the other
processes' threads:

1. the processes agree that every one of them captured its shards, and on the folder (the
   writing process's temporary name);
2. each writes its shards there (a collective write such as ``torch.distributed.checkpoint``);
3. each hashes the files it wrote (as it writes them, when the write says what it wrote; else
   by reading back a share of the folder's files), and all learn those checksums and whether
   any process failed.

Only then does the writing process (global rank 0) commit the manifest that lists the folder:
the two-phase commit; it hashes any file no process has (none, when the write hashes what it
writes). A process that fails at any step makes the checkpoint fail on every process, the
previous best intact. The core knows nothing of torch: the adapter hands it a
:class:`Group` for the exchanges and the function that writes the shards.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bestsave.background import yield_to_training
from bestsave.staging import Snapshot
from bestsave.store import Parts, Store, files_below, tree_digest

MAX_QUEUED = 2
"""Captures waiting for the writer thread before a new one waits for room: each holds a copy of
this process's shards in host memory."""


class Group(Protocol):
    """The processes that write one sharded checkpoint together."""

    rank: int
    size: int

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, by rank; a collective: every process calls it in turn."""


@dataclass(frozen=True)
class Sharded:
    """A checkpoint writer whose parts are written by every process of ``group``.

    ``capture()`` runs on the training thread of every process and copies that process's
    shards into host memory; ``write(snapshot, where)`` runs in the background, on every
    process at once, and writes them into the folder ``where`` (a path, or a URL for a remote
    directory) with collectives over ``group``: ``torch.distributed.checkpoint.save`` of a
    state dict whose tensors are ``DTensor`` shards is one. A write that hashed the files it
    wrote (:class:`bestsave.hashing.HashedFolder`) returns their :data:`Parts`, by path inside
    the folder, so that nothing is read back; one that returns anything else has the folder's
    files read back and hashed, a share on each process.
    """

    capture: Callable[[], Any]
    write: Callable[[Any, str], Any]
    group: Group


class ShardWriteError(RuntimeError):
    """A sharded checkpoint failed on at least one process, so on all of them."""


class ShardedFile:
    """The content of one sharded checkpoint on one process: written by the shard writer
    thread; on the writing process, :meth:`materialize` waits for it."""

    background = True

    def __init__(self, store: Store, name: str, owned: bool) -> None:
        self.staging = ""
        self.name = name
        """The folder's temporary name in the store; the writing process's, once agreed."""
        self.digest: tuple[int, str] | None = None
        self.parts: Parts = {}
        self._store, self._owned = store, owned
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._dropped = False

    def wait(self) -> None:
        """Until every process has written its shards, or one failed."""
        self._done.wait()

    def materialize(self, path: str) -> str:
        self.wait()
        if self._error is not None:
            raise self._error
        self._owned = False  # the committer's from here
        self._complete()
        return self.where

    def _complete(self) -> None:
        """Hash the folder's files that no process hashed, and check that every file a process
        hashed is there."""
        files = set(files_below(self._store, self.name))
        gone = sorted(set(self.parts) - files)
        if gone:
            raise ShardWriteError(f"written parts of {self.name} are missing: {', '.join(gone)}")
        missing = sorted(files - set(self.parts))
        if missing:
            self.parts.update({p: self._store.digest(f"{self.name}/{p}") for p in missing})
            self.digest = tree_digest(self.parts)

    @property
    def where(self) -> str:
        return self._store.shared(self.name)

    def release(self) -> None:
        """Done with: a folder never handed to the committer is deleted once written."""
        self._dropped = True
        if self._done.is_set():
            self._discard()

    def finish(self, error: BaseException | None, parts: Parts) -> None:
        if error is None:
            self.digest, self.parts = tree_digest(parts), parts
        self._error = error
        self._done.set()
        if self._dropped:
            self._discard()

    def _discard(self) -> None:
        if self._owned and self._error is None:
            self._store.delete(self.name)


@dataclass
class _Entry:
    content: ShardedFile
    write: Callable[[Any, str], Any] | None
    snapshot: Any
    error: BaseException | None


class ShardWriter:
    """Writes this process's shards of each sharded checkpoint, in order, in step with the
    other processes of ``group``.

    The writing process hears of a failure through the checkpoint's content; the others keep
    the first error for :meth:`take_error`, so that every process raises it. Every process
    learns of a failure at the same checkpoint, and writes none after it: captures raise it.
    """

    def __init__(self, store: Store, group: Group, writing: bool) -> None:
        self.store, self.group, self.writing = store, group, writing
        self._queue: deque[_Entry] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._error: BaseException | None = None
        self._broken: BaseException | None = None
        self._thread: threading.Thread | None = None

    def capture(self, writer: Sharded, tmp: str) -> ShardedFile:
        """Capture this process's shards for the folder that becomes ``tmp`` on the writing
        process, and queue their write. A capture that fails is queued too (the other
        processes learn of it), then raised."""
        content = ShardedFile(self.store, tmp, owned=self.writing)
        with self._cond:
            self._cond.wait_for(lambda: len(self._queue) < MAX_QUEUED)
            if self._broken is not None:
                raise ShardWriteError(
                    "an earlier sharded checkpoint failed, so no process writes more"
                ) from self._broken
        try:
            snapshot = writer.capture()
        except BaseException as e:
            self._queue_entry(_Entry(content, None, None, e))
            raise
        self._queue_entry(_Entry(content, writer.write, snapshot, None))
        if isinstance(snapshot, Snapshot):
            snapshot.hand_over()
            if snapshot.live:
                # Training's own tensors, too large for host buffers: written before it goes on.
                content.staging = "streaming"
                content.wait()
            else:
                content.staging = snapshot.staging
        return content

    def _queue_entry(self, entry: _Entry) -> None:
        with self._cond:
            self._queue.append(entry)
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="bestsave-shards",
                                                daemon=True)  # fmt: skip
                self._thread.start()

    def flush(self, stop: bool = False) -> None:
        """Wait until every queued checkpoint is written (or has failed); with ``stop`` the
        thread ends too (the next capture starts another), so none is left at exit."""
        with self._cond:
            self._cond.wait_for(lambda: not self._queue and not self._busy)
            thread, self._thread = (self._thread, None) if stop else (None, self._thread)
            self._cond.notify_all()
        if thread is not None:
            thread.join()

    def take_error(self) -> BaseException | None:
        with self._cond:
            error, self._error = self._error, None
            return error

    def _loop(self) -> None:
        yield_to_training()
        me = threading.current_thread()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._thread is not me)
                if not self._queue:
                    return
                entry = self._queue[0]
                self._busy = True
            error: BaseException | None
            parts: Parts = {}
            try:
                if self._broken is not None:  # every process skips it: no exchange
                    error = self._broken
                else:
                    error, parts = self._write(entry)
            except BaseException as e:  # an exchange failed: a process is gone
                error = e
            finally:
                release = getattr(entry.snapshot, "release", None)
                if callable(release):
                    release()
            entry.content.finish(error, parts)
            with self._cond:
                if error is not None and self._broken is None:
                    self._broken = error
                    if not self.writing:
                        self._error = error
                self._queue.popleft()
                self._busy = False
                self._cond.notify_all()

    def _write(self, entry: _Entry) -> tuple[BaseException | None, Parts]:
        """Steps 1-3 of the module's protocol; returns the error, or every part's digest."""
        group, content = self.group, entry.content
        agreed = group.all_gather((describe(entry.error), content.name))
        failed = {rank: why for rank, (why, _) in enumerate(agreed) if why is not None}
        if failed:
            return _failure("capturing", failed, entry.error), {}
        content.name = agreed[0][1]  # the writing process's name for the folder
        error: BaseException | None = None
        written: Any = None
        try:
            assert entry.write is not None
            written = entry.write(entry.snapshot, content.where)
        except BaseException as e:  # DCP raises BaseException; the others must hear of it
            error = e
        mine: Parts = {}
        if error is None:
            try:
                mine = dict(written) if isinstance(written, dict) else self._hash_share(content)
            except Exception as e:
                error = e
        outcomes = group.all_gather((describe(error), mine))
        failed = {rank: why for rank, (why, _) in enumerate(outcomes) if why is not None}
        if failed:
            return _failure("writing", failed, error), {}
        parts: Parts = {}
        for _, share in outcomes:
            parts.update(share)
        return None, parts

    def _hash_share(self, content: ShardedFile) -> Parts:
        """Size and sha256 of this process's share of the folder's files (every ``size``-th
        one, sorted): the work of checking every part is spread over the processes."""
        rank, size, name = self.group.rank, self.group.size, content.name
        files = sorted(files_below(self.store, name))
        return {part: self.store.digest(f"{name}/{part}") for part in files[rank::size]}


def describe(error: BaseException | None) -> str | None:
    """An error as other processes are told of it."""
    if error is None:
        return None
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _failure(doing: str, failed: dict[int, str], own: BaseException | None) -> ShardWriteError:
    ranks = ", ".join(f"rank {r} ({why})" for r, why in sorted(failed.items()))
    error = ShardWriteError(f"{doing} a sharded checkpoint failed on {ranks}; no process keeps it")
    error.__cause__ = own
    return error
