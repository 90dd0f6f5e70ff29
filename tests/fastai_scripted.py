"""A fastai validation metric with scripted values, shared by the fastai integration tests."""

from __future__ import annotations

from typing import Any

import pytest

fastai_learner = pytest.importorskip("fastai.learner")


class Scripted(fastai_learner.Metric):  # type: ignore[misc]
    """A validation metric whose value at epoch e is ``values[e]``."""

    def __init__(self, values: list[float], name: str = "score") -> None:
        self.values, self._name, self.epoch = list(values), name, 0

    def accumulate(self, learn: Any) -> None:
        self.epoch = learn.epoch

    @property
    def value(self) -> float:
        return self.values[self.epoch]

    @property
    def name(self) -> str:
        return self._name
