"""Keras 3: ``BestModelCheckpoint``, a drop-in superset of ``keras.callbacks.ModelCheckpoint``.

It takes ModelCheckpoint's arguments with their meaning, on every Keras 3 backend (JAX, PyTorch,
TensorFlow), and adds bestsave's: keep the ``top_k`` best or a ``delta`` ensemble, stop after
``patience`` evaluations without improvement, ``restore_best_weights`` when ``fit`` ends, resume
a run. Files are written atomically and each one comes with a record of its epoch's metrics.

Example:
    >>> import tempfile
    >>> import keras, numpy as np
    >>> from bestsave.adapters.keras import BestModelCheckpoint
    >>> x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    >>> y = (x[:, :1] > 0).astype("float32")
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, "sigmoid")])
    >>> model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    >>> checkpoint = BestModelCheckpoint(
    ...     tempfile.mkdtemp() + "/{epoch:02d}-{val_loss:.4f}.weights.h5",
    ...     save_best_only=True, top_k=2, restore_best_weights=True,
    ... )
    >>> history = model.fit(x, y, validation_split=0.25, epochs=4, verbose=0,
    ...                     callbacks=[checkpoint])
    >>> len(checkpoint.kept), checkpoint.best_record.epoch == int(np.argmin(
    ...     history.history["val_loss"]))
    (2, True)
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import keras
import numpy as np
from keras.src.saving import saving_lib
from keras.src.utils.io_utils import print_msg
from typing_extensions import Unpack

from bestsave import (
    BestSaver,
    Decision,
    MissingMetricError,
    Options,
    Record,
    SaverOptions,
    Staged,
    fetch,
)
from bestsave.layout import run_name
from bestsave.messages import warn
from bestsave.monitor import infer_mode
from bestsave.naming import DEFAULT_TEMPLATE
from bestsave.options import monitor_names
from bestsave.pipeline import WriteNow
from bestsave.staging import Snapshot, Stager

__all__ = ["BestModelCheckpoint"]

_WEIGHTS = ".weights.h5"
_MODEL = (".keras", ".h5")


def _split_filepath(filepath: str, save_weights_only: bool) -> tuple[str, str, str]:
    """``filepath`` as the saver's directory, file name template and extension.

    A path ending in ``.keras``, ``.h5`` or ``.weights.h5`` is a template for the files; any
    other path is the directory, and files get bestsave's default name. ``.weights.h5`` files
    hold weights whatever ``save_weights_only`` says (Keras would write a legacy whole-model
    file under that name, which ``load_weights`` cannot read).
    """
    wanted = _WEIGHTS if save_weights_only else ".keras"
    if filepath.endswith(("/", os.sep)) or not filepath.endswith((_WEIGHTS, *_MODEL)):
        return filepath, DEFAULT_TEMPLATE, wanted
    if save_weights_only and not filepath.endswith(_WEIGHTS):
        raise ValueError(
            "When using `save_weights_only=True`, the filepath provided must end in "
            f"`.weights.h5` (Keras weights format), or name a directory. Received: {filepath=}"
        )
    extension = _WEIGHTS if filepath.endswith(_WEIGHTS) else os.path.splitext(filepath)[1]
    dirpath, name = os.path.split(filepath)
    if "{" in dirpath:
        raise ValueError(
            f"{filepath=} has a field in its directory; put fields such as {{epoch}} in the "
            "file name only: a run's records are kept in one directory, beside its files."
        )
    return dirpath or os.curdir, name[: -len(extension)] or "checkpoint", extension


def _fields(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


def _is_writer() -> bool:
    """Whether this process writes: process 0 of a multi-process (multi-host) run."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return int(jax.process_index()) == 0
    if backend == "torch":
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.distribute.get_strategy().extended.should_checkpoint)
    return True


def _compiled_metrics(model: Any) -> list[Any]:
    """The metrics given to ``compile``, flattened out of Keras's containers."""
    found, pending = [], list(getattr(model, "metrics", []))
    while pending:
        metric = pending.pop(0)
        inner = getattr(metric, "metrics", None)
        if isinstance(inner, list):
            pending.extend(inner)
        else:
            found.append(metric)
    return found


class BestModelCheckpoint(keras.callbacks.Callback):
    """Callback to keep the best Keras models, or their weights, while ``fit`` trains.

    A drop-in replacement for ``keras.callbacks.ModelCheckpoint``: the same arguments mean the
    same thing and ``filepath`` names the files written, and bestsave's options (all
    keyword-only) choose what else to keep. Every file is written under a temporary name and
    renamed into place, so a crash never leaves a half-written best. bestsave's own records are
    in a hidden folder beside the files, ``.bestsave/<run>/`` (the run named after the file
    name): the run's manifest, a ``history.jsonl`` line per evaluation, and a record per kept
    file with its epoch's ``logs``, the learning rate, and the model's name and parameter
    count; ``bestsave.load_best(directory)`` finds the best file from another process.

    Where it differs from ModelCheckpoint: with ``save_best_only=True`` a monitor missing from
    ``logs`` is an error (Keras warns and saves anyway, so a misspelt name would keep the last
    epoch), and a new best replaces the previous best's file (Keras leaves each improvement's
    file behind when the name holds ``{epoch}``; ``top_k`` keeps more); a new run in the place
    of an earlier one deletes the earlier run's files that it does not overwrite, once it has
    saved its first; a name ending in ``.weights.h5`` always holds weights;
    ``initial_value_threshold`` also applies to ``top_k`` and ``delta``; ``filepath`` may have
    fields in its file name only.

    Example:

    ```python
    checkpoint = BestModelCheckpoint(
        "ckpt/{epoch:02d}-{val_auc:.4f}.weights.h5",
        monitor="val_auc",
        save_best_only=True,
        top_k=3,                    # keep the three best, not only the latest best
        restore_best_weights=True,  # the model ends fit with the best epoch's weights
    )
    model.fit(x, y, validation_data=(xv, yv), epochs=30, callbacks=[checkpoint])
    checkpoint.best_record.metrics["val_auc"]   # the best epoch's logs
    ```

    Args:
        filepath: string or `PathLike`: a file name template ending in `.keras` (whole model),
            `.weights.h5` (weights) or `.h5` (legacy whole model), or a directory, where files
            are named `epoch=003-val_loss=0.1234.keras`. The template may use `{epoch}`
            (1-based, as Keras prints it), any key of `logs` (`{val_loss:.4f}`), `{batch}`
            (1-based, with an integer `save_freq`), `{monitor}` and `{score}`. A file of the
            same name is overwritten, as Keras does.
        monitor: The metric name to monitor, as it appears in `logs` (`"val_loss"`,
            `"val_accuracy"`, `"loss"`). With `save_best_only=True` (or `top_k`, `delta`,
            `patience`) it must be logged at every evaluation. A list keeps a best (or top-k)
            for each metric; `best` and `restore_best_weights` follow the first.
        verbose: 0 is silent; 1 prints a message when the callback takes an action.
        save_best_only: `True` keeps only the best (or, with bestsave's options, the `top_k`
            best, the `delta` ensemble, periodic epochs). `False`, ModelCheckpoint's default,
            saves at every evaluation, as Keras does: a name with `{epoch}` gives a file per
            epoch, a fixed name is overwritten, and `monitor` need not be logged. Given
            `top_k`, `delta`, `keep_every_n_epochs` or `patience`, it judges by `monitor` as
            `True` does, and those options say what else to keep.
        save_weights_only: `True` saves `model.save_weights(path)`, else `model.save(path)`;
            a `filepath` ending in `.weights.h5` implies it.
        mode: `"min"`, `"max"` or `"auto"`: from the compiled metric's direction, then from the
            name (`loss`, `error`, `mae`... are min; `acc`, `auc`, `f1`... are max). A name
            neither tells raises `ValueError` asking for `mode`. Any other value warns and
            falls back to `"auto"`, as in Keras.
        save_freq: `"epoch"`, or an integer: evaluate after this many training batches (with
            the batch `logs`, which hold training metrics only).
        initial_value_threshold: A score must beat this to be saved (with `save_best_only`
            or bestsave's options). A resumed run's best replaces it.
        restore_best_weights: Load the best checkpoint's weights into the model when `fit` ends
            (the optimizer keeps its state, as with `EarlyStopping`). It needs a best:
            `save_best_only=True`, or `top_k` or `delta`.
        **options: bestsave's options (`bestsave.Options`, each described on
            `bestsave.SaverOptions`): `top_k`, `delta`, `min_delta`, `keep_every_n_epochs`,
            `patience` (sets `model.stop_training`), `smooth`, `tie_break`, `warmup`,
            `trackers` (they get the best epoch's record), `on_write_error`,
            `storage_options` (for a `filepath` URL, `s3://bucket/run/`). `async_write=True`
            (the default) writes a `.weights.h5` file in the background from a copy of the
            variables, through Keras's own HDF5 writer; a `.keras` file is written from the
            live model before the callback returns, and hashing, syncing and recording it run
            in the background; `fit` waits for them at its end. `resume=True` continues the
            earlier run of this file name in the directory: its best score, kept files and
            patience count carry over (use it with `keras.callbacks.BackupAndRestore` to
            resume the training state too); without it a new callback starts a new run there,
            as Keras does, with a warning naming the earlier run, whose files stay until the
            new run saves its first.
    """

    def __init__(
        self,
        filepath: str | os.PathLike[str],
        monitor: str | Sequence[str] = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: Literal["auto", "min", "max"] = "auto",
        save_freq: int | Literal["epoch"] = "epoch",
        initial_value_threshold: float | None = None,
        *,
        restore_best_weights: bool = False,
        **options: Unpack[Options],
    ) -> None:
        super().__init__()
        self.filepath = os.fspath(filepath)
        # Several monitors each keep their best; `monitor` and `best` follow the first.
        self.monitors = list(monitor_names(monitor))
        self.monitor = self.monitors[0]
        if mode not in ("auto", "min", "max"):
            # Keras's words and its fallback, so that code written for ModelCheckpoint runs.
            warn(f"{type(self).__name__} mode '{mode}' is unknown, fallback to auto mode.")
            mode = "auto"
        self.verbose = verbose
        self.save_best_only = save_best_only
        self.mode = mode
        self.save_freq = save_freq
        self.initial_value_threshold = initial_value_threshold
        self.restore_best_weights = restore_best_weights

        if save_freq != "epoch" and (
            isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1
        ):
            raise ValueError(
                f"Unrecognized save_freq: {save_freq!r}. Expected 'epoch' or a number of "
                "batches >= 1."
            )
        self.dirpath, self._template, self._extension = _split_filepath(
            self.filepath, save_weights_only
        )
        self.save_weights_only: bool = self._extension == _WEIGHTS
        self._layout: _WeightsLayout | None = None
        if "batch" in _fields(self._template) and save_freq == "epoch":
            raise ValueError(
                f"filepath {self.filepath!r} uses {{batch}}, which exists only when save_freq "
                "is a number of batches; remove it or set save_freq."
            )

        if "baseline" in options:
            raise TypeError(
                "BestModelCheckpoint takes ModelCheckpoint's initial_value_threshold, not baseline"
            )
        # ModelCheckpoint(save_best_only=False) saves at every evaluation and never reads the
        # monitor: a schedule, which keeps no best. bestsave's own options, when given, say
        # what to keep instead.
        judging = ("top_k", "delta", "keep_every_n_epochs", "patience")
        schedule = not save_best_only and all(options.get(k) is None for k in judging)
        if schedule and restore_best_weights:
            raise ValueError(
                "restore_best_weights=True loads the best checkpoint, and with "
                "save_best_only=False every epoch is saved but none is kept as the best: "
                "pass save_best_only=True (or top_k or delta)."
            )
        if schedule:
            options["top_k"], options["keep_every_n_epochs"] = 0, 1
        # The direction is resolved once the model is known (`_open`); these checks do not
        # depend on it.
        self.options = SaverOptions.of(
            monitor=self.monitors,
            filename=self._template,
            # Keras applies the threshold to save_best_only alone.
            baseline=None if schedule else initial_value_threshold,
            # A new callback where an earlier one saved starts afresh, as Keras's does.
            overwrite=not options.get("resume", False),
            version_names=False,  # Keras overwrites a file of the same name
            # Named after the whole file name: `best.keras` and `best.weights.h5` written by
            # two callbacks in one directory are two runs.
            name=run_name(self._template + self._extension, self.monitor),
            **options,
        )
        """bestsave's options (:class:`bestsave.SaverOptions`)."""
        self._stager = Stager(self.options.staging_memory)
        self.saver: BestSaver | None = None
        self._current_epoch = 0
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen: int | None = None

    # -- what is kept -----------------------------------------------------------------------

    @property
    def best(self) -> float | None:
        """The best value of ``monitor`` so far (ModelCheckpoint's ``best``)."""
        score = self.saver.best_score if self.saver is not None else None
        return self.initial_value_threshold if score is None else score

    @property
    def best_record(self) -> Record | None:
        """The record of the best checkpoint kept: ``.path``, ``.epoch`` (0-based), ``.metrics``."""
        return self.saver.best if self.saver is not None else None

    @property
    def kept(self) -> list[Record]:
        """Records of the checkpoints kept now, best first."""
        return self.saver.kept if self.saver is not None else []

    # -- fit --------------------------------------------------------------------------------

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._current_epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._should_save_on_batch(batch):
            self._evaluate(self._current_epoch, logs or {}, batch)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.save_freq == "epoch":
            self._evaluate(epoch, logs or {}, None)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.saver is not None:
            self.saver.close()
        if self.restore_best_weights:
            self._restore_best()

    def _open(self) -> BestSaver:
        """The run, opened at the first evaluation, as ModelCheckpoint sets up its monitor at
        the first epoch's end: only then is the model built (a Sequential without an `Input`
        on TensorFlow) and are the compiled metrics, which `mode="auto"` asks, known. A later
        fit() with the same callback continues the run, as ModelCheckpoint's `best` carries
        over."""
        if self.saver is None:
            options = replace(self.options, mode=[self._resolve_mode(m) for m in self.monitors])
            self.saver = BestSaver(
                self.dirpath,
                extension=self._extension,
                writer=_is_writer(),
                framework="keras",
                hparams=self._hparams(),
                **options.as_kwargs(),
            )
        return self.saver

    # -- one evaluation -----------------------------------------------------------------------

    def _should_save_on_batch(self, batch: int) -> bool:
        """Counts batches as ModelCheckpoint does, steps_per_execution included."""
        if self.save_freq == "epoch":
            return False
        if self._last_batch_seen is None or batch <= self._last_batch_seen:
            add_batches = batch + 1  # a new epoch; batches are zero-indexed
        else:
            add_batches = batch - self._last_batch_seen
        self._batches_seen_since_last_saving += add_batches
        self._last_batch_seen = batch
        if self._batches_seen_since_last_saving >= self.save_freq:
            self._batches_seen_since_last_saving = 0
            return True
        return False

    def _evaluate(self, epoch: int, logs: Mapping[str, Any], batch: int | None) -> Decision:
        saver = self._open()
        metrics = self._metrics(logs)
        previous = saver.best_score
        try:
            decision = saver.step(
                epoch,
                metrics,
                write=self._writer(),
                step=self._global_step(),
                fields=self._keras_numbers(epoch, batch),
            )
        except MissingMetricError as error:
            error.message += self._why_missing(metrics, batch)
            raise
        if self.verbose > 0:
            self._report(epoch, previous, decision)
        if decision.should_stop:
            self.model.stop_training = True
        return decision

    def _metrics(self, logs: Mapping[str, Any]) -> dict[str, Any]:
        metrics = dict(logs)
        optimizer = self.model.optimizer
        if optimizer is not None and "learning_rate" not in metrics:
            metrics["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        return metrics

    def _why_missing(self, metrics: Mapping[str, Any], batch: int | None) -> str:
        """The usual reason a monitor is missing from Keras's logs, for the error message."""
        if batch is not None:
            return (
                " With save_freq a number of batches, the callback sees each batch's logs, "
                "which hold training metrics only."
            )
        missing = [m for m in self.monitors if m not in metrics]
        if any(m.startswith("val_") for m in missing) and not any(
            k.startswith("val_") for k in metrics
        ):
            return (
                " Validation metrics are logged only when fit() is given validation_data or "
                "validation_split."
            )
        return ""

    @staticmethod
    def _keras_numbers(epoch: int, batch: int | None) -> dict[str, int]:
        """``{epoch}`` and ``{batch}`` in file names count from 1, as Keras prints them."""
        fields = {"epoch": epoch + 1}
        if batch is not None:
            fields["batch"] = batch + 1
        return fields

    def _global_step(self) -> int | None:
        optimizer = self.model.optimizer
        if optimizer is None:
            return None
        return int(keras.ops.convert_to_numpy(optimizer.iterations))

    def _save(self, path: str) -> None:
        # `path` ends with the format's extension, which Keras checks.
        if self.save_weights_only:
            self.model.save_weights(path, overwrite=True)
        else:
            self.model.save(path, overwrite=True)

    def _writer(self) -> Staged | WriteNow:
        """A weights file is written from a snapshot of the variables; anything else is saved
        from the live model at once (a `.keras` file holds more than the variables)."""
        model, saver = self.model, self.saver
        if self.save_weights_only and saver is not None and saver.async_write:
            optimizer = getattr(model, "optimizer", None)
            variables = [*model.weights, *getattr(optimizer, "variables", ())]
            key = tuple(id(v) for v in variables)
            if self._layout is None or self._layout.key != key:
                self._layout = _WeightsLayout.record(model, key)
            layout = self._layout
            if layout.variables is not None:
                return Staged(
                    lambda: self._stager.snapshot((layout.key, layout.values())), layout.write
                )
        # A whole `.keras` file holds more than the variables: Keras saves it from the live
        # model, now; the saver hashes, syncs, renames and records it in the background.
        return WriteNow(self._save)

    def _report(self, epoch: int, previous: float | None, decision: Decision) -> None:
        """ModelCheckpoint's messages, and bestsave's own actions in the same words."""
        assert self.saver is not None
        where = f"\nEpoch {epoch + 1}"
        best_str = "None" if previous is None else f"{previous:.5f}"
        path = decision.record.path if decision.record is not None else None
        if not self.saver.policy.judges:  # save_best_only=False
            message = f"saving model to {path}"
        else:
            if decision.score is None:
                message = f"{self.monitor} is not a valid score"
            elif decision.is_best:
                message = f"{self.monitor} improved from {best_str} to {decision.score:.5f}"
            else:
                message = f"{self.monitor} did not improve from {best_str}"
            if path is not None:
                message += f", saving model to {path}"
        print_msg(f"{where}: {message}")
        for record in decision.evicted:
            print_msg(f"{where}: removed {record.path}")
        if decision.should_stop:
            print_msg(f"{where}: early stopping, {self.monitor} stopped improving")

    # -- helpers ------------------------------------------------------------------------------

    def _resolve_mode(self, monitor: str) -> str:
        """ModelCheckpoint's order: the compiled metric's direction, then the name. A given
        `mode` is the first monitor's."""
        if self.mode != "auto" and monitor == self.monitor:
            return self.mode
        name = monitor.removeprefix("val_")
        for metric in _compiled_metrics(self.model):
            direction = getattr(metric, "_direction", None)
            if metric.name == name and direction in ("up", "down"):
                return "max" if direction == "up" else "min"
        return infer_mode(monitor)

    def _hparams(self) -> dict[str, Any]:
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        return {
            "model_name": model.name,
            "params": int(model.count_params()),
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "epochs": (self.params or {}).get("epochs"),
            "steps_per_epoch": (self.params or {}).get("steps"),
            "save_weights_only": self.save_weights_only,
        }

    def _restore_best(self) -> None:
        best = self.best_record
        if best is None:
            warn(
                f"restore_best_weights: no checkpoint was kept in {self.dirpath} (no valid "
                f"{self.monitor}, or none beat initial_value_threshold); the model keeps the "
                "weights of its last epoch"
            )
            return
        if self.verbose > 0:
            print_msg(f"Restoring model weights from the end of the best epoch: {best.epoch + 1}.")
        model = self.model
        # load_weights also loads the optimizer saved beside the weights; keep the current one,
        # as EarlyStopping(restore_best_weights=True) does.
        optimizer_variables = list(getattr(model.optimizer, "variables", []))
        held = self.saver.held_state(best) if self.saver is not None else None
        layout = self._layout
        if held is not None and layout is not None and held[0] == layout.key:
            # The best was the latest save, its variables still in memory: no file to read.
            assert layout.variables is not None
            skip = {id(v) for v in optimizer_variables}
            # torch variables copy what they are given; other backends may keep the array
            # itself, which the next save would overwrite.
            own = keras.backend.backend() != "torch"
            for variable, value in zip(layout.variables, held[1], strict=True):
                if id(variable) not in skip:
                    variable.assign(np.array(value) if own else value)
            return
        optimizer_state = [keras.ops.convert_to_numpy(v) for v in optimizer_variables]
        model.load_weights(fetch(best, **dict(self.options.storage_options or {})))
        for variable, value in zip(optimizer_variables, optimizer_state, strict=True):
            variable.assign(value)


class _Recorder(saving_lib.H5IOStore):
    """Takes down what Keras's weight saving would write to an HDF5 file, writing nothing."""

    def __init__(self) -> None:  # no file: the parent's state is never used
        self.mode = "w"
        self.entries: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = []

    def __bool__(self) -> bool:
        return True

    def make(self, path: str, metadata: dict[str, Any] | None = None) -> _Recorder:
        self.entries.append((path, metadata, {}))
        return self

    def __setitem__(self, key: str, value: Any) -> None:
        self.entries[-1][2][key] = value


class _Writer(saving_lib.H5IOStore):
    """Keras's HDF5 weights store, writing a snapshot's buffers without copying them first."""

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(value, np.ndarray):
            if str(value.dtype) == "torch.bfloat16":  # numpy has none: Keras converts it
                super().__setitem__(key, value)
                return
            value = value.numpy()  # a view of the torch buffer
        if value.dtype.name == "bfloat16":  # saved with a dtype attribute
            super().__setitem__(key, value)
            return
        # What the parent does, less its np.array() copy of the value.
        if not self._h5_entry_initialized:
            self._create_h5_group(self._h5_entry_path)
        self._h5_entry_group[key] = value


class _WeightsLayout:
    """Where each variable goes in a `.weights.h5` file, recorded once by Keras's own saving
    walk, so later files are written from a snapshot, away from the live model.

    Recording walks every layer (tens of milliseconds for a large model); it is done again
    only when the model's or the optimizer's variables change.
    """

    def __init__(
        self,
        key: tuple[int, ...],
        entries: list[tuple[str, dict[str, Any] | None, list[str]]],
        variables: list[Any] | None,
    ) -> None:
        self.key = key
        self.entries = entries
        self.variables = variables
        """The variables in the order they are written; None when a layer saves something
        else (a value computed at save time), which only the live model can give."""

    @classmethod
    def record(cls, model: Any, key: tuple[int, ...]) -> _WeightsLayout:
        recorder = _Recorder()
        saving_lib._save_state(
            model,
            weights_store=recorder,
            assets_store=None,
            inner_path="",
            visited_saveables=set(),
        )
        optimizer = getattr(model, "optimizer", None)
        values: list[Any] = []
        for path, _, saved in recorder.entries:
            if path == "optimizer" and optimizer is not None:
                # The optimizer saves `variable.numpy()` of each of its variables, in order;
                # anything else is left to the live model.
                variables = list(optimizer.variables)
                same = len(saved) == len(variables) and all(
                    np.shape(a) == tuple(v.shape) and np.asarray(a).dtype == v.dtype
                    for a, v in zip(saved.values(), variables, strict=True)
                )
                values += variables if same else [None]
            else:
                values += saved.values()
        plain = all(isinstance(v, keras.Variable) for v in values)
        entries = [(path, metadata, list(saved)) for path, metadata, saved in recorder.entries]
        return cls(key, entries, values if plain else None)

    def values(self) -> list[Any]:
        """The variables' current values, as torch tensors on the torch backend (copied
        from the device the way they are), else as numpy arrays."""
        assert self.variables is not None
        if keras.backend.backend() == "torch":
            return [v.value for v in self.variables]
        return [np.asarray(v.value) for v in self.variables]

    def write(self, snapshot: Snapshot, path: str) -> None:
        """The file ``model.save_weights(path)`` writes, from the snapshot's values."""
        store = _Writer(path, mode="w")
        try:
            key, values = snapshot.state
            assert key == self.key
            values = iter(values)
            for inner_path, metadata, keys in self.entries:
                entry = store.make(inner_path, metadata)
                for key in keys:
                    entry[key] = next(values)
        finally:
            store.close()
