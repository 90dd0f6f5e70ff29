"""PyTorch Lightning: ``BestCheckpoint``, a drop-in superset of ``ModelCheckpoint``.

Swap the class and change nothing else: the Trainer takes it as its checkpoint callback,
``ckpt_path="best"`` and ``ckpt_path="last"`` resolve to its files, loggers read the attributes
they know (``best_model_path``, ``best_k_models``, ...). ``ModelCheckpoint``'s own hooks decide
*when* to evaluate (every epoch, every n steps, after validation, before a manual optimiser
step); :class:`bestsave.BestSaver` decides *what* to keep, evict and when to stop, and every kept
checkpoint carries everything logged at its epoch.

Sharded strategies (``FSDPStrategy(state_dict_type="sharded")``, ``ModelParallelStrategy``) keep
folders of shards that every process writes in the background, in the layout the strategy itself
loads: ``ckpt_path="best"`` and resuming go through Lightning.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple
from weakref import proxy

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import (
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    Strategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import WarningCache, rank_zero_info, rank_zero_warn
from typing_extensions import Unpack

from bestsave import (
    BestSaver,
    Decision,
    MissingMetricError,
    Options,
    Record,
    SaverOptions,
    Sharded,
    Staged,
)
from bestsave.adapters.torch import ShardGroup, save_shards
from bestsave.layout import run_name
from bestsave.metrics import as_number
from bestsave.monitor import infer_mode
from bestsave.naming import sanitize
from bestsave.options import monitor_names
from bestsave.pipeline import Writer
from bestsave.staging import Snapshot, Stager
from bestsave.store import Parts

__all__ = ["BestCheckpoint", "MonitorNotLoggedError"]

_LISTEN: tuple[str, Any] = ("", None)  # what ranks other than 0 pass to a broadcast they receive
_warning_cache = WarningCache()


class MonitorNotLoggedError(MisconfigurationException, MissingMetricError):
    """A monitored metric is not logged: Lightning's error, which names what was logged."""


class _View(NamedTuple):
    """What every rank needs to know after a save: global rank 0's saver, in brief."""

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
            written at every evaluation (so that a fit resumed from it replays none) and at the
            end of training, as a hard link to the checkpoint saved at the same step when that
            holds the same state.
        save_top_k: Keep the k best (-1: every valid score, 0: none). Default 1, or no cap when
            ``delta`` is set (with ``delta`` it caps the ensemble).
        save_on_exception: Keep a checkpoint named by ``filename`` when training raises.
        save_weights_only: Kept files hold the weights alone.
        mode: ``"min"``, ``"max"``, or ``"auto"`` (from the metric's name: ``val_loss`` is min,
            ``val_acc`` max; a name it cannot read is min, Lightning's default, with a warning).
        auto_insert_metric_name: ``"{epoch}"`` becomes ``"epoch=3"``, as in Lightning.
        every_n_train_steps: Evaluate every n training steps.
        train_time_interval: Evaluate when this much time has passed since the last evaluation.
        every_n_epochs: Evaluate every n epochs (default 1 when no other trigger is set; 0 never).
        save_on_train_epoch_end: Evaluate at the end of the training epoch (``True``) or of
            validation (``False``); by default Lightning's rule picks.
        enable_version_counter: A name another file already holds gets ``-v1``, ``-v2``; with
            False the new checkpoint replaces that file, as in Lightning.
        **options: bestsave's options (:class:`bestsave.Options`, each described on
            :class:`bestsave.SaverOptions`): ``delta``, ``patience`` (stops training through
            ``trainer.should_stop``), ``min_delta``, ``keep_every_n_epochs``, ``smooth``,
            ``tie_break``, ``warmup``, ``baseline``, ``trackers`` (``"auto"`` follows a
            ``WandbLogger``'s run), ``async_write``, ``on_write_error``, ``storage_options``.
            ``resume=True`` continues the run in ``dirpath``; a fit resumed from a checkpoint
            this callback wrote (``trainer.fit(ckpt_path=...)``) continues its run without it.
            Otherwise a new fit starts a new run there, replacing the earlier run's files once
            it has kept its first checkpoint (with a warning naming that run).

    Attributes:
        best_model_path, best_model_score, best_k_models, kth_best_model_path, kth_value,
        last_model_path, current_score: as in ``ModelCheckpoint`` (scores are tensors).
        best_record: The :class:`bestsave.Record` of the best checkpoint: epoch, step, score,
            every metric logged at that evaluation, hyperparameters.

    Checkpoints are Lightning checkpoints: they load with ``Model.load_from_checkpoint`` and
    resume with ``trainer.fit(ckpt_path=...)``. bestsave's own records (the manifest, the
    history and one record per checkpoint) are in ``dirpath/.bestsave/<run>/``, the run named
    after ``filename`` and the monitor.

    Under ``FSDPStrategy(state_dict_type="sharded")`` and ``ModelParallelStrategy`` (with its
    default ``save_distributed_checkpoint=True``) a checkpoint is the folder the strategy would
    write (``torch.distributed.checkpoint`` shards and ``meta.pt``): every process copies its
    shards to host memory and writes them in the background, and the folder is committed once
    every process's parts are on disk, so ``dirpath`` must be a directory every process can
    write (a local or shared file system). Their full state dicts are single files.
    ``DeepSpeedStrategy`` is refused at setup.
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
        **options: Unpack[Options],
    ) -> None:
        if "top_k" in options:
            raise TypeError("BestCheckpoint takes ModelCheckpoint's save_top_k, not top_k")
        if save_top_k is not None and (
            isinstance(save_top_k, bool) or not isinstance(save_top_k, int)
        ):
            raise ValueError(f"save_top_k must be an int >= -1 or None, not {save_top_k!r}")
        # Without a monitor, ModelCheckpoint keeps the latest checkpoints: the same as monitoring
        # the global step, higher is better. Several monitors each keep their best;
        # Lightning's attributes follow the first.
        self._monitors = ["step"] if monitor is None else list(monitor_names(monitor))
        self._monitor_name = self._monitors[0]
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None if monitor is None else self._monitor_name,
            verbose=verbose,
            save_last=save_last,
            save_top_k=_lightning_top_k(save_top_k, options.get("delta")),
            save_on_exception=save_on_exception,
            save_weights_only=save_weights_only,
            mode=_mode(self._monitor_name, mode) if monitor else _unused_mode(mode),
            auto_insert_metric_name=auto_insert_metric_name,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval,
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end,
            enable_version_counter=enable_version_counter,
        )
        # The rest of the saver's options, checked now rather than at the first evaluation.
        self.options = SaverOptions.of(
            monitor=self._monitors,
            # Without a monitor, the latest checkpoints: the highest step.
            mode=[self.mode if monitor else "max", *map(_mode, self._monitors[1:])],
            top_k=save_top_k,
            # last follows every evaluation (not only saves, as in ModelCheckpoint), in the
            # evaluation's own commit: a fit resumed from it replays nothing already judged.
            save_last=bool(save_last),
            filename=self._template(),
            version_names=enable_version_counter,
            **options,
        )
        """bestsave's options (:class:`bestsave.SaverOptions`)."""
        self.best_record: Record | None = None
        self._init_state()

    def _init_state(self) -> None:
        """State of a fit (the saver is not pickled with the callback: ``ddp_spawn``,
        ``copy.deepcopy``)."""
        self._saver: BestSaver | None = None
        self._restored: dict[str, Any] | None = None
        self._staged = True
        self._shards_key: str | None = None  # a sharded strategy's key for the model's shards
        self._group: ShardGroup | None = None  # the processes writing those shards
        self._evaluated_at: int | None = None
        self._current: Any = None  # the monitored value of the evaluation being saved
        self._last_written_at: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_saver", "_stager", "_group"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._saver = None
        self._group = None

    @property
    def _staging(self) -> Stager:
        """The host buffers of this callback's snapshots, made at the first use (a callback
        that is pickled before training has none)."""
        stager: Stager | None = self.__dict__.get("_stager")
        if stager is None:
            stager = self._stager = Stager(self.options.staging_memory)
        return stager

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so a checkpoint written with either class restores the other.
        key = super().state_key
        if type(self) is BestCheckpoint:
            key = key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)
        return key

    def _template(self, filename: str | None = None) -> str:
        """Lightning's ``filename`` as a bestsave template, ``auto_insert_metric_name`` applied.

        >>> BestCheckpoint(monitor="val/loss")._template("{epoch:02d}-{val/loss:.2f}")
        'epoch={epoch:02d}-val_loss={val/loss:.2f}'
        """
        filename = filename or self.filename or "{epoch}" + self.CHECKPOINT_JOIN_CHAR + "{step}"
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

    def _fields(self, template: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Template fields no metric fills: 0, as Lightning names them."""
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        return {f: 0 for f in names - set(metrics) - {"epoch", "step"}}

    # -- opening the run -----------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            _refuse_deepspeed(trainer.strategy)  # before a directory is made for the run
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            _check_shards_dirpath(trainer.strategy, os.fspath(self.dirpath or ""))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not trainer.fast_dev_run:  # type: ignore[attr-defined]  # which saves nothing
            self._open(trainer, pl_module)

    def _open(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> BestSaver:
        # Sharded strategies: every rank snapshots its own shards and writes them later
        # (_sharded_writer). Strategies that save the way Strategy does (global rank 0 writes
        # what dump_checkpoint returns, with no collective call) let rank 0 snapshot the state
        # alone and serialize it later; any other strategy saves through
        # trainer.save_checkpoint on every rank.
        self._shards_key = _shards_key(trainer.strategy)
        strategy = type(trainer.strategy)
        self._staged = (
            self._shards_key is None
            and all(
                getattr(strategy, name) is getattr(Strategy, name)
                for name in ("save_checkpoint", "lightning_module_state_dict", "optimizer_state")
            )
            and not any(
                hasattr(getattr(o, "_optimizer", o), "consolidate_state_dict")
                for o in trainer.optimizers
            )
        )
        if self._staged and trainer.is_global_zero:
            # The first save then copies into buffers allocated while the first epoch trains.
            self._staging.reserve({"state_dict": pl_module.state_dict()})
        if self._saver is not None and self._saver.dirpath == self._store_url():
            return self._saver  # a second fit() with this callback continues its run
        if self._shards_key is not None:
            # A group of bestsave's own (a collective call: every rank opens the run here), so
            # that background writes never share a collective stream with training.
            self._group = ShardGroup()
        self._saver = self._new_saver(trainer, pl_module)
        self._restored = None
        self._apply(self._share(trainer, self._local_view(None)))
        return self._saver

    def _store_url(self) -> str:
        path = os.fspath(self.dirpath or "")
        return os.path.abspath(path) if _is_local_file_protocol(path) else path.rstrip("/")

    def _new_saver(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> BestSaver:
        resume = self.options.resume
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
        template = self._template()
        options = replace(
            self.options,
            filename=template,
            last_name=self._template(self.CHECKPOINT_NAME_LAST),
            # Lightning versions clashing names (-v1), so callbacks that differ only in their
            # monitor share a directory as separate runs.
            name=f"{run_name(template)}.{self.monitor or 'latest'}",
            resume=resume,
            overwrite=not resume,  # a second fit in the same place starts afresh
            async_write=self.options.async_write and not _uploads_every_save(trainer),
        )
        error: BaseException | None = None
        saver = None
        try:
            saver = BestSaver(
                os.fspath(self.dirpath or ""),
                extension=self.FILE_EXTENSION,
                writer=trainer.is_global_zero,
                framework="lightning",
                hparams=_hparams(trainer, pl_module),
                **options.as_kwargs(),
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

    # -- writing ----------------------------------------------------------------------------

    def _writer(self, trainer: pl.Trainer, weights_only: bool) -> Writer | Staged | Sharded:
        """Writes the checkpoint Lightning would write with ``trainer.save_checkpoint``."""
        if self._shards_key is not None:
            return self._sharded_writer(trainer, weights_only)
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
            self._apply_now()
            if trainer.world_size > 1:
                # The other ranks wait in _follow(); they join this save's collective calls.
                trainer.strategy.broadcast(("save", (path, weights_only)))
            trainer.save_checkpoint(path, weights_only)

        return write

    def _capture(self, trainer: pl.Trainer, weights_only: bool) -> Snapshot:
        self._apply_now()
        with trainer.profiler.profile("save_checkpoint"):  # type: ignore[attr-defined]
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only)
            return self._staging.snapshot(checkpoint)

    def _sharded_writer(self, trainer: pl.Trainer, weights_only: bool) -> Sharded:
        """The folder a sharded strategy's ``save_checkpoint`` writes, written in the
        background by every rank: the model's and optimizers' shards through
        ``torch.distributed.checkpoint`` over bestsave's own group, the rest of the checkpoint
        in ``meta.pt`` by global rank 0. The strategy's ``load_checkpoint`` reads it back."""
        key, group = self._shards_key, self._group
        assert key is not None and group is not None, "a sharded run opens its group first"

        def capture() -> Snapshot:
            self._apply_now()
            # On every rank in the training thread, as the strategy's own save: its state dicts
            # hold this rank's shards (and gathering a full optimizer state is collective).
            with trainer.profiler.profile("save_checkpoint"):  # type: ignore[attr-defined]
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only)
                shards = {key: checkpoint.pop("state_dict")}
                for i, state in enumerate(checkpoint.pop("optimizer_states", [])):
                    shards[f"optimizer_{i}"] = state
                meta = checkpoint if trainer.is_global_zero else None
                return self._staging.snapshot({"shards": shards, "meta": meta})

        def write(snapshot: Snapshot, where: str) -> Parts | None:
            meta = snapshot.state["meta"]
            if meta is not None:
                # Before the shards: the collective save ends after this, so every rank's
                # listing of the folder for its checksums sees the file.
                os.makedirs(where, exist_ok=True)
                torch.save(meta, os.path.join(where, _METADATA_FILENAME))
            # The shards' checksums, taken as they were written; meta.pt is hashed at commit.
            return save_shards(snapshot.state["shards"], where, group, {})  # a local path

        return Sharded(capture, write, group)

    def _on_all_ranks(self, trainer: pl.Trainer, save: Callable[[], Decision | None]) -> _View:
        """Run ``save`` with global rank 0's saver, the other ranks joining the collective calls
        of its writes; every rank returns rank 0's view."""
        if trainer.is_global_zero:
            try:
                decision = save()
            except BaseException as e:
                if trainer.world_size > 1:
                    trainer.strategy.broadcast(("error", repr(e)))
                raise
            view = self._local_view(decision)
            if trainer.world_size > 1:
                trainer.strategy.broadcast(("done", view))
            return view
        save()  # the same decisions; nothing written
        while True:
            kind, payload = trainer.strategy.broadcast(_LISTEN)
            if kind == "save":
                path, weights_only = payload
                trainer.save_checkpoint(path, weights_only)
            elif kind == "error":
                raise RuntimeError(f"global rank 0 failed to save a checkpoint: {payload}")
            else:
                return payload  # type: ignore[no-any-return]

    # -- what ModelCheckpoint's hooks call -------------------------------------------------------

    def _save_topk_checkpoint(
        self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]
    ) -> None:
        """One evaluation: the saver judges it, keeps and evicts."""
        saver = self._saver
        if saver is None or self._evaluated_at == trainer.global_step:
            return  # judged at this step already (patience counts evaluations)
        metrics = self._metrics(trainer)
        if trainer.world_size > 1:
            # Every rank judges rank 0's values: unsynced logging must not split decisions.
            metrics = trainer.strategy.broadcast(metrics)
        missing = next((m for m in self._monitors if m not in metrics), None)
        if missing is not None:
            error = MonitorNotLoggedError(missing, list(metrics))
            if trainer.fit_loop.epoch_loop.val_loop._has_run:
                raise error
            _warning_cache.warn(str(error))  # before validation, a validation metric may be missing
            return
        self._evaluated_at = trainer.global_step
        self._current = metrics.get(self._monitor_name)
        epoch, step = trainer.current_epoch, trainer.global_step
        template = self._template()
        write = self._writer(trainer, self.save_weights_only)
        # last holds the full state; with the same state it is a hard link to the kept file.
        write_last = self._writer(trainer, False) if self.save_weights_only else None
        view = self._on_all_ranks(
            trainer,
            lambda: saver.step(
                epoch,
                metrics,
                write=write,
                step=step,
                write_last=write_last,
                fields=self._fields(template, metrics),
            ),
        )
        self._apply(view, metrics.get(self._monitor_name))
        decision = view.decision
        assert decision is not None
        self._report(trainer, epoch, step, view, metrics[self._monitor_name])
        if self.save_last:
            self._last_written_at = step
        if decision.saved:
            assert decision.record is not None
            self._saved(trainer, decision.record.path)
        if self.save_last and view.last is not None and view.last.step == step:
            self._saved(trainer, view.last.path)  # ModelCheckpoint saves last after the top-k
        if decision.should_stop:
            trainer.should_stop = True

    def _save_last_checkpoint(
        self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]
    ) -> None:
        """``last`` outside an evaluation (at the end of training, at an exception); each
        evaluation writes it with its own files, in one commit."""
        saver = self._saver
        if not self.save_last or saver is None or self._last_written_at == trainer.global_step:
            return
        self._last_written_at = trainer.global_step
        metrics = self._metrics(trainer)
        epoch, step = trainer.current_epoch, trainer.global_step
        write = self._writer(trainer, weights_only=False)
        view = self._on_all_ranks(
            trainer, lambda: _no_decision(saver.save_last_checkpoint(epoch, write, metrics, step))
        )
        self._apply(view)
        if view.last is not None:
            self._saved(trainer, view.last.path)

    def _saved(self, trainer: pl.Trainer, path: str) -> None:
        """As ModelCheckpoint._save_checkpoint does after writing a file."""
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = path
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # save_on_exception saves on every rank, as ModelCheckpoint's does: the exception
        # must have reached them all. Otherwise it may have reached this rank alone.
        saving = self._should_save_on_exception(trainer) and self.dirpath is not None
        if saving:
            saver = self._saver or self._open(trainer, pl_module)
            candidates = self._monitor_candidates(trainer)
            metrics = {
                **self._metrics(trainer),
                "exception": f"{type(exception).__name__}: {exception}",
            }
            template = self._template()
            # No announcement: an exception may have reached only some ranks. Strategies that
            # save collectively get the call on every rank here, as ModelCheckpoint makes it.
            record = saver.save_exception(
                trainer.current_epoch,
                self._writer(trainer, self.save_weights_only),
                metrics=metrics,
                step=trainer.global_step,
                filename=template,
                fields=self._fields(template, metrics),
            )
            if not trainer.is_global_zero and not self._staged and self._shards_key is None:
                trainer.save_checkpoint(os.path.join(os.fspath(self.dirpath or ""), "unused.ckpt"))
            if record is not None:
                self._saved(trainer, record.path)
                rank_zero_info(
                    f"An {type(exception).__name__} was raised with message: {exception}, "
                    f"saved checkpoint to {record.path}"
                )
            self._save_last_checkpoint(trainer, candidates)
        if self._saver is not None:
            try:
                # Closing a sharded run waits for the other ranks, unless this one may be alone
                # (then it only waits for its own writes).
                self._saver.close(alone=self._shards_key is not None and not saving)
            except Exception as e:  # the training's exception is the one to raise
                rank_zero_warn(f"BestCheckpoint could not finish its pending writes: {e}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)  # a last checkpoint, if none was written
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

    # -- one evaluation ------------------------------------------------------------------------

    def _metrics(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Everything logged, train and validation, as Python numbers."""
        out: dict[str, Any] = {}
        # ModelCheckpoint's candidates: the callback metrics, with the epoch and step.
        for key, value in {**trainer.logged_metrics, **self._monitor_candidates(trainer)}.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue  # not a metric
                out[str(key)] = value.item()
            else:
                out[str(key)] = value
        return out

    def _apply_now(self) -> None:
        """ModelCheckpoint's attributes as they stand with the checkpoint being written, which
        holds them in its callback state (ModelCheckpoint sets them before it saves)."""
        if self._saver is not None:
            self._apply(self._local_view(None), self._current)
            if self.save_last and "{" not in self.CHECKPOINT_NAME_LAST:
                # Lightning writes last right after this save: its path is in the state.
                name = self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION
                self.last_model_path = os.path.join(os.fspath(self.dirpath or ""), name)

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
        ranked = [r for r in view.kept if r.ranked and r.monitor == self._monitor_name]
        assert self._saver is not None, "saves start after the saver opens"
        self.best_record = view.best
        self.best_model_path = view.best.path if view.best else ""
        self.last_model_path = view.last.path if view.last else ""
        if self.monitor is None:
            return  # ModelCheckpoint keeps no score for the latest checkpoints
        self.best_model_score = self._score(view.best) if view.best else None
        self.best_k_models = {r.path: self._score(r) for r in ranked}
        # Without a cap (save_top_k=-1) ModelCheckpoint's k-th best is the worst kept.
        cap = self._saver.policy.cap
        if ranked and (len(ranked) >= cap or cap == math.inf):
            self.kth_best_model_path = ranked[-1].path
            self.kth_value = self._score(ranked[-1])
        else:
            self.kth_best_model_path = ""
            self.kth_value = _tensor(self._saver.monitor.worst_value)
        if current is not None:
            number = as_number(current)
            # As ModelCheckpoint: a NaN score is the worst one.
            self.current_score = _tensor(
                self._saver.monitor.worst_value if number is None or math.isnan(number) else number
            )

    def _score(self, record: Record) -> torch.Tensor:
        """The record's score as ModelCheckpoint holds it: a tensor of the logged value's
        type (an int step stays an int, which loggers' metadata keep)."""
        logged = record.metrics.get(self._monitor_name)
        if isinstance(logged, int) and not isinstance(logged, bool) and logged == record.score:
            return torch.tensor(logged)
        return _tensor(record.score)

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
            elif self.options.delta is not None:
                rank_zero_info(f"{prefix} was not within {self.options.delta} of the best")
            else:
                rank_zero_info(f"{prefix} was not in top {self.save_top_k}")
        if decision.should_stop and not trainer.should_stop:
            kept = view.best.score if view.best else None
            best_text = f" (best {kept:0.5f})" if kept is not None else ""
            rank_zero_info(
                f"{prefix} did not improve in the last {self.options.patience} evaluations"
                f"{best_text}. "
                "Signaling Trainer to stop."
            )

    def _why(self, kind: str) -> str:
        if kind == "ensemble" or (kind == "best" and self.options.delta is not None):
            return f"a member of the delta-ensemble (within {self.options.delta} of the best)"
        if kind == "periodic":
            return f"every {self.options.keep_every_n_epochs} epochs"
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
            super().load_state_dict(state_dict)
            self._restored = state_dict.get("bestsave")

    @property
    def saver(self) -> BestSaver | None:
        """The :class:`bestsave.BestSaver` making the decisions, once training has started."""
        return self._saver

    @property
    def kept(self) -> list[Record]:
        """Records of the checkpoints kept now, best first (empty before training)."""
        return self._saver.kept if self._saver is not None else []


def _mode(monitor: str, mode: str = "auto") -> str:
    """``mode``, with ``"auto"`` read from the metric's name; a name the table cannot place
    gets ModelCheckpoint's default, ``"min"``, with a warning."""
    if mode != "auto":
        return mode  # ModelCheckpoint checks it
    try:
        return infer_mode(monitor)
    except ValueError:
        rank_zero_warn(
            f"BestCheckpoint cannot tell from its name whether {monitor!r} is better higher or "
            "lower; it uses mode='min', ModelCheckpoint's default. Pass mode='min' or "
            "mode='max' to say which."
        )
        return "min"


def _unused_mode(mode: str) -> str:
    """``mode`` without a monitor, where nothing reads it: ModelCheckpoint's default for
    "auto" (it appears in the callback's state key), any other value for it to check."""
    return "min" if mode == "auto" else mode


def _no_decision(_: Record | None) -> None:
    return None


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


def _shards_key(strategy: Strategy) -> str | None:
    """The key under which ``strategy`` saves the model's shards in a sharded checkpoint
    folder, as its ``load_checkpoint`` reads them; None when its checkpoints are one file."""
    if isinstance(strategy, ModelParallelStrategy) and strategy._save_distributed_checkpoint:
        return "state_dict"
    if isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "sharded":
        return "model"
    return None


def _refuse_deepspeed(strategy: Strategy) -> None:
    """DeepSpeed's checkpoints are its engine's: refuse them, saying what to do instead."""
    if isinstance(strategy, DeepSpeedStrategy):
        raise ValueError(
            f"BestCheckpoint cannot keep {type(strategy).__name__}'s checkpoints: DeepSpeed's "
            "engine writes and reads its checkpoint folders itself, with no way to write them "
            "in the background or to check their parts. Use ModelCheckpoint with DeepSpeed, or "
            "train with FSDPStrategy or ModelParallelStrategy, whose sharded checkpoints "
            "BestCheckpoint keeps."
        )


def _check_shards_dirpath(strategy: Strategy, dirpath: str) -> None:
    """Sharded checkpoints go where every process writes and the strategy loads: a path."""
    name = type(strategy).__name__
    if _shards_key(strategy) is not None and not _is_local_file_protocol(dirpath):
        raise ValueError(
            f"BestCheckpoint keeps {name}'s sharded checkpoints in a directory every process "
            f"writes, which {name} then loads from a path, but dirpath={dirpath!r} is a URL. "
            "Pass a local or shared file system path as dirpath (copy the folders elsewhere "
            "after training), or save full state dicts (FSDPStrategy(state_dict_type='full'), "
            "ModelParallelStrategy(save_distributed_checkpoint=False))."
        )
