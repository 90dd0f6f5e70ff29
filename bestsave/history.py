"""One line of ``history.jsonl``: an evaluation, everything logged at it, and what it led to.

>>> line = HistoryLine(epoch=3, step=40, time="2026-01-01T00:00:00+00:00", elapsed_s=1.5,
...                    score=0.9, raw_score=0.9, metrics={"val_acc": 0.9},
...                    decision=HistoryDecision(saved=True, is_best=True, kind=["best"],
...                                             files=["epoch=003.pt"], evicted=[]))
>>> HistoryLine.from_json(line.to_json()) == line
True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class HistoryDecision:
    """What an evaluation led to."""

    saved: bool
    is_best: bool
    kind: list[str] = field(default_factory=list)
    """Why each file was kept (best, top_k, ensemble, periodic)."""
    files: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    best_for: list[str] | None = None
    """With several monitors: those this evaluation is a new best for."""
    lost: list[str] | None = None
    """Files decided on but never written: their write failed with ``error``."""
    error: str | None = None


@dataclass(frozen=True)
class HistoryLine:
    """One evaluation."""

    epoch: int
    step: int | None
    time: str
    elapsed_s: float
    score: float | None
    """The score judged (smoothed, with ``smooth``), None when invalid."""
    raw_score: float | None
    metrics: dict[str, Any]
    decision: HistoryDecision
    scores: dict[str, float | None] | None = None
    """With several monitors: each one's score."""

    def to_json(self) -> str:
        """The line as written to ``history.jsonl`` (strict JSON, newline included); keys
        with no value are left out."""
        # Shallow: asdict would deep-copy every metric, once per evaluation.
        decision = {k: v for k, v in vars(self.decision).items() if v is not None}
        data = {**vars(self), "decision": decision}
        if self.scores is None:
            del data["scores"]
        return json.dumps(data, default=str, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> HistoryLine:
        data = json.loads(text)
        return cls(**{**data, "decision": HistoryDecision(**data["decision"])})

    def lost(self, names: set[str], error: str) -> HistoryLine:
        """This line with the files in ``names`` never written: what it saved and evicted is
        undone, and the loss recorded."""
        if not names & set(self.decision.files):
            return self
        decision = replace(
            self.decision,
            saved=False,
            kind=[],
            files=[],
            evicted=[],
            lost=sorted(names),
            error=error,
        )
        return replace(self, decision=decision)
