"""Writing a checkpoint file: the bytes on disk and the digest kept while writing agree."""

import errno
import hashlib
import os
import threading

import pytest

from bestsave import hashing
from bestsave.hashing import HashingFile
from bestsave.store import file_digest

pytestmark = pytest.mark.core

# Sizes around the edges of the aligned buffer: a tail shorter than a disk block, exactly one
# buffer, and several buffers plus a tail, written in small and large pieces.
BUFFER = hashing._AlignedBuffers.SIZE
PIECES = [
    [b"x" * 10],
    [os.urandom(BUFFER)],
    [b"head" * 100, os.urandom(2 * BUFFER + 12345), b"tail", os.urandom(HashingFile._PARALLEL)],
]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("pieces", PIECES, ids=["tiny", "one-buffer", "mixed"])
def test_the_file_holds_what_was_written_and_its_digest(tmp_path, direct, pieces):
    path = tmp_path / "x.bin"
    with HashingFile(path, direct=direct) as f:
        for piece in pieces:
            assert f.write(piece) == len(piece)
    data = b"".join(pieces)
    assert path.read_bytes() == data
    assert f.digest() == file_digest(path) == (len(data), hashlib.sha256(data).hexdigest())


def test_direct_io_is_used_where_the_filesystem_offers_it(tmp_path):
    offered = hashing._open_direct(str(tmp_path / "probe"))  # None: the platform or fs has none
    if offered is not None:
        os.close(offered)
    with HashingFile(tmp_path / "x.bin") as f:
        f.write(b"x" * 5000)
    assert f.direct == (offered is not None)
    assert (tmp_path / "x.bin").read_bytes() == b"x" * 5000


def test_a_filesystem_that_refuses_direct_writes_gets_buffered_ones(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no direct I/O on this platform")
    # Some filesystems open a file for direct I/O and then refuse the writes: injected here,
    # as no filesystem on a test machine does.
    real_write, refused = os.write, []

    def write(fd, data):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    data = os.urandom(BUFFER + 5000)
    path = tmp_path / "x.bin"
    with HashingFile(path) as f:
        f.write(data)
    assert refused == [BUFFER]
    assert path.read_bytes() == data
    assert f.digest() == file_digest(path)


def test_other_write_errors_are_raised(tmp_path, monkeypatch):
    def write(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError, match="No space"), HashingFile(tmp_path / "x.bin") as f:
        f.write(os.urandom(BUFFER))
    assert f.closed


def stable_memory(size):
    """Random bytes in memory that stays put, and its span for ``HashingFile(stable=...)``."""
    data = bytearray(os.urandom(size))
    return data, (hashing._address(memoryview(data)), len(data))


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_blocks_in_stable_memory_are_written_in_order_with_the_rest(tmp_path, direct):
    data, span = stable_memory(3 * BUFFER + 777)
    view = memoryview(data)
    large = HashingFile._PARALLEL
    # Small pieces between queued blocks, a large piece outside the stable memory after them.
    pieces = [b"head", view[:large], b"mid" * 10, view[large : 3 * large + 5], os.urandom(large)]
    pieces += [b"x", view[3 * large + 5 :], b"tail"]
    path = tmp_path / "x.bin"
    with HashingFile(path, direct=direct, stable=[span]) as f:
        for piece in pieces:
            assert f.write(piece) == len(piece)
    expected = b"".join(bytes(p) for p in pieces)
    assert path.read_bytes() == expected
    assert f.digest() == (len(expected), hashlib.sha256(expected).hexdigest())


def test_a_block_in_stable_memory_is_written_after_write_returns(tmp_path, monkeypatch):
    data, span = stable_memory(2 * HashingFile._PARALLEL)
    returned = threading.Event()
    put = HashingFile._put

    def put_after_return(self, view):
        assert returned.wait(10), "write() waited for the block to be written"
        put(self, view)

    monkeypatch.setattr(HashingFile, "_put", put_after_return)
    with HashingFile(tmp_path / "x.bin", stable=[span]) as f:
        f.write(memoryview(data))
        returned.set()
    assert (tmp_path / "x.bin").read_bytes() == data


def test_a_failed_write_of_a_queued_block_is_raised(tmp_path, monkeypatch):
    data, span = stable_memory(3 * BUFFER)

    def put(self, view):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(HashingFile, "_put", put)
    with (
        pytest.raises(OSError, match="No space"),
        HashingFile(tmp_path / "x.bin", stable=[span]) as f,
    ):
        for i in range(3):
            f.write(memoryview(data)[i * BUFFER : (i + 1) * BUFFER])
    assert f.closed


def test_memory_outside_the_stable_spans_is_not_queued(tmp_path):
    data, (start, size) = stable_memory(2 * HashingFile._PARALLEL)
    with HashingFile(tmp_path / "x.bin", stable=[(start, size - 1)]) as f:
        f.write(memoryview(data))  # reaches one byte past the span
        assert not f._queued
        f.write(memoryview(data)[: size - 1])
        assert f._queued


def test_a_file_given_up_leaves_its_queued_blocks_unwritten(tmp_path, monkeypatch, caplog):
    data, span = stable_memory(3 * HashingFile._PARALLEL)
    discarded, puts = threading.Event(), []
    put, discard = HashingFile._put, HashingFile.discard

    def slow_put(self, view):
        puts.append(len(view))
        assert discarded.wait(10)  # the first block is still being written when it is given up
        put(self, view)

    def spy(self):
        discard(self)
        discarded.set()

    monkeypatch.setattr(HashingFile, "_put", slow_put)
    monkeypatch.setattr(HashingFile, "discard", spy)
    with pytest.raises(KeyboardInterrupt), HashingFile(tmp_path / "x.bin", stable=[span]) as f:
        for i in range(3):
            f.write(memoryview(data)[i * HashingFile._PARALLEL : (i + 1) * HashingFile._PARALLEL])
        raise KeyboardInterrupt
    assert f.closed and puts == [HashingFile._PARALLEL]
    assert not caplog.records  # cancelling the queued blocks is no error


def test_an_interrupt_stops_a_file_whose_blocks_are_all_queued(tmp_path, monkeypatch):
    data, span = stable_memory(3 * HashingFile._PARALLEL)
    stop, puts = threading.Event(), []
    put = HashingFile._put

    def slow_put(self, view):
        puts.append(len(view))
        assert stop.wait(10)  # the first block is still being written when the file is given up
        put(self, view)

    def interrupt():
        if stop.is_set():
            raise InterruptedError("given up")

    monkeypatch.setattr(HashingFile, "_put", slow_put)
    with (
        pytest.raises(InterruptedError),
        HashingFile(tmp_path / "x.bin", stable=[span], interrupt=interrupt) as f,
    ):
        for i in range(3):
            f.write(memoryview(data)[i * HashingFile._PARALLEL : (i + 1) * HashingFile._PARALLEL])
        stop.set()  # every block is handed over: close() alone is left
    assert f.closed and puts == [HashingFile._PARALLEL]
