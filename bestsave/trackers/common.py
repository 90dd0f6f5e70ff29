"""What every tracker does with a record: its JSON form, its ``best_*`` values, its file.

Nothing here imports a tracking library.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any, Literal

from bestsave.record import Record

Upload = Literal["best", "kept", "end"]
"""When a tracker uploads checkpoints: every new best, every kept file, or the final best only."""


def require(module: str, tracker: str) -> None:
    """Fail at construction, not at the first checkpoint, when the tracking library is missing.

    ``find_spec`` looks for the package without importing it.
    """
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(
            f"{tracker} needs the {module!r} package: pip install {module} "
            f"(or pip install 'bestsave[{module}]')"
        )


def record_dict(record: Record) -> dict[str, Any]:
    """The record as plain JSON values: what the sidecar file holds."""
    data: dict[str, Any] = json.loads(record.to_json())
    return data


def best_values(record: Record) -> dict[str, Any]:
    """``best_<metric>`` for every metric of the record's epoch, then ``best_epoch``/``best_step``.

    The record's own epoch and step come last so that a logged metric named ``epoch`` (Lightning
    logs one) never hides them.

    >>> r = Record(path="x.pt", kind="best", epoch=3, step=40, monitor="val_loss", mode="min",
    ...            score=0.2, metrics={"val_loss": 0.2, "train_loss": 0.1})
    >>> best_values(r)
    {'best_val_loss': 0.2, 'best_train_loss': 0.1, 'best_epoch': 3, 'best_step': 40}
    """
    values = {f"best_{name}": value for name, value in record.metrics.items()}
    values["best_epoch"] = record.epoch
    values["best_step"] = record.step
    return values


def is_local(path: str) -> bool:
    """A path on this machine's file system (the saver gives absolute paths for those), as
    opposed to a remote URL (``s3://bucket/run/x.ckpt``)."""
    return "://" not in path


def uploads(upload: Upload, kind: str) -> bool:
    """Whether a record of this kind is uploaded when it is saved."""
    if upload == "best":
        return kind == "best"
    return upload == "kept"


def check_upload(upload: str, allowed: tuple[str, ...]) -> None:
    if upload not in allowed:
        choices = ", ".join(repr(u) for u in allowed)
        raise ValueError(f"upload must be one of {choices}, not {upload!r}")
