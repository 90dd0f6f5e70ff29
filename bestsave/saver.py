"""BestSaver: the one object every adapter drives, once per evaluation."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Literal

from bestsave import runinfo
from bestsave.manifest import Manifest, read_manifest
from bestsave.metrics import MissingMetricError, as_score, clean_metrics
from bestsave.monitor import Monitor, resolve_mode
from bestsave.naming import (
    DEFAULT_TEMPLATE,
    HISTORY,
    MANIFEST,
    check_template,
    render,
    sanitize,
    sidecar_name,
    unique_name,
)
from bestsave.policy import Policy, PolicyState
from bestsave.record import Record, join
from bestsave.store import TMP_PREFIX, Store, file_digest, open_store, tmp_name
from bestsave.tracker import BestSaveWarning, notify
from bestsave.trackers import resolve_trackers

Writer = Callable[[str], Any]
"""Writes a checkpoint to the local path it is given."""


@dataclass(frozen=True)
class Staged:
    """A checkpoint writer in two parts, so the training loop pays only for the first.

    ``capture()`` runs on the training thread when a save is decided and returns a snapshot
    that no later training step changes (tensors copied into host memory); ``serialize(snapshot,
    path)`` writes it, in a background thread when the saver writes asynchronously. Called as
    ``staged(path)`` it does both at once.

    >>> import json, tempfile, os
    >>> state = {"w": [1, 2]}
    >>> write = Staged(lambda: json.dumps(state), lambda snap, path: open(path, "w").write(snap))
    >>> path = os.path.join(tempfile.mkdtemp(), "x.json")
    >>> _ = write(path); open(path).read()
    '{"w": [1, 2]}'
    """

    capture: Callable[[], Any]
    serialize: Callable[[Any, str], Any]

    def __call__(self, path: str) -> None:
        self.serialize(self.capture(), path)


_RANKED = ("best", "top_k", "ensemble")


class RunExistsError(FileExistsError):
    """The directory holds another run's manifest; resume it, overwrite it, or choose another."""


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


def _now() -> tuple[float, str]:
    t = time.time()
    return t, datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


class BestSaver:
    """Decides, at each evaluation, whether to keep a checkpoint, and keeps it safely.

    Args:
        dirpath: Directory for checkpoints: a local path or an fsspec URL (``s3://bucket/run``).
        monitor: The metric that decides, e.g. ``"val_auroc"``.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (from the metric's name; unknown names raise).
        min_delta: An improvement must beat the best by more than this.
        top_k: Keep the k best; -1 every valid score; 0 none (history only). None: 1 without
            ``delta``, no cap with it.
        delta: Keep every checkpoint within ``delta`` of the best (a near-best ensemble).
        keep_every_n_epochs: Also keep epochs n-1, 2n-1, ... (0-based), whatever their score.
        save_last: Keep a rolling ``last`` checkpoint for resuming (``True`` or ``"link"``; both
            hard-link it to a kept file holding the same state instead of writing it twice).
        patience: Evaluations without improvement before :attr:`should_stop` is True.
        filename: Template for kept files; ``{epoch}``, ``{step}``, ``{monitor}``, ``{score}`` and
            any logged metric (``{val_loss:.3f}``, ``{val/loss:.3f}``) may appear.
        baseline: A score must beat this to be best or kept (Keras's
            ``initial_value_threshold``); a resumed run's best replaces it.
        resume: Continue the run whose manifest is in ``dirpath`` (a new run when there is none).
        overwrite: Delete the files another run's manifest lists in ``dirpath`` and start afresh.
        trackers: ``"auto"`` (a W&B or MLflow run already active), ``"wandb"``, ``"mlflow"``, or
            objects with ``on_save``/``on_evict``/``on_end`` (see :class:`bestsave.Tracker`).
        async_write: Write in a background thread (``Staged`` writers only): the training loop
            pays for a snapshot in host memory. False writes everything before ``step`` returns.
        on_write_error: ``"raise"`` (default) stops training with the write's error; ``"warn"``
            warns and trains on. Either way the previous best stays intact.
        extension: Appended to every file name (adapters pass their format's, e.g. ``".ckpt"``).
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
        monitor: str,
        mode: Literal["min", "max", "auto"] | str = "auto",
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
        baseline: float | None = None,
        async_write: bool = True,
        on_write_error: Literal["raise", "warn"] = "raise",
        extension: str = "",
        writer: bool = True,
        framework: str | None = None,
        hparams: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be the name of a logged metric, not {monitor!r}")
        if save_last not in (False, True, "link"):
            raise ValueError(f"save_last must be False, True or 'link', not {save_last!r}")
        if extension == ".json":
            raise ValueError("extension '.json' is reserved for the sidecar records")
        if on_write_error not in ("raise", "warn"):
            raise ValueError(f"on_write_error must be 'raise' or 'warn', not {on_write_error!r}")
        check_template(filename)
        self.async_write = bool(async_write)
        self.on_write_error = on_write_error
        self.monitor = Monitor(monitor, resolve_mode(monitor, mode), min_delta)
        self.policy = Policy(self.monitor, top_k, delta, keep_every_n_epochs, patience, baseline)
        self.save_last = save_last
        self.filename = filename
        self.extension = extension
        self.writer = writer
        self.trackers = resolve_trackers(trackers) if writer else []
        self._store: Store = open_store(dirpath, **dict(storage_options or {}))
        self.dirpath = self._store.url

        self._state = PolicyState()
        self._evaluations = 0
        self._kept: list[Record] = []
        self._last: Record | None = None
        self._history_bytes = 0
        self._warned: set[str] = set()
        self._ended_best: str | None = ""
        self._pending: dict[str, str] = {}
        self._evicting: list[str] = []
        started_ts, started = _now()
        self._run = runinfo.collect(framework, dict(hparams or {}), started)
        self._run["started_ts"] = started_ts
        self._taken: set[str] = set()
        self._last_epoch: int | None = None
        if writer:
            self._open(resume=resume, overwrite=overwrite)

    # -- public state ---------------------------------------------------------------------

    @property
    def best(self) -> Record | None:
        """Record of the best checkpoint, or None."""
        best_id = self._state.best_id
        return next((r for r in self._kept if r.id == best_id and r.kind in _RANKED), None)

    @property
    def kept(self) -> list[Record]:
        """Records kept now, best first; periodic and exception ones after, by epoch."""
        return sorted(self._kept, key=self._order)

    @property
    def last(self) -> Record | None:
        """Record of the rolling ``last`` checkpoint, or None."""
        return self._last

    @property
    def should_stop(self) -> bool:
        """Patience is exhausted: this many evaluations passed without improvement."""
        return self.policy.patience is not None and (
            self._state.since_improvement >= self.policy.patience
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

    def _order(self, r: Record) -> tuple[int, float, int]:
        if r.kind in _RANKED and r.score is not None:
            return (0, self.monitor.rank_key(r.score), r.id)
        return (1, float(r.epoch), r.id)

    # -- opening a directory ----------------------------------------------------------------

    def _open(self, resume: bool, overwrite: bool) -> None:
        store = self._store
        manifest = read_manifest(store)
        if manifest is not None and resume:
            if manifest.monitor != self.monitor.name or manifest.mode != self.monitor.mode:
                raise ValueError(
                    f"cannot resume the run in {self.dirpath}: it monitors {manifest.monitor!r} "
                    f"({manifest.mode}), this saver {self.monitor.name!r} ({self.monitor.mode}); "
                    "use the same monitor and mode, or another directory"
                )
            self._restore(manifest)
            self._recover(manifest)
        elif manifest is not None and overwrite:
            for name in self._names_of(manifest):
                store.delete(name)
            store.delete(HISTORY)
            store.delete(MANIFEST)
        elif manifest is not None:
            best = manifest.best
            what = (
                f"its best is {best.name} ({manifest.monitor}={best.score})"
                if best
                else ("it has kept no best yet")
            )
            raise RunExistsError(
                f"{self.dirpath} holds run {manifest.run.get('id', '?')} started "
                f"{manifest.run.get('started', '?')} on {manifest.run.get('host', '?')}; {what}. "
                "Pass resume=True to continue it, overwrite=True to replace it, "
                "or choose another directory."
            )
        for name in store.names():
            if name.startswith(TMP_PREFIX):
                store.delete(name)
        self._taken = {n for n in store.names()}

    def _names_of(self, manifest: Manifest) -> list[str]:
        names = []
        for r in manifest.kept:
            names += [r.name, sidecar_name(r.name, self._ext_of(manifest))]
        if manifest.last:
            names.append(manifest.last.name)
        names += list(manifest.pending.values()) + manifest.evicting
        return names

    @staticmethod
    def _ext_of(manifest: Manifest) -> str:
        return str(manifest.policy.get("extension", ""))

    def _restore(self, manifest: Manifest) -> None:
        state = manifest.state
        self._state = PolicyState.from_dict(state.get("policy", {}))
        self._evaluations = int(state.get("evaluations", 0))
        self._last_epoch = state.get("last_epoch")
        self._history_bytes = int(state.get("history_bytes", 0))
        self._warned = set(state.get("warned", []))
        self._kept = [replace(r, path=join(self.dirpath, r.name)) for r in manifest.kept]
        self._last = manifest.last
        run = dict(manifest.run)
        run["resumes"] = int(run.get("resumes", 0)) + 1
        self._run = run

    def _recover(self, manifest: Manifest) -> None:
        """Finish what a crash interrupted: the manifest is the truth, files follow it."""
        store = self._store
        for final, tmp in manifest.pending.items():
            if store.exists(tmp):
                store.rename(tmp, final)
        for name in manifest.evicting:
            store.delete(name)
        for r in self._kept:
            side = sidecar_name(r.name, self.extension)
            if not store.exists(side):
                store.write_text(side, self._sidecar_text(r))
        store.truncate(HISTORY, self._history_bytes)

    # -- one evaluation ----------------------------------------------------------------------

    def step(
        self,
        epoch: int,
        metrics: Mapping[str, Any],
        write: Writer | None = None,
        *,
        step: int | None = None,
        write_last: Writer | None = None,
    ) -> Decision:
        """Judge one evaluation and keep, evict and record as the policy decides.

        Args:
            epoch: The epoch just evaluated (0-based).
            metrics: Everything logged at this evaluation; must hold the monitored metric.
            write: Writes the checkpoint to the local path it is given. Called only when a file
                is kept, at most once per evaluation.
            step: The global step, recorded with the evaluation.
            write_last: Writes the ``last`` checkpoint when it differs from ``write``'s (e.g. kept
                files hold weights only); by default ``last`` holds what ``write`` writes.
        """
        if self.monitor.name not in metrics:
            raise MissingMetricError(self.monitor.name, [str(k) for k in metrics])
        score, reason = as_score(metrics[self.monitor.name])
        if reason in ("nan", "inf", "not a number"):
            self._warn_once(
                reason,
                f"{self.monitor.name} is {metrics[self.monitor.name]!r} at epoch {epoch}: "
                "invalid scores are never best nor kept for their score",
            )
        ts, now = _now()
        clean = clean_metrics(metrics)
        id = self._evaluations
        verdict, state = self.policy.decide(self._state, id, epoch, score)

        base = Record(
            path="",
            kind="",
            epoch=int(epoch),
            step=step,
            monitor=self.monitor.name,
            mode=self.monitor.mode,
            score=score,
            metrics=clean,
            time=now,
            elapsed_s=round(ts - float(self._run.get("started_ts", ts)), 3),
            run=self._public_run(),
            id=id,
        )
        by_id = {r.id: r for r in self._kept if r.kind in _RANKED}
        evicted = tuple(by_id[i] for i in verdict.evict if i in by_id)
        taken = self._taken - {n for r in evicted for n in self._files_of(r)}
        fields = {
            **clean,
            "epoch": int(epoch),
            "step": step,
            "monitor": sanitize(self.monitor.name),
            "score": score,
        }

        new: list[Record] = []
        if verdict.keep:
            new.append(self._named(replace(base, kind=verdict.keep), fields, taken))
        if verdict.periodic:
            new.append(self._named(replace(base, kind="periodic"), fields, taken))
        last = (
            replace(base, kind="last", path=join(self.dirpath, "last" + self.extension))
            if (self.save_last)
            else None
        )
        if (new or last) and write is None:
            raise TypeError("step() must be given write= to save a checkpoint at this evaluation")

        if self.writer:
            new, last = self._write(new, last, write, write_last)
            self._commit(base, verdict.is_best, new, last, evicted, state)
        self._state = state
        self._evaluations += 1
        self._last_epoch = int(epoch)
        self._kept = [r for r in self._kept if r not in evicted] + new
        self._taken = taken | {n for r in new for n in self._files_of(r)}
        if last is not None:
            self._last = last
        if self.writer:
            for r in evicted:
                notify(self.trackers, "on_evict", r)
            for r in new:
                notify(self.trackers, "on_save", r, r.path)
        ranked = next((r for r in new if r.kind in _RANKED), None)
        return Decision(
            is_best=verdict.is_best,
            saved=bool(new),
            record=ranked or (new[0] if new else None),
            evicted=evicted,
            should_stop=verdict.should_stop,
            score=score,
            records=tuple(new),
        )

    def _named(self, record: Record, fields: dict[str, Any], taken: set[str]) -> Record:
        stem = render(self.filename, fields)
        if record.kind == "periodic":  # the same epoch may also be kept for its score
            stem += "-periodic"
        name = unique_name(stem, self.extension, taken)
        taken |= {name, sidecar_name(name, self.extension)}
        return replace(record, path=join(self.dirpath, name))

    def _files_of(self, r: Record) -> tuple[str, str]:
        return r.name, sidecar_name(r.name, self.extension)

    def _write(
        self,
        new: list[Record],
        last: Record | None,
        write: Writer | None,
        write_last: Writer | None,
    ) -> tuple[list[Record], Record | None]:
        """Write every new file under a temporary name, each distinct content once.

        Files with the same content (a best that is also periodic, ``last`` beside a kept file)
        are hard links to one written file. Returns the records with size and sha256 filled in.
        """
        store = self._store
        written: list[str] = []
        self._pending = {}
        source: tuple[str, tuple[int, str]] | None = None  # what ``write`` wrote, and its digest

        def produce(name: str, writer: Writer, reuse: bool) -> tuple[int, str]:
            nonlocal source
            if reuse and source is not None:
                tmp, digest = tmp_name(name), source[1]
                store.link(source[0], tmp)
            else:
                tmp, digest = self._write_one(name, writer)
                if reuse:
                    source = (tmp, digest)
            written.append(tmp)
            self._pending[name] = tmp
            return digest

        try:
            out = [self._with_digest(r, produce(r.name, write, True)) for r in new]  # type: ignore[arg-type]
            if last is not None:
                same = write_last is None
                last = self._with_digest(
                    last,
                    produce(last.name, write if same else write_last, same),  # type: ignore[arg-type]
                )
        except BaseException:
            for tmp in written:
                store.delete(tmp)
            self._pending = {}
            raise
        return out, last

    @staticmethod
    def _with_digest(r: Record, digest: tuple[int, str]) -> Record:
        return replace(r, bytes=digest[0], sha256=digest[1])

    def _write_one(self, name: str, write: Writer) -> tuple[str, tuple[int, str]]:
        tmp = tmp_name(name)
        local = self._store.scratch(tmp)
        try:
            write(local)
            if not os.path.exists(local):
                raise FileNotFoundError(f"write() was given {local} but wrote no file there")
            digest = file_digest(local)
            self._store.publish(local, tmp)
        except BaseException:
            if os.path.exists(local):
                os.unlink(local)
            raise
        return tmp, digest

    def _commit(
        self,
        base: Record,
        is_best: bool,
        new: list[Record],
        last: Record | None,
        evicted: tuple[Record, ...],
        state: PolicyState,
    ) -> None:
        """History line, then the manifest (the commit point), then renames and deletions."""
        store = self._store
        decision = {
            "saved": bool(new),
            "is_best": is_best,
            "kind": [r.kind for r in new],
            "files": [r.name for r in new],
            "evicted": [r.name for r in evicted],
        }
        line = {
            "epoch": base.epoch,
            "step": base.step,
            "time": base.time,
            "elapsed_s": base.elapsed_s,
            "score": base.score,
            "metrics": base.metrics,
            "decision": decision,
        }
        self._history_bytes = store.append_text(
            HISTORY, json.dumps(line, default=str, allow_nan=False) + "\n"
        )
        evicting = [n for r in evicted for n in self._files_of(r)]
        kept = [r for r in self._kept if r not in evicted] + new
        self._write_manifest(
            kept, last or self._last, state, self._evaluations + 1, base.epoch, evicting
        )
        self._finish(new, evicting)

    def _write_manifest(
        self,
        kept: list[Record],
        last: Record | None,
        state: PolicyState,
        evaluations: int,
        last_epoch: int | None,
        evicting: list[str],
    ) -> None:
        manifest = Manifest(
            dirpath=self.dirpath,
            run=self._run,
            monitor=self.monitor.name,
            mode=self.monitor.mode,
            policy=self._policy_dict(),
            kept=sorted(kept, key=self._order),
            best_name=next(
                (r.name for r in kept if r.id == state.best_id and r.kind in _RANKED), None
            ),
            last=last,
            state={
                "policy": state.to_dict(),
                "evaluations": evaluations,
                "last_epoch": last_epoch,
                "history_bytes": self._history_bytes,
                "warned": sorted(self._warned),
            },
            pending=dict(self._pending),
            evicting=evicting,
        )
        self._store.write_text(MANIFEST, manifest.to_json())

    def _finish(self, new: list[Record], evicting: list[str]) -> None:
        """After the manifest is durable: files into place, sidecars, then deletions."""
        store = self._store
        for final, tmp in self._pending.items():
            store.rename(tmp, final)
        for r in new:
            store.write_text(sidecar_name(r.name, self.extension), self._sidecar_text(r))
        for name in evicting:
            store.delete(name)
        store.sync()
        self._pending = {}

    def _sidecar_text(self, r: Record) -> str:
        return json.dumps(r.to_dict(), indent=1, default=str, allow_nan=False) + "\n"

    def _policy_dict(self) -> dict[str, Any]:
        p = self.policy
        return {
            "min_delta": self.monitor.min_delta,
            "top_k": p.top_k,
            "delta": p.delta,
            "keep_every_n_epochs": p.keep_every_n_epochs,
            "patience": p.patience,
            "baseline": p.baseline,
            "save_last": self.save_last,
            "filename": self.filename,
            "extension": self.extension,
        }

    def _public_run(self) -> dict[str, Any]:
        return {k: v for k, v in self._run.items() if k != "started_ts"}

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(message, BestSaveWarning, stacklevel=3)

    # -- the rest ------------------------------------------------------------------------------

    def save_exception(
        self,
        epoch: int,
        write: Writer,
        metrics: Mapping[str, Any] | None = None,
        step: int | None = None,
    ) -> Record | None:
        """Keep a checkpoint of the state at an exception (kind ``exception``), outside the
        policy: it never counts as best and is never evicted."""
        if not self.writer:
            return None
        ts, now = _now()
        clean = clean_metrics(metrics or {})
        record = Record(
            path="",
            kind="exception",
            epoch=int(epoch),
            step=step,
            monitor=self.monitor.name,
            mode=self.monitor.mode,
            score=None,
            metrics=clean,
            time=now,
            elapsed_s=round(ts - float(self._run.get("started_ts", ts)), 3),
            run=self._public_run(),
            id=self._evaluations,
        )
        fields = {
            **clean,
            "epoch": int(epoch),
            "step": step,
            "monitor": sanitize(self.monitor.name),
            "score": None,
        }
        taken = set(self._taken)
        name = unique_name(render("exception-epoch={epoch:03d}", fields), self.extension, taken)
        record = replace(record, path=join(self.dirpath, name))
        [record], _ = self._write([record], None, write, None)
        self._kept.append(record)
        self._taken |= set(self._files_of(record))
        self._write_manifest(
            self._kept, self._last, self._state, self._evaluations, self._last_epoch, []
        )
        self._finish([record], [])
        return record

    def close(self) -> None:
        """Flush: wait for pending writes and tell trackers the run's best. Safe to repeat."""
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
