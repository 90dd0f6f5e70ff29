"""The background writer: one job in flight, at most one pending, errors kept for the caller."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

from bestsave.jobs import Abandoned, Job


class BackgroundWriter:
    """Runs jobs in order on one daemon thread.

    A job submitted while another is pending is merged into it (:meth:`Job.absorb`), so a newer
    best replaces an older one that has not started. The first error a job raises is kept for
    :meth:`take_error` to hand to the training thread; the jobs after it are dropped (training
    is about to stop) unless ``keep_going``, when they run as usual. :meth:`flush` abandons a
    write in flight whose files the pending job would delete as soon as they land.
    """

    def __init__(
        self,
        run: Callable[[Job], object],
        keep_going: bool = False,
        name: str = "bestsave-writer",
    ) -> None:
        self._run = run
        self._keep_going = keep_going
        self._cond = threading.Condition()
        self._pending: Job | None = None
        self._current: Job | None = None
        self._busy = False
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _stopped(self) -> bool:
        return self._error is not None and not self._keep_going

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopped():  # the caller has not seen the error yet: nothing more is written
                job.release()
                return
            self._pending = job if self._pending is None else self._pending.absorb(job)
            self._cond.notify_all()

    def take_pending(self) -> Job | None:
        """Take back the pending job, if any, before the worker starts it: the caller merges a
        newer job into it and submits the result."""
        with self._cond:
            job, self._pending = self._pending, None
            return job

    def pending_files(self) -> set[str]:
        """Names of the files the pending job would write."""
        with self._cond:
            return {f.record.name for f in self._pending.files} if self._pending else set()

    def wait_for_room(self) -> None:
        """Block until no job is pending (the one in flight may still run)."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending is None or self._stopped())

    def flush(self) -> None:
        """Block until every submitted job has run."""
        with self._cond:
            current, pending = self._current, self._pending
            if (
                current is not None
                and pending is not None
                and {f.record.name for f in current.files} <= pending.superseded()
            ):
                # Training has stopped for this wait: writing a file only to delete it at once
                # would make it longer. (During training the write goes on: it is the best on
                # disk until the newer one lands.)
                current.abandon()
            self._cond.wait_for(
                lambda: (self._pending is None and not self._busy) or self._stopped()
            )
            self._cond.wait_for(lambda: not self._busy)

    def stop(self) -> None:
        """Run what is submitted, then end the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def take_error(self) -> BaseException | None:
        with self._cond:
            error, self._error = self._error, None
            return error

    def _loop(self) -> None:
        yield_to_training()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                job, self._pending = self._pending, None
                self._current, self._busy = job, True
                self._cond.notify_all()
            try:
                self._run(job)  # type: ignore[arg-type]
            except Abandoned:
                with self._cond:
                    assert self._pending is not None  # only flush() abandons, and only then
                    self._pending = job.absorb(self._pending)
            except BaseException as e:
                with self._cond:
                    self._error = self._error or e
                    if self._pending is not None and not self._keep_going:
                        self._pending.release()
                        self._pending = None
            finally:
                with self._cond:
                    self._current, self._busy = None, False
                    self._cond.notify_all()


def yield_to_training() -> None:
    """Run the calling thread (and the helpers it starts) only on cores training leaves idle.

    Training comes first: the writer's serialising and hashing must not slow the steps it runs
    beside, and back-pressure bounds how far it lags. Linux's idle scheduling class does that: a
    core that runs only such threads counts as free when a training thread wakes. Elsewhere the
    lowest priority is the nearest.
    """
    me = threading.get_native_id()
    try:
        os.sched_setscheduler(me, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, me, 19)
