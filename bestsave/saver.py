"""BestSaver: the one object every adapter drives, once per evaluation.

It is a front over parts with one job each: :mod:`bestsave.rundir` takes the run's place on
disk (lock, resume, recovery), :mod:`bestsave.plan` decides what an evaluation keeps and evicts,
:mod:`bestsave.pipeline` captures and commits it. ``step()`` plans, then carries the plan out.
"""

from __future__ import annotations

import atexit
import functools
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from bestsave import runinfo
from bestsave.commit import Committer
from bestsave.guards import ScoreWatch
from bestsave.jobs import Job
from bestsave.layout import RunFiles, run_name
from bestsave.messages import warn
from bestsave.metrics import clean_metrics
from bestsave.monitor import Monitor
from bestsave.naming import sanitize
from bestsave.options import SaverOptions
from bestsave.pipeline import AnyWriter, WritePipeline
from bestsave.plan import Evaluation, Naming, Plan, exception_file, last_file, plan
from bestsave.record import Record
from bestsave.rundir import RunDirectory
from bestsave.sharded import Sharded
from bestsave.state import RunHeader, RunState
from bestsave.store import open_store
from bestsave.tracker import notify, notify_committed
from bestsave.trackers import resolve_trackers

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from bestsave.options import CoreOptions


_LIVE: weakref.WeakSet[BestSaver] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    # A script that ends without close() still gets its pending writes.
    for saver in list(_LIVE):
        saver._pipeline.keep_error(saver._pipeline.flush())
        saver._dir.release()


@dataclass(frozen=True)
class Decision:
    """What one evaluation led to."""

    is_best: bool
    """This evaluation is the new best."""
    saved: bool
    """A file was kept this time (best, top-k, ensemble or periodic)."""
    record: Record | None
    """The record of what was kept, or None."""
    evicted: tuple[Record, ...] = ()
    """Records deleted because this one pushed them out."""
    should_stop: bool = False
    score: float | None = None
    """The monitored value as a float, or None when it was invalid."""
    records: tuple[Record, ...] = field(default=())
    """Every file kept this time (a best that is also periodic gives two)."""
    best_for: tuple[str, ...] = ()
    """The monitors for which this evaluation is a new best."""


def _now() -> tuple[float, str]:
    t = time.time()
    return t, datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def _evaluated(
    run: Mapping[str, Any], monitor: Monitor, epoch: int, step: int | None,
    metrics: Mapping[str, Any] | None, id: int,
) -> Record:  # fmt: skip
    """A record of evaluation ``id`` of ``run``, before any file is kept for it."""
    ts, now = _now()
    return Record(
        path="",
        kind="",
        epoch=int(epoch),
        step=step,
        monitor=monitor.name,
        mode=monitor.mode,
        score=None,
        metrics=clean_metrics(metrics or {}),
        time=now,
        elapsed_s=round(ts - float(run.get("started_ts", ts)), 3),
        run={k: v for k, v in run.items() if k != "started_ts"},
        id=id,
    )


def _decision(
    the_plan: Plan, first: str, should_stop: bool, filled: Callable[[Record], Record]
) -> Decision:
    """What ``the_plan`` led to, as :meth:`BestSaver.step` reports it."""
    verdict = the_plan.verdicts[first]
    ranked = next((r for r in the_plan.new if r.ranked), None)
    return Decision(
        is_best=verdict.is_best,
        saved=bool(the_plan.new),
        record=filled(ranked or the_plan.new[0]) if the_plan.new else None,
        evicted=the_plan.evicted,
        should_stop=should_stop,
        score=verdict.score,
        records=tuple(filled(r) for r in the_plan.new),
        best_for=tuple(the_plan.best_for),
    )


class BestSaver:
    """Decides, at each evaluation, whether to keep a checkpoint, and keeps it safely.

    Args:
        dirpath: Directory for checkpoints: a local path or an fsspec URL (``s3://bucket/run``).
        monitor: The metric that decides, e.g. ``"val_auroc"``; or several.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (from the metric's name).
        **options: The rest of bestsave's options, each described on
            :class:`bestsave.SaverOptions`: ``top_k``, ``delta``, ``patience``, ``save_last``,
            ``filename``, ``resume``, ``overwrite``, ``smooth``, ``tie_break``, ``trackers``...
        extension: Appended to every file name (adapters pass their format's, e.g. ``".ckpt"``).
        writer: False on processes that must not write (distributed ranks other than 0): they
            reach the same decisions and touch no file.
        framework: Recorded in the run info, e.g. ``"lightning"``.
        hparams: Hyperparameters recorded in the run info.

    Example:
        >>> import tempfile
        >>> saver = BestSaver(tempfile.mkdtemp(), monitor="val_auroc", top_k=2)
        >>> for epoch, auroc in enumerate([0.71, 0.83, 0.79, 0.80]):
        ...     d = saver.step(epoch, {"val_auroc": auroc, "train_loss": 1 / (epoch + 1)},
        ...                    write=lambda path: open(path, "w").write("weights"))
        >>> saver.close()
        >>> [r.epoch for r in saver.kept], saver.best.metrics["train_loss"]
        ([1, 3], 0.5)
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        monitor: str | Sequence[str],
        mode: str | Sequence[str] = "auto",
        *,
        extension: str = "",
        writer: bool = True,
        framework: str | None = None,
        hparams: Mapping[str, Any] | None = None,
        **options: Unpack[CoreOptions],
    ) -> None:
        self.options = opts = SaverOptions.of(monitor=monitor, mode=mode, **options)
        if extension == ".json":
            raise ValueError("extension '.json' is reserved for the sidecar records")
        self.monitors = opts.monitors()
        self.policies = {m.name: opts.policy(m) for m in self.monitors}
        self.monitor = self.monitors[0]
        """The first monitor: the one :attr:`best` follows."""
        self.policy = self.policies[self.monitor.name]
        self.extension, self.writer = extension, writer
        self.trackers = resolve_trackers(opts.trackers) if writer else []
        store = open_store(dirpath, **dict(opts.storage_options or {}))
        self.dirpath = store.url
        name = sanitize(opts.name) if opts.name else run_name(opts.filename, self.monitor.name)
        self.files = RunFiles(name, extension)
        """Where the run's own files are: ``dirpath/.bestsave/<name>/``."""
        self._naming = Naming(self.dirpath, opts.filename, opts.last_name, extension,
                              bool(opts.save_last))  # fmt: skip
        started_ts, started = _now()
        self._run = runinfo.collect(framework, dict(hparams or {}), started)
        self._run["started_ts"] = started_ts  # in the manifest: a resumed run counts from it
        self._state = RunState.new(list(self.policies))
        self._watch = ScoreWatch(self.policies, self._warn_once)
        self._ended_best: str | None = ""
        self._dir = RunDirectory(store, self.files, self._run["id"])
        self._dir.before_takeover = lambda: self._pipeline.keep_error(self._pipeline.flush())
        self._dir.claimed = lambda: {r.name for r in (*self._state.kept, self._state.last) if r}
        self._committer, self._pipeline = self._open(store)
        _LIVE.add(self)

    def _open(self, store: Any) -> tuple[Committer, WritePipeline]:
        """Take the run's place, then build what commits its evaluations."""
        opts = self.options
        monitors: dict[str, str] = {m.name: m.mode for m in self.monitors}
        keeps = any(p.cap > 0 or p.keep_every_n_epochs for p in self.policies.values())
        opened = self._dir.take(monitors, opts.resume, opts.overwrite, keeps, self.writer)
        if opened.manifest is not None:
            self._state = RunState.of(opened.manifest, list(self.policies), self.dirpath)
            run = opened.manifest.run
            self._run = {**run, "resumes": int(run.get("resumes", 0)) + 1}
        self._taken = self._names_taken()
        header = RunHeader(self._run, monitors, opts.described(self.extension))
        committer = Committer(
            store, self.files, header, opened.history_bytes, self._state, self.policies,
            keep_evaluations=opts.on_write_error == "warn", replacing=opened.replacing,
            replace_at=opened.replace_at,
        )  # fmt: skip
        told = functools.partial(notify_committed, self.trackers)
        pipeline = WritePipeline(
            store, self.files, committer, background=opts.async_write,
            keep_going=opts.on_write_error == "warn", committed=told, writing=self.writer,
        )  # fmt: skip
        return committer, pipeline

    def _names_taken(self) -> set[str]:
        """Names a new file must not take: the run's own, and with ``version_names`` the
        directory's other files (without it, a file of the same name is replaced)."""
        kept = {r.name for r in self._state.kept}
        return kept | self._dir.foreign() if self.options.version_names else kept

    # -- public state ---------------------------------------------------------------------

    @property
    def best(self) -> Record | None:
        """Record of the best checkpoint (by the first monitor), or None."""
        return self.best_for(self.monitor.name)

    def best_for(self, monitor: str) -> Record | None:
        """Record of the best checkpoint by ``monitor`` (one of the saver's monitors)."""
        if monitor not in self.policies:
            raise KeyError(f"{monitor!r} is not monitored; monitors: {list(self.policies)}")
        best = self.policies[monitor].best(self._state.policies[monitor], self._state.kept)
        return self._committer.filled(best) if best else None

    def held_state(self, record: Record) -> Any | None:
        """The state ``record``'s file was written from, while host memory still holds it;
        else None.

        A :class:`Staged` save copies the state into buffers that a later save reuses, so the
        latest save's state stays in memory after its file is written: loading it from there
        (at the end of training, say) skips reading the file back and checking its sha256.
        The buffers belong to the saver: copy from them (``load_state_dict`` does), do not keep
        them.

        >>> import tempfile, torch
        >>> from bestsave import BestSaver, Staged
        >>> from bestsave.staging import Stager
        >>> stager, model = Stager(), torch.nn.Linear(2, 1)
        >>> write = Staged(lambda: stager.snapshot(model.state_dict()),
        ...                lambda snap, path: torch.save(snap.state, path))
        >>> saver = BestSaver(tempfile.mkdtemp(), monitor="val_loss")
        >>> _ = saver.step(0, {"val_loss": 0.5}, write=write)
        >>> saver.close()
        >>> torch.equal(saver.held_state(saver.best)["weight"], model.weight)
        True
        """
        return self._pipeline.held(record)

    @property
    def kept(self) -> list[Record]:
        """Records kept now, best first; periodic and exception ones after, by epoch.

        With background writes, ``bytes`` and ``sha256`` are filled in once a file is written
        (after :meth:`close` for certain).
        """
        return [self._committer.filled(r) for r in self._state.kept]

    @property
    def last(self) -> Record | None:
        """Record of the rolling ``last`` checkpoint, or None."""
        return self._committer.filled(self._state.last) if self._state.last else None

    @property
    def should_stop(self) -> bool:
        """Patience is exhausted: that many evaluations passed without improvement (of every
        monitor, when there are several)."""
        return all(p.stops(self._state.policies[n]) for n, p in self.policies.items())

    @property
    def best_score(self) -> float | None:
        """The score a new one must beat (by more than ``min_delta``)."""
        return self._state.policies[self.monitor.name].best

    @property
    def evaluations(self) -> int:
        """How many evaluations this run has seen, resumed ones included."""
        return self._state.evaluations

    @property
    def last_epoch(self) -> int | None:
        """Epoch of the latest evaluation, or None before the first."""
        return self._state.last_epoch

    @property
    def run(self) -> dict[str, Any]:
        """Run info recorded with every checkpoint."""
        return self._run

    @property
    def async_write(self) -> bool:
        return self.options.async_write

    # -- one evaluation ----------------------------------------------------------------------

    def step(
        self,
        epoch: int,
        metrics: Mapping[str, Any],
        write: AnyWriter | None = None,
        *,
        step: int | None = None,
        write_last: AnyWriter | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> Decision:
        """Judge one evaluation and keep, evict and record as the policy decides.

        Args:
            epoch: The epoch just evaluated (0-based).
            metrics: Everything logged at this evaluation; must hold the monitored metric(s).
            write: Writes the checkpoint to the local path it is given, or a :class:`Staged`
                writer whose ``capture`` runs now and ``serialize`` in the background, or a
                :class:`Sharded` one whose parts every process writes (then every process
                calls ``step``). Used only when a file is kept, at most once per evaluation.
            step: The global step, recorded with the evaluation.
            write_last: Writes the ``last`` checkpoint when it differs from ``write``'s (e.g. kept
                files hold weights only); by default ``last`` holds what ``write`` writes.
            fields: Extra values for the filename template, not recorded as metrics (an adapter
                passes Keras's 1-based ``epoch`` and ``batch``).

        Raises:
            MissingMetricError: a monitored metric is not in ``metrics``.
            ScoreTypeError: a monitored value cannot be one number (a string, per-class values).
            WriteError: an earlier background write failed (with ``on_write_error="raise"``).
        """
        self._take_run()
        raw = self._watch.scores(metrics, epoch)
        secondary = self._watch.secondary(metrics, self.policy.tie_break)
        base = self._record(epoch, step, metrics)
        taken = frozenset(self._taken | self._dir.names_elsewhere())
        evaluation = Evaluation(base, raw, secondary, dict(fields or {}))
        the_plan = plan(self._state, evaluation, self.policies, self._naming, taken)
        if (the_plan.new or the_plan.last) and write is None:
            raise TypeError("step() must be given write= to save a checkpoint at this evaluation")
        if not self._apply(the_plan, write, write_last):
            return Decision(False, False, None, score=the_plan.verdicts[self.monitor.name].score)
        self._watch.after(metrics, raw, first=self._state.evaluations == 1)
        return _decision(the_plan, self.monitor.name, self.should_stop, self._committer.filled)

    def _apply(self, the_plan: Plan, write: AnyWriter | None,
               write_last: AnyWriter | None) -> bool:  # fmt: skip
        """Carry ``the_plan`` out: the state moves on before the capture, so that a capture
        that reads it (the callback state inside a Lightning checkpoint) sees the outcome.
        False when the capture failed and the saver trains on (``on_write_error="warn"``)."""
        before, taken_before = self._state, self._taken
        self._state, self._taken = the_plan.state, set(the_plan.taken)
        records = [*the_plan.new, *([the_plan.last] if the_plan.last else [])]
        if not self.writer:
            self._write_shards(records, the_plan.last, write, write_last)
            return True
        evict = [*the_plan.evicted, *([the_plan.stale_last] if the_plan.stale_last else [])]
        job = Job(evict=evict, lines=[the_plan.line])
        try:
            job = self._pipeline.capture(job, records, the_plan.last, write, write_last)
        except Exception as e:
            self._state, self._taken = before, taken_before
            self._failed(e, roll_back=False)  # raises, or warns and skips this save
            return False
        self._submit(job)
        return True

    def _write_shards(self, records: list[Record], last: Record | None,
                      write: AnyWriter | None, write_last: AnyWriter | None) -> None:  # fmt: skip
        """On a process that does not commit: write its shards of the sharded checkpoints the
        committing process writes (every process decides alike), then raise a failure of an
        earlier one, as that process does."""
        if isinstance(write, Sharded) or isinstance(write_last, Sharded):
            self._pipeline.capture(Job(), records, last, write, write_last).release()
        self._failed(self._pipeline.take_error())

    def _take_run(self) -> None:
        self._dir.retake(self.writer)
        self._failed(self._pipeline.take_error())

    def _record(self, epoch: int, step: int | None, metrics: Mapping[str, Any] | None) -> Record:
        return _evaluated(self._run, self.monitor, epoch, step, metrics, self._state.evaluations)

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._state.warned:
            return
        self._state = replace(self._state, warned=self._state.warned | {key})
        warn(message)

    # -- writing -----------------------------------------------------------------------------

    def _submit(self, job: Job, wait: bool = False) -> None:
        """Hand ``job`` to the pipeline (``wait``: write it before returning)."""
        job.state = self._state
        try:
            (self._pipeline.run if wait else self._pipeline.submit)(job)
        except BaseException as e:
            self._failed(e)

    def _failed(self, error: BaseException | None, roll_back: bool = True) -> None:
        """A write failed (when ``error`` is not None): raise, forgetting what was decided since
        the last commit, or warn, forgetting only the files that were never written."""
        if error is None:
            return
        self._state, raised = self._pipeline.failed(error, self._state, roll_back)
        self._taken = self._names_taken()
        if raised is not None:
            raise raised

    # -- outside an evaluation -----------------------------------------------------------------

    def save_exception(
        self,
        epoch: int,
        write: AnyWriter,
        metrics: Mapping[str, Any] | None = None,
        step: int | None = None,
        filename: str = "exception-epoch={epoch:03d}",
        fields: Mapping[str, Any] | None = None,
    ) -> Record | None:
        """Keep the state at an exception (kind ``exception``), outside the policy: it never
        counts as best and is never evicted. Written before this returns.

        ``filename`` is the file's name template, filled from the epoch, step, ``metrics`` and
        ``fields`` (values for the template only, as in :meth:`step`). With a
        :class:`Sharded` writer every process calls it, and writes its shards."""
        base = self._record(epoch, step, metrics)
        record = exception_file(base, self._naming, filename, fields or {}, self._taken)
        if not self.writer:
            self._write_shards([record], None, write, None)
            return None
        self._pipeline.keep_error(self._pipeline.flush())
        job = self._pipeline.capture(Job(), [record], None, write, None)
        self._state = replace(self._state, kept=(*self._state.kept, record))  # ordered: last
        self._taken.add(record.name)
        self._submit(job, wait=True)
        return self._committer.filled(record)

    def save_last_checkpoint(
        self,
        epoch: int,
        write: AnyWriter,
        metrics: Mapping[str, Any] | None = None,
        step: int | None = None,
    ) -> Record | None:
        """Write the rolling ``last`` checkpoint now, outside an evaluation (Lightning writes
        one at the end of training and at an exception)."""
        base = self._record(epoch, step, metrics)
        record, previous = last_file(base, self._naming), self._state.last
        if not self.writer:
            self._write_shards([record], record, None, write)
            return None
        self._state = replace(self._state, last=record)  # before the capture, as in step()
        job = Job(evict=[previous] if previous and previous.name != record.name else [])
        try:
            job = self._pipeline.capture(job, [record], record, None, write)
        except BaseException:
            self._state = replace(self._state, last=previous)
            raise
        self._taken.add(record.name)
        self._submit(job)
        return record

    def flush(self) -> None:
        """Wait for pending writes and raise what a background write raised (or warn, with
        ``on_write_error="warn"``). Every kept file is on disk and committed when it returns.
        With sharded checkpoints every process calls it, and each raises what failed on any."""
        self._failed(self._pipeline.settle(self._pipeline.flush()))

    def close(self, *, alone: bool = False) -> None:
        """Flush, release the run, and tell trackers its best. May be called more than once;
        the saver stays usable (the next step takes the run again). With sharded checkpoints
        every process calls it; ``alone=True`` is for a process that may be the only one
        closing (an exception that reached it alone): it waits for its own writes but skips
        the exchange in which every process learns the committing one's outcome."""
        try:
            error = self._pipeline.flush(stop=True)
            self._failed(error if alone else self._pipeline.settle(error))
        finally:
            self._dir.release()
        if self.writer:
            self._watch.warn_if_nothing_kept(self._state, self.best_for, self.dirpath)
        best = self.best
        key = best.name if best else None
        if self.writer and key != self._ended_best:
            self._ended_best = key
            notify(self.trackers, "on_end", best)

    def __enter__(self) -> BestSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        best = self.best
        return (
            f"BestSaver({self.dirpath!r}, monitor={self.monitor.name!r}, "
            f"mode={self.monitor.mode!r}, best={best.score if best else None})"
        )
