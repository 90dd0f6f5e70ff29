"""The monitored metric: its direction, and how two scores compare.

This is the one place that knows what "better" means; the policy, the adapters and the
trackers all ask a :class:`Monitor`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

Mode = Literal["min", "max"]

_MIN_TOKENS = frozenset(
    {"loss", "error", "err", "mse", "mae", "rmse", "mape", "nll", "perplexity", "ppl", "wer",
     "cer", "fid"}
)  # fmt: skip
_MAX_TOKENS = frozenset(
    {"acc", "accuracy", "auc", "auroc", "auprc", "ap", "map", "f1", "fbeta", "precision",
     "recall", "mcc", "matthews", "corrcoef", "iou", "jaccard", "dice", "r2", "bleu", "rouge",
     "ndcg", "kappa", "score"}
)  # fmt: skip


def metric_tokens(name: str) -> list[str]:
    """Split a metric name into lower-case tokens, digits stripped from their ends.

    >>> metric_tokens("val_top5_acc")
    ['val', 'top', 'acc']
    """
    tokens = []
    for part in re.split(r"[_/.\-\s]+", name.lower()):
        token = part.strip("0123456789")
        if token:
            tokens.append(token)
    return tokens


def infer_mode(name: str) -> Mode:
    """The direction of a metric, from its name.

    ``min`` when any token names an error or a loss, else ``max`` when any token names a score
    that grows with quality. Any other name raises ``ValueError``: a silent wrong guess would lose
    the best model.

    >>> infer_mode("val_loss_epoch"), infer_mode("val/acc")
    ('min', 'max')
    """
    # "f1" and "r2" end in digits that are part of the name: match raw parts too.
    tokens = set(metric_tokens(name)) | set(re.split(r"[_/.\-\s]+", name.lower()))
    if any(t in _MIN_TOKENS for t in tokens):
        return "min"
    if any(t in _MAX_TOKENS for t in tokens):
        return "max"
    raise ValueError(
        f"cannot tell whether {name!r} should go up or down; pass mode='min' or mode='max' for it"
    )


def resolve_mode(name: str, mode: str) -> Mode:
    """``mode`` checked, with ``"auto"`` resolved from the metric's name."""
    if mode == "auto":
        return infer_mode(name)
    if mode in ("min", "max"):
        return mode  # type: ignore[return-value]
    raise ValueError(f"mode must be 'min', 'max' or 'auto', not {mode!r}")


def _slack(reference: float) -> float:
    return 1e-12 * max(1.0, abs(reference))


@dataclass(frozen=True)
class Monitor:
    """A metric name, its direction and the margin an improvement must clear.

    >>> m = Monitor("val_loss", "min", min_delta=0.01)
    >>> m.improves(0.5, 0.52), m.improves(0.515, 0.52)
    (True, False)
    """

    name: str
    mode: Mode
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {self.mode!r}")
        if not (isinstance(self.min_delta, (int, float)) and self.min_delta >= 0):
            raise ValueError(
                f"min_delta must be a number >= 0, not {self.min_delta!r}; "
                "the direction comes from mode, not from the sign of min_delta"
            )

    def improves(self, score: float, reference: float | None, margin: float | None = None) -> bool:
        """``score`` beats ``reference`` by more than ``margin`` (``min_delta`` by default).

        A tie is not an improvement; anything beats no reference. Differences within rounding
        error count as ties, so ``0.8`` beats ``0.3`` by exactly ``0.5``, not by a hair more.
        """
        if reference is None:
            return True
        margin = (self.min_delta if margin is None else margin) + _slack(reference)
        if self.mode == "max":
            return score > reference + margin
        return score < reference - margin

    def within(self, score: float, reference: float, delta: float) -> bool:
        """``score`` is no more than ``delta`` behind ``reference`` (rounding error forgiven)."""
        delta += _slack(reference)
        if self.mode == "max":
            return score >= reference - delta
        return score <= reference + delta

    def better(self, a: float, b: float) -> float:
        """The better of two scores."""
        return max(a, b) if self.mode == "max" else min(a, b)

    def rank_key(self, score: float) -> float:
        """A key that sorts better scores first."""
        return -score if self.mode == "max" else score

    @property
    def worst_value(self) -> float:
        """The value every real score beats, for frameworks that want a starting point."""
        return -math.inf if self.mode == "max" else math.inf
