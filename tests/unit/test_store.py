"""Writing a checkpoint file: the bytes on disk and the digest kept while writing agree."""

import errno
import hashlib
import os

import pytest

from bestsave import store
from bestsave.store import HashingFile, file_digest

pytestmark = pytest.mark.core

# Sizes around the edges of the aligned buffer: a tail shorter than a disk block, exactly one
# buffer, and several buffers plus a tail, written in small and large pieces.
BUFFER = store._AlignedBuffers.SIZE
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
    offered = store._open_direct(str(tmp_path / "probe"))  # None: the platform or fs has none
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
