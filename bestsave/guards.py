"""Guard rails: monitored values that cannot be scores, and monitors likely to pick the wrong
model, told once per run."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from bestsave.metrics import MissingMetricError, ScoreTypeError, as_score
from bestsave.monitor import Monitor, metric_tokens
from bestsave.policy import Policy, PolicyState
from bestsave.record import Record
from bestsave.state import RunState

_TRAIN = frozenset({"train", "training", "trn"})
_VALID = frozenset({"val", "valid", "validation", "eval", "dev", "test"})
_ACCURACY = frozenset({"acc", "accuracy"})
_RANKING = frozenset(
    {"precision", "recall", "f1", "fbeta", "auroc", "auc", "auprc", "ap", "mcc", "matthews",
     "corrcoef", "kappa"}
)  # fmt: skip
CONSTANT_AFTER = 5


def _tokens(name: str) -> set[str]:
    return set(metric_tokens(name)) | set(name.lower().replace("/", "_").split("_"))


def naming_warnings(monitor: str, logged: Iterable[str]) -> list[tuple[str, str]]:
    """Warnings about the choice of ``monitor`` given the other logged names: (key, message)."""
    out = []
    tokens = _tokens(monitor)
    others = [k for k in logged if k != monitor]
    validation = [k for k in others if _tokens(k) & _VALID]
    if tokens & _TRAIN or (monitor == "loss" and validation):
        better = next((k for k in validation if _tokens(k) & (tokens - _TRAIN - _VALID)), None)
        hint = f" such as {better!r}" if better else ""
        out.append(
            (
                "guard:train",
                f"monitor {monitor!r} looks like a training metric: the best training score "
                f"picks an overfit model; choose a validation metric{hint}",
            )
        )
    if tokens & _ACCURACY:
        ranking = sorted(k for k in others if _tokens(k) & _RANKING)
        if ranking:
            out.append(
                (
                    "guard:accuracy",
                    f"monitor {monitor!r} is accuracy while {', '.join(map(repr, ranking))} "
                    "is logged: accuracy can hide a useless model on imbalanced data; consider "
                    f"monitoring {ranking[0]!r}",
                )
            )
    return out


def constant_warning(monitor: str, first_scores: Sequence[float]) -> tuple[str, str] | None:
    """A warning when the first evaluations' scores never moved (a metric not computed)."""
    if len(first_scores) < CONSTANT_AFTER or len(set(first_scores[:CONSTANT_AFTER])) > 1:
        return None
    return (
        "guard:constant",
        f"monitor {monitor!r} was {first_scores[0]!r} for the first {CONSTANT_AFTER} "
        "evaluations: it looks like a metric that is not computed (check that it is updated "
        "from the validation data)",
    )


class ScoreWatch:
    """Reads each monitored score from an evaluation's metrics, and tells what looks wrong
    once per run: a value that is no score, NaN or inf, a monitor that never moves, a run that
    ended with nothing kept for its score."""

    def __init__(self, policies: Mapping[str, Policy], warn_once: Callable[[str, str], None]):
        self.policies = policies
        self.warn_once = warn_once
        self._first: dict[str, list[float]] = {name: [] for name in policies}
        self._invalid: dict[str, dict[str, int]] = {name: {} for name in policies}
        """How many of this process's evaluations had no valid score, by monitor and why."""

    def scores(self, metrics: Mapping[str, Any], epoch: int) -> dict[str, float | None]:
        """Each monitor's score, None when invalid.

        Raises:
            MissingMetricError: a monitor that decisions need is not logged.
            ScoreTypeError: a monitored value cannot be one number.
        """
        return {name: self._score(name, metrics, epoch) for name in self.policies}

    def _score(self, name: str, metrics: Mapping[str, Any], epoch: int) -> float | None:
        if name not in metrics:
            if not self.policies[name].judges:
                return None  # files are kept on a schedule: nothing needs the score
            raise MissingMetricError(name, [str(k) for k in metrics])
        score, reason = as_score(metrics[name])
        if reason == "not a number":
            raise ScoreTypeError(name, metrics[name], epoch)
        if reason is not None:
            self._invalid[name][reason] = self._invalid[name].get(reason, 0) + 1
        if reason in ("nan", "inf"):
            self.warn_once(
                f"{reason}:{name}",
                f"{name} is {metrics[name]!r} at epoch {epoch}: invalid scores are never best "
                "nor kept for their score",
            )
        return score

    def secondary(self, metrics: Mapping[str, Any], tie: Monitor | None) -> float | None:
        """The tie-break metric's value, when there is one and it is logged."""
        if tie is None:
            return None
        if tie.name not in metrics:
            self.warn_once(
                "tie_break",
                f"tie_break metric {tie.name!r} is not logged; ties keep the "
                f"incumbent. Logged: {sorted(map(str, metrics))}",
            )
            return None
        return as_score(metrics[tie.name])[0]

    def after(self, metrics: Mapping[str, Any], scores: Mapping[str, float | None],
              first: bool) -> None:  # fmt: skip
        """The guard rails, after an evaluation (``first``: the run's first)."""
        for name in self.policies:
            if first:
                for key, message in naming_warnings(name, [str(k) for k in metrics]):
                    self.warn_once(f"{key}:{name}", message)
            seen, score = self._first[name], scores[name]
            if score is not None and len(seen) < CONSTANT_AFTER:
                seen.append(score)
                warning = constant_warning(name, seen)
                if warning:
                    self.warn_once(f"{warning[0]}:{name}", warning[1])

    def warn_if_nothing_kept(
        self, state: RunState, best_for: Callable[[str], Record | None], where: str
    ) -> None:
        """At the end of a run: say so, and why, for each monitor that judges by score and
        kept nothing for it."""
        if not state.evaluations:
            return
        for name, policy in self.policies.items():
            if policy.cap > 0 and best_for(name) is None:
                why = self._nothing_kept(name, state.policies[name], state.last_epoch)
                self.warn_once(
                    f"nothing kept:{name}",
                    f"training ended with no checkpoint kept for {name} in {where}: {why}",
                )

    def _nothing_kept(self, name: str, state: PolicyState, last_epoch: int | None) -> str:
        """Why a run that judges by ``name`` kept nothing for it."""
        policy, invalid = self.policies[name], self._invalid[name]
        if policy.warmup > (last_epoch or 0):
            return f"every evaluation was within warmup={policy.warmup}"
        if invalid and state.peak is None:
            counts = ", ".join(f"{k} {n} times" for k, n in sorted(invalid.items()))
            return f"{name} was never a valid number ({counts})"
        if policy.baseline is not None:
            return f"no {name} beat baseline={policy.baseline}"
        return "the files were never written (see the errors above)"
