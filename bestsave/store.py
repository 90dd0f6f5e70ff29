"""Where files live: a local directory, or any fsspec URL (``s3://bucket/run``, ``memory://x``).

A store knows nothing of checkpoints; it offers the few operations the saver's commit protocol
needs, each atomic where the medium allows: a new file is written under a temporary name with the
reserved prefix, made durable, and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
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


Parts = dict[str, tuple[int, str]]
"""Size and sha256 of each file of a checkpoint that is a folder, by path inside it."""


def folder_parts(path: str | os.PathLike[str]) -> Parts:
    """Size and sha256 of every file below a local folder, by ``/``-separated path in it."""
    parts: Parts = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            parts[os.path.relpath(full, path).replace(os.sep, "/")] = file_digest(full)
    return parts


def tree_digest(parts: Parts) -> tuple[int, str]:
    """Size and sha256 of a folder checkpoint: its total size, and the sha256 of the list of
    its parts (path, size and sha256 of each, sorted), so that one value names its content.

    >>> tree_digest({"b": (1, "x"), "a": (2, "y")}) == tree_digest({"a": (2, "y"), "b": (1, "x")})
    True
    """
    listing = "".join(f"{name}\t{size}\t{sha}\n" for name, (size, sha) in sorted(parts.items()))
    return sum(size for size, _ in parts.values()), hashlib.sha256(listing.encode()).hexdigest()


def path_digest(path: str | os.PathLike[str]) -> tuple[tuple[int, str], Parts]:
    """Size and sha256 of a local file or folder, and a folder's parts (empty for a file)."""
    if os.path.isdir(path):
        parts = folder_parts(path)
        return tree_digest(parts), parts
    return file_digest(path), {}


def tmp_name(name: str) -> str:
    """A fresh temporary name for ``name``: reserved prefix, so a crash leaves only those."""
    return f"{TMP_PREFIX}{secrets.token_hex(4)}-{name}"


class Store(Protocol):
    """The operations the saver needs from a directory. Names are relative to it and may name
    a file in a folder below it (``.bestsave/run/bestsave.json``); folders are made as needed."""

    url: str
    is_local: bool

    def scratch(self, name: str) -> str:
        """A local path where a writer may write the file (or folder) that will become
        ``name``."""

    def shared(self, name: str) -> str:
        """Where every process of a run, on any host, may write parts of the folder that will
        become ``name`` (a sharded checkpoint): a path, or a URL for remote stores."""

    def publish(self, local: str, name: str) -> None:
        """Make the file or folder written at ``local`` (from :meth:`scratch` or :meth:`shared`)
        durable as ``name``."""

    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst``, replacing what is there (a folder too)."""

    def link(self, src: str, dst: str) -> None:
        """``dst`` holds the bytes of ``src``: hard links where possible, else a copy."""

    def delete(self, name: str) -> None:
        """Remove the file or folder ``name``; a missing one is not an error."""

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
        """Size and sha256 of a stored file (:func:`tree_digest` for a folder)."""

    def local_file(self, name: str) -> str:
        """A local path holding the file's (or folder's) bytes, for loading."""

    def sync(self, folder: str = "") -> None:
        """Make renames and deletions in the directory (or a folder below it) durable."""


def files_below(store: Store, folder: str) -> list[str]:
    """The paths of the files below ``folder`` in ``store``, relative to it."""
    found = list(store.names(folder))
    for sub in store.folders(folder):
        found += [f"{sub}/{p}" for p in files_below(store, f"{folder}/{sub}")]
    return found


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


def remove_local(path: str) -> None:
    """Remove a local file or folder; a missing one is not an error."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # filesystems without hard links get a copy
        shutil.copyfile(src, dst)
        fsync_file(dst)


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

    shared = scratch

    def publish(self, local: str, name: str) -> None:
        if os.path.abspath(local) != self._path(name):
            self._ensure_dir(name)
            os.replace(local, self._path(name))
        if not os.path.isdir(self._path(name)):
            fsync_file(self._path(name))
            return
        for folder, _, names in os.walk(self._path(name)):
            for part in names:
                fsync_file(os.path.join(folder, part))
            _fsync_dir(folder)

    def rename(self, src: str, dst: str) -> None:
        target = self._path(dst)
        if os.path.isdir(target) and not os.path.islink(target):
            # A folder is not replaced by a rename: the old one is moved aside first, beside
            # ``src`` (a temporary name in the run's folder), where a crash's leftovers are
            # cleaned; never into the checkpoint directory itself.
            aside = os.path.join(
                os.path.dirname(self._path(src)), tmp_name(os.path.basename(target))
            )
            os.replace(target, aside)
            os.replace(self._path(src), target)
            shutil.rmtree(aside, ignore_errors=True)
            return
        os.replace(self._path(src), target)

    def link(self, src: str, dst: str) -> None:
        target = self._path(dst)
        self.delete(dst)
        if os.path.isdir(self._path(src)):
            shutil.copytree(self._path(src), target, copy_function=_link_or_copy)
            return
        _link_or_copy(self._path(src), target)

    def delete(self, name: str) -> None:
        remove_local(self._path(name))

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
        return path_digest(self._path(name))[0]

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

    def shared(self, name: str) -> str:
        return f"{self.url}/{name}"

    def publish(self, local: str, name: str) -> None:
        if local == self.shared(name):  # written in place by every process
            return
        try:
            if os.path.isdir(local):
                self.fs.put(local.rstrip("/") + "/", self._path(name), recursive=True)
            else:
                self.fs.put_file(local, self._path(name))
        finally:
            remove_local(local)

    def _isdir(self, name: str) -> bool:
        return bool(self.fs.isdir(self._fresh(name)))

    def rename(self, src: str, dst: str) -> None:
        if self._isdir(src):
            self.link(src, dst)
            self.delete(src)
            return
        self.fs.mv(self._path(src), self._path(dst))

    def link(self, src: str, dst: str) -> None:
        if self._isdir(src):
            # A folder is a set of keys: each is copied (server-side), as fsspec's recursive
            # copy and move treat folder names differently from one store to another.
            self.delete(dst)
            for part in files_below(self, src):
                self.fs.copy(self._path(f"{src}/{part}"), self._path(f"{dst}/{part}"))
            return
        self.fs.copy(self._path(src), self._path(dst))

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self._isdir(name):
                self.fs.rm(self._path(name), recursive=True)
            else:
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
        return path_digest(self.local_file(name))[0]

    def local_file(self, name: str) -> str:
        local = os.path.join(self._scratch_dir, "cache-" + name.replace("/", "-"))
        if self._isdir(name):
            shutil.rmtree(local, ignore_errors=True)
            self.fs.get(self._path(name).rstrip("/") + "/", local, recursive=True)
            return local
        self.fs.get_file(self._fresh(name), local)
        return local

    def sync(self, folder: str = "") -> None:
        """Object stores are durable once a write returns."""
