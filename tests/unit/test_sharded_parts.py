"""The parts of a sharded checkpoint are hashed as each process writes them, not read back.

One process here (a group of one); ``tests/reliability/test_sharded.py`` runs two with FSDP2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from bestsave.hashing import HashedFolder
from bestsave.sharded import Sharded, ShardWriteError, ShardWriter
from bestsave.store import LocalStore, folder_parts, tree_digest


class Alone:
    rank, size = 0, 1

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]


class CountingStore(LocalStore):
    """Counts the files read back to be hashed."""

    read_back: list[str]

    def digest(self, name: str) -> tuple[int, str]:
        self.read_back.append(name)
        return super().digest(name)


def write_parts(where: str, hashed: tuple[str, ...], plain: tuple[str, ...] = ()) -> Any:
    """Write ``hashed`` through a HashedFolder (as the torch adapter does) and ``plain`` as
    ordinary files; returns what the folder hashed."""
    folder = HashedFolder(where)
    os.makedirs(where, exist_ok=True)
    for name in hashed:
        os.makedirs(os.path.dirname(os.path.join(where, name)), exist_ok=True)
        with folder.create(os.path.join(where, name + ".tmp")) as f:
            f.write(name.encode() * 5000)
        os.rename(os.path.join(where, name + ".tmp"), os.path.join(where, name))
        folder.renamed(os.path.join(where, name + ".tmp"), os.path.join(where, name))
    for name in plain:
        Path(where, name).write_bytes(name.encode() * 7)
    return folder.parts()


def written(store: CountingStore, write: Any) -> tuple[str, Any]:
    writer = ShardWriter(store, Alone(), writing=True)
    content = writer.capture(Sharded(lambda: None, write, Alone()), ".bestsave-tmp-x-ckpt")
    where = content.materialize("")
    writer.flush(stop=True)
    return where, content


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    store = CountingStore(str(tmp_path))
    store.read_back = []
    return store


def test_parts_hashed_as_written_are_not_read_back(store: CountingStore) -> None:
    where, content = written(store, lambda _, where: write_parts(where, ("a", "b/c", ".metadata")))
    assert store.read_back == []
    assert content.parts == folder_parts(where)
    assert content.digest == tree_digest(folder_parts(where))


def test_files_no_process_hashed_are_hashed_at_commit(store: CountingStore) -> None:
    where, content = written(store, lambda _, where: write_parts(where, ("a",), ("extra",)))
    assert content.parts == folder_parts(where)
    assert store.read_back == [".bestsave-tmp-x-ckpt/extra"]


def test_a_write_that_hashes_nothing_has_its_files_read_back(store: CountingStore) -> None:
    where, content = written(store, lambda _, where: write_parts(where, (), ("x", "y")) and None)
    assert content.parts == folder_parts(where)
    assert sorted(store.read_back) == [".bestsave-tmp-x-ckpt/x", ".bestsave-tmp-x-ckpt/y"]


def test_a_part_hashed_but_gone_fails_the_commit(store: CountingStore) -> None:
    def write(_: Any, where: str) -> Any:
        parts = write_parts(where, ("a", "b"))
        os.unlink(os.path.join(where, "b"))
        return parts

    writer = ShardWriter(store, Alone(), writing=True)
    content = writer.capture(Sharded(lambda: None, write, Alone()), ".bestsave-tmp-x-ckpt")
    with pytest.raises(ShardWriteError, match="missing: b"):
        content.materialize("")
    writer.flush(stop=True)
