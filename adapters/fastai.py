"""fastai: ``SaveBestModelCallback``, a drop-in superset of fastai's ``SaveModelCallback``.

Swap the class and keep the arguments: the best model goes to ``models/model.pth``
(``learn.path/learn.model_dir/fname + ".pth"``) in fastai's format, ``learn.load("model")``
loads it, "Better model found at epoch N with M value: V." is printed at each improvement, and
the best weights are in the learner after ``fit``; ``every_epoch`` writes ``model_0.pth``,
``model_1.pth``, ... and ``at_end`` the final model as ``model.pth``. In addition it can keep
the k best epochs (``top_k``) or every epoch within ``delta`` of the best, stop training when
the metric stalls (``patience``), and it records everything the Recorder held at each kept
epoch, in ``models/.bestsave/<run>/``.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from fastai.data.core import DataLoaders
    >>> from fastai.learner import Learner
    >>> from bestsave.adapters.fastai import SaveBestModelCallback
    >>> x = torch.randn(64, 3)
    >>> data = list(zip(x, x.sum(1, keepdim=True)))
    >>> dls = DataLoaders.from_dsets(data[:48], data[48:], bs=16, device="cpu")
    >>> learn = Learner(dls, nn.Linear(3, 1), loss_func=nn.MSELoss(), path=tempfile.mkdtemp())
    >>> save = SaveBestModelCallback()
    >>> with learn.no_bar(), learn.no_logging():
    ...     learn.fit(3, lr=0.1, cbs=[save])  # doctest: +ELLIPSIS
    Better model found at epoch 0 with valid_loss value: ...
    >>> sorted(p.name for p in (learn.path / "models").glob("*.pth"))
    ['model.pth']
    >>> best = save.best_record  # the best epoch's record: its file, score and every value
    >>> best.path == str(learn.path / "models" / "model.pth"), sorted(best.metrics)[:3]
    (True, ['lr', 'mom', 'train_loss'])
    >>> _ = learn.load("model")  # fastai's own load finds it
"""

from __future__ import annotations

import numbers
import operator
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import SaveModelCallback, TrackerCallback
from fastai.optimizer import Optimizer
from fastai.torch_core import distrib_barrier, get_model, rank_distrib
from fastcore.foundation import L
from typing_extensions import Unpack

from bestsave import (
    BestSaver,
    Decision,
    MissingMetricError,
    Record,
    SaverOptions,
    Staged,
    fetch,
    load_manifest,
)
from bestsave.messages import warn
from bestsave.monitor import infer_mode
from bestsave.options import SharedOptions, monitor_names
from bestsave.staging import Snapshot, Stager
from bestsave.trackers import WandbTracker, resolve_trackers

__all__ = ["SaveBestModelCallback"]

_MIN_COMPS = (np.less, np.less_equal, operator.lt, operator.le)
_MAX_COMPS = (np.greater, np.greater_equal, operator.gt, operator.ge)
_HYPERS = ("lr", "mom", "wd")


class SaveBestModelCallback(Callback):
    """Saves the best model while a fastai ``Learner`` trains, and loads it when training ends.

    Files go where fastai's ``SaveModelCallback`` puts them, ``learn.path/learn.model_dir``,
    in fastai's format (the model's ``state_dict``, or ``{"model": ..., "opt": ...}`` with
    ``with_opt``), so ``learn.load(fname)`` reads them:

    - the best: ``models/model.pth`` (``fname + ".pth"``), replaced at each improvement;
    - with several files to keep (``top_k`` > 1, ``delta``, several monitors,
      ``keep_every_n_epochs``, or a best beside ``at_end``'s final model), each is named after
      its epoch, as fastai's ``every_epoch`` names them: ``models/model_3.pth``;
    - ``every_epoch=n``: ``models/model_0.pth``, ``model_n.pth``, ``model_2n.pth``, ...;
    - ``at_end=True``: ``models/model.pth`` holds the final model.

    Beside them, ``models/.bestsave/<run>/`` holds each kept file's record (its epoch and every
    value the Recorder held), the run's manifest and its history. A run is named after its file
    names (``model``; ``model_epoch`` for ``model_{epoch}.pth``), so callbacks with different
    ``fname`` share ``models/``. A later fit over a run of the same name (a notebook cell run
    again, a second training stage) starts afresh, as fastai overwrites its files: it warns,
    and the earlier run's files stay until the new run has saved its first one.

    The callback is named ``save_model``: ``learn.save_model`` while it is in the learner (for
    good when it was passed to ``Learner(cbs=...)``), the name fastai's
    ``WandbCallback(log_model=True)`` looks for: it uploads this callback's best file instead
    of adding a second saver, with the best epoch's record as the artifact's metadata.

    Args:
        monitor: The Recorder value that decides: ``"valid_loss"``, ``"train_loss"`` or a
            metric's name (``"accuracy"``, ``"matthews_corrcoef"``). A list keeps a best (or
            top-k) for each; the message, ``comp`` and the weights loaded follow the first.
        comp: ``np.less`` (lower is better) or ``np.greater``. When None, bestsave's table of
            metric names decides (``rmse``, ``mae``, ``perplexity`` are minimised, where
            fastai would maximise them); a name it does not know follows fastai's rule
            (``np.less`` when it holds "loss" or "error", else ``np.greater``), with a warning.
        min_delta: An improvement must beat the best by more than this.
        fname: The files' name in ``learn.path/learn.model_dir``, without ``.pth``.
        every_epoch: Save every epoch (``True``) or every n epochs (an int: epochs 0, n, 2n,
            ...) as ``{fname}_{epoch}.pth``, whatever the score, without loading a best.
        at_end: Save the final model as ``{fname}.pth`` and leave it in the learner instead
            of loading the best (the best is still tracked and printed).
        with_opt: Save the optimizer state with the model, and load it with the best.
        reset_on_fit: Every ``fit`` starts a new run (its best replaces the previous fit's
            files). With False, a later ``fit`` must beat the earlier fits' best to be saved.
        save_last: Also keep a rolling ``{fname}_last.pth`` of the latest epoch (``True`` or
            ``"link"``).
        filename: Template of the kept files' names instead of the names above (without
            ``.pth``); any Recorder value may appear: ``"model-{epoch}-{accuracy:.3f}"``.
        dirpath: Directory for the files instead of ``learn.path/learn.model_dir``: a local
            path or an fsspec URL (``s3://bucket/run``).
        **options: bestsave's options (:class:`bestsave.SharedOptions`, each described on
            :class:`bestsave.SaverOptions`): ``top_k`` (default 1, or no cap with ``delta``; 0
            with ``every_epoch`` or ``at_end``), ``delta``, ``patience`` (the Learner raises
            ``CancelFitException``, as ``EarlyStoppingCallback`` does), ``keep_every_n_epochs``,
            ``smooth``, ``tie_break``, ``warmup``, ``baseline``, ``trackers``, ``async_write``
            (every file is on disk when ``fit`` returns), ``on_write_error``,
            ``storage_options``. ``resume=True`` continues the run of this name (its best
            stays the one to beat): load the weights to resume from and pass ``start_epoch``
            to ``fit`` yourself.

    Under fastai's distributed training only rank 0 writes; every rank loads the best.

    Example:
        >>> from bestsave.adapters.fastai import SaveBestModelCallback
        >>> SaveBestModelCallback(monitor="accuracy", top_k=3, patience=5).name
        'save_model'
    """

    # Right after the Recorder has the epoch's values, where fastai's SaveModelCallback runs.
    order = TrackerCallback.order + 1
    remove_on_fetch, _only_train_loop = True, True
    # Left out when a Learner holding this callback is pickled by ``learn.export()``.
    _stateattrs = ("_saver", "_stager", "_wandb", "_latest", "_frames")

    def __init__(
        self,
        monitor: str | Sequence[str] = "valid_loss",
        comp: Any = None,
        min_delta: float = 0.0,
        fname: str = "model",
        every_epoch: bool | int = False,
        at_end: bool = False,
        with_opt: bool = False,
        reset_on_fit: bool = True,
        *,
        save_last: bool | Literal["link"] = False,
        filename: str | None = None,
        dirpath: str | os.PathLike[str] | None = None,
        **options: Unpack[SharedOptions],
    ) -> None:
        super().__init__()
        # Several monitors each keep their best; fastai's attributes follow the first.
        monitors = list(monitor_names(monitor))
        monitor = monitors[0]
        if not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname:
            raise ValueError(
                f"fname must be a plain file name such as 'model', not {fname!r}; pass "
                "dirpath= for another folder"
            )
        every = _every_n(every_epoch)
        if every and at_end:
            raise ValueError("every_epoch and at_end cannot both be set: choose one")
        if every and options.get("keep_every_n_epochs") is not None:
            raise ValueError(
                "every_epoch and keep_every_n_epochs say the same thing: pass only one of them"
            )
        modes = [_mode(monitor, comp)] + [_mode(m, None) for m in monitors[1:]]
        if options.get("top_k") is None and options.get("delta") is None and (every or at_end):
            options["top_k"] = 0  # fastai's every_epoch and at_end keep no best file of their own
        self.options = SaverOptions.of(
            monitor=monitors,
            mode=modes,
            min_delta=min_delta,
            save_last=save_last or at_end,
            filename=filename or "model",
            periodic_start=0 if every else None,  # fastai's 0, n, 2n, ...
            **{**options, "keep_every_n_epochs": options.get("keep_every_n_epochs") or every},
        )
        """bestsave's options (:class:`bestsave.SaverOptions`), checked now rather than at the
        first fit."""
        self.monitor, self.min_delta, self.fname = monitor, min_delta, fname
        self.monitors = monitors
        self.comp = np.less if modes[0] == "min" else np.greater
        self.every_epoch, self.at_end, self.with_opt = every_epoch, at_end, with_opt
        self.reset_on_fit = reset_on_fit
        self.filename, self.dirpath = filename, dirpath
        self.new_best = False
        self._modes = modes
        self._run_at: tuple[str, str] | None = None  # (directory, file names) of the own run
        self._init_state()

    def _init_state(self) -> None:
        """State that is not pickled with the learner (``learn.export()``)."""
        self._saver: BestSaver | None = None
        self._stager = Stager(self.options.staging_memory)
        self._wandb: list[Any] = []  # WandbCallbacks whose upload this callback does
        self._latest: Record | None = None
        self._frames: list[_Frame] = []

    @property
    def name(self) -> str:
        """``save_model``: the attribute fastai's loggers look for (``learn.save_model``)."""
        return "save_model"

    # -- what was kept ---------------------------------------------------------------------

    @property
    def saver(self) -> BestSaver | None:
        """The :class:`bestsave.BestSaver` of the current run (None before the first fit)."""
        return self._saver

    @property
    def best_record(self) -> Record | None:
        """Record of the best checkpoint: its file, epoch, score and every metric."""
        return self._saver.best if self._saver else None

    @property
    def kept(self) -> list[Record]:
        """Records of the files kept now, best first."""
        return self._saver.kept if self._saver else []

    @property
    def best(self) -> float:
        """The best monitored value so far (``inf``/``-inf`` before one, as fastai's)."""
        score = self._saver.best_score if self._saver else None
        if score is None:
            return float("inf") if self._modes[0] == "min" else -float("inf")
        return score

    @property
    def last_saved_path(self) -> Path | str | None:
        """The file loggers upload: the best one; with ``at_end`` the final one; with
        ``every_epoch`` the latest one."""
        record = self._logged_record()
        if record is None:
            return None
        return record.path if "://" in record.path else Path(record.path)

    @property
    def last_saved_metadata(self) -> dict[str, Any] | None:
        """The record of :attr:`last_saved_path` (epoch, score, every metric, run info)."""
        record = self._logged_record()
        return record.to_dict() if record else None

    def _logged_record(self) -> Record | None:
        saver = self._saver
        if saver is None:
            return None
        if self.at_end and saver.last is not None:
            return saver.last
        if saver.policy.cap > 0:
            return saver.best
        return self._latest

    # -- the training loop ------------------------------------------------------------------

    # learn.validate() sends before_fit, before_epoch, after_epoch and after_fit too, even from
    # inside a fit, but never before_train. Each before_fit opens a frame; a frame becomes a fit
    # at its first trained epoch, and only the innermost frame counts. A fit that ended in an
    # exception (no after_fit) leaves a frame behind, which the next fit's frame covers.

    def before_fit(self) -> None:
        # As fastai's TrackerCallback: the learning-rate finder and get_preds are not training.
        self.run = not hasattr(self, "lr_finder") and not hasattr(self, "gather_preds")
        self._frames.append(_Frame())

    def before_epoch(self) -> None:
        if self._frames:
            self._frames[-1].epoch_trained = self._frames[-1].epoch_cancelled = False

    def before_train(self) -> None:
        frame = self._frames[-1]
        if not frame.fit:
            self._start_fit()
            frame.fit = True
        frame.epoch_trained = True

    def after_cancel_epoch(self) -> None:
        if self._frames:
            self._frames[-1].epoch_cancelled = True

    def after_epoch(self) -> None:
        frame = self._frames[-1] if self._frames else None
        if frame is None or not (frame.fit and frame.epoch_trained) or frame.epoch_cancelled:
            return  # learn.validate(), an epoch skipped by fit's start_epoch, or cancelled
        saver = self._saver
        assert saver is not None
        metrics = self._epoch_metrics()
        decision = saver.step(
            self.epoch,
            metrics,
            write=Staged(self._capture, self._serialize, stream=True),
            step=self.train_iter,
        )
        self._after_step(decision, metrics)

    def _after_step(self, decision: Decision, metrics: Mapping[str, Any]) -> None:
        self.new_best = decision.is_best
        if decision.records:
            self._latest = decision.records[-1]
        if decision.is_best and self._tracks_best:
            print(
                f"Better model found at epoch {self.epoch} with {self.monitor} value: "
                f"{metrics[self.monitor]}."
            )
        if decision.should_stop:
            print(
                f"No improvement since epoch {self.epoch - (self.options.patience or 0)}: "
                "early stopping"
            )
            raise CancelFitException()

    def after_fit(self) -> None:
        frame = self._frames.pop() if self._frames else None
        if frame is None or not frame.fit:
            return
        saver = self._saver
        assert saver is not None
        saver.close()  # every file written, trackers told
        if not (self.at_end or self.every_epoch):
            self._load_best(saver)
        self._upload(saver)

    # -- starting a fit ---------------------------------------------------------------------

    def _start_fit(self) -> None:
        recorder = getattr(self.learn, "recorder", None)
        if recorder is None:
            raise RuntimeError(
                "SaveBestModelCallback reads the epoch's values from the Recorder, and this "
                "Learner has none: keep Recorder in the Learner's callbacks"
            )
        names = _value_names(recorder)
        missing = next((m for m in self.monitors if m not in names), None)
        if missing is not None:
            raise MissingMetricError(missing, names)
        # fastai's learn.save(fname) writes learn.path/learn.model_dir/fname.pth.
        dirpath = str(self.dirpath or Path(self.learn.path) / self.learn.model_dir)
        # WandbCallback(model_name=...) sets fname after this callback was made.
        where = (dirpath, self._template())
        self._take_upload()
        if self._saver is None or self.reset_on_fit or where != self._run_at:
            self._saver = self._new_saver(*where)
        if self._saver.writer:
            # The first save then copies into buffers allocated while the first epoch trains.
            weights = get_model(self.learn.model).state_dict()
            self._stager.reserve({"model": weights} if self.with_opt else weights)
        others = [cb for cb in self.learn.cbs if isinstance(cb, SaveModelCallback)]
        if others:
            warn(
                "the Learner also holds fastai's SaveModelCallback, a second saver (fastai's "
                "WandbCallback(log_model=True) adds one when, at Learner creation, no callback "
                "is named 'save_model'); pass SaveBestModelCallback in Learner(cbs=...) or "
                "remove the other one"
            )

    @property
    def _tracks_best(self) -> bool:
        """fastai's every_epoch tracks no best; bestsave's top_k beside it does."""
        return not self.every_epoch or self.options.top_k != 0

    def _template(self) -> str:
        """The kept files' names: ``fname`` for a single best, as fastai's; named after their
        epoch, as fastai's every_epoch names them, when several may be kept or ``fname`` is
        at_end's final model."""
        if self.filename is not None:
            return self.filename
        fname = _literal(self.fname)
        opts = self.options
        single = len(self.monitors) == 1 and opts.top_k in (None, 1) and opts.delta is None
        if opts.keep_every_n_epochs or (opts.top_k != 0 and (self.at_end or not single)):
            return fname + "_{epoch}"
        return fname

    def _new_saver(self, dirpath: str, template: str) -> BestSaver:
        # fastai overwrites its files: a new run replaces an earlier one of the same name (a
        # cell run again, the next training stage). A later fit of this callback without
        # reset_on_fit continues its own run instead.
        own = (dirpath, template) == self._run_at
        resume = self.options.resume or (own and not self.reset_on_fit)
        trackers = resolve_trackers(self.options.trackers)
        if self._wandb:  # this callback uploads for WandbCallback: not a second time
            trackers = [t for t in trackers if not isinstance(t, WandbTracker)]
        options = replace(
            self.options,
            filename=template,
            resume=resume,
            overwrite=not resume,
            version_names=False,  # learn.save("model") names one file: a new best replaces it
            last_name=_literal(self.fname) if self.at_end else _literal(self.fname) + "_last",
            trackers=trackers,
        )
        saver = BestSaver(
            dirpath,
            extension=".pth",
            writer=rank_distrib() == 0,
            framework="fastai",
            hparams=self._hparams(),
            **options.as_kwargs(),
        )
        self._run_at = (dirpath, template)
        return saver

    def _hparams(self) -> dict[str, Any]:
        learn = self.learn
        hparams: dict[str, Any] = {
            "n_epoch": learn.n_epoch,
            "batch_size": getattr(learn.dls, "bs", None),
            "model": type(get_model(learn.model)).__name__,
            "opt_func": getattr(learn.opt_func, "__name__", type(learn.opt_func).__name__),
            "loss_func": type(learn.loss_func).__name__,
        }
        hparams.update(self._hypers(every_group=True))
        return hparams

    def _hypers(self, every_group: bool = False) -> dict[str, Any]:
        """lr, mom and wd of the last parameter group (the one the Recorder reports), and of
        each group by index when there are several."""
        hypers = list(getattr(getattr(self.learn, "opt", None), "hypers", None) or [])
        if not hypers:
            return {}
        out = {k: float(hypers[-1][k]) for k in _HYPERS if _is_number(hypers[-1].get(k))}
        if every_group and len(hypers) > 1:
            for i, group in enumerate(hypers):
                out.update(
                    {f"{k}_{i}": float(group[k]) for k in _HYPERS if _is_number(group.get(k))}
                )
        return out

    # -- one epoch's values -----------------------------------------------------------------

    def _epoch_metrics(self) -> dict[str, Any]:
        """Every value the Recorder holds for this epoch, by name, then lr, mom and wd."""
        recorder = self.learn.recorder
        metrics = dict(zip(_present_names(recorder), recorder.values[-1], strict=False))
        for key, value in self._hypers().items():
            metrics.setdefault(key, value)
        return metrics

    # -- writing and loading ----------------------------------------------------------------

    def _capture(self) -> Snapshot:
        """The state to save, copied on the training thread (fastai's ``save_model`` format)."""
        state: Any = get_model(self.learn.model).state_dict()
        opt = getattr(self.learn, "opt", None)
        if self.with_opt and opt is not None:
            # fastcore's L becomes a list, so the file loads with weights_only=True and no
            # allow-listed classes; fastai's learn.load reads it all the same.
            state = {"model": state, "opt": _plain(opt.state_dict())}
        return self._stager.snapshot(state)

    @staticmethod
    def _serialize(snapshot: Snapshot, f: BinaryIO) -> None:
        # The saver releases the snapshot's buffers once it is written (or dropped).
        torch.save(snapshot.state, f, pickle_protocol=2)

    def load_record(self, record: Record, with_opt: bool | None = None) -> Record:
        """Load a kept file's weights (and optimizer state with ``with_opt``) into the learner.

        The file is checked against its record's sha256 first and read with
        ``torch.load(weights_only=True)``, so loading never runs pickled code.
        """
        path = fetch(record, **(self.options.storage_options or {}))
        device = getattr(self.learn.dls, "device", None) or "cpu"
        self._load_state(torch.load(path, map_location=device, weights_only=True), record, with_opt)
        return record

    def _load_state(self, state: Any, record: Record, with_opt: bool | None) -> None:
        with_opt = self.with_opt if with_opt is None else with_opt
        has_opt = isinstance(state, dict) and set(state) == {"model", "opt"}
        get_model(self.learn.model).load_state_dict(state["model"] if has_opt else state)
        if not with_opt:
            return
        if self.learn.opt is None:
            self.learn.create_opt()
        if not has_opt:
            warn(f"{record.name} holds no optimizer state (saved with with_opt=False)")
            return
        opt = self.learn.opt
        opt.load_state_dict(state["opt"])
        if isinstance(opt, Optimizer) and not isinstance(opt.hypers, L):
            opt.hypers = L(opt.hypers)  # saved as a list; fastai's Optimizer keeps an L

    def _load_best(self, saver: BestSaver) -> None:
        distrib_barrier()  # rank 0 has written and flushed (saver.close above)
        best = (
            saver.best
            if saver.writer
            else load_manifest(
                saver.dirpath, saver.files.name, **(self.options.storage_options or {})
            ).best
        )
        if best is None:
            if saver.policy.cap > 0:
                warn(
                    f"no best model was kept in {saver.dirpath} ({self.monitor} was never a "
                    "valid number); the learner keeps its final weights"
                )
            return
        held = saver.held_state(best)
        if held is None:
            self.load_record(best)
            return
        # The best is the latest save, still in the saver's buffers: no need to read the file
        # back. fastai's optimizer keeps the tensors it is given, so those are copied.
        if isinstance(held, dict) and set(held) == {"model", "opt"} and self.with_opt:
            device = getattr(self.learn.dls, "device", None) or "cpu"
            held = {"model": held["model"], "opt": _copied(held["opt"], device)}
        self._load_state(held, best, None)

    # -- fastai's WandbCallback -------------------------------------------------------------

    def _take_upload(self) -> None:
        """WandbCallback(log_model=True) uploads ``save_model.last_saved_path`` with the
        *last* epoch's values as metadata; this callback uploads the same file with the record
        of its own epoch instead, once, after the best is final."""
        module = sys.modules.get("fastai.callback.wandb")
        wandb_cb = getattr(module, "WandbCallback", None)
        if wandb_cb is None or getattr(self.learn, "save_model", None) is not self:
            return
        for cb in self.learn.cbs:
            if isinstance(cb, wandb_cb) and cb.log_model:
                cb.log_model = False
                self._wandb.append(cb)

    def _upload(self, saver: BestSaver) -> None:
        taken, self._wandb = self._wandb, []
        for cb in taken:
            cb.log_model = True  # given back, for fits without this callback
        if not taken or not saver.writer:
            return
        import wandb

        record = self._logged_record()
        if wandb.run is None or record is None:
            print("WandbCallback could not retrieve a model to upload")
            return
        artifact = wandb.Artifact(
            name=self.fname, type="model", metadata=record.to_dict(), description="trained model"
        )
        artifact.add_file(
            fetch(record, **(self.options.storage_options or {})), name=f"{self.fname}.pth"
        )
        aliases = ["latest", f"epoch-{record.epoch}"] + (["best"] if record.kind == "best" else [])
        wandb.run.log_artifact(artifact, aliases=aliases)


@dataclass
class _Frame:
    """One before_fit ... after_fit: a fit once an epoch trained, else learn.validate()."""

    fit: bool = False
    epoch_trained: bool = False
    epoch_cancelled: bool = False


def _every_n(every_epoch: bool | int) -> int | None:
    """fastai's ``every_epoch`` (a bool or an int) as an epoch count, None when off."""
    if every_epoch is True:
        return 1
    if every_epoch is False or every_epoch is None:
        return None
    if isinstance(every_epoch, int) and every_epoch >= 0:
        return every_epoch or None
    raise ValueError(f"every_epoch must be a bool or an int >= 1, not {every_epoch!r}")


def _mode(monitor: str, comp: Any) -> Literal["min", "max"]:
    """The core's mode from fastai's ``comp``, else from the metric's name."""
    if comp is not None:
        if any(comp is c or comp == c for c in _MIN_COMPS):
            return "min"
        if any(comp is c or comp == c for c in _MAX_COMPS):
            return "max"
        raise ValueError(f"comp must be np.less or np.greater (or None to infer), not {comp!r}")
    try:
        return infer_mode(monitor)
    except ValueError:
        pass
    # fastai's own default, which a user swapping the class expects.
    mode: Literal["min", "max"] = "min" if "loss" in monitor or "error" in monitor else "max"
    comp_name, better = ("np.less", "lower") if mode == "min" else ("np.greater", "higher")
    warn(
        f"bestsave cannot tell from its name whether {monitor!r} is better higher or lower; "
        f"following fastai's rule, {better} is better (comp={comp_name}). Pass comp=np.less "
        "or comp=np.greater to say which"
    )
    return mode


def _literal(name: str) -> str:
    """``name`` as a file name template that renders to itself."""
    return name.replace("{", "{{").replace("}", "}}")


def _value_names(recorder: Any) -> list[str]:
    """The names the Recorder gives an epoch's values (no ``epoch``, no ``time``)."""
    names = list(recorder.metric_names[1:])
    return names[:-1] if getattr(recorder, "add_time", False) else names


def _present_names(recorder: Any) -> list[str]:
    """The names of the values the Recorder holds this epoch: a cancelled train or validation
    phase leaves its values out, and the names after it shift."""
    names = _value_names(recorder)
    n_train = 1 + (len(recorder.metrics) if recorder.train_metrics else 0)
    train, valid = names[:n_train], names[n_train:]
    return ([] if getattr(recorder, "cancel_train", False) else train) + (
        [] if getattr(recorder, "cancel_valid", False) else valid
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _copied(obj: Any, device: Any) -> Any:
    """``obj`` with every tensor copied to ``device``, as ``torch.load`` would give it."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, copy=True)
    if isinstance(obj, dict):
        return {k: _copied(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copied(v, device) for v in obj)
    return obj


def _plain(obj: Any) -> Any:
    """``obj`` with every fastcore ``L`` turned into a list (the stager copies lists)."""
    if isinstance(obj, L):
        return [_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(o) for o in obj]
    return obj
