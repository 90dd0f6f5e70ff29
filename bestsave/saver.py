"""BestSaver: the one object every adapter drives, once per evaluation."""

from __future__ import annotations

import atexit
import errno
import json
import os
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Literal

from bestsave import lock, runinfo
from bestsave.background import BackgroundWriter
from bestsave.commit import (
    Captured,
    Committer,
    Content,
    Job,
    NewFile,
    SaverState,
    WrittenFile,
    sidecar_text,
)
from bestsave.guards import CONSTANT_AFTER, constant_warning, naming_warnings
from bestsave.layout import RunFiles, run_name
from bestsave.manifest import Manifest, ManifestError, read_manifest
from bestsave.messages import warn
from bestsave.metrics import MissingMetricError, ScoreTypeError, as_score, clean_metrics
from bestsave.monitor import Monitor, resolve_mode
from bestsave.naming import DEFAULT_TEMPLATE, check_template, render, sanitize, unique_name
from bestsave.policy import Candidate, Policy, PolicyState, Smooth
from bestsave.record import Record, join
from bestsave.staging import Snapshot
from bestsave.store import Store, open_store
from bestsave.tracker import notify
from bestsave.trackers import resolve_trackers

Writer = Callable[[str], Any]
"""Writes a checkpoint to the local path it is given."""


@dataclass(frozen=True)
class Staged:
    """A checkpoint writer in two parts, so the training loop pays only for the first.

    ``capture()`` runs on the training thread when a save is decided and returns a snapshot
    that no later training step changes (tensors copied into host memory); ``serialize(snapshot,
    path)`` writes it, in a background thread when the saver writes asynchronously. Called as
    ``staged(path)`` it does both at once. With ``stream=True``, ``serialize`` is given a binary
    file object open for writing instead of a path (``torch.save`` takes either): the saver
    checksums the bytes as they go by instead of reading the file back.

    >>> import json, tempfile, os
    >>> state = {"w": [1, 2]}
    >>> write = Staged(lambda: json.dumps(state), lambda snap, path: open(path, "w").write(snap))
    >>> path = os.path.join(tempfile.mkdtemp(), "x.json")
    >>> _ = write(path); open(path).read()
    '{"w": [1, 2]}'
    """

    capture: Callable[[], Any]
    serialize: Callable[[Any, Any], Any]
    stream: bool = False

    def __call__(self, path: str) -> None:
        if not self.stream:
            self.serialize(self.capture(), path)
            return
        with open(path, "wb") as f:
            self.serialize(self.capture(), f)


_RANKED = ("best", "top_k", "ensemble")


def _snapshots(job: Job) -> dict[tuple[int, str], Snapshot]:
    """The stager snapshot each of ``job``'s files is written from (a twin's for a link), by
    evaluation and name: a fixed file name is written again by later evaluations."""
    files = {f.record.name: f for f in job.files}
    out = {}
    for f in job.files:
        content = files[f.same_as].content if f.same_as else f.content
        if isinstance(content, Captured) and isinstance(content.snapshot, Snapshot):
            out[(f.record.id, f.record.name)] = content.snapshot
    return out


class RunExistsError(FileExistsError):
    """The directory holds another run's manifest; resume it, overwrite it, or choose another."""


class WriteError(OSError, RuntimeError):
    """Writing a checkpoint failed; the previous best is intact. ``__cause__`` says why.

    An ``OSError``, as code written for the frameworks' own callbacks expects around ``fit``
    for a full disk; ``errno`` is the cause's when it had one (``errno.ENOSPC``)."""


_LIVE: weakref.WeakSet[BestSaver] = weakref.WeakSet()
_OWNERS: weakref.WeakValueDictionary[str, BestSaver] = weakref.WeakValueDictionary()
"""The saver that writes each run (by its folder) in this process."""


@atexit.register
def _flush_all() -> None:
    # A script that ends without close() still gets its pending writes.
    for saver in list(_LIVE):
        saver._flush(quiet=True)
        saver._release_lock()


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


def check_options(
    *,
    min_delta: float = 0.0,
    top_k: int | None = None,
    delta: float | None = None,
    keep_every_n_epochs: int | None = None,
    patience: int | None = None,
    save_last: bool | str = False,
    filename: str = DEFAULT_TEMPLATE,
    baseline: float | None = None,
    smooth: Smooth = None,
    tie_break: str | tuple[str, str] | None = None,
    warmup: int = 0,
    periodic_start: int | None = None,
    async_write: bool = True,
    on_write_error: str = "raise",
) -> Monitor | None:
    """Check the options of a :class:`BestSaver` that do not depend on the monitored metric,
    raising ``ValueError`` naming the fix; returns the tie-break metric.

    Adapters that create their saver when training starts call it in their constructor, so a
    bad value fails at once, before any training.

    >>> check_options(top_k=-3)
    Traceback (most recent call last):
    ...
    ValueError: top_k must be None or an int >= -1, not -3; use -1 to keep every valid score, ...
    """
    if save_last not in (False, True, "link"):
        raise ValueError(f"save_last must be False, True or 'link', not {save_last!r}")
    if on_write_error not in ("raise", "warn"):
        raise ValueError(f"on_write_error must be 'raise' or 'warn', not {on_write_error!r}")
    if not isinstance(async_write, bool):
        raise ValueError(f"async_write must be True or False, not {async_write!r}")
    check_template(filename)
    tie = _tie_break_monitor(tie_break)
    # The rules' own checks; the direction does not matter for them.
    Policy(Monitor("score", "max", min_delta), top_k, delta, keep_every_n_epochs, patience,
           baseline, smooth, tie, warmup, periodic_start)  # fmt: skip
    return tie


def _tie_break_monitor(tie_break: str | tuple[str, str] | None) -> Monitor | None:
    if tie_break is None:
        return None
    if isinstance(tie_break, str):
        return Monitor(tie_break, resolve_mode(tie_break, "auto"))
    if isinstance(tie_break, (tuple, list)) and len(tie_break) == 2:
        return Monitor(tie_break[0], resolve_mode(tie_break[0], tie_break[1]))
    raise ValueError(
        f"tie_break must be a metric name or (name, mode), e.g. ('val_loss', 'min'), "
        f"not {tie_break!r}"
    )


def _now() -> tuple[float, str]:
    t = time.time()
    return t, datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


class BestSaver:
    """Decides, at each evaluation, whether to keep a checkpoint, and keeps it safely.

    Args:
        dirpath: Directory for checkpoints: a local path or an fsspec URL (``s3://bucket/run``).
        monitor: The metric that decides, e.g. ``"val_auroc"``; or several, each keeping its
            own best (or top-k) in the same directory, files shared when one epoch wins several.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (from the metric's name; unknown names raise);
            one per monitor when there are several.
        min_delta: An improvement must beat the best by more than this.
        top_k: Keep the k best; -1 every valid score; 0 none (history only). None: 1 without
            ``delta``, no cap with it.
        delta: Keep every checkpoint within ``delta`` of the best (a near-best ensemble).
        keep_every_n_epochs: Also keep epochs n-1, 2n-1, ... (0-based), whatever their score.
            Without ``top_k``, ``delta`` or ``patience`` to judge, the monitor may go unlogged.
        save_last: Keep a rolling ``last`` checkpoint for resuming (``True`` or ``"link"``; both
            hard-link it to a kept file holding the same state instead of writing it twice).
        patience: Evaluations without improvement before :attr:`should_stop` is True.
        filename: Template for kept files; ``{epoch}``, ``{step}``, ``{monitor}``, ``{score}`` and
            any logged metric (``{val_loss:.3f}``, ``{val/loss:.3f}``) may appear.
        baseline: A score must beat this to be best or kept (Keras's
            ``initial_value_threshold``); a resumed run's best replaces it.
        resume: Continue the run of this name in ``dirpath`` (a new run when there is none).
        overwrite: Start a new run over an earlier run of this name in ``dirpath``; the earlier
            run stays whole until this one has kept its first file, then its files are deleted.
            Without ``resume`` or ``overwrite``, an earlier run that kept a checkpoint for its
            score is an error (:class:`RunExistsError`); one that kept none is replaced.
        smooth: Judge on a smoothed score: ``N`` (mean of the last N valid scores) or
            ``("ema", alpha)``. Records and history keep the raw score beside it.
        tie_break: A metric that decides ties (equal scores, or within ``min_delta``): its
            name (mode inferred) or ``(name, mode)``. Without it a tie keeps the incumbent.
        warmup: Epochs before this are never best nor kept for their score (history, periodic
            and last checkpoints still are), so early spikes never become the best.
        periodic_start: The first epoch ``keep_every_n_epochs`` keeps (n-1 by default; 0 keeps
            epochs 0, n, 2n, ...).
        trackers: ``"auto"`` (a W&B or MLflow run already active), ``"wandb"``, ``"mlflow"``, or
            objects with ``on_save``/``on_evict``/``on_end`` (see :class:`bestsave.Tracker`).
        async_write: Write :class:`Staged` writers' snapshots in a background thread: the
            training loop pays only for the snapshot in host memory, and :meth:`close` waits for
            the rest. Plain ``write(path)`` callables always commit before ``step`` returns.
            False writes everything before ``step`` returns.
        on_write_error: ``"raise"`` (default) stops training with the write's error; ``"warn"``
            warns and trains on. Either way the previous best stays intact.
        extension: Appended to every file name (adapters pass their format's, e.g. ``".ckpt"``).
        name: The run's name in ``dirpath``, the folder in ``dirpath/.bestsave`` that holds its
            manifest, history and records; by default made from ``filename`` and the first
            monitor, so savers that write differently named files can share a directory.
        last_name: Template of the ``last`` file's name (without the extension).
        version_names: A new file whose name a file that is not this run's already holds gets
            ``-v1``, ``-v2``... (Lightning's rule); False replaces that file, as Keras and
            fastai overwrite theirs.
        writer: False on processes that must not write (distributed ranks other than 0): they
            reach the same decisions and touch no file.
        framework: Recorded in the run info, e.g. ``"lightning"``.
        hparams: Hyperparameters recorded in the run info.
        storage_options: Passed to fsspec for remote URLs.

    Example:
        >>> import tempfile
        >>> saver = BestSaver(tempfile.mkdtemp(), monitor="val_auroc", top_k=2)
        >>> for epoch, auroc in enumerate([0.71, 0.83, 0.79, 0.80]):
        ...     d = saver.step(epoch, {"val_auroc": auroc, "train_loss": 1 / (epoch + 1)},
        ...                    write=lambda path: open(path, "w").write("weights"))
        >>> [r.epoch for r in saver.kept], saver.best.metrics["train_loss"]
        ([1, 3], 0.5)
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        monitor: str | Sequence[str],
        mode: str | Sequence[str] = "auto",
        min_delta: float = 0.0,
        top_k: int | None = None,
        delta: float | None = None,
        keep_every_n_epochs: int | None = None,
        save_last: bool | Literal["link"] = False,
        patience: int | None = None,
        filename: str = DEFAULT_TEMPLATE,
        resume: bool = False,
        overwrite: bool = False,
        trackers: str | Iterable[Any] = "auto",
        *,
        smooth: Smooth = None,
        tie_break: str | tuple[str, str] | None = None,
        warmup: int = 0,
        periodic_start: int | None = None,
        baseline: float | None = None,
        async_write: bool = True,
        on_write_error: Literal["raise", "warn"] = "raise",
        extension: str = "",
        name: str | None = None,
        last_name: str = "last",
        version_names: bool = True,
        writer: bool = True,
        framework: str | None = None,
        hparams: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        names = [monitor] if isinstance(monitor, str) else list(monitor)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"monitor must name a logged metric, or list several, not {monitor!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"monitor lists a metric twice: {names!r}")
        modes = [mode] * len(names) if isinstance(mode, str) else list(mode)
        if len(modes) != len(names):
            raise ValueError(
                f"mode must be one mode for every monitor or one per monitor; got {len(modes)} "
                f"modes for {len(names)} monitors"
            )
        if extension == ".json":
            raise ValueError("extension '.json' is reserved for the sidecar records")
        tie = check_options(
            min_delta=min_delta, top_k=top_k, delta=delta,
            keep_every_n_epochs=keep_every_n_epochs, patience=patience, save_last=save_last,
            filename=filename, baseline=baseline, smooth=smooth, tie_break=tie_break,
            warmup=warmup, periodic_start=periodic_start, async_write=async_write,
            on_write_error=on_write_error,
        )  # fmt: skip
        check_template(last_name)
        self.monitors = [
            Monitor(n, resolve_mode(n, m), min_delta) for n, m in zip(names, modes, strict=True)
        ]
        self.policies = {
            m.name: Policy(
                m,
                top_k,
                delta,
                keep_every_n_epochs,
                patience,
                baseline,
                smooth,
                tie,
                warmup,
                periodic_start,
            )
            for m in self.monitors
        }
        self.monitor = self.monitors[0]
        """The first monitor: the one :attr:`best` follows."""
        self.policy = self.policies[self.monitor.name]
        self.save_last = save_last
        self.filename = filename
        self.last_name = last_name
        self.version_names = version_names
        self.extension = extension
        self.writer = writer
        self.async_write = bool(async_write)
        self.on_write_error = on_write_error
        self.trackers = resolve_trackers(trackers) if writer else []
        self._store: Store = open_store(dirpath, **dict(storage_options or {}))
        self.dirpath = self._store.url
        self.files = RunFiles(
            sanitize(name) if name else run_name(filename, self.monitor.name), extension
        )
        """Where the run's own files are: ``dirpath/.bestsave/<name>/``."""

        self._states = {m.name: PolicyState() for m in self.monitors}
        self._first_scores: dict[str, list[float]] = {m.name: [] for m in self.monitors}
        self._invalid: dict[str, dict[str, int]] = {m.name: {} for m in self.monitors}
        """How many of this process's evaluations had no valid score, by monitor and why."""
        self._evaluations = 0
        self._last_epoch: int | None = None
        self._kept: list[Record] = []
        self._last: Record | None = None
        self._warned: set[str] = set()
        self._taken: set[str] = set()
        self._replaced: set[str] = set()
        self._replace_at: frozenset[str] = frozenset()
        self._superseded = False
        self._ended_best: str | None = ""
        started_ts, started = _now()
        self._run = runinfo.collect(framework, dict(hparams or {}), started)
        self._run["started_ts"] = started_ts
        history_bytes = 0
        replacing: list[str] | None = None
        self._locked = False
        if writer:
            self._lock()
            try:
                history_bytes, replacing = self._open(resume=resume, overwrite=overwrite)
            except BaseException:
                self._release_lock()
                raise
        elif resume:
            # Other ranks read the run rank 0 resumes, so they reach the same decisions.
            manifest = read_manifest(self._store, self.files.name)
            if manifest is not None and self._compatible(manifest):
                self._restore(manifest)
        self._committer = Committer(
            self._store,
            self.files,
            {
                "run": self._run,
                "monitor": self.monitor.name,
                "mode": self.monitor.mode,
                "monitors": {m.name: m.mode for m in self.monitors},
                "policy": self._policy_dict(),
            },
            history_bytes,
            self._saver_state(),
            keep_evaluations=on_write_error == "warn",
            replacing=replacing,
            replace_at=self._replace_at,
        )
        self._worker: BackgroundWriter | None = None
        self._worker_error: BaseException | None = None
        self._held: dict[tuple[int, str], Snapshot] = {}  # the latest save's, by record
        _LIVE.add(self)

    # -- public state ---------------------------------------------------------------------

    @property
    def best(self) -> Record | None:
        """Record of the best checkpoint (by the first monitor), or None."""
        return self.best_for(self.monitor.name)

    def best_for(self, monitor: str) -> Record | None:
        """Record of the best checkpoint by ``monitor`` (one of the saver's monitors)."""
        if monitor not in self._states:
            raise KeyError(f"{monitor!r} is not monitored; monitors: {list(self._states)}")
        state = self._states[monitor]
        ranked = {r.id: r for r in self._kept if r.kind in _RANKED and r.monitor == monitor}
        # After a lost write the best score's file may not exist: the best kept one stands in.
        best = (
            ranked.get(state.best_id)
            or next((ranked[c.id] for c in state.ranked if c.id in ranked), None)
            if state.best_id is not None
            else None
        )
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
        snapshot = self._held.get((record.id, record.name))
        return snapshot.state if snapshot is not None and snapshot.intact else None

    @property
    def _state(self) -> PolicyState:
        return self._states[self.monitor.name]

    @property
    def kept(self) -> list[Record]:
        """Records kept now, best first; periodic and exception ones after, by epoch.

        With background writes, ``bytes`` and ``sha256`` are filled in once a file is written
        (after :meth:`close` for certain).
        """
        return [self._committer.filled(r) for r in sorted(self._kept, key=self._order)]

    @property
    def last(self) -> Record | None:
        """Record of the rolling ``last`` checkpoint, or None."""
        return self._committer.filled(self._last) if self._last else None

    @property
    def should_stop(self) -> bool:
        """Patience is exhausted: that many evaluations passed without improvement (of any
        monitor, when there are several)."""
        patience = self.policy.patience
        return patience is not None and all(
            s.since_improvement >= patience for s in self._states.values()
        )

    @property
    def best_score(self) -> float | None:
        """The score a new one must beat (by more than ``min_delta``)."""
        return self._state.best

    @property
    def evaluations(self) -> int:
        """How many evaluations this run has seen, resumed ones included."""
        return self._evaluations

    @property
    def last_epoch(self) -> int | None:
        """Epoch of the latest evaluation, or None before the first."""
        return self._last_epoch

    @property
    def run(self) -> dict[str, Any]:
        """Run info recorded with every checkpoint."""
        return self._run

    def _order(self, r: Record) -> tuple[int, int, float, int]:
        names = list(self.policies)
        if r.kind in _RANKED and r.score is not None and r.monitor in self.policies:
            return (
                0,
                names.index(r.monitor),
                self.policies[r.monitor].monitor.rank_key(r.score),
                r.id,
            )
        return (1, 0, float(r.epoch), r.id)

    def _saver_state(self) -> SaverState:
        return SaverState(
            policies={name: st.to_dict() for name, st in self._states.items()},
            evaluations=self._evaluations,
            last_epoch=self._last_epoch,
            kept=tuple(sorted(self._kept, key=self._order)),
            last=self._last,
            warned=tuple(sorted(self._warned)),
        )

    def _forget_lost(self) -> None:
        """Drop the records of files that were never written; the best score, patience and
        history stay, so every rank keeps deciding alike."""
        lost = set(self._committer.lost)
        restored = [r for r in list(self._committer.restored.values()) if r not in self._kept]
        if not lost and not restored:
            return
        # Files a lost write would have evicted are still there: kept again.
        self._kept = [r for r in self._kept if r.name not in lost] + restored
        for name, state in self._states.items():
            ranked = {c.id: c for c in state.ranked}
            kept = [r for r in self._kept if r.monitor == name and r.kind in _RANKED]
            self._states[name] = replace(
                state,
                ranked=self.policies[name]._sorted(
                    [ranked.get(r.id) or Candidate(r.id, r.score or 0.0) for r in kept]
                ),
            )
        if self._last is not None and self._last.name in lost:
            self._last = self._committer.committed.last
        self._taken = (self._taken - lost) | {r.name for r in restored}

    def _roll_back(self, state: SaverState) -> None:
        """Forget decisions whose files were never committed."""
        self._states = {name: PolicyState.from_dict(d) for name, d in state.policies.items()}
        self._evaluations = state.evaluations
        self._last_epoch = state.last_epoch
        self._kept = list(state.kept)
        self._last = state.last
        self._warned = set(state.warned)
        self._taken = self._foreign() | {r.name for r in self._kept}

    # -- opening a directory ----------------------------------------------------------------

    def _lock(self) -> None:
        """Take the run's lock. In this process a newer saver of the same run takes it over (a
        notebook cell run again); the older one then refuses to step."""
        key = join(self.dirpath, self.files.folder)
        older = _OWNERS.get(key)
        if older is not None and older is not self and older._locked:
            older._flush(quiet=True)
            older._locked = False
            older._superseded = True
        try:
            lock.acquire(self._store, self.files.lock, self._run["id"])
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise PermissionError(
                e.errno,
                f"cannot write in {self.dirpath} ({e.strerror}): bestsave keeps the run's records "
                f"in {join(self.dirpath, self.files.folder)}; make the directory writable or "
                "choose another",
            ) from e
        _OWNERS[key] = self
        self._locked = True

    def _open(self, resume: bool, overwrite: bool) -> tuple[int, list[str] | None]:
        """Take the run over. Returns the committed size of its history, and the files of an
        earlier run this one replaces (None when it replaces none)."""
        store, files = self._store, self.files
        manifest = read_manifest(store, files.name)
        if manifest is not None:
            self._finish(manifest)
        for name in files.leftovers(store):
            store.delete(name)
        history_bytes, replacing = 0, None
        if manifest is None:
            records = [n for n in store.names(files.folder) if n.endswith(".json")]
            if records:  # the run's records are there, its manifest is gone: never write over
                raise ManifestError(
                    join(self.dirpath, files.manifest),
                    f"it is missing, but {len(records)} records of the run's checkpoints are "
                    "beside it",
                )
            # History written before a first commit that never came belongs to no run.
            store.truncate(files.history, 0)
        elif resume and self._compatible(manifest):
            history_bytes = self._restore(manifest)
        elif overwrite or manifest.best is None:
            replacing = self._names_of(manifest)
            if manifest.best is not None:
                # Its best stays until this run keeps a checkpoint that stands for something:
                # one for its score or its epoch, or a last one if it keeps no other.
                keeps = any(p.cap > 0 or p.keep_every_n_epochs for p in self.policies.values())
                self._replace_at = frozenset(
                    ("best", "top_k", "ensemble", "periodic") if keeps else ("last",)
                )
            self._warn_replacing(manifest)
        elif resume:
            ours = {m.name: m.mode for m in self.monitors}
            raise RunExistsError(
                f"cannot resume {self._describe(manifest)}: it monitors {manifest.monitors}, "
                f"this saver {ours}. Use the same monitors and modes to resume it, "
                "overwrite=True to start a new run in its place, or another directory."
            )
        else:
            raise RunExistsError(
                f"{self._describe(manifest)}. Pass resume=True to continue it, overwrite=True "
                "to start a new run in its place, or choose another directory."
            )
        self._replaced = set(replacing or ())
        self._taken = self._foreign() | {r.name for r in self._kept}
        return history_bytes, replacing

    def _foreign(self) -> set[str]:
        """Names of files in the directory that are not this run's, which a new file must not
        take: all of them with ``version_names``, none without (the file is replaced)."""
        if not self.version_names:
            return set()
        return set(self._store.names()) - self._replaced

    def _claimed_elsewhere(self) -> set[str]:
        """Names other savers of this process keep in this directory: files another run is
        writing in the background are not on disk yet, but their names are taken."""
        if not self.version_names:
            return set()
        return {
            r.name
            for saver in list(_LIVE)
            if saver is not self
            and saver._locked  # a closed run's files are all on disk
            and saver.dirpath == self.dirpath
            and saver.files.name != self.files.name
            for r in [*saver._kept, *([saver._last] if saver._last else [])]
        }

    def _describe(self, manifest: Manifest) -> str:
        """The earlier run in words: where, when, and its best."""
        best = manifest.best
        what = (
            f"its best is {best.name} ({manifest.monitor}={best.score})"
            if best
            else "it kept no checkpoint for its score"
        )
        run = manifest.run
        return (
            f"{self.dirpath} holds run {run.get('id', '?')} ({self.files.name!r}, started "
            f"{run.get('started', '?')} on {run.get('host', '?')}); {what}"
        )

    def _warn_replacing(self, manifest: Manifest) -> None:
        files = [r.name for r in manifest.kept] + ([manifest.last.name] if manifest.last else [])
        gone = f"its files ({', '.join(files)}) are" if files else "its records are"
        warn(
            f"{self._describe(manifest)}. Starting a new run there: the earlier run stays whole "
            f"until this one keeps its first checkpoint, then {gone} deleted. Pass "
            "resume=True to continue it instead, or choose another directory."
        )

    def _compatible(self, manifest: Manifest) -> bool:
        return manifest.monitors == {m.name: m.mode for m in self.monitors}

    @staticmethod
    def _names_of(manifest: Manifest) -> list[str]:
        """Every file of ``manifest``'s run and their records (its history is replaced)."""
        files = manifest.files
        names = []
        for r in manifest.kept:
            names += [r.name, files.sidecar(r.name)]
        if manifest.last:
            names.append(manifest.last.name)
        return names

    def _restore(self, manifest: Manifest) -> int:
        state = manifest.state
        policies = state.get("policies", {})
        self._states = {
            m.name: PolicyState.from_dict(policies.get(m.name, {})) for m in self.monitors
        }
        self._evaluations = int(state.get("evaluations", 0))
        self._last_epoch = state.get("last_epoch")
        self._warned = set(state.get("warned", []))
        self._kept = [replace(r, path=join(self.dirpath, r.name)) for r in manifest.kept]
        if manifest.last:
            self._last = replace(manifest.last, path=join(self.dirpath, manifest.last.name))
        run = dict(manifest.run)
        run["resumes"] = int(run.get("resumes", 0)) + 1
        self._run = run
        return int(state.get("history_bytes", 0))

    def _finish(self, manifest: Manifest) -> None:
        """Finish what a crash interrupted in ``manifest``'s run: the manifest is the truth,
        files follow it."""
        store, files = self._store, manifest.files
        for final, tmp in manifest.pending.items():
            if store.exists(tmp):
                store.rename(tmp, final)
        for name in manifest.evicting:
            store.delete(name)
        for r in manifest.kept:
            if not store.exists(files.sidecar(r.name)):
                store.write_text(files.sidecar(r.name), sidecar_text(r))
        store.truncate(files.history, int(manifest.state.get("history_bytes", 0)))

    # -- one evaluation ----------------------------------------------------------------------

    def step(
        self,
        epoch: int,
        metrics: Mapping[str, Any],
        write: Writer | Staged | None = None,
        *,
        step: int | None = None,
        write_last: Writer | Staged | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> Decision:
        """Judge one evaluation and keep, evict and record as the policy decides.

        Args:
            epoch: The epoch just evaluated (0-based).
            metrics: Everything logged at this evaluation; must hold the monitored metric(s).
            write: Writes the checkpoint to the local path it is given, or a :class:`Staged`
                writer whose ``capture`` runs now and ``serialize`` in the background. Used
                only when a file is kept, at most once per evaluation.
            step: The global step, recorded with the evaluation.
            write_last: Writes the ``last`` checkpoint when it differs from ``write``'s (e.g. kept
                files hold weights only); by default ``last`` holds what ``write`` writes.
            fields: Extra values for the filename template, not recorded as metrics (an adapter
                passes Keras's 1-based ``epoch`` and ``batch``).

        Raises:
            MissingMetricError: a monitored metric is not in ``metrics``.
            WriteError: an earlier background write failed (with ``on_write_error="raise"``).
        """
        if self._superseded:
            raise RuntimeError(
                f"another saver in this process has since opened run {self.files.name!r} in "
                f"{self.dirpath}, and two savers cannot write one run: give each its own "
                "dirpath or file name template"
            )
        self._check_worker()
        if self.writer and not self._locked:
            self._lock()
        raw = {m.name: self._score_of(m.name, metrics, epoch) for m in self.monitors}
        secondary = self._secondary(metrics)
        ts, now = _now()
        clean = clean_metrics(metrics)
        id = self._evaluations
        verdicts, states = {}, {}
        for name, policy in self.policies.items():
            verdicts[name], states[name] = policy.decide(
                self._states[name], id, epoch, raw[name], secondary
            )
        first = verdicts[self.monitor.name]
        base = self._record(epoch, step, first.score, clean, ts, now, id)
        evicted = tuple(
            r
            for r in self._kept
            if r.kind in _RANKED and r.monitor in verdicts and r.id in verdicts[r.monitor].evict
        )
        taken = (self._taken | self._claimed_elsewhere()) - {r.name for r in evicted}
        template = {**clean, "epoch": int(epoch), "step": step}

        def values(m: Monitor, score: float | None) -> dict[str, Any]:
            return {**template, **self._fields(m, score), **(fields or {})}

        last = None
        if self.save_last:
            name = render(self.last_name, values(self.monitor, first.score)) + self.extension
            last = replace(base, kind="last", path=join(self.dirpath, name))
            taken.add(name)
        new: list[Record] = []
        for m in self.monitors:
            verdict = verdicts[m.name]
            if verdict.keep:
                record = replace(
                    base,
                    kind=verdict.keep,
                    monitor=m.name,
                    mode=m.mode,
                    score=verdict.score,
                    raw_score=raw[m.name],
                )
                new.append(
                    self._named(record, render(self.filename, values(m, verdict.score)), taken)
                )
        if first.periodic:
            stem = render(self.filename, values(self.monitor, first.score))
            if any(r.name == stem + self.extension for r in new):
                stem += "-periodic"  # the same bytes, linked: kept for its score and its epoch
            # A periodic file named like an earlier one (a name without the epoch) replaces it,
            # as the frameworks' callbacks overwrite it.
            older = [
                r for r in self._kept if r.kind == "periodic" and r.name == stem + self.extension
            ]
            evicted += tuple(older)
            taken -= {r.name for r in older}
            new.append(self._named(replace(base, kind="periodic"), stem, taken))
        renamed_last = (
            (self._last,)
            if last is not None and self._last is not None and self._last.name != last.name
            else ()
        )
        if (new or last) and write is None:
            raise TypeError("step() must be given write= to save a checkpoint at this evaluation")
        best_for = [name for name, v in verdicts.items() if v.is_best]
        line: dict[str, Any] = {
            "epoch": base.epoch,
            "step": base.step,
            "time": base.time,
            "elapsed_s": base.elapsed_s,
            "score": first.score,
            "raw_score": raw[self.monitor.name],
            "metrics": clean,
            "decision": {
                "saved": bool(new),
                "is_best": first.is_best,
                "kind": [r.kind for r in new],
                "files": [r.name for r in new],
                "evicted": [r.name for r in evicted],
            },
        }
        if len(self.monitors) > 1:
            line["scores"] = {name: v.score for name, v in verdicts.items()}
            line["decision"]["best_for"] = best_for
        # The saver's state moves on before the capture, so that a capture reading it (the
        # callback state inside a Lightning checkpoint) sees this evaluation's outcome.
        before = (self._states, self._evaluations, self._last_epoch, self._kept, self._taken)
        last_before = self._last
        self._states = states
        self._evaluations += 1
        self._last_epoch = int(epoch)
        self._kept = [r for r in self._kept if r not in evicted] + new
        self._taken = taken | {r.name for r in new}
        if last is not None:
            self._last = last
        job = None
        if self.writer:
            job = Job(
                evict=[*evicted, *renamed_last],
                lines=[json.dumps(line, default=str, allow_nan=False) + "\n"],
            )
            try:
                records = new + ([last] if last is not None else [])
                job = self._capture(job, records, last, write, write_last)
            except Exception as e:
                self._states, self._evaluations, self._last_epoch, self._kept, self._taken = before
                self._last = last_before
                self._failed(e, roll_back=False)  # raises, or warns and skips this save
                return Decision(False, False, None, score=first.score)
        self._guard(metrics, raw)
        if job is not None:
            job.state = self._saver_state()
            best = self.best
            job.best_name = best.name if best else None
            self._submit(job)
        ranked = next((r for r in new if r.kind in _RANKED), None)
        return Decision(
            is_best=first.is_best,
            saved=bool(new),
            record=self._committer.filled(ranked or new[0]) if new else None,
            evicted=evicted,
            should_stop=self.should_stop,
            score=first.score,
            records=tuple(self._committer.filled(r) for r in new),
            best_for=tuple(best_for),
        )

    def _score_of(self, name: str, metrics: Mapping[str, Any], epoch: int) -> float | None:
        if name not in metrics:
            if not self.policies[name].judges:
                return None  # files are kept on a schedule: nothing needs the score
            raise MissingMetricError(name, [str(k) for k in metrics])
        score, reason = as_score(metrics[name])
        if reason == "not a number":
            raise ScoreTypeError(name, metrics[name], epoch)
        if reason is not None:
            self._invalid[name][reason] = self._invalid[name].get(reason, 0) + 1
        if reason in ("nan", "inf"):
            self._warn_once(
                f"{reason}:{name}",
                f"{name} is {metrics[name]!r} at epoch {epoch}: invalid scores are never best "
                "nor kept for their score",
            )
        return score

    def _secondary(self, metrics: Mapping[str, Any]) -> float | None:
        tie = self.policy.tie_break
        if tie is None:
            return None
        if tie.name not in metrics:
            self._warn_once(
                "tie_break",
                f"tie_break metric {tie.name!r} is not logged; ties keep the "
                f"incumbent. Logged: {sorted(map(str, metrics))}",
            )
            return None
        return as_score(metrics[tie.name])[0]

    @staticmethod
    def _fields(monitor: Monitor, score: float | None) -> dict[str, Any]:
        return {"monitor": sanitize(monitor.name), "score": score}

    def _guard(self, metrics: Mapping[str, Any], raw: Mapping[str, float | None]) -> None:
        if self._evaluations == 1:
            for m in self.monitors:
                for key, message in naming_warnings(m.name, [str(k) for k in metrics]):
                    self._warn_once(f"{key}:{m.name}", message)
        for m in self.monitors:
            first = self._first_scores[m.name]
            score = raw[m.name]
            if score is not None and len(first) < CONSTANT_AFTER:
                first.append(score)
                warning = constant_warning(m.name, first)
                if warning:
                    self._warn_once(f"{warning[0]}:{m.name}", warning[1])

    def _record(
        self,
        epoch: int,
        step: int | None,
        score: float | None,
        metrics: dict[str, Any],
        ts: float,
        now: str,
        id: int,
    ) -> Record:
        return Record(
            path="",
            kind="",
            epoch=int(epoch),
            step=step,
            monitor=self.monitor.name,
            mode=self.monitor.mode,
            score=score,
            metrics=metrics,
            time=now,
            elapsed_s=round(ts - float(self._run.get("started_ts", ts)), 3),
            run={k: v for k, v in self._run.items() if k != "started_ts"},
            id=id,
        )

    def _named(self, record: Record, stem: str, taken: set[str]) -> Record:
        name = unique_name(stem, self.extension, taken)
        taken.add(name)
        return replace(record, path=join(self.dirpath, name))

    # -- writing ---------------------------------------------------------------------------------

    def _capture(
        self,
        job: Job,
        records: list[Record],
        last: Record | None,
        write: Writer | Staged | None,
        write_last: Writer | Staged | None,
    ) -> Job:
        """Take what ``job`` must write, on the training thread: each distinct content once.
        Returns the job to submit, which may hold a pending job taken back from the worker.

        Files holding the same bytes (a best that is also periodic, ``last`` beside a kept file)
        become hard links to one written file.
        """
        if not records:
            return job
        shared: NewFile | None = None
        for r in records:
            own = r is last and write_last is not None
            twin = shared.record.name if shared is not None and not own else None
            job.files.append(NewFile(r, self.files.tmp(r.name), same_as=twin))
            if shared is None and not own:
                shared = job.files[-1]
        held = self._hold_pending(job)
        merged = held.absorb(job) if held is not None else job
        try:
            for f in job.files:
                if f.same_as is None:
                    own = f.record is last and write_last is not None
                    f.content = self._content(write_last if own else write, f.tmp)  # type: ignore[arg-type]
        except BaseException as e:
            job.release()
            if held is not None:  # its superseded snapshots are gone: those files are lost
                assert self._worker is not None
                self._worker.submit(held.lost(job.superseded(), e))
            raise
        self._held = _snapshots(job)
        return merged

    def _hold_pending(self, job: Job) -> Job | None:
        """Keep at most two snapshots (one being written, one pending) while ``job`` captures.

        A pending job whose files ``job`` supersedes is taken back from the worker and merged
        now, so its snapshot is freed before the new one is taken; any other pending job must
        start first.
        """
        worker = self._worker
        if worker is None:
            return None
        if worker.pending_files() <= job.superseded():
            return worker.take_pending()
        worker.wait_for_room()
        return None

    def _content(self, write: Writer | Staged, tmp: str) -> Content:
        if isinstance(write, Staged):
            return Captured(write.serialize, write.capture(), write.stream)
        local = self._store.scratch(tmp)
        try:
            write(local)
        except BaseException:
            WrittenFile(local).release()
            raise
        return WrittenFile(local)

    def _submit(self, job: Job) -> None:
        # Only captured snapshots go to the background; a plain write() already ran here, so
        # its commit follows at once, after any background job, keeping the order.
        contents = [f.content for f in job.files if f.content is not None]
        staged = bool(contents) and all(isinstance(c, Captured) for c in contents)
        # An evaluation that keeps nothing only appends history and rewrites the manifest: the
        # worker does that too, so such steps cost the loop the decision alone.
        background = self.async_write and (staged or not contents)
        if not background:
            self._flush(quiet=True)
            self._check_worker()
            self._run_job(job, raise_now=True)
            return
        if self._worker is None:
            self._worker = BackgroundWriter(
                lambda j: self._run_job(j, raise_now=False),
                keep_going=self.on_write_error == "warn",
            )
        self._worker.submit(job)

    def _run_job(self, job: Job, raise_now: bool) -> None:
        try:
            written, evicted = self._committer.run(job)
        except BaseException as e:
            if raise_now:
                self._failed(e)
                return
            raise
        for r in evicted:
            notify(self.trackers, "on_evict", r)
        for r in written:
            if r.kind != "last":
                notify(self.trackers, "on_save", r, r.path)

    def _check_worker(self) -> None:
        error, self._worker_error = self._worker_error, None
        if error is None and self._worker is not None:
            error = self._worker.take_error()
        if error is not None:
            self._failed(error)

    def _failed(self, error: BaseException, roll_back: bool = True) -> None:
        """A write failed: raise, forgetting what was decided since the last commit, or warn,
        forgetting only the files that were never written."""
        stop = isinstance(error, (KeyboardInterrupt, SystemExit)) or self.on_write_error == "raise"
        if roll_back and stop:
            self._roll_back(self._committer.committed)
        self._forget_lost()
        if stop:
            if isinstance(error, Exception) and not isinstance(error, WriteError):
                message = (
                    f"writing a checkpoint to {self.dirpath} failed ({type(error).__name__}: "
                    f"{error}); the previous best is intact. Fix the cause and resume, or pass "
                    "on_write_error='warn' to train on without that checkpoint"
                )
                code = getattr(error, "errno", None)
                raise (WriteError(code, message) if code else WriteError(message)) from error
            raise error
        warn(
            f"writing a checkpoint to {self.dirpath} failed ({type(error).__name__}: {error}); "
            "training goes on and the previous best is intact"
        )

    def _policy_dict(self) -> dict[str, Any]:
        p = self.policy
        tie = p.tie_break
        return {
            "smooth": list(p.smooth) if isinstance(p.smooth, tuple) else p.smooth,
            "tie_break": [tie.name, tie.mode] if tie else None,
            "warmup": p.warmup,
            "min_delta": self.monitor.min_delta,
            "top_k": p.top_k,
            "delta": p.delta,
            "keep_every_n_epochs": p.keep_every_n_epochs,
            "periodic_start": p.periodic_start,
            "patience": p.patience,
            "baseline": p.baseline,
            "save_last": self.save_last,
            "filename": self.filename,
            "last_name": self.last_name,
            "extension": self.extension,
        }

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        warn(message)

    # -- the rest ------------------------------------------------------------------------------

    def save_last_checkpoint(
        self,
        epoch: int,
        write: Writer | Staged,
        metrics: Mapping[str, Any] | None = None,
        step: int | None = None,
    ) -> Record | None:
        """Write the rolling ``last`` checkpoint now, outside an evaluation (Lightning writes
        one at the end of training and at an exception)."""
        if not self.writer:
            return None
        ts, now = _now()
        clean = clean_metrics(metrics or {})
        name = render(self.last_name, {**clean, "epoch": int(epoch), "step": step}) + self.extension
        record = replace(
            self._record(epoch, step, None, clean, ts, now, self._evaluations),
            kind="last",
            path=join(self.dirpath, name),
        )
        previous, self._last = self._last, record  # before the capture, as in step()
        job = Job(evict=[previous] if previous and previous.name != name else [])
        try:
            job = self._capture(job, [record], record, None, write)
        except BaseException:
            self._last = previous
            raise
        self._taken.add(name)
        job.state = self._saver_state()
        best = self.best
        job.best_name = best.name if best else None
        self._submit(job)
        return record

    def save_exception(
        self,
        epoch: int,
        write: Writer | Staged,
        metrics: Mapping[str, Any] | None = None,
        step: int | None = None,
        filename: str = "exception-epoch={epoch:03d}",
        fields: Mapping[str, Any] | None = None,
    ) -> Record | None:
        """Keep the state at an exception (kind ``exception``), outside the policy: it never
        counts as best and is never evicted. Written before this returns.

        ``filename`` is the file's name template, filled from the epoch, step, ``metrics`` and
        ``fields`` (values for the template only, as in :meth:`step`)."""
        if not self.writer:
            return None
        ts, now = _now()
        clean = clean_metrics(metrics or {})
        name = unique_name(
            render(filename, {**clean, "epoch": int(epoch), "step": step, **(fields or {})}),
            self.extension,
            self._taken,
        )
        record = replace(
            self._record(epoch, step, None, clean, ts, now, self._evaluations),
            kind="exception",
            path=join(self.dirpath, name),
        )
        self._flush(quiet=True)
        job = self._capture(Job(), [record], None, write, None)
        self._kept.append(record)
        self._taken.add(record.name)
        job.state = self._saver_state()
        best = self.best
        job.best_name = best.name if best else None
        self._run_job(job, raise_now=True)
        return self._committer.filled(record)

    def _flush(self, quiet: bool = False, stop: bool = False) -> None:
        worker = self._worker
        if worker is None:
            return
        worker.flush()
        if stop:  # a later step starts a new thread
            worker.stop()
            self._worker = None
        error = worker.take_error()
        if error is not None:
            if quiet:
                self._worker_error = error
            else:
                self._failed(error)

    def flush(self) -> None:
        """Wait for pending writes and raise what a background write raised (or warn, with
        ``on_write_error="warn"``). Every kept file is on disk and committed when it returns."""
        self._flush()

    def close(self) -> None:
        """Flush, release the directory, and tell trackers the run's best. May be called more
        than once; the saver stays usable (the next step takes the directory again)."""
        try:
            self._flush(stop=True)
        finally:
            self._release_lock()
        self._warn_if_nothing_kept()
        best = self.best
        key = best.name if best else None
        if self.writer and key != self._ended_best:
            self._ended_best = key
            notify(self.trackers, "on_end", best)

    def _warn_if_nothing_kept(self) -> None:
        """A run that judges by score and kept nothing for it says so, and why."""
        if not self.writer or not self._evaluations:
            return
        for m in self.monitors:
            policy = self.policies[m.name]
            if policy.cap == 0 or self.best_for(m.name) is not None:
                continue
            invalid = self._invalid[m.name]
            if policy.warmup > (self._last_epoch or 0):
                why = f"every evaluation was within warmup={policy.warmup}"
            elif invalid and self._states[m.name].peak is None:
                counts = ", ".join(f"{k} {n} times" for k, n in sorted(invalid.items()))
                why = f"{m.name} was never a valid number ({counts})"
            elif policy.baseline is not None:
                why = f"no {m.name} beat baseline={policy.baseline}"
            else:
                why = "the files were never written (see the errors above)"
            self._warn_once(
                f"nothing kept:{m.name}",
                f"training ended with no checkpoint kept for {m.name} in {self.dirpath}: {why}",
            )

    def _release_lock(self) -> None:
        if self._locked:
            self._locked = False
            try:
                lock.release(self._store, self.files.lock)
            except OSError as e:  # a directory that turned read-only: the lock goes stale
                warn(
                    f"could not remove the lock in {self.dirpath} ({e}); the next run takes "
                    "it over once this process has ended"
                )

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
