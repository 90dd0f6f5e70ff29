"""Where files live: a local directory, or any fsspec URL (``s3://bucket/run``, ``memory://x``).

A store knows nothing of checkpoints; it offers the few operations the saver's commit protocol
needs, each atomic where the medium allows: a new file is written under a temporary name with the
reserved prefix, made durable, and only then renamed into place.
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
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

TMP_PREFIX = ".bestsave-tmp-"


def file_digest(path: str | os.PathLike[str]) -> tuple[int, str]:
    """Size in bytes and sha256 of a local file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


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
    queued one too, and may raise to give the file up.

    >>> import tempfile, os
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
    ) -> None:
        self.name = os.fspath(path)
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

    def digest(self) -> tuple[int, str]:
        """Size in bytes and sha256 of everything written, as :func:`file_digest` gives them."""
        return self._size, self._sha.hexdigest()


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


def tmp_name(name: str) -> str:
    """A fresh temporary name for ``name``: reserved prefix, so a crash leaves only those."""
    return f"{TMP_PREFIX}{secrets.token_hex(4)}-{name}"


class Store(Protocol):
    """The operations the saver needs from a directory. Names are relative to it and may name
    a file in a folder below it (``.bestsave/run/bestsave.json``); folders are made as needed."""

    url: str
    is_local: bool

    def scratch(self, name: str) -> str:
        """A local path where a writer may write the file that will become ``name``."""

    def publish(self, local: str, name: str) -> None:
        """Make the file written at ``local`` (from :meth:`scratch`) durable as ``name``."""

    def rename(self, src: str, dst: str) -> None: ...
    def link(self, src: str, dst: str) -> None:
        """``dst`` holds the bytes of ``src``: a hard link where possible, else a copy."""

    def delete(self, name: str) -> None:
        """Remove ``name``; a missing file is not an error."""

    def exists(self, name: str) -> bool: ...
    def names(self, folder: str = "") -> list[str]:
        """The file names in the directory, or in a folder below it (an absent one has none)."""

    def folders(self, folder: str = "") -> list[str]:
        """The names of the folders in the directory, or in a folder below it."""

    def read_text(self, name: str) -> str | None:
        """The file's text, or None when it does not exist."""

    def write_text(self, name: str, text: str) -> None:
        """Replace ``name`` atomically with ``text``."""

    def create_exclusive(self, name: str, text: str) -> bool:
        """Create ``name`` holding ``text`` unless it exists; False when it did."""

    def append_text(self, name: str, text: str) -> int:
        """Append ``text`` durably; returns the file's new size in bytes."""

    def truncate(self, name: str, size: int) -> None: ...
    def digest(self, name: str) -> tuple[int, str]:
        """Size and sha256 of a stored file."""

    def local_file(self, name: str) -> str:
        """A local path holding the file's bytes, for loading."""

    def sync(self, folder: str = "") -> None:
        """Make renames and deletions in the directory (or a folder below it) durable."""


def open_store(url: str | os.PathLike[str], **storage_options: Any) -> Store:
    """The store for a local path, a ``file://`` URL or any fsspec URL."""
    text = os.fspath(url)
    if "://" not in text:
        return LocalStore(text)
    if text.startswith("file://"):
        return LocalStore(text[len("file://") :])
    return FsspecStore(text, **storage_options)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


class LocalStore:
    """A directory on a local (or locally mounted) filesystem."""

    is_local = True

    def __init__(self, path: str) -> None:
        self.url = os.path.abspath(os.path.expanduser(path))
        self._made: set[str] = set()

    def _path(self, name: str) -> str:
        return os.path.join(self.url, name)

    def _ensure_dir(self, name: str) -> None:
        """Make the folder that will hold ``name``."""
        folder = os.path.dirname(self._path(name))
        if folder not in self._made:
            try:
                os.makedirs(folder, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                blocker = folder
                while blocker and not os.path.isfile(blocker):
                    blocker = os.path.dirname(blocker)
                raise NotADirectoryError(
                    f"{blocker or folder} is a file, so it cannot hold checkpoints; pass a "
                    "directory path (a new one is created) or move the file away"
                ) from None
            self._made.add(folder)

    def scratch(self, name: str) -> str:
        self._ensure_dir(name)
        return self._path(name)

    def publish(self, local: str, name: str) -> None:
        if os.path.abspath(local) != self._path(name):
            self._ensure_dir(name)
            os.replace(local, self._path(name))
        fsync_file(self._path(name))

    def rename(self, src: str, dst: str) -> None:
        os.replace(self._path(src), self._path(dst))

    def link(self, src: str, dst: str) -> None:
        target = self._path(dst)
        if os.path.lexists(target):
            os.unlink(target)
        try:
            os.link(self._path(src), target)
        except OSError:  # filesystems without hard links get a copy
            shutil.copyfile(self._path(src), target)
            fsync_file(target)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(name))

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def _entries(self, folder: str) -> list[os.DirEntry[str]]:
        try:
            return list(os.scandir(self._path(folder)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def names(self, folder: str = "") -> list[str]:
        return sorted(e.name for e in self._entries(folder) if not e.is_dir())

    def folders(self, folder: str = "") -> list[str]:
        return sorted(e.name for e in self._entries(folder) if e.is_dir())

    def read_text(self, name: str) -> str | None:
        try:
            return Path(self._path(name)).read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_text(self, name: str, text: str) -> None:
        self._ensure_dir(name)
        target = self._path(name)
        folder, base = os.path.split(target)
        tmp = os.path.join(folder, tmp_name(base))
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(folder)

    def create_exclusive(self, name: str, text: str) -> bool:
        self._ensure_dir(name)
        try:
            fd = os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return True

    def append_text(self, name: str, text: str) -> int:
        self._ensure_dir(name)
        with open(self._path(name), "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            return f.tell()

    def truncate(self, name: str, size: int) -> None:
        if os.path.exists(self._path(name)) and os.path.getsize(self._path(name)) > size:
            os.truncate(self._path(name), size)

    def digest(self, name: str) -> tuple[int, str]:
        return file_digest(self._path(name))

    def local_file(self, name: str) -> str:
        return self._path(name)

    def sync(self, folder: str = "") -> None:
        _fsync_dir(self._path(folder))


class FsspecStore:
    """A directory behind any fsspec filesystem (S3 through s3fs, ``memory://`` in tests).

    Object stores have no rename or append: a rename is a copy then a delete, an append rewrites
    the file. Each object appears whole or not at all, so a reader never sees half a file.
    """

    is_local = False

    def __init__(self, url: str, **storage_options: Any) -> None:
        import fsspec  # only remote users need it

        self.url = url.rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.url, **storage_options)
        self._scratch_dir = tempfile.mkdtemp(prefix="bestsave-")

    def _path(self, name: str) -> str:
        return f"{self._root}/{name}"

    def scratch(self, name: str) -> str:
        return os.path.join(self._scratch_dir, tmp_name(name.rsplit("/", 1)[-1]))

    def publish(self, local: str, name: str) -> None:
        try:
            self.fs.put_file(local, self._path(name))
        finally:
            os.unlink(local)

    def rename(self, src: str, dst: str) -> None:
        self.fs.mv(self._path(src), self._path(dst))

    def link(self, src: str, dst: str) -> None:
        self.fs.copy(self._path(src), self._path(dst))

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(name))

    def _fresh(self, name: str) -> str:
        # Another process may have rewritten the file since this one listed the directory:
        # fsspec's listing cache would answer from the old listing.
        path = self._path(name)
        self.fs.invalidate_cache(path)
        return path

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self._fresh(name)))

    def _entries(self, folder: str, kind: str) -> list[str]:
        root = self._path(folder).rstrip("/")
        self.fs.invalidate_cache(root)
        try:
            entries = self.fs.ls(root, detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == kind
        )

    def names(self, folder: str = "") -> list[str]:
        return self._entries(folder, "file")

    def folders(self, folder: str = "") -> list[str]:
        return self._entries(folder, "directory")

    def read_text(self, name: str) -> str | None:
        try:
            with self.fs.open(self._fresh(name), "rb") as f:
                return f.read().decode("utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        self.fs.pipe_file(self._path(name), text.encode("utf-8"))

    def create_exclusive(self, name: str, text: str) -> bool:
        # Object stores offer no exclusive create here: check, then write (best effort).
        if self.exists(name):
            return False
        self.write_text(name, text)
        return True

    def append_text(self, name: str, text: str) -> int:
        data = (self.read_text(name) or "") + text
        self.write_text(name, data)
        return len(data.encode("utf-8"))

    def truncate(self, name: str, size: int) -> None:
        text = self.read_text(name)
        if text is not None and len(text.encode("utf-8")) > size:
            self.write_text(name, text.encode("utf-8")[:size].decode("utf-8", "ignore"))

    def digest(self, name: str) -> tuple[int, str]:
        return file_digest(self.local_file(name))

    def local_file(self, name: str) -> str:
        local = os.path.join(self._scratch_dir, "cache-" + name.replace("/", "-"))
        self.fs.get_file(self._fresh(name), local)
        return local

    def sync(self, folder: str = "") -> None:
        """Object stores are durable once a write returns."""
