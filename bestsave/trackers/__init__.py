"""Experiment trackers that follow a saver: Weights & Biases and MLflow."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def resolve_trackers(spec: str | Iterable[Any]) -> list[Any]:
    """Tracker objects for a saver's ``trackers`` argument."""
    if isinstance(spec, str):
        spec = () if spec == "auto" else (spec,)
    out = []
    for item in spec:
        if isinstance(item, str):
            raise ValueError(f"unknown tracker {item!r}; use 'wandb', 'mlflow' or a tracker object")
        out.append(item)
    return out
