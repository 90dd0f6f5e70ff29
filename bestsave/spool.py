"""A bounded spool between a serialiser on the training thread and the file it writes.

For a state too large to copy into host memory (the ``chunked`` step of
:mod:`bestsave.memory`): the serialiser writes into :class:`Spool`, whose ``write`` returns
once the bytes are copied into at most ``capacity`` bytes of memory, and a helper thread writes
them to the file behind it. Training therefore waits for the write of all but the last
``capacity`` bytes, and the rest is written while it goes on.
"""

from __future__ import annotations

import io
import threading
from collections import deque
from functools import partial
from typing import Any

from bestsave.memory import CHUNK


class Spool(io.RawIOBase):
    """Writes to ``file`` through at most ``capacity`` bytes of memory (plus one chunk).

    >>> raw = io.BytesIO()
    >>> spool = Spool(raw, capacity=4)
    >>> _ = spool.write(b"abcdefgh")
    >>> spool.finish()
    >>> raw.getvalue()
    b'abcdefgh'
    """

    def __init__(self, file: Any, capacity: int) -> None:
        super().__init__()
        self._file = file
        self._capacity = max(capacity, 1)
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._size = 0
        self._done = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        # Training waits on this thread while the spool is full: it runs at normal priority.
        self._thread = threading.Thread(target=self._drain, name="bestsave-spool", daemon=True)
        self._thread.start()

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        """Bytes written so far (the file is written front to back, never sought)."""
        return self._size

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK):
            piece = bytes(view[start : start + CHUNK])
            with self._cond:
                self._cond.wait_for(partial(self._has_room, len(piece)))
                self._raise()
                self._queue.append(piece)
                self._queued += len(piece)
                self._cond.notify_all()
        self._size += len(view)
        return len(view)

    def _has_room(self, size: int) -> bool:
        return self._queued + size <= self._capacity or not self._queued or self._error is not None

    def finish(self) -> None:
        """Wait until every byte is in the file; raises what writing it raised."""
        with self._cond:
            self._done = True
            self._cond.notify_all()
        self._thread.join()
        self._raise()

    @property
    def error(self) -> BaseException | None:
        """What writing the file raised, once it did."""
        return self._error

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._done)
                if not self._queue:
                    return
                piece = self._queue[0]
            try:
                self._file.write(piece)
            except BaseException as e:
                with self._cond:
                    self._error = e
                    self._queue.clear()
                    self._queued = 0
                    self._cond.notify_all()
                return
            with self._cond:
                self._queue.popleft()
                self._queued -= len(piece)
                self._cond.notify_all()
