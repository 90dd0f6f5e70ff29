"""What to keep: the decision rules, as pure functions of the scores seen so far.

Nothing here does I/O. :meth:`Policy.decide` takes the state after the previous evaluations and
one new score, and returns what to do (keep? as what? evict whom? stop?) with the next state.
The saver carries it out; every adapter reaches the same decision from the same scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from bestsave.monitor import Monitor

Kind = Literal["best", "top_k", "ensemble", "periodic", "last", "exception"]


@dataclass(frozen=True)
class Candidate:
    """A checkpoint kept for its score; ``id`` is the evaluation that produced it."""

    id: int
    score: float


@dataclass(frozen=True)
class PolicyState:
    """Everything the rules remember between evaluations (saved in the manifest for resume)."""

    best: float | None = None
    """Score of the last improvement: the one a new score must beat by ``min_delta``."""
    best_id: int | None = None
    peak: float | None = None
    """Best valid score seen, the delta-ensemble's baseline (which ignores ``min_delta``)."""
    since_improvement: int = 0
    ranked: tuple[Candidate, ...] = ()
    """Checkpoints kept for their score (best, top-k, ensemble), best first."""

    def to_dict(self) -> dict[str, object]:
        return {
            "best": self.best,
            "best_id": self.best_id,
            "peak": self.peak,
            "since_improvement": self.since_improvement,
            "ranked": [[c.id, c.score] for c in self.ranked],
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PolicyState:
        ranked = data.get("ranked") or []
        return cls(
            best=data.get("best"),  # type: ignore[arg-type]
            best_id=data.get("best_id"),  # type: ignore[arg-type]
            peak=data.get("peak"),  # type: ignore[arg-type]
            since_improvement=int(data.get("since_improvement", 0)),  # type: ignore[call-overload]
            ranked=tuple(Candidate(int(i), float(s)) for i, s in ranked),  # type: ignore[attr-defined]
        )


@dataclass(frozen=True)
class Verdict:
    """The decision for one evaluation."""

    is_best: bool
    """The score improves on the best by more than ``min_delta``."""
    keep: Kind | None
    """Why the checkpoint is kept for its score ("best", "top_k", "ensemble"), or None."""
    periodic: bool
    """The epoch is also kept by ``keep_every_n_epochs``."""
    evict: tuple[int, ...] = ()
    """Ids of checkpoints this one pushes out."""
    should_stop: bool = False


def _check_int(name: str, value: object, low: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be None or an int >= {low}, not {value!r}; {fix}")


@dataclass(frozen=True)
class Policy:
    """The keep/evict/stop rules of DESIGN.md, for one monitored metric.

    >>> from bestsave.monitor import Monitor
    >>> policy = Policy(Monitor("val_acc", "max"), top_k=2)
    >>> state = PolicyState()
    >>> for i, score in enumerate([0.5, 0.7, 0.6, 0.8]):
    ...     verdict, state = policy.decide(state, i, i, score)
    >>> [c.score for c in state.ranked], verdict.evict
    ([0.8, 0.7], (2,))
    """

    monitor: Monitor
    top_k: int | None = None
    delta: float | None = None
    keep_every_n_epochs: int | None = None
    patience: int | None = None
    baseline: float | None = None
    """A score must beat this to count as an improvement or be kept for its score."""
    _cap: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.top_k is not None:
            _check_int("top_k", self.top_k, -1, "use -1 to keep every valid score, 0 to keep none")
        if self.delta is not None and not (
            isinstance(self.delta, (int, float))
            and not isinstance(self.delta, bool)
            and self.delta >= 0
        ):
            raise ValueError(f"delta must be None or a number >= 0, not {self.delta!r}")
        if self.keep_every_n_epochs is not None:
            _check_int("keep_every_n_epochs", self.keep_every_n_epochs, 1, "or None to keep none")
        if self.patience is not None:
            _check_int("patience", self.patience, 1, "or None never to stop")
        if self.baseline is not None and not (
            isinstance(self.baseline, (int, float)) and math.isfinite(self.baseline)
        ):
            raise ValueError(f"baseline must be None or a finite number, not {self.baseline!r}")
        if self.top_k is None:
            cap = 1.0 if self.delta is None else math.inf
        else:
            cap = math.inf if self.top_k == -1 else float(self.top_k)
        object.__setattr__(self, "_cap", cap)

    @property
    def cap(self) -> float:
        """How many checkpoints may be kept for their score (``inf`` for no limit)."""
        return self._cap

    def is_periodic(self, epoch: int) -> bool:
        n = self.keep_every_n_epochs
        return n is not None and (epoch + 1) % n == 0

    def _sorted(self, ranked: list[Candidate]) -> tuple[Candidate, ...]:
        # Best first; among equal scores the older one ranks higher, so a tie keeps the incumbent.
        return tuple(sorted(ranked, key=lambda c: (self.monitor.rank_key(c.score), c.id)))

    def decide(
        self, state: PolicyState, id: int, epoch: int, score: float | None
    ) -> tuple[Verdict, PolicyState]:
        """The decision for evaluation ``id`` at ``epoch`` with ``score`` (None when invalid)."""
        monitor = self.monitor
        periodic = self.is_periodic(epoch)
        if score is None:
            since = state.since_improvement + 1
            verdict = Verdict(False, None, periodic, (), self._stops(since))
            return verdict, replace(state, since_improvement=since)

        reference = self.baseline if state.best is None else state.best
        improved = monitor.improves(score, reference)
        peak = score if state.peak is None else monitor.better(state.peak, score)
        ranked = list(state.ranked)
        evict: list[int] = []

        if self.delta is not None:
            # Members that a new peak leaves more than delta behind leave the ensemble.
            for c in ranked:
                if not monitor.within(c.score, peak, self.delta):
                    evict.append(c.id)
            ranked = [c for c in ranked if c.id not in evict]
            eligible = monitor.within(score, peak, self.delta)
        else:
            eligible = True
        if self.baseline is not None:
            eligible = eligible and monitor.improves(score, self.baseline, margin=0.0)

        enters = False
        if eligible and self._cap > 0:
            ordered = self._sorted(ranked)
            if len(ordered) < self._cap:
                enters = True
            elif monitor.improves(score, ordered[-1].score):
                enters = True
                evict.append(ordered[-1].id)
                ranked = [c for c in ranked if c.id != ordered[-1].id]
        if enters:
            ranked.append(Candidate(id, score))

        if improved:
            keep: Kind | None = "best" if enters else None
        elif enters:
            keep = "ensemble" if self.delta is not None else "top_k"
        else:
            keep = None
        since = 0 if improved else state.since_improvement + 1
        new_state = PolicyState(
            best=score if improved else state.best,
            best_id=id if improved else state.best_id,
            peak=peak,
            since_improvement=since,
            ranked=self._sorted(ranked),
        )
        return Verdict(improved, keep, periodic, tuple(evict), self._stops(since)), new_state

    def _stops(self, since_improvement: int) -> bool:
        return self.patience is not None and since_improvement >= self.patience
