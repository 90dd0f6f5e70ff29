"""The plan of one evaluation: a pure function from the run's state and the evaluation's scores
to what to keep, evict, name, and record, and the next state. Nothing here does I/O; the saver
carries a plan out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from bestsave.history import HistoryDecision, HistoryLine
from bestsave.naming import render, sanitize, unique_name
from bestsave.policy import Policy, Verdict
from bestsave.record import Record, join
from bestsave.state import RunState


@dataclass(frozen=True)
class Naming:
    """How a run names its files."""

    dirpath: str
    filename: str
    last_name: str
    extension: str
    save_last: bool

    def located(self, record: Record, name: str) -> Record:
        return replace(record, path=join(self.dirpath, name))


@dataclass(frozen=True)
class Evaluation:
    """One evaluation, as the saver hands it to the planner."""

    base: Record
    """A record of the evaluation (epoch, step, metrics, time, run); files are copies of it."""
    raw: Mapping[str, float | None]
    """Each monitor's score as logged, None when invalid."""
    secondary: float | None
    """The tie-break metric's value."""
    fields: Mapping[str, Any]
    """Values for file name templates that are not metrics (Keras's 1-based epoch)."""


@dataclass(frozen=True)
class Plan:
    """What an evaluation leads to."""

    verdicts: Mapping[str, Verdict]
    state: RunState
    """The run's state once the plan is carried out."""
    new: tuple[Record, ...]
    """Files kept this time: for their score (each monitor's), then for their epoch."""
    evicted: tuple[Record, ...]
    """Kept files this evaluation pushes out (ranked ones, a periodic one it writes over)."""
    last: Record | None
    """The rolling ``last`` file, when the run keeps one."""
    stale_last: Record | None
    """The previous ``last`` file when the new one has another name: deleted after commit."""
    line: HistoryLine
    taken: frozenset[str]
    """Names this run's files and the directory's other files hold afterwards."""

    @property
    def best_for(self) -> list[str]:
        return [name for name, v in self.verdicts.items() if v.is_best]


def plan(
    state: RunState,
    evaluation: Evaluation,
    policies: Mapping[str, Policy],
    naming: Naming,
    taken: frozenset[str],
) -> Plan:
    """The plan of ``evaluation`` after ``state``; ``taken`` are the names new files must
    not take."""
    base = evaluation.base
    judged = {
        name: policy.decide(
            state.policies[name], base.id, base.epoch, evaluation.raw[name], evaluation.secondary
        )
        for name, policy in policies.items()
    }
    verdicts = {name: verdict for name, (verdict, _) in judged.items()}
    first_name = next(iter(policies))
    first = verdicts[first_name]
    base = replace(base, score=first.score)
    evicted = [r for r in state.kept if r.ranked and r.id in _evicts(verdicts, r)]
    free = set(taken) - {r.name for r in evicted}
    template = _values(base)

    def values(policy: Policy, score: float | None) -> dict[str, Any]:
        scored = {"monitor": sanitize(policy.monitor.name), "score": score}
        return {**template, **scored, **evaluation.fields}

    last = None
    if naming.save_last:
        name = render(naming.last_name, values(policies[first_name], first.score))
        last = naming.located(replace(base, kind="last"), name + naming.extension)
        free.add(last.name)
    new: list[Record] = []
    for name, policy in policies.items():
        verdict = verdicts[name]
        if verdict.keep:
            record = replace(base, kind=verdict.keep, monitor=name, mode=policy.monitor.mode,
                             score=verdict.score, raw_score=evaluation.raw[name])  # fmt: skip
            stem = render(naming.filename, values(policy, verdict.score))
            new.append(_named(naming, record, stem, free))
    if first.periodic:
        stem = render(naming.filename, values(policies[first_name], first.score))
        evicted += _periodic(state, naming, replace(base, kind="periodic"), stem, new, free)
    stale = state.last if last and state.last and state.last.name != last.name else None
    kept = state.kept  # most evaluations keep nothing new: no need to order it again
    if new or evicted:
        kept = tuple(ordered([*(r for r in state.kept if r not in evicted), *new], policies))
    next_state = RunState(
        {name: policy_state for name, (_, policy_state) in judged.items()},
        evaluations=state.evaluations + 1,
        last_epoch=base.epoch,
        kept=kept,
        last=last or state.last,
        warned=state.warned,
    )
    line = _line(base, first, evaluation, verdicts, new, evicted, len(policies) > 1)
    return Plan(verdicts, next_state, tuple(new), tuple(evicted), last, stale, line,
                frozenset(free))  # fmt: skip


def exception_file(
    base: Record, naming: Naming, template: str, fields: Mapping[str, Any], taken: set[str]
) -> Record:
    """The file an exception's state is kept in, named by ``template`` from ``base`` and
    ``fields``, and unlike any of ``taken``."""
    name = unique_name(render(template, {**_values(base), **fields}), naming.extension, taken)
    return naming.located(replace(base, kind="exception"), name)


def last_file(base: Record, naming: Naming) -> Record:
    """The rolling ``last`` file written outside an evaluation."""
    name = render(naming.last_name, _values(base)) + naming.extension
    return naming.located(replace(base, kind="last"), name)


def _values(base: Record) -> dict[str, Any]:
    """What a file name template is filled from."""
    return {**base.metrics, "epoch": base.epoch, "step": base.step}


def ordered(records: Iterable[Record], policies: Mapping[str, Policy]) -> list[Record]:
    """``records`` as a run lists them: those kept for their score first, by monitor then
    best first; then the others (periodic, exception) by epoch."""
    names = list(policies)

    def key(r: Record) -> tuple[int, int, tuple[float, float, int]]:
        if r.ranked and r.monitor in policies:
            policy = policies[r.monitor]
            return (0, names.index(r.monitor), policy.rank_key(policy.candidate(r)))
        return (1, 0, (float(r.epoch), 0.0, r.id))

    return sorted(records, key=key)


def _periodic(
    state: RunState, naming: Naming, record: Record, stem: str, new: list[Record], free: set[str]
) -> list[Record]:
    """Add the periodic file ``record`` to ``new``; return the earlier one it replaces."""
    if any(r.name == stem + naming.extension for r in new):
        stem += "-periodic"  # the same bytes, linked: kept for its score and its epoch
    # A periodic file named like an earlier one (a name without the epoch) replaces it, as the
    # frameworks' callbacks overwrite it.
    older = [r for r in state.kept if r.kind == "periodic" and r.name == stem + naming.extension]
    free -= {r.name for r in older}
    new.append(_named(naming, record, stem, free))
    return older


def _evicts(verdicts: Mapping[str, Verdict], record: Record) -> tuple[int, ...]:
    verdict = verdicts.get(record.monitor)
    return verdict.evict if verdict is not None else ()


def _named(naming: Naming, record: Record, stem: str, free: set[str]) -> Record:
    name = unique_name(stem, naming.extension, free)
    free.add(name)
    return naming.located(record, name)


def _line(
    base: Record,
    first: Verdict,
    evaluation: Evaluation,
    verdicts: Mapping[str, Verdict],
    new: list[Record],
    evicted: list[Record],
    several: bool,
) -> HistoryLine:
    first_name = next(iter(verdicts))
    return HistoryLine(
        epoch=base.epoch,
        step=base.step,
        time=base.time,
        elapsed_s=base.elapsed_s,
        score=first.score,
        raw_score=evaluation.raw[first_name],
        metrics=base.metrics,
        decision=HistoryDecision(
            saved=bool(new),
            is_best=first.is_best,
            kind=[r.kind for r in new],
            files=[r.name for r in new],
            evicted=[r.name for r in evicted],
            best_for=[n for n, v in verdicts.items() if v.is_best] if several else None,
        ),
        scores={n: v.score for n, v in verdicts.items()} if several else None,
    )
