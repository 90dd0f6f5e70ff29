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
    {"loss", "error", "err", "mse", "mae", "rmse", "msle", "mape", "smape", "nll", "perplexity",
     "ppl", "wer", "cer", "eer", "fid", "brier", "logloss", "hinge", "distance", "crossentropy",
     "huber", "kld", "divergence"}
)  # fmt: skip
"""Tokens of scores that fall as the model improves."""
_MAX_TOKENS = frozenset(
    {"acc", "accuracy", "auc", "auroc", "auprc", "ap", "map", "f1", "fbeta", "precision",
     "recall", "sensitivity", "specificity", "mcc", "matthews", "corrcoef", "iou", "jaccard",
     "dice", "r2", "bleu", "rouge", "ndcg", "kappa", "psnr", "ssim", "spearman", "pearson"}
)  # fmt: skip
"""Tokens of scores that rise as the model improves."""
_QUALIFIERS = frozenset(
    {"drop", "gap", "delta", "diff", "change", "increase", "decrease", "improvement"}
)
"""Tokens that may turn a score's direction around: "accuracy drop" is better lower."""


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
    """The direction of a metric, from its name, when the name says it without doubt.

    ``min`` when a token names a loss, an error or a distance (``val_loss``,
    ``val_brier_score``), ``max`` when one names a score that grows with quality
    (``val/acc``, ``matthews_corrcoef``); a leading ``neg`` (scikit-learn's ``neg_log_loss``)
    turns it around. A name with tokens of both directions, with a qualifier that may turn it
    around (``val_accuracy_drop``), or with no known token (``score`` alone: a Brier score is
    better lower) raises ``ValueError`` asking for the mode: a silent wrong guess would keep the
    worst model.

    >>> infer_mode("val_loss_epoch"), infer_mode("val/acc"), infer_mode("neg_log_loss")
    ('min', 'max', 'max')
    """
    tokens = metric_tokens(name)
    # "f1" and "r2" end in digits that are part of the name: match raw parts too.
    words = set(tokens) | set(re.split(r"[_/.\-\s]+", name.lower()))
    found = {"min"} if words & _MIN_TOKENS else set()
    found |= {"max"} if words & _MAX_TOKENS else set()
    doubt = words & _QUALIFIERS
    if len(found) == 1 and not doubt:
        mode: Mode = found.pop()  # type: ignore[assignment]
        if tokens and tokens[0] == "neg":
            return "max" if mode == "min" else "min"
        return mode
    if doubt:
        why = f"{'/'.join(sorted(doubt))!r} may turn its direction around"
    elif found:
        why = "it names scores of both directions"
    else:
        why = "no part of it names a loss, an error or a score of known direction"
    raise ValueError(
        f"cannot tell whether {name!r} should go up or down ({why}); "
        "pass mode='min' or mode='max' for it"
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
