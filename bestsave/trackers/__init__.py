"""Experiment trackers that follow a saver: Weights & Biases and MLflow.

A tracker hears of every kept checkpoint after its file is committed (see
:class:`bestsave.Tracker`), and shows the best model with the metrics of *its* epoch. A tracker
that fails gives a warning; the checkpoint on disk is never lost for it.

Example:
    ```python
    import mlflow, wandb
    from bestsave import BestSaver
    from bestsave.trackers import MLflowTracker, WandbTracker

    wandb.init(project="demo")
    with mlflow.start_run():
        BestSaver("a/", monitor="val_loss")           # trackers="auto": both active runs
        BestSaver("b/", monitor="val_loss", trackers=["wandb"])
        BestSaver("c/", monitor="val_loss",
                  trackers=[WandbTracker(upload="end"), MLflowTracker(register_model_name="m")])
    ```

Importing this package imports neither wandb nor mlflow; a tracker imports its library when it
first logs, and ``"auto"`` looks only at libraries the program has imported.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from bestsave.tracker import Tracker
from bestsave.trackers.mlflow import MLflowTracker
from bestsave.trackers.wandb import WandbTracker

__all__ = ["MLflowTracker", "WandbTracker", "active_trackers", "resolve_trackers"]

_METHODS = ("on_save", "on_evict", "on_end")


def active_trackers() -> list[Tracker]:
    """Trackers for the W&B and MLflow runs active now (what ``trackers="auto"`` means).

    A W&B run is active after ``wandb.init()`` (Lightning's ``WandbLogger`` and fastai's
    ``WandbCallback`` call it); an MLflow run inside ``mlflow.start_run()`` on this thread.
    A library that was never imported cannot have a run, and is not imported to look.
    Lightning's ``MLFlowLogger`` leaves no active run: see :class:`MLflowTracker` for it.
    """
    found: list[Tracker] = []
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        found.append(WandbTracker(run=wandb.run))
    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow is not None and hasattr(mlflow, "active_run") else None
    if mlflow is not None and run is not None:
        found.append(MLflowTracker(run_id=run.info.run_id, tracking_uri=mlflow.get_tracking_uri()))
    return found


def resolve_trackers(spec: str | Tracker | Iterable[str | Tracker] | None) -> list[Tracker]:
    """Tracker objects for a saver's ``trackers`` argument.

    ``spec`` is ``"auto"`` (the active W&B and MLflow runs, if any), ``"wandb"``, ``"mlflow"``,
    a tracker object, None (no trackers), or a list of these.

    >>> resolve_trackers(()), resolve_trackers(None)
    ([], [])
    """
    if spec is None:
        return []
    items = [spec] if isinstance(spec, str) or not isinstance(spec, Iterable) else list(spec)
    out: list[Tracker] = []
    for item in items:
        if isinstance(item, str) and item == "auto":
            out += active_trackers()
        elif isinstance(item, str):
            out.append(_named(item))
        else:
            missing = [m for m in _METHODS if not callable(getattr(item, m, None))]
            if missing:
                raise TypeError(
                    f"tracker {item!r} lacks {', '.join(missing)}: a tracker needs "
                    "on_save(record, path), on_evict(record) and on_end(best); "
                    "or pass 'wandb', 'mlflow' or 'auto'"
                )
            if isinstance(item, (WandbTracker, MLflowTracker)):
                item.bind()  # built before its run was started: the run active now
            out.append(item)
    return out


def _named(name: str) -> Tracker:
    if name == "wandb":
        return WandbTracker()
    if name == "mlflow":
        return MLflowTracker()
    raise ValueError(f"unknown tracker {name!r}; use 'auto', 'wandb', 'mlflow' or a tracker object")
