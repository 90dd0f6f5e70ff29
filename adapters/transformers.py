"""Hugging Face Transformers: a ``TrainerCallback`` that keeps the best models the bestsave way.

The decision is taken at every evaluation, whatever ``save_steps`` says, so the best is chosen
among all of them; each kept checkpoint is a folder that ``from_pretrained`` loads (weights as
safetensors, the config, and the tokenizer or processor the Trainer holds), written in the
background from a copy of the weights in host memory.

Example:
    >>> import contextlib, io, tempfile, torch
    >>> with contextlib.redirect_stdout(io.StringIO()):  # its W&B integration may print
    ...     from transformers import BertConfig, BertForSequenceClassification, Trainer
    ...     from transformers import TrainingArguments
    >>> from bestsave.adapters.transformers import BestSaveCallback
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
    ...                     num_attention_heads=2, intermediate_size=16)
    >>> model = BertForSequenceClassification(config)
    >>> data = [{"input_ids": torch.randint(0, 32, (6,)), "labels": i % 2} for i in range(16)]
    >>> out = tempfile.mkdtemp()
    >>> args = TrainingArguments(out, eval_strategy="epoch", save_strategy="no",
    ...                          num_train_epochs=3, report_to=[], disable_tqdm=True)
    >>> best = BestSaveCallback(monitor="eval_loss", top_k=2, load_best_at_end=True)
    >>> trainer = Trainer(model, args, train_dataset=data, eval_dataset=data, callbacks=[best])
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {'eval_loss': ...
    >>> best.best.path == trainer.state.best_model_checkpoint
    True
    >>> reloaded = BertForSequenceClassification.from_pretrained(best.best.path)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from bestsave import BestSaver, Record, SaverOptions, Staged, fetch
from bestsave.messages import warn
from bestsave.staging import Snapshot, Stager

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from bestsave.options import Options

__all__ = ["BestSaveCallback"]

WEIGHTS = "model.safetensors"

# The TrainingArguments a record keeps as hyperparameters.
_HPARAMS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
            "gradient_accumulation_steps", "weight_decay", "warmup_steps", "lr_scheduler_type",
            "optim", "seed", "fp16", "bf16", "eval_strategy", "eval_steps")  # fmt: skip


class BestSaveCallback(TrainerCallback):
    """Keeps the best checkpoints of a ``transformers.Trainer``, judged at every evaluation.

    Args:
        monitor: The metric that decides, as ``metric_for_best_model`` names it: an
            evaluation's metric with or without the ``eval_`` prefix (``"f1"`` and
            ``"eval_f1"`` both mean ``compute_metrics``'s ``f1``); or several.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (from the name), one per monitor or one for all.
        dirpath: Where the checkpoints and the run's files go; ``args.output_dir`` by default.
        filename: Template of each kept folder's name; ``checkpoint-{step}`` as the Trainer's.
        save_last: Also keep ``last``, the latest evaluation's checkpoint with what
            ``trainer.train(resume_from_checkpoint=...)`` needs (optimizer, scheduler, RNG,
            ``trainer_state.json``); kept folders then hold it too, so that ``last`` is a link
            to the best when they are the same evaluation. A killed run resumes with
            ``resume=True`` and ``resume_from_checkpoint=os.path.join(dirpath, "last")``: its
            best score, kept set and patience go on.
        load_best_at_end: At the end of training, put the best checkpoint's weights back into
            the model (``Trainer(load_best_model_at_end=True)``'s job, for bestsave's best).
        **options: bestsave's options (:class:`bestsave.SaverOptions`): ``top_k``, ``delta``,
            ``min_delta``, ``patience`` (stops training through ``control``), ``smooth``,
            ``tie_break``, ``warmup``, ``keep_every_n_epochs``, ``baseline``, ``resume``,
            ``trackers``, ``async_write``, ``staging_memory``...

    ``best`` is the best :class:`bestsave.Record` and ``kept`` the kept ones, as on
    :class:`bestsave.BestSaver`; the Trainer's ``state.best_metric``,
    ``state.best_model_checkpoint`` and ``state.best_global_step`` name the same best.
    """

    def __init__(
        self,
        monitor: str | Sequence[str] = "eval_loss",
        mode: str | Sequence[str] = "auto",
        *,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str = "checkpoint-{step}",
        save_last: bool = False,
        load_best_at_end: bool = False,
        **options: Unpack[Options],
    ) -> None:
        self.options = SaverOptions.of(monitor=_evaluated(monitor), mode=mode, filename=filename,
                                       save_last=save_last, **options)  # fmt: skip
        """bestsave's options (:class:`bestsave.SaverOptions`), checked now."""
        if not isinstance(load_best_at_end, bool):
            raise ValueError(f"load_best_at_end must be True or False, not {load_best_at_end!r}")
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.load_best_at_end = load_best_at_end
        self.saver: BestSaver | None = None
        self._stager = Stager(self.options.staging_memory)
        self._training = False

    @property
    def best(self) -> Record | None:
        """The best checkpoint's record, or None before the first."""
        return self.saver.best if self.saver is not None else None

    @property
    def kept(self) -> list[Record]:
        """The kept checkpoints' records, best first."""
        return self.saver.kept if self.saver is not None else []

    # -- the Trainer's events -----------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if args.deepspeed or args.fsdp:
            raise ValueError(
                "BestSaveCallback saves the model's weights from one process and cannot yet "
                "save a model DeepSpeed or FSDP shards over processes: keep the Trainer's own "
                "saving (save_strategy) for such runs, or train with DDP"
            )
        if args.save_strategy != "no":
            warn(
                f"the Trainer also saves checkpoints (save_strategy={str(args.save_strategy)!r})"
                ": pass TrainingArguments(save_strategy='no') to leave saving to bestsave"
            )
        dirpath = self.dirpath or args.output_dir
        assert dirpath is not None, "TrainingArguments sets output_dir"
        self.saver = BestSaver(
            dirpath,
            writer=args.should_save,
            framework="transformers",
            hparams=_hparams(args, model),
            **self.options.as_kwargs(),
        )
        if model is not None and args.should_save:
            self._stager.reserve({"model": _weights(model)})  # the first save then only copies
        self._training = True

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        model: torch.nn.Module | None = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.saver is None or model is None or not self._training:
            return  # trainer.evaluate() outside train(), on a test set say: not a candidate
        logged = dict(_train_logs(state))
        logged.update(metrics or {})
        # Every process's RNG, gathered on every process alike before the decision, since
        # only the writer writes and the Trainer resumes each process from a file of its own.
        rng = _rng_states(args) if self.options.save_last else []
        decision = self.saver.step(
            _epoch(state),
            logged,
            step=state.global_step,
            write=self._writer(state, model, processing_class, rng, **kwargs),
        )
        if decision.should_stop:
            control.should_training_stop = True
        self._tell(state)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self._training = False
        if self.saver is None:
            return
        self.saver.close()
        self._tell(state)
        best = self.saver.best
        if self.load_best_at_end and best is not None and model is not None:
            held = self.saver.held_state(best)
            weights = held["model"] if held is not None else None
            if weights is None:
                folder = fetch(best, **dict(self.options.storage_options or {}))
                weights = load_file(os.path.join(folder, WEIGHTS))
            model.load_state_dict(weights, strict=False)  # tied weights are saved once

    # -- writing ------------------------------------------------------------------------------

    def _writer(
        self,
        state: TrainerState,
        model: Any,
        processing_class: Any,
        rng: list[dict[str, Any]],
        **kwargs: Any,
    ) -> Staged:
        """A folder ``from_pretrained`` loads (and with ``save_last``, that the Trainer resumes
        from): the state copied on the training thread, then the files written in the
        background."""
        optimizer, scheduler = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        full = bool(self.options.save_last)

        def capture() -> Snapshot:
            captured: dict[str, Any] = {"model": _weights(model)}
            if full:
                captured.update(
                    optimizer=optimizer.state_dict() if optimizer is not None else None,
                    scheduler=scheduler.state_dict() if scheduler is not None else None,
                    rng=rng,
                    trainer_state=json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True),
                )
            return self._stager.snapshot(captured)

        def serialize(snapshot: Snapshot, path: str) -> None:
            os.makedirs(path)
            captured = snapshot.state
            weights = {k: v.contiguous() for k, v in captured["model"].items()}
            save_file(weights, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
            model.config.save_pretrained(path)
            generation = getattr(model, "generation_config", None)
            if generation is not None and model.can_generate():
                generation.save_pretrained(path)
            if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                processing_class.save_pretrained(path)
            if not full:
                return
            # The Trainer's own checkpoint files, as its _save_checkpoint names them.
            for name, key in (("optimizer.pt", "optimizer"), ("scheduler.pt", "scheduler")):
                if captured[key] is not None:
                    torch.save(captured[key], os.path.join(path, name))
            if len(captured["rng"]) == 1:
                torch.save(captured["rng"][0], os.path.join(path, "rng_state.pth"))
            else:
                for index, states in enumerate(captured["rng"]):
                    torch.save(states, os.path.join(path, f"rng_state_{index}.pth"))
            with open(os.path.join(path, "trainer_state.json"), "w") as f:
                f.write(captured["trainer_state"] + "\n")

        return Staged(capture, serialize)

    def _tell(self, state: TrainerState) -> None:
        """The Trainer's own view of the best, for what reads it (its EarlyStoppingCallback,
        the model card, the Hub upload)."""
        best = self.best
        if best is None:
            return
        state.best_metric = best.score
        state.best_model_checkpoint = best.path
        state.best_global_step = best.step


def _evaluated(monitor: str | Sequence[str]) -> str | list[str]:
    """Monitor names as the Trainer reads ``metric_for_best_model``: ``"f1"`` is the
    evaluation's ``"eval_f1"``."""
    names = [monitor] if isinstance(monitor, str) else list(monitor)
    named = [n if not isinstance(n, str) or n.startswith("eval_") else f"eval_{n}" for n in names]
    return named[0] if isinstance(monitor, str) else named


def _rng_states(args: TrainingArguments) -> list[dict[str, Any]]:
    """Each process's random generators, by process index, as the Trainer's
    ``_save_rng_state`` keeps them (one file per process when there are several)."""
    distributed = args.world_size > 1
    mine: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        cuda = torch.cuda.random
        mine["cuda"] = cuda.get_rng_state_all() if distributed else cuda.get_rng_state()
    if not (distributed and torch.distributed.is_initialized()):
        return [mine]
    every: list[Any] = [None] * args.world_size
    torch.distributed.all_gather_object(every, mine)
    return every


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, each tensor once: tied weights (an output layer sharing the input
    embedding) keep their first name, as ``save_pretrained`` does, and are tied again when
    ``from_pretrained`` loads them."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def _epoch(state: TrainerState) -> int:
    """The 0-based epoch an evaluation fell in (the Trainer counts epochs done as a float)."""
    return max(0, math.ceil((state.epoch or 0) - 1e-9) - 1)


def _train_logs(state: TrainerState) -> dict[str, Any]:
    """The latest training log (``loss``, ``grad_norm``, ``learning_rate``), beside the
    evaluation's metrics in the record."""
    for entry in reversed(state.log_history):
        if "loss" in entry:
            return {k: v for k, v in entry.items() if k not in ("epoch", "step")}
    return {}


def _hparams(args: TrainingArguments, model: torch.nn.Module | None) -> dict[str, Any]:
    hparams = {k: _plain(getattr(args, k, None)) for k in _HPARAMS}
    if model is not None:
        hparams["model_type"] = getattr(model.config, "model_type", type(model).__name__)
        hparams["params"] = sum(p.numel() for p in model.parameters())
    return hparams


def _plain(value: Any) -> Any:
    """An argument as JSON holds it (the Trainer's enums as their values)."""
    return getattr(value, "value", value)
