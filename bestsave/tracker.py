"""Trackers: experiment trackers told about kept checkpoints, after the files are committed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from bestsave.messages import warn
from bestsave.record import Record


@runtime_checkable
class Tracker(Protocol):
    """Anything with these three methods can follow a saver (``trackers=[obj]``).

    They are called after the files are committed: with background writes, ``on_save`` and
    ``on_evict`` run in the saver's writer thread, ``on_end`` in the thread that calls
    ``close()``. A tracker that needs thread-local state (MLflow's active run) binds it when
    the saver is built.
    """

    def on_save(self, record: Record, path: str) -> None:
        """A checkpoint was kept; ``path`` is its file."""

    def on_evict(self, record: Record) -> None:
        """A kept checkpoint was deleted."""

    def on_end(self, best: Record | None) -> None:
        """Training ended; ``best`` is the best checkpoint's record."""


def notify_committed(trackers: Iterable[Any], written: list[Record], evicted: list[Record]) -> None:
    """Tell ``trackers`` of the files a commit kept and deleted (the rolling ``last`` is none of
    their business)."""
    for r in evicted:
        notify(trackers, "on_evict", r)
    for r in written:
        if r.kind != "last":
            notify(trackers, "on_save", r, r.path)


def notify(trackers: Iterable[Any], method: str, *args: Any) -> None:
    """Call ``method`` on every tracker; a tracker's failure is a warning, never a lost file."""
    for tracker in trackers:
        try:
            getattr(tracker, method)(*args)
        except Exception as e:
            warn(
                f"tracker {type(tracker).__name__}.{method} failed ({type(e).__name__}: {e}); "
                "the checkpoint on disk is unaffected"
            )
