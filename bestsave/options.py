"""bestsave's options, described once: :class:`BestSaver` and every adapter take them.

:class:`SaverOptions` holds and checks them; a bad value raises ``ValueError`` naming the fix
when the options are built, before any training. :class:`Options` lists, for type checkers and
``LightningCLI``, the ones an adapter passes on as they are (``**options``); each adapter
declares the rest under its framework's names, and :class:`CoreOptions` those
:class:`bestsave.BestSaver` takes beside them.

>>> SaverOptions(monitor="val_auroc", top_k=3, delta=0.01).top_k
3
>>> SaverOptions(monitor="val_loss", patience=0)
Traceback (most recent call last):
...
ValueError: patience must be None or an int >= 1, not 0; or None never to stop
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypedDict

from bestsave.memory import parse_size
from bestsave.monitor import Monitor, resolve_mode
from bestsave.naming import DEFAULT_TEMPLATE, check_template
from bestsave.policy import Policy, Smooth

TieBreak = str | tuple[str, str] | None
"""A metric that decides ties: its name (mode inferred) or ``(name, mode)``."""


class SharedOptions(TypedDict, total=False):
    """The options every adapter passes on to its :class:`bestsave.BestSaver` as they are,
    each described on :class:`SaverOptions`. fastai's callback takes ``min_delta`` itself, in
    its own place; the other adapters take it with these (:class:`Options`)."""

    top_k: int | None
    delta: float | None
    keep_every_n_epochs: int | None
    patience: int | None
    baseline: float | None
    smooth: Smooth
    tie_break: TieBreak
    warmup: int
    resume: bool
    trackers: str | Iterable[Any]
    async_write: bool
    staging_memory: int | str | None
    on_write_error: Literal["raise", "warn"]
    storage_options: Mapping[str, Any] | None


class Options(SharedOptions, total=False):
    """The options an adapter passes on as they are, ``min_delta`` included."""

    min_delta: float


class CoreOptions(Options, total=False):
    """The options :class:`bestsave.BestSaver` takes beside the monitor and mode: an adapter's
    :class:`Options`, and those an adapter sets from its framework's own arguments."""

    save_last: bool | Literal["link"]
    filename: str
    last_name: str
    periodic_start: int | None
    name: str | None
    version_names: bool
    overwrite: bool


# The options a manifest records, in the order it has always written them.
_RECORDED = (
    "warmup",
    "min_delta",
    "top_k",
    "delta",
    "keep_every_n_epochs",
    "periodic_start",
    "patience",
    "baseline",
    "save_last",
    "filename",
    "last_name",
)


@dataclass(frozen=True, kw_only=True)
class SaverOptions:
    """What a saver keeps and how: the decision rules, the file names, what happens to an
    earlier run, and how files are written.

    Attributes:
        monitor: The metric that decides, e.g. ``"val_auroc"``; or several, each keeping its
            own best (or top-k) in the same directory, files shared when one epoch wins several.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (from the metric's name; a name it cannot
            place raises); one per monitor when there are several.
        min_delta: An improvement must beat the best by more than this.
        top_k: Keep the k best; -1 every valid score; 0 none (history only). None: 1 without
            ``delta``, no cap with it.
        delta: Keep every checkpoint within ``delta`` of the best (a near-best ensemble).
        keep_every_n_epochs: Also keep epochs n-1, 2n-1, ... (0-based), whatever their score.
            Without ``top_k``, ``delta`` or ``patience`` to judge, the monitor may go unlogged.
        periodic_start: The first epoch ``keep_every_n_epochs`` keeps (n-1 by default; 0 keeps
            epochs 0, n, 2n, ...).
        save_last: Keep a rolling ``last`` checkpoint for resuming, written at every evaluation
            (``True`` or ``"link"``; both hard-link it to a kept file holding the same state
            instead of writing it twice).
        patience: Evaluations without improvement before the saver says to stop.
        filename: Template for kept files; ``{epoch}``, ``{step}``, ``{monitor}``, ``{score}`` and
            any logged metric (``{val_loss:.3f}``, ``{val/loss:.3f}``) may appear.
        last_name: Template of the ``last`` file's name (without the extension).
        baseline: A score must be better than this (``min_delta`` aside) to be best or kept
            (Keras's ``initial_value_threshold``); a resumed run's best replaces it.
        smooth: Judge on a smoothed score: ``N`` (mean of the last N valid scores) or
            ``("ema", alpha)``. Records and history keep the raw score beside it.
        tie_break: A metric that decides ties (equal scores, or within ``min_delta``): its
            name (mode inferred) or ``(name, mode)``. Without it a tie keeps the incumbent.
        warmup: Epochs before this are never best nor kept for their score (history, periodic
            and last checkpoints still are), so early spikes never become the best.
        resume: Continue the run of this name in the directory (a new run when there is none).
        overwrite: Start a new run over an earlier run of this name; the earlier run stays
            whole until this one has kept its first checkpoint, then its files are deleted.
            Without ``resume`` or ``overwrite``, an earlier run that kept a checkpoint for its
            score is an error (:class:`bestsave.RunExistsError`); one that kept none is replaced.
            The framework adapters always start afresh this way, as their frameworks do.
        name: The run's name in the directory, the folder in ``.bestsave`` that holds its
            manifest, history and records; by default made from ``filename`` and the first
            monitor, so savers that write differently named files share a directory.
        version_names: A new file whose name a file that is not this run's already holds gets
            ``-v1``, ``-v2``... (Lightning's rule); False replaces that file, as Keras and
            fastai overwrite theirs.
        trackers: ``"auto"`` (a W&B or MLflow run already active), ``"wandb"``, ``"mlflow"``, or
            objects with ``on_save``/``on_evict``/``on_end`` (see :class:`bestsave.Tracker`).
        async_write: Write snapshots of the state in a background thread: the training loop
            pays only for the copy into host memory. False writes everything before the
            evaluation returns.
        staging_memory: The host memory the copies of the state for background writes may
            take: bytes, or a size such as ``"8GB"``. None: half of what the process may still
            take when training starts (and a quarter of physical memory at most for pinned
            copies of GPU state). A state that does not fit twice is written through one copy,
            then in chunks, then straight from training's tensors (see the README's "Bounded
            memory"); the record says which (``Record.staging``). The adapters give it to the
            :class:`~bestsave.staging.Stager` that copies the state; with a ``Staged`` writer
            of your own, make its Stager with it.
        on_write_error: ``"raise"`` stops training with the write's error; ``"warn"`` warns
            and trains on. Either way the previous best stays intact.
        storage_options: Passed to fsspec for a remote directory (``s3://bucket/run``).
    """

    monitor: str | Sequence[str]
    mode: str | Sequence[str] = "auto"
    min_delta: float = 0.0
    top_k: int | None = None
    delta: float | None = None
    keep_every_n_epochs: int | None = None
    periodic_start: int | None = None
    save_last: bool | Literal["link"] = False
    patience: int | None = None
    filename: str = DEFAULT_TEMPLATE
    last_name: str = "last"
    baseline: float | None = None
    smooth: Smooth = None
    tie_break: TieBreak = None
    warmup: int = 0
    resume: bool = False
    overwrite: bool = False
    name: str | None = None
    version_names: bool = True
    trackers: str | Iterable[Any] = "auto"
    async_write: bool = True
    staging_memory: int | str | None = None
    on_write_error: Literal["raise", "warn"] = "raise"
    storage_options: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        names = monitor_names(self.monitor)
        if len(set(names)) != len(names):
            raise ValueError(f"monitor lists a metric twice: {list(names)!r}")
        modes = self.modes
        if len(modes) != len(names):
            raise ValueError(
                f"mode must be one mode for every monitor or one per monitor; got {len(modes)} "
                f"modes for {len(names)} monitors"
            )
        for mode in modes:
            if mode not in ("auto", "min", "max"):
                raise ValueError(f"mode must be 'min', 'max' or 'auto', not {mode!r}")
        if self.save_last not in (False, True, "link"):
            raise ValueError(f"save_last must be False, True or 'link', not {self.save_last!r}")
        if self.on_write_error not in ("raise", "warn"):
            raise ValueError(
                f"on_write_error must be 'raise' or 'warn', not {self.on_write_error!r}"
            )
        for flag in ("async_write", "resume", "overwrite", "version_names"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, not {getattr(self, flag)!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite cannot both be set: continue, or start afresh")
        parse_size(self.staging_memory)
        check_template(self.filename)
        check_template(self.last_name)
        self.policy(Monitor("score", "max", self.min_delta))  # the rules' own checks

    @classmethod
    def of(cls, **options: Any) -> SaverOptions:
        """Options from keyword arguments; a name that is no option is a ``TypeError`` with
        the closest one, as a misspelt keyword argument is.

        >>> SaverOptions.of(monitor="val_loss", patiance=3)
        Traceback (most recent call last):
        ...
        TypeError: patiance is not an option of bestsave; did you mean patience?
        """
        known = {f.name for f in fields(cls)}
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise TypeError(f"{key} is not an option of bestsave{hint}")
        return cls(**options)

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of :class:`bestsave.BestSaver`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def described(self, extension: str) -> dict[str, Any]:
        """The rules and names as a run's manifest records them."""
        policy = self.policy(Monitor("score", "max", self.min_delta))
        tie, smooth = policy.tie_break, policy.smooth
        return {
            "smooth": list(smooth) if isinstance(smooth, tuple) else smooth,
            "tie_break": [tie.name, tie.mode] if tie else None,
            **{k: getattr(self, k) for k in _RECORDED},
            "extension": extension,
        }

    @property
    def monitors_named(self) -> tuple[str, ...]:
        return monitor_names(self.monitor)

    @property
    def modes(self) -> tuple[str, ...]:
        mode = self.mode
        return (mode,) * len(self.monitors_named) if isinstance(mode, str) else tuple(mode)

    def monitors(self) -> list[Monitor]:
        """The monitored metrics with their directions (``"auto"`` read from the names)."""
        return [
            Monitor(n, resolve_mode(n, m), self.min_delta)
            for n, m in zip(self.monitors_named, self.modes, strict=True)
        ]

    def policy(self, monitor: Monitor) -> Policy:
        """The rules for one monitored metric."""
        return Policy(
            monitor,
            top_k=self.top_k,
            delta=self.delta,
            keep_every_n_epochs=self.keep_every_n_epochs,
            patience=self.patience,
            baseline=self.baseline,
            smooth=self.smooth,
            tie_break=_tie_break(self.tie_break),
            warmup=self.warmup,
            periodic_start=self.periodic_start,
        )


def monitor_names(monitor: str | Sequence[str]) -> tuple[str, ...]:
    """The monitored metrics' names: one, or several (each keeps its own best; the first is
    the one a framework's single "best" follows)."""
    names = (monitor,) if isinstance(monitor, str) else tuple(monitor)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"monitor must name a logged metric, or list several, not {monitor!r}")
    return names


def _tie_break(tie_break: TieBreak) -> Monitor | None:
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
