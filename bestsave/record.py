"""Record: what is known about one kept checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

Kind = Literal["best", "top_k", "ensemble", "periodic", "last", "exception"]
"""Why a checkpoint was kept."""

RANKED: frozenset[str] = frozenset({"best", "top_k", "ensemble"})
"""The kinds kept for their score: ranked against each other, and evicted by better ones."""


@dataclass(frozen=True)
class Record:
    """One kept checkpoint and everything that was true at the evaluation that produced it.

    In memory ``path`` is the file to load (the directory joined with the file name); on disk,
    in the manifest and the sidecar, it is the file name alone, so a directory can be moved.

    >>> r = Record(path="runs/a/epoch=001.pt", kind="best", epoch=1, step=10, monitor="val_acc",
    ...            mode="max", score=0.9, metrics={"val_acc": 0.9, "train_loss": 0.3})
    >>> r.name, r.metrics["train_loss"]
    ('epoch=001.pt', 0.3)
    """

    path: str
    kind: str
    """Why it was kept: best, top_k, ensemble, periodic, last or exception."""
    epoch: int
    step: int | None
    monitor: str
    mode: str
    score: float | None
    """The score judged: the monitored value, or its smoothed value with ``smooth``."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Every metric logged at that evaluation, train and validation."""
    time: str = ""
    """UTC time of the evaluation, ISO-8601."""
    elapsed_s: float = 0.0
    """Seconds since the run started."""
    bytes: int = 0
    sha256: str = ""
    run: dict[str, Any] = field(default_factory=dict)
    """Run info: id, host, framework and versions, git commit and dirty flag, hyperparameters."""
    id: int = -1
    """Index of the evaluation that produced it, counted from the run's first."""
    raw_score: float | None = None
    """The monitored value as logged (equal to ``score`` unless smoothed)."""
    parts: dict[str, tuple[int, str]] = field(default_factory=dict)
    """For a checkpoint that is a folder (a sharded checkpoint): size and sha256 of each file
    in it, by path inside it; ``bytes`` and ``sha256`` then describe the whole
    (:func:`bestsave.store.tree_digest`). Empty for a file."""
    staging: str = ""
    """How it was written from host memory, within ``staging_memory``: ``"two sets"``, ``"one
    set"``, ``"chunked"`` or ``"streaming"`` (:mod:`bestsave.memory`); empty when the writer
    wrote the file itself, or for a run written before budgets were."""

    @property
    def ranked(self) -> bool:
        """Kept for its score (best, top-k or ensemble), and so ranked by it."""
        return self.kind in RANKED and self.score is not None

    @property
    def name(self) -> str:
        """The file name, relative to the checkpoint directory."""
        return self.path.replace("\\", "/").rsplit("/", 1)[-1]

    def moved(self, dirpath: str) -> Record:
        """This record with ``path`` in ``dirpath``."""
        return replace(self, path=join(dirpath, self.name))

    def to_json(self) -> str:
        """The record as its sidecar file holds it (strict JSON, newline included)."""
        return json.dumps(self.to_dict(), indent=1, default=str, allow_nan=False) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """The record as stored: ``path`` is the file name alone."""
        data = asdict(self)
        data["path"] = self.name
        for name in ("parts", "staging"):  # as written before folders and budgets were
            if not data[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], dirpath: str | None = None) -> Record:
        """A record read from a manifest or sidecar; ``dirpath`` makes ``path`` loadable."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if "parts" in known:
            known["parts"] = {p: (int(n), str(sha)) for p, (n, sha) in known["parts"].items()}
        record = cls(**known)
        if dirpath is not None:
            record = replace(record, path=join(dirpath, record.name))
        return record


def join(dirpath: str, name: str) -> str:
    """``dirpath`` and a file name, for local paths and URLs alike."""
    return dirpath.rstrip("/") + "/" + name if dirpath else name
