"""Guard rails: monitors that are likely to pick the wrong model, told once per run."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bestsave.monitor import metric_tokens

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
