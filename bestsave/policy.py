"""What to keep: the decision rules, as pure functions of the scores seen so far.

Nothing here does I/O. :meth:`Policy.decide` takes the state after the previous evaluations and
one new score, and returns what to do (keep? as what? evict whom? stop?) with the next state.
The saver carries it out; every adapter reaches the same decision from the same scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from bestsave.metrics import as_score
from bestsave.monitor import Monitor
from bestsave.record import Kind, Record

Smooth = int | tuple[str, float] | None
"""``N`` (mean of the last N valid scores), ``("ema", alpha)``, or None."""


@dataclass(frozen=True)
class Candidate:
    """A checkpoint kept for its score; ``id`` is the evaluation that produced it."""

    id: int
    score: float
    secondary: float | None = None
    """The tie-break metric's value, when there is one."""


@dataclass(frozen=True)
class PolicyState:
    """Everything the rules remember between evaluations (saved in the manifest for resume)."""

    best: float | None = None
    """Score of the last improvement: the one a new score must beat by ``min_delta``."""
    best_id: int | None = None
    best_secondary: float | None = None
    peak: float | None = None
    """Best valid score seen, the delta-ensemble's baseline (which ignores ``min_delta``)."""
    since_improvement: int = 0
    ranked: tuple[Candidate, ...] = ()
    """Checkpoints kept for their score (best, top-k, ensemble), best first."""
    recent: tuple[float, ...] = ()
    """The last valid raw scores, for ``smooth=N``."""
    ema: float | None = None
    """The running average, for ``smooth=("ema", alpha)``."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_id": self.best_id,
            "best_secondary": self.best_secondary,
            "peak": self.peak,
            "since_improvement": self.since_improvement,
            "ranked": [[c.id, c.score, c.secondary] for c in self.ranked],
            "recent": list(self.recent),
            "ema": self.ema,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyState:
        return cls(
            best=data.get("best"),
            best_id=data.get("best_id"),
            best_secondary=data.get("best_secondary"),
            peak=data.get("peak"),
            since_improvement=int(data.get("since_improvement", 0)),
            ranked=tuple(
                Candidate(int(c[0]), float(c[1]), c[2] if len(c) > 2 else None)
                for c in data.get("ranked") or []
            ),
            recent=tuple(float(x) for x in data.get("recent") or []),
            ema=data.get("ema"),
        )


@dataclass(frozen=True)
class Verdict:
    """The decision for one evaluation."""

    is_best: bool
    """The score improves on the best by more than ``min_delta`` (or ties and wins the
    tie-break)."""
    keep: Kind | None
    """Why the checkpoint is kept for its score ("best", "top_k", "ensemble"), or None."""
    periodic: bool
    """The epoch is also kept by ``keep_every_n_epochs``."""
    evict: tuple[int, ...] = ()
    """Ids of checkpoints this one pushes out."""
    should_stop: bool = False
    score: float | None = None
    """The score judged: the smoothed one with ``smooth``, else the raw one."""


def _check_int(name: str, value: object, low: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be None or an int >= {low}, not {value!r}; {fix}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_smooth(smooth: object) -> Smooth:
    """``smooth`` validated: None, an int >= 1, or ("ema", alpha) with 0 < alpha <= 1."""
    if smooth is None or (isinstance(smooth, int) and not isinstance(smooth, bool) and smooth >= 1):
        return smooth  # type: ignore[return-value]
    if (
        isinstance(smooth, (tuple, list))
        and len(smooth) == 2
        and smooth[0] == "ema"
        and _is_number(smooth[1])
        and 0 < smooth[1] <= 1
    ):
        return ("ema", float(smooth[1]))
    raise ValueError(
        f"smooth must be None, a window size N >= 1 (mean of the last N scores) or "
        f"('ema', alpha) with 0 < alpha <= 1, not {smooth!r}"
    )


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
    smooth: Smooth = None
    """Judge on a smoothed score: ``N`` (mean of the last N valid scores) or ``("ema", a)``."""
    tie_break: Monitor | None = None
    """A second metric that decides ties (equal, or within ``min_delta``)."""
    warmup: int = 0
    """Epochs before this are never best nor kept for their score, and do not count for
    patience."""
    periodic_start: int | None = None
    """The first epoch ``keep_every_n_epochs`` keeps (0-based); n-1 by default, so epochs
    n-1, 2n-1, ... are kept. fastai's ``every_epoch=n`` keeps 0, n, 2n, ...: start 0."""
    _cap: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.top_k is not None:
            _check_int("top_k", self.top_k, -1, "use -1 to keep every valid score, 0 to keep none")
        if self.delta is not None and not (_is_number(self.delta) and self.delta >= 0):
            raise ValueError(f"delta must be None or a number >= 0, not {self.delta!r}")
        if self.keep_every_n_epochs is not None:
            _check_int("keep_every_n_epochs", self.keep_every_n_epochs, 1, "or None to keep none")
        if self.patience is not None:
            _check_int("patience", self.patience, 1, "or None never to stop")
        if self.baseline is not None and not (
            _is_number(self.baseline) and math.isfinite(self.baseline)
        ):
            raise ValueError(f"baseline must be None or a finite number, not {self.baseline!r}")
        _check_int("warmup", self.warmup, 0, "the number of epochs to ignore, 0 for none")
        if self.periodic_start is not None:
            _check_int("periodic_start", self.periodic_start, 0, "the first epoch to keep")
        object.__setattr__(self, "smooth", check_smooth(self.smooth))
        if self.top_k is None:
            cap = 1.0 if self.delta is None else math.inf
        else:
            cap = math.inf if self.top_k == -1 else float(self.top_k)
        object.__setattr__(self, "_cap", cap)

    @property
    def cap(self) -> float:
        """How many checkpoints may be kept for their score (``inf`` for no limit)."""
        return self._cap

    @property
    def judges(self) -> bool:
        """Whether any decision depends on the score: without top-k, ensemble or patience, a
        run keeps files on a schedule alone and its monitor may go unlogged."""
        return self._cap > 0 or self.delta is not None or self.patience is not None

    def is_periodic(self, epoch: int) -> bool:
        n = self.keep_every_n_epochs
        if n is None:
            return False
        start = n - 1 if self.periodic_start is None else self.periodic_start
        return epoch >= start and (epoch - start) % n == 0

    def rank_key(self, c: Candidate) -> tuple[float, float, int]:
        # Best first; then the better tie-break value; then the older one, so that a full tie
        # keeps the incumbent.
        secondary = math.inf
        if self.tie_break is not None and c.secondary is not None:
            secondary = self.tie_break.rank_key(c.secondary)
        return (self.monitor.rank_key(c.score), secondary, c.id)

    def ranked(self, candidates: Iterable[Candidate]) -> tuple[Candidate, ...]:
        """``candidates`` best first, as the rules rank them (ties: the tie-break, then the
        older)."""
        return tuple(sorted(candidates, key=self.rank_key))

    def candidate(self, record: Record) -> Candidate:
        """A kept record as the rules see it."""
        assert record.score is not None, "only records kept for their score are ranked"
        secondary = None
        if self.tie_break is not None:
            secondary = as_score(record.metrics.get(self.tie_break.name))[0]
        return Candidate(record.id, record.score, secondary)

    def best_of(self, records: Iterable[Record]) -> Record | None:
        """The best of the records kept for this monitor's score, or None."""
        mine = {r.id: r for r in records if r.ranked and r.monitor == self.monitor.name}
        ranked = self.ranked(self.candidate(r) for r in mine.values())
        return mine[ranked[0].id] if ranked else None

    def best(self, state: PolicyState, records: Iterable[Record]) -> Record | None:
        """The record of the best checkpoint ``state`` names, among ``records``; when its file
        was lost, the best of the kept ones stands in."""
        if state.best_id is None:
            return None
        mine = [r for r in records if r.ranked and r.monitor == self.monitor.name]
        return next((r for r in mine if r.id == state.best_id), None) or self.best_of(mine)

    def reranked(self, state: PolicyState, records: Iterable[Record]) -> PolicyState:
        """``state`` whose checkpoints kept for their score are exactly those ``records``."""
        known = {c.id: c for c in state.ranked}
        mine = [r for r in records if r.ranked and r.monitor == self.monitor.name]
        return replace(
            state, ranked=self.ranked(known.get(r.id) or self.candidate(r) for r in mine)
        )

    def stops(self, state: PolicyState) -> bool:
        """Patience is exhausted: that many evaluations passed without improvement."""
        return self.patience is not None and state.since_improvement >= self.patience

    def beats_baseline(self, score: float) -> bool:
        """``score`` is better than the baseline, if there is one (``min_delta`` does not
        apply: the baseline is a bar, not an earlier best)."""
        return self.baseline is None or self.monitor.improves(score, self.baseline, margin=0.0)

    def beats(self, new: Candidate, old: Candidate, margin: float | None = None) -> bool:
        """``new`` improves on ``old`` by more than ``margin`` (``min_delta``), or ties with it
        (neither is that much better) and has the better tie-break value."""
        if self.monitor.improves(new.score, old.score, margin):
            return True
        if self.tie_break is None or self.monitor.improves(old.score, new.score, margin):
            return False
        if new.secondary is None:
            return False
        return self.tie_break.improves(new.secondary, old.secondary, margin=0.0)

    def _judge(self, state: PolicyState, raw: float | None) -> tuple[float | None, PolicyState]:
        """The score to judge, and the smoothing state after ``raw``."""
        if raw is None or self.smooth is None:
            return raw, state
        if isinstance(self.smooth, tuple):
            alpha = self.smooth[1]
            ema = raw if state.ema is None else alpha * raw + (1 - alpha) * state.ema
            return ema, replace(state, ema=ema)
        recent = (*state.recent, raw)[-self.smooth :]
        return sum(recent) / len(recent), replace(state, recent=recent)

    def decide(
        self,
        state: PolicyState,
        id: int,
        epoch: int,
        score: float | None,
        secondary: float | None = None,
    ) -> tuple[Verdict, PolicyState]:
        """The decision for evaluation ``id`` at ``epoch``.

        Args:
            state: The state after the previous evaluations.
            id: This evaluation's index.
            epoch: Its epoch (0-based).
            score: The monitored value, None when invalid.
            secondary: The tie-break metric's value, None when absent or invalid.
        """
        periodic = self.is_periodic(epoch)
        score, state = self._judge(state, score)
        if epoch < self.warmup:
            return Verdict(False, None, periodic, (), self.stops(state), score), state
        if score is None:
            state = replace(state, since_improvement=state.since_improvement + 1)
            return Verdict(False, None, periodic, (), self.stops(state), None), state

        new = Candidate(id, score, secondary)
        if state.best is None:
            improved = self.beats_baseline(score)
        else:
            incumbent = Candidate(state.best_id or -1, state.best, state.best_secondary)
            improved = self.beats(new, incumbent)
        peak = score if state.peak is None else self.monitor.better(state.peak, score)
        ranked, evict, enters = self._rank(state.ranked, new, peak)
        if improved:
            keep: Kind | None = "best" if enters else None
        elif enters:
            keep = "ensemble" if self.delta is not None else "top_k"
        else:
            keep = None
        state = replace(
            state,
            best=score if improved else state.best,
            best_id=id if improved else state.best_id,
            best_secondary=secondary if improved else state.best_secondary,
            peak=peak,
            since_improvement=0 if improved else state.since_improvement + 1,
            ranked=ranked,
        )
        return Verdict(improved, keep, periodic, evict, self.stops(state), score), state

    def _rank(
        self, ranked: tuple[Candidate, ...], new: Candidate, peak: float
    ) -> tuple[tuple[Candidate, ...], tuple[int, ...], bool]:
        """The checkpoints kept for their score once ``new`` is judged, the ids it pushes out,
        and whether it enters."""
        monitor, kept, evict = self.monitor, list(ranked), []
        eligible = self.beats_baseline(new.score)
        if self.delta is not None:
            # Members that a new peak leaves more than delta behind leave the ensemble.
            evict = [c.id for c in kept if not monitor.within(c.score, peak, self.delta)]
            kept = [c for c in kept if c.id not in evict]
            eligible = eligible and monitor.within(new.score, peak, self.delta)
        enters = False
        if eligible and self._cap > 0:
            ordered = self.ranked(kept)
            if len(ordered) < self._cap:
                enters = True
            elif self.beats(new, ordered[-1]):
                enters = True
                evict.append(ordered[-1].id)
                kept.remove(ordered[-1])
        if enters:
            kept.append(new)
        return self.ranked(kept), tuple(evict), enters
