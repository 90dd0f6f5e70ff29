"""PyTorch Lightning: ``BestCheckpoint``, a drop-in superset of ``ModelCheckpoint``.

Swap the class and change nothing else: the Trainer takes it as its checkpoint callback,
``ckpt_path="best"`` and ``ckpt_path="last"`` resolve to its files, loggers read the attributes
they know (``best_model_path``, ``best_k_models``, ...). Every decision (what to keep, what to
evict, when to stop) is made by :class:`bestsave.BestSaver`, and every kept checkpoint carries
everything logged at its epoch.

Example:
    >>> import lightning as L  # doctest: +SKIP
    >>> from bestsave.adapters.lightning import BestCheckpoint
    >>> checkpoint = BestCheckpoint(monitor="val_f1", mode="max", save_top_k=3, delta=0.01,
    ...                             patience=10, save_last=True)
    >>> trainer = L.Trainer(max_epochs=50, callbacks=[checkpoint])  # doctest: +SKIP
    >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
    >>> trainer.test(ckpt_path="best")  # doctest: +SKIP
    >>> checkpoint.best_record.metrics["val_f1"], checkpoint.best_record.epoch  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import string
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple
from weakref import proxy

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import WarningCache, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT

from bestsave import BestSaver, Decision, MissingMetricError, Record, Staged
from bestsave.metrics import as_number
from bestsave.monitor import resolve_mode
from bestsave.naming import sanitize
from bestsave.policy import Smooth
from bestsave.saver import Writer, check_options
from bestsave.staging import Snapshot, Stager

__all__ = ["BestCheckpoint"]

_RANKED = ("best", "top_k", "ensemble")
_LISTEN: tuple[str, Any] = ("", None)  # what ranks other than 0 pass to a broadcast they receive
_warning_cache = WarningCache()


class _View(NamedTuple):
    """What every rank needs to know after an evaluation: global rank 0's saver, in brief."""

    decision: Decision | None
    best: Record | None
    kept: list[Record]
    last: Record | None


class BestCheckpoint(ModelCheckpoint):
    """Keeps the best checkpoints of a Lightning run; a drop-in for ``ModelCheckpoint``.

    Takes ``ModelCheckpoint``'s arguments with their meaning, and bestsave's options.

    Args:
        dirpath: Directory for checkpoints (a local path or an fsspec URL). By default the first
            logger's ``save_dir/name/version/checkpoints``, else ``default_root_dir/checkpoints``.
        filename: File name template, as in Lightning: ``"{epoch}-{val_loss:.2f}"`` (metric
            names with ``/`` work and never make folders). Default ``"{epoch}-{step}"``.
        monitor: The logged metric that decides. ``None`` keeps the latest checkpoints, as
            ``ModelCheckpoint`` does. A list keeps a best (or top-k) for each metric in one
            directory; ``best_model_path`` and the other attributes follow the first.
        verbose: Log every evaluation's outcome, in Lightning's words.
        save_last: ``True`` or ``"link"``: a rolling ``last.ckpt`` with the full training state,
            written at every evaluation (a hard link to a kept file holding the same state).
        save_top_k: Keep the k best (-1: every valid score, 0: none). Default 1, or no cap when
            ``delta`` is set (with ``delta`` it caps the ensemble).
        save_on_exception: Keep a checkpoint (``exception-epoch=NNN.ckpt``) when training raises.
        save_weights_only: Kept files hold the weights alone; ``last.ckpt`` keeps the full
            training state so a run can always resume.
        mode: ``"min"``, ``"max"``, or ``"auto"`` (from the metric's name: ``val_loss`` is min,
            ``val_acc`` max; a name it cannot read raises and asks for ``mode``).
        auto_insert_metric_name: ``"{epoch}"`` becomes ``"epoch=3"``, as in Lightning.
        every_n_train_steps: Evaluate every n training steps.
        train_time_interval: Evaluate when this much time has passed since the last evaluation.
        every_n_epochs: Evaluate every n epochs (default 1 when no other trigger is set; 0 never).
        save_on_train_epoch_end: Evaluate at the end of the training epoch (``True``) or of
            validation (``False``); by default Lightning's rule picks.
        enable_version_counter: Accepted for compatibility. bestsave never overwrites a kept
            file: a name already taken always gets ``-v1``, ``-v2``.
        min_delta: An improvement must beat the best by more than this.
        delta: Keep every checkpoint within ``delta`` of the best (a near-best ensemble).
        patience: Stop training (``trainer.should_stop``) after this many evaluations without
            improvement.
        keep_every_n_epochs: Also keep epochs n-1, 2n-1, ... (0-based), whatever their score.
        resume: Continue the run whose manifest is in ``dirpath``. Resuming a fit from a
            checkpoint this callback wrote (``trainer.fit(ckpt_path=...)``) continues its run
            without it.
        overwrite: Delete the files another run's manifest lists in ``dirpath`` and start afresh.
        trackers: ``"auto"`` (a W&B or MLflow run already active, e.g. a ``WandbLogger``'s),
            ``"wandb"``, ``"mlflow"``, or tracker objects told of every kept checkpoint.
        baseline: A score must beat this to be best or kept.
        smooth: Judge on a smoothed score: ``N`` (mean of the last N) or ``("ema", alpha)``.
        tie_break: A metric (or ``(name, mode)``) that decides ties within ``min_delta``.
        warmup: Epochs before this are never best nor kept for their score.
        async_write: Write checkpoints in a background thread where the strategy allows.
        on_write_error: ``"raise"`` stops training with a write's error; ``"warn"`` trains on.
        storage_options: fsspec options for a remote ``dirpath``.

    Attributes:
        best_model_path, best_model_score, best_k_models, kth_best_model_path, kth_value,
        last_model_path, current_score: as in ``ModelCheckpoint`` (scores are tensors).
        best_record: The :class:`bestsave.Record` of the best checkpoint: epoch, step, score,
            every metric logged at that evaluation, hyperparameters.

    Checkpoints are Lightning checkpoints: they load with ``Model.load_from_checkpoint`` and
    resume with ``trainer.fit(ckpt_path=...)``. Beside them bestsave writes ``bestsave.json``
    (the manifest), ``history.jsonl`` and one ``.json`` record per checkpoint. Strategies whose
    checkpoints are single files work (single device, DDP, FSDP with ``state_dict_type="full"``);
    sharded checkpoint directories (DeepSpeed, sharded FSDP) are refused at setup.
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        filename: str | None = None,
        monitor: str | Sequence[str] | None = None,
        verbose: bool = False,
        save_last: bool | Literal["link"] | None = None,
        save_top_k: int | None = None,
        save_on_exception: bool = False,
        save_weights_only: bool = False,
        mode: Literal["min", "max", "auto"] = "auto",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
        *,
        min_delta: float = 0.0,
        delta: float | None = None,
        patience: int | None = None,
        keep_every_n_epochs: int | None = None,
        resume: bool = False,
        overwrite: bool = False,
        trackers: str | Sequence[Any] = "auto",
        baseline: float | None = None,
        smooth: Smooth = None,
        tie_break: str | tuple[str, str] | None = None,
        warmup: int = 0,
        async_write: bool = True,
        on_write_error: Literal["raise", "warn"] = "raise",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if save_top_k is not None and (
            isinstance(save_top_k, bool) or not isinstance(save_top_k, int)
        ):
            raise ValueError(f"save_top_k must be an int >= -1 or None, not {save_top_k!r}")
        # Without a monitor, ModelCheckpoint keeps the latest checkpoints: the same as monitoring
        # the global step, higher is better.
        # Several monitors each keep their best; Lightning's attributes follow the first.
        self._monitors = (
            ["step"]
            if monitor is None
            else [monitor]
            if isinstance(monitor, str)
            else list(monitor)
        )
        self._monitor_name = self._monitors[0]
        resolved_mode = "max" if monitor is None else resolve_mode(self._monitor_name, mode)
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None if monitor is None else self._monitor_name,
            verbose=verbose,
            save_last=save_last,
            save_top_k=_lightning_top_k(save_top_k, delta),
            save_on_exception=save_on_exception,
            save_weights_only=save_weights_only,
            mode=resolved_mode,
            auto_insert_metric_name=auto_insert_metric_name,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval,
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end,
            enable_version_counter=enable_version_counter,
        )
        self._top_k = save_top_k
        self._template = self._bestsave_template(filename or "{epoch}-{step}")
        # The core's own checks, now rather than at the first evaluation.
        check_options(
            min_delta=min_delta, top_k=save_top_k, delta=delta,
            keep_every_n_epochs=keep_every_n_epochs, patience=patience,
            save_last=save_last or False, filename=self._template, baseline=baseline,
            smooth=smooth, tie_break=tie_break, warmup=warmup, async_write=async_write,
            on_write_error=on_write_error,
        )  # fmt: skip
        if not enable_version_counter:
            rank_zero_warn(
                "BestCheckpoint(enable_version_counter=False): bestsave never overwrites a kept "
                "checkpoint, so a name already taken still gets a -v1 suffix"
            )
        self.min_delta = min_delta
        self.delta = delta
        self.patience = patience
        self.keep_every_n_epochs = keep_every_n_epochs
        self.resume = resume
        self.overwrite = overwrite
        self.trackers = trackers if isinstance(trackers, str) else list(trackers)
        self.baseline = baseline
        self.smooth = smooth
        self.tie_break = tie_break
        self.warmup = warmup
        self.async_write = async_write
        self.on_write_error = on_write_error
        self.storage_options = dict(storage_options or {})
        self.best_record: Record | None = None

        self._saver: BestSaver | None = None
        self._restored: dict[str, Any] | None = None
        self._staged = True
        self._stager = Stager()
        self._last_global_step_checked = 0  # no evaluation before a training step
        self._defer_until_validation = False

    def _bestsave_template(self, filename: str) -> str:
        """Lightning's ``filename`` as a bestsave template, ``auto_insert_metric_name`` applied.

        >>> BestCheckpoint(monitor="val/loss")._bestsave_template("{epoch:02d}-{val/loss:.2f}")
        'epoch={epoch:02d}-val_loss={val/loss:.2f}'
        """
        parts = []
        for literal, field, spec, conversion in string.Formatter().parse(filename):
            parts.append(literal.replace("{", "{{").replace("}", "}}"))
            if field is None:
                continue
            if self.auto_insert_metric_name:
                # The name enters the file name: "val/loss" must not make a folder.
                parts.append(sanitize(field) + self.CHECKPOINT_EQUALS_CHAR)
            parts.append(
                "{"
                + field
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
        return "".join(parts)

    # -- where and how to write ------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dirpath = trainer.strategy.broadcast(self._resolve_dirpath(trainer))
        if _is_local_file_protocol(dirpath):
            dirpath = os.path.realpath(os.path.expanduser(dirpath))
        self.dirpath = dirpath
        self._fs = get_filesystem(dirpath)
        if stage == "fit":
            _check_single_file_checkpoints(trainer.strategy)

    def _resolve_dirpath(self, trainer: pl.Trainer) -> str:
        """``dirpath``, or where ``ModelCheckpoint`` would put checkpoints."""
        if self.dirpath is not None:
            return os.fspath(self.dirpath)
        if trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            version = logger.version
            version = version if isinstance(version, str) else f"version_{version}"
            return os.path.join(save_dir, str(logger.name), version, "checkpoints")
        return os.path.join(trainer.default_root_dir, "checkpoints")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_time_checked = time.monotonic()
        # Strategies that save the way Strategy does (global rank 0 writes what
        # dump_checkpoint returns, with no collective call) let rank 0 snapshot the state
        # alone and serialize it later; any other strategy saves through
        # trainer.save_checkpoint on every rank.
        strategy = type(trainer.strategy)
        self._staged = all(
            getattr(strategy, name) is getattr(Strategy, name)
            for name in ("save_checkpoint", "lightning_module_state_dict", "optimizer_state")
        ) and not any(
            hasattr(getattr(o, "_optimizer", o), "consolidate_state_dict")
            for o in trainer.optimizers
        )
        if self._staged and trainer.is_global_zero:
            # The first save then copies into buffers allocated while the first epoch trains.
            self._stager.reserve({"state_dict": pl_module.state_dict()})
        if self._saver is not None and self._saver.dirpath == self._store_url():
            return  # a second fit() with this callback continues its run
        self._saver = self._open_saver(trainer, pl_module)
        self._restored = None
        self._apply(self._share(trainer, self._local_view(None)))

    def _store_url(self) -> str:
        path = os.fspath(self.dirpath or "")
        return os.path.abspath(path) if _is_local_file_protocol(path) else path.rstrip("/")

    def _open_saver(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> BestSaver:
        resume = self.resume
        # Only a fit resumed from a checkpoint continues that checkpoint's run; test() and
        # validate() load callback state too.
        restored = self._restored if trainer.ckpt_path is not None else None
        if restored is not None:
            if restored.get("dirpath") == self._store_url():
                resume = True
            else:
                rank_zero_warn(
                    f"The checkpoint being resumed was written by a BestCheckpoint in "
                    f"{restored.get('dirpath')!r}; this one writes to {self.dirpath!r} and starts "
                    "a new run there. Pass dirpath= that directory to continue its run."
                )
        error: BaseException | None = None
        saver = None
        try:
            saver = BestSaver(
                os.fspath(self.dirpath or ""),
                self._monitors,
                mode=self.mode if len(self._monitors) == 1 else _modes(self._monitors, self.mode),
                min_delta=self.min_delta,
                top_k=self._top_k,
                delta=self.delta,
                keep_every_n_epochs=self.keep_every_n_epochs,
                save_last=self.save_last or False,
                patience=self.patience,
                filename=self._template,
                resume=resume,
                overwrite=self.overwrite,
                trackers=self.trackers,
                baseline=self.baseline,
                smooth=self.smooth,
                tie_break=self.tie_break,
                warmup=self.warmup,
                async_write=self.async_write and not _uploads_every_save(trainer),
                on_write_error=self.on_write_error,
                extension=self.FILE_EXTENSION,
                writer=trainer.is_global_zero,
                framework="lightning",
                hparams=_hparams(trainer, pl_module),
                storage_options=self.storage_options,
            )
        except Exception as e:  # every rank must fail, or the others hang at the next collective
            error = e
        if trainer.world_size > 1:
            failed = trainer.strategy.broadcast(repr(error) if error is not None else None)
            if error is None and failed is not None:
                raise RuntimeError(f"global rank 0 could not open {self.dirpath}: {failed}")
        if error is not None:
            raise error
        assert saver is not None
        return saver

    def _writer(self, trainer: pl.Trainer, weights_only: bool, announce: bool) -> Writer | Staged:
        """Writes the checkpoint Lightning would write with ``trainer.save_checkpoint``."""
        if self._staged:
            checkpoint_io = trainer.strategy.checkpoint_io
            if isinstance(checkpoint_io, AsyncCheckpointIO) and checkpoint_io.checkpoint_io:
                # bestsave already writes in the background; the file must exist on return.
                checkpoint_io = checkpoint_io.checkpoint_io
            if type(checkpoint_io) is TorchCheckpointIO:
                # Its save goes through an in-memory copy of the whole file first (a third copy
                # of the state); the file is local and temporary, so torch.save writes it.
                return Staged(
                    lambda: self._capture(trainer, weights_only),
                    lambda snapshot, f: torch.save(snapshot.state, f),
                    stream=True,
                )
            return Staged(
                lambda: self._capture(trainer, weights_only),
                lambda snapshot, path: checkpoint_io.save_checkpoint(snapshot.state, path),
            )

        def write(path: str) -> None:
            if announce and trainer.world_size > 1:
                # The other ranks wait in _follow(); they join this save's collective calls.
                trainer.strategy.broadcast(("save", (path, weights_only)))
            trainer.save_checkpoint(path, weights_only)

        return write

    def _capture(self, trainer: pl.Trainer, weights_only: bool) -> Snapshot:
        with trainer.profiler.profile("save_checkpoint"):  # type: ignore[attr-defined]
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only)
            return self._stager.snapshot(checkpoint)

    # -- when to evaluate --------------------------------------------------------------------

    def _should_skip(self, trainer: pl.Trainer) -> bool:
        return (
            bool(trainer.fast_dev_run)  # type: ignore[attr-defined]
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or self._saver is None
            or self._last_global_step_checked == trainer.global_step  # judged at this step
        )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Evaluate every ``every_n_train_steps`` steps or ``train_time_interval``."""
        if self._should_skip(trainer):
            return
        skip_batch = self._every_n_train_steps < 1 or (
            trainer.global_step % self._every_n_train_steps != 0
        )
        skip_time, now = True, time.monotonic()
        if self._train_time_interval is not None:
            previous = self._last_time_checked
            skip_time = previous is None or (
                now - previous < self._train_time_interval.total_seconds()
            )
            skip_time = trainer.strategy.broadcast(skip_time)  # clocks differ across ranks
        if skip_batch and skip_time:
            return
        if not skip_time:
            self._last_time_checked = now
        # As ModelCheckpoint: a metric only validation logs, or a validation about to run,
        # moves the evaluation to the end of that validation.
        if self._monitor_name not in self._metrics(trainer) or (
            not self._should_save_on_train_epoch_end(trainer) and _validation_follows(trainer)
        ):
            self._defer_until_validation = True
            return
        self._evaluate(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer) or not self._should_save_on_train_epoch_end(trainer):
            return
        if self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0:
            self._evaluate(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer) or self._should_save_on_train_epoch_end(trainer):
            return
        if self._defer_until_validation:
            self._defer_until_validation = False
            self._evaluate(trainer)
        elif self._every_n_epochs >= 1 and (
            (trainer.current_epoch + 1) % self._every_n_epochs == 0
        ):
            self._evaluate(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saver is None:
            return
        # Background writes land before trainer.test(ckpt_path="best") reads them; the records
        # then carry their files' sha256, and loggers that upload checkpoints find every file.
        self._saver.close()
        self._apply(self._share(trainer, self._local_view(None)))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._saver is not None and stage == "fit":
            self._saver.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        saver = self._saver
        if saver is None:
            return
        if (
            self.save_on_exception
            and not trainer.fast_dev_run  # type: ignore[attr-defined]
            and not trainer.sanity_checking
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_exception(trainer, saver, exception)
        try:
            saver.close()
        except Exception as e:  # the training's exception is the one to raise
            rank_zero_warn(f"BestCheckpoint could not finish its pending writes: {e}")

    def _save_exception(
        self, trainer: pl.Trainer, saver: BestSaver, exception: BaseException
    ) -> None:
        # No announcement: an exception may have reached only some ranks. Strategies that save
        # collectively get the call on every rank here, as ModelCheckpoint makes it.
        write = self._writer(trainer, weights_only=False, announce=False)
        metrics = {
            **self._metrics(trainer),
            "exception": f"{type(exception).__name__}: {exception}",
        }
        record = saver.save_exception(
            trainer.current_epoch, write, metrics=metrics, step=trainer.global_step
        )
        if not trainer.is_global_zero and not self._staged:
            trainer.save_checkpoint(os.path.join(os.fspath(self.dirpath or ""), "unused.ckpt"))
        if record is not None:
            rank_zero_info(
                f"An {type(exception).__name__} was raised with message: {exception}, "
                f"saved checkpoint to {record.path}"
            )

    # -- one evaluation ------------------------------------------------------------------------

    def _metrics(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Everything logged, train and validation, as Python numbers."""
        out: dict[str, Any] = {}
        for key, value in {**trainer.logged_metrics, **trainer.callback_metrics}.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue  # not a metric
                out[str(key)] = value.item()
            else:
                out[str(key)] = value
        if self.monitor is None:
            out.setdefault("step", trainer.global_step)
        return out

    def _evaluate(self, trainer: pl.Trainer) -> None:
        saver = self._saver
        assert saver is not None
        self._last_global_step_checked = trainer.global_step
        metrics = self._metrics(trainer)
        if trainer.world_size > 1:
            # Every rank judges rank 0's values: unsynced logging must not split decisions.
            metrics = trainer.strategy.broadcast(metrics)
        missing = next((m for m in self._monitors if m not in metrics), None)
        if missing is not None:
            if not trainer.fit_loop.epoch_loop.val_loop._has_run:
                # As ModelCheckpoint: before any validation, a validation metric may be missing.
                _warning_cache.warn(
                    f"BestCheckpoint(monitor={self._monitor_name!r}) could not find the "
                    f"monitored key in the logged metrics: {sorted(metrics)}. No evaluation "
                    "this time."
                )
                return
            raise MissingMetricError(missing, list(metrics))

        epoch, step = trainer.current_epoch, trainer.global_step
        write = self._writer(trainer, self.save_weights_only, announce=True)
        write_last = self._writer(trainer, False, announce=True) if self.save_weights_only else None
        if trainer.is_global_zero:
            try:
                decision = saver.step(epoch, metrics, write=write, step=step, write_last=write_last)
            except BaseException as e:
                if trainer.world_size > 1:
                    trainer.strategy.broadcast(("error", repr(e)))
                raise
            view = self._local_view(decision)
            if trainer.world_size > 1:
                trainer.strategy.broadcast(("done", view))
        else:
            saver.step(epoch, metrics, write=write, step=step, write_last=write_last)
            view = self._follow(trainer)

        self._apply(view, metrics.get(self._monitor_name))
        outcome = view.decision
        assert outcome is not None
        self._report(trainer, epoch, step, view, metrics[self._monitor_name])
        if outcome.saved or view.last is not None:
            self._last_global_step_saved = step
            self._last_checkpoint_saved = (
                outcome.record.path if outcome.record else view.last.path if view.last else ""
            )
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.after_save_checkpoint(proxy(self))
        if outcome.should_stop:
            trainer.should_stop = True

    def _follow(self, trainer: pl.Trainer) -> _View:
        """On ranks other than 0: join rank 0's saves until it sends what it decided."""
        while True:
            kind, payload = trainer.strategy.broadcast(_LISTEN)
            if kind == "save":
                path, weights_only = payload
                trainer.save_checkpoint(path, weights_only)
            elif kind == "error":
                raise RuntimeError(f"global rank 0 failed to save a checkpoint: {payload}")
            else:
                return payload  # what rank 0 sent: its _View

    def _local_view(self, decision: Decision | None) -> _View:
        saver = self._saver
        assert saver is not None
        return _View(decision, saver.best, saver.kept, saver.last)

    @staticmethod
    def _share(trainer: pl.Trainer, view: _View) -> _View:
        return trainer.strategy.broadcast(view) if trainer.world_size > 1 else view

    def _apply(self, view: _View, current: Any = None) -> None:
        """ModelCheckpoint's attributes, from the saver's state."""
        # With several monitors, ModelCheckpoint's attributes follow the first.
        ranked = [
            r for r in view.kept
            if r.kind in _RANKED and r.score is not None and r.monitor == self._monitor_name
        ]  # fmt: skip
        assert self._saver is not None, "evaluations start after the saver opens"
        self.best_record = view.best
        self.best_model_path = view.best.path if view.best else ""
        self.best_model_score = _tensor(view.best.score) if view.best else None
        self.best_k_models = {r.path: _tensor(r.score) for r in ranked}
        if ranked and len(ranked) >= self._saver.policy.cap:
            self.kth_best_model_path = ranked[-1].path
            self.kth_value = _tensor(ranked[-1].score)
        else:
            self.kth_best_model_path = ""
            self.kth_value = _tensor(self._saver.monitor.worst_value)
        self.last_model_path = view.last.path if view.last else ""
        number = as_number(current)
        if number is not None:
            self.current_score = _tensor(number)

    def _report(self, trainer: pl.Trainer, epoch: int, step: int, view: _View, value: Any) -> None:
        decision = view.decision
        assert decision is not None
        name = self._monitor_name
        prefix = f"Epoch {epoch:d}, global step {step:d}: {name!r}"
        if self.verbose:
            if decision.score is None:
                rank_zero_info(f"{prefix} is {value!r}, not a valid score")
            elif decision.record is not None:
                best = view.best.score if view.best else decision.score
                rank_zero_info(
                    f"{prefix} reached {decision.score:0.5f} (best {best:0.5f}), saving model "
                    f"to {decision.record.path!r} as {self._why(decision.record.kind)}"
                )
            elif self.delta is not None:
                rank_zero_info(f"{prefix} was not within {self.delta} of the best")
            else:
                rank_zero_info(f"{prefix} was not in top {self.save_top_k}")
        if decision.should_stop and not trainer.should_stop:
            kept = view.best.score if view.best else None
            best_text = f" (best {kept:0.5f})" if kept is not None else ""
            rank_zero_info(
                f"{prefix} did not improve in the last {self.patience} evaluations{best_text}. "
                "Signaling Trainer to stop."
            )

    def _why(self, kind: str) -> str:
        if kind == "ensemble" or (kind == "best" and self.delta is not None):
            return f"a member of the delta-ensemble (within {self.delta} of the best)"
        if kind == "periodic":
            return f"every {self.keep_every_n_epochs} epochs"
        return f"top {self.save_top_k}"

    # -- resuming -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        saver = self._saver
        state["bestsave"] = {
            "dirpath": saver.dirpath if saver else self.dirpath and self._store_url(),
            "run": saver.run.get("id") if saver else None,
            "evaluations": saver.evaluations if saver else 0,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the run to continue; the saver restores it from its manifest at train start.

        Called when a fit resumes from a checkpoint, and when ``validate``/``test`` load one:
        a run already open keeps its state (the manifest is the truth).
        """
        if self._saver is None:
            self._restored = state_dict.get("bestsave")

    @property
    def saver(self) -> BestSaver | None:
        """The :class:`bestsave.BestSaver` making the decisions, once training has started."""
        return self._saver

    @property
    def kept(self) -> list[Record]:
        """Records of the checkpoints kept now, best first (empty before training)."""
        return self._saver.kept if self._saver is not None else []


def _modes(monitors: Sequence[str], mode: str) -> list[str]:
    """One mode per monitor: the given one for the first, the others from their names."""
    return [mode] + ["auto"] * (len(monitors) - 1)


def _lightning_top_k(save_top_k: int | None, delta: float | None) -> int:
    """``save_top_k`` as ModelCheckpoint and the loggers read it."""
    if save_top_k is not None:
        return save_top_k
    return 1 if delta is None else -1


def _tensor(value: Any) -> torch.Tensor:
    return torch.tensor(float(value))


def _hparams(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """The module's hyperparameters over the datamodule's, as Lightning logs them."""
    hparams: dict[str, Any] = {}
    datamodule = trainer.datamodule  # type: ignore[attr-defined]
    if datamodule is not None:
        hparams.update(dict(datamodule.hparams))
    hparams.update(dict(pl_module.hparams))
    return {str(k): _plain(v) for k, v in hparams.items()}


def _plain(value: Any) -> Any:
    """``value`` as strict JSON holds it: non-finite floats and other objects as text."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float)):
        return value
    return str(value)


def _uploads_every_save(trainer: pl.Trainer) -> bool:
    """A logger uploads each checkpoint when told of it (``WandbLogger(log_model="all")``,
    ``MLFlowLogger(log_model="all")``): the file must be on disk by then, not in a background
    write."""
    return any(getattr(logger, "_log_model", None) == "all" for logger in trainer.loggers)


def _validation_follows(trainer: pl.Trainer) -> bool:
    """The batch just ended is the epoch's last and validation runs after it."""
    if not getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False):
        return False
    if not getattr(trainer, "enable_validation", False):
        return False
    batches = trainer.num_val_batches
    if not (sum(batches) if isinstance(batches, list) else batches):
        return False
    every = trainer.check_val_every_n_epoch
    return every is None or (trainer.current_epoch + 1) % every == 0


def _check_single_file_checkpoints(strategy: Strategy) -> None:
    """Refuse strategies that save a directory of shards: a kept checkpoint is one file."""
    if isinstance(strategy, DeepSpeedStrategy):
        what = "DeepSpeedStrategy saves a directory of shards"
        fix = "convert with DeepSpeed's zero_to_fp32 after training, or use FSDP"
    elif getattr(strategy, "_state_dict_type", "full") == "sharded":
        what = "FSDPStrategy(state_dict_type='sharded') saves a directory of shards"
        fix = "use FSDPStrategy(state_dict_type='full')"
    elif getattr(strategy, "_save_distributed_checkpoint", False):
        what = f"{type(strategy).__name__} saves a distributed checkpoint directory"
        fix = "pass save_distributed_checkpoint=False to the strategy"
    else:
        return
    raise ValueError(f"BestCheckpoint keeps single-file checkpoints, but {what}; {fix}.")
