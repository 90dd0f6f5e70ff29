"""Writing a checkpoint file while hashing it, around the page cache where the filesystem allows.

:class:`HashingFile` is the binary file ``torch.save`` writes to: it computes the sha256 of the
bytes as they go by (so the file is never read back), writes through a reused aligned buffer
with ``O_DIRECT`` where the filesystem offers it (filling hundreds of megabytes of fresh page
cache costs more CPU than the write), and lets tensors held in a snapshot's buffers be hashed and
written by helper threads after ``write()`` returns.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import ctypes
import errno
import hashlib
import io
import math
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any


class _AlignedBuffers:
    """Page-aligned scratch buffers for writes that bypass the page cache, kept for reuse:
    touching fresh memory costs far more than copying into memory already touched."""

    SIZE = 4 << 20

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, self.SIZE)

    def give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < 2:  # a file takes one; two savers seldom write at once
                self._free.append(buffer)
                return
        buffer.close()


_ALIGNED = _AlignedBuffers()
_BLOCK = 4096  # O_DIRECT alignment of addresses, lengths and offsets on every common device


class HashingFile(io.RawIOBase):
    """A new binary file open for writing that keeps the size and sha256 of what goes through
    it, so a file written once need not be read back to be checksummed. A large block is hashed
    in a helper thread while it is written.

    Where the filesystem allows it (Linux ``O_DIRECT``), the bytes go to the disk through a
    reused aligned buffer instead of the page cache: a checkpoint is written once and rarely
    read soon, and filling hundreds of megabytes of fresh page cache costs more than the write
    itself (and leaves the final fsync all the work). Elsewhere it is an ordinary buffered file.

    ``stable`` lists memory, as ``(address, size)`` spans, that nothing changes or frees until
    the file is closed (a snapshot's buffers). A large block inside it is queued for helper
    threads to hash and write, and ``write`` returns at once: ``torch.save`` computes the next
    tensor's CRC-32 meanwhile instead of waiting. ``interrupt`` is called before each block, a
    queued one too, and may raise to give the file up. With ``sync``, :meth:`close` makes the
    file durable (fsync) once its last block is written.

    >>> import tempfile, os
    >>> from bestsave.store import file_digest
    >>> path = os.path.join(tempfile.mkdtemp(), "x.bin")
    >>> with HashingFile(path) as f:
    ...     _ = f.write(b"abc")
    >>> f.digest() == file_digest(path)
    True
    """

    _PARALLEL = 1 << 20

    def __init__(
        self,
        path: str | os.PathLike[str],
        direct: bool = True,
        stable: Sequence[tuple[int, int]] = (),
        interrupt: Callable[[], None] | None = None,
        sync: bool = False,
    ) -> None:
        self.name = os.fspath(path)
        self._sync = sync
        self._fd = _open_direct(self.name) if direct else None
        self._file = None if self._fd is not None else open(self.name, "wb")  # noqa: SIM115
        self._buffer = _ALIGNED.take() if self._fd is not None else None
        self._filled = 0
        self._sha = hashlib.sha256()
        self._size = 0
        self._stable = sorted(stable)
        self._interrupt = interrupt
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, "bestsave-hash")
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "bestsave-put")
        self._queued: list[concurrent.futures.Future[None]] = []
        self._small = bytearray()  # small blocks behind queued ones, queued with the next
        self._error: BaseException | None = None
        self._discarded = False

    @property
    def direct(self) -> bool:
        """Whether the bytes bypass the page cache."""
        return self._fd is not None

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        """Bytes written so far (the file is written front to back, never sought)."""
        return self._size

    def write(self, b: Any) -> int:
        if self._interrupt is not None:
            self._interrupt()
        view = memoryview(b).cast("B")
        n = len(view)
        if self._error is not None:
            self._wait()  # raises it: the caller stops writing a file that cannot be finished
        if n >= self._PARALLEL and self._holds(view):
            self._queue(view)
        elif self._queued and n < self._PARALLEL:
            self._small += view  # copied: the caller may reuse it once this returns
        else:
            self._wait()
            if n < self._PARALLEL:
                self._sha.update(view)
                self._put(view)
            else:
                # Both release the GIL; the block must be hashed before the caller may reuse it.
                hashed = self._hasher.submit(self._sha.update, view)
                try:
                    self._put(view)
                finally:
                    hashed.result()
        self._size += n
        return n

    def _holds(self, view: memoryview) -> bool:
        """Whether ``view`` lies inside one of the stable spans."""
        if not self._stable:
            return False
        start = _address(view)
        i = bisect.bisect_right(self._stable, (start, math.inf)) - 1
        return i >= 0 and start + len(view) <= sum(self._stable[i])

    def _queue(self, view: memoryview) -> None:
        self._queue_small()
        for future in (
            self._hasher.submit(self._sha.update, view),
            self._writer.submit(self._put_queued, view),
        ):
            future.add_done_callback(self._note)
            self._queued.append(future)

    def _queue_small(self) -> None:
        """Queue the small blocks gathered since the last queued one, as one block."""
        if self._small:
            small, self._small = memoryview(bytes(self._small)), bytearray()
            self._queue(small)

    def _put_queued(self, view: memoryview) -> None:
        if self._error is None:  # after a failed write the file is lost anyway
            if self._interrupt is not None:  # write() may have handed over every block already
                self._interrupt()
            self._put(view)

    def _note(self, future: concurrent.futures.Future[None]) -> None:
        if self._error is None and not future.cancelled():
            self._error = future.exception()

    def _wait(self) -> None:
        """Hash and write everything queued, in order; raises what a helper raised, as soon as
        one has (the blocks not started yet are dropped: the file is lost anyway)."""
        self._queue_small()
        queued, self._queued = self._queued, []
        _, left = concurrent.futures.wait(queued, return_when=concurrent.futures.FIRST_EXCEPTION)
        for future in left:
            future.cancel()
        concurrent.futures.wait(left)
        for future in queued:
            if not future.cancelled():
                future.result()

    def _put(self, view: memoryview) -> None:
        if self._file is not None:
            self._file.write(view)
            return
        assert self._buffer is not None
        size = len(self._buffer)
        while view:
            n = min(len(view), size - self._filled)
            self._buffer[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == size:
                self._drain(size)

    def _drain(self, length: int) -> None:
        """Write the first ``length`` bytes of the buffer (a multiple of the block size)."""
        assert self._buffer is not None and self._fd is not None
        data = memoryview(self._buffer)[:length]
        try:
            while data:
                try:
                    data = data[os.write(self._fd, data) :]
                except OSError as e:
                    if e.errno != errno.EINVAL or not self._stop_direct():
                        raise
        finally:
            data.release()
        self._filled = 0

    def _stop_direct(self) -> bool:
        """Go on through the page cache where the filesystem opened the file for direct I/O
        but refuses the writes; False when it was not direct I/O that failed."""
        import fcntl

        assert self._fd is not None
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        if not flags & os.O_DIRECT:
            return False
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        return True

    def flush(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.flush()

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None:
            self.discard()
        self.close()

    def discard(self) -> None:
        """Give the file up: :meth:`close` then leaves unwritten what is still queued."""
        self._discarded = True
        for future in self._queued:
            future.cancel()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._discarded:
                self._wait()
                self.flush()
                if self._fd is not None and self._filled:
                    # The tail goes out padded to a whole block, then the file is cut to size.
                    self._drain(-(-self._filled // _BLOCK) * _BLOCK)
                    os.ftruncate(self._fd, self._size)
                if self._sync:
                    self._fsync()
        finally:
            if self._queued:  # after a failure or a discard, helpers may still use the file
                concurrent.futures.wait(self._queued)
            if self._file is not None:
                self._file.close()
            if self._fd is not None:
                os.close(self._fd)
            if self._buffer is not None:
                _ALIGNED.give(self._buffer)
                self._buffer = None
            self._hasher.shutdown()
            self._writer.shutdown()
            super().close()

    def _fsync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        elif self._fd is not None:
            os.fsync(self._fd)

    def digest(self) -> tuple[int, str]:
        """Size in bytes and sha256 of everything written, as :func:`file_digest` gives them."""
        return self._size, self._sha.hexdigest()


class HashedFolder:
    """The files written into the folder ``root``, each through a :class:`HashingFile` (around
    the page cache, hashed as it is written, durable once closed), so that a checkpoint whose
    parts several processes write need not be read back to be checksummed.

    >>> import tempfile, os
    >>> from bestsave.store import folder_parts
    >>> root = tempfile.mkdtemp()
    >>> folder = HashedFolder(root)
    >>> with folder.create(os.path.join(root, "part.tmp")) as f:
    ...     _ = f.write(b"abc")
    >>> os.rename(os.path.join(root, "part.tmp"), os.path.join(root, "part"))
    >>> folder.renamed(os.path.join(root, "part.tmp"), os.path.join(root, "part"))
    >>> folder.parts() == folder_parts(root)
    True
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(root)
        self._parts: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()

    def _name(self, path: str | os.PathLike[str]) -> str:
        return os.path.relpath(os.path.abspath(path), self.root).replace(os.sep, "/")

    @contextlib.contextmanager
    def create(self, path: str | os.PathLike[str]) -> Iterator[HashingFile]:
        """A new file at ``path`` (inside the folder), open for writing; its size and sha256
        are noted when it closes without an error."""
        with HashingFile(path, sync=True) as f:
            yield f
        with self._lock:
            self._parts[self._name(path)] = f.digest()

    def renamed(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        """Note that the file written at ``src`` is now at ``dst``."""
        with self._lock:
            digest = self._parts.pop(self._name(src), None)
            if digest is not None:
                self._parts[self._name(dst)] = digest

    def parts(self) -> dict[str, tuple[int, str]]:
        """Size and sha256 of each file written, by ``/``-separated path inside the folder."""
        with self._lock:
            return dict(self._parts)


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


def _address(view: memoryview) -> int:
    """Where ``view``'s bytes start in memory (read-only views too, which ctypes refuses)."""
    buffer = _PyBuffer()
    ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(view), ctypes.byref(buffer), 0)
    try:
        return buffer.buf or 0
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(buffer))


def _open_direct(path: str) -> int | None:
    """A descriptor for a new file written around the page cache, or None where the platform
    or the filesystem (tmpfs, many network mounts) offers no direct I/O."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o666)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
