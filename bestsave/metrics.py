"""Turning what frameworks log into plain Python values.

Frameworks log tensors, numpy scalars, Python numbers and sometimes strings. The core records
plain JSON values and judges plain floats; nothing here imports a framework (a one-element tensor
or array is recognised by its ``item`` method).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

JSONValue = Any


def as_number(value: Any) -> float | int | bool | None:
    """``value`` as a Python number, or None when it is not a single number.

    Tensors and numpy arrays with exactly one element count as numbers.

    >>> as_number(3), as_number(0.5), as_number("0.5"), as_number([1.0])
    (3, 0.5, None, None)
    """
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (str, bytes)) or value is None:
        return None
    item = getattr(value, "item", None)
    if item is None or not callable(item):
        return None
    size = getattr(value, "size", 1)
    if callable(size):  # torch.Tensor.size() is a method; numel() is the count
        numel = getattr(value, "numel", None)
        size = numel() if callable(numel) else 1
    try:
        if int(size) != 1:
            return None
        out = item()
    except (TypeError, ValueError, RuntimeError):
        return None
    return out if isinstance(out, (bool, int, float)) else None


def as_score(value: Any) -> tuple[float | None, str | None]:
    """The monitored value as a finite float, or None and the reason it is invalid.

    >>> as_score(0.9), as_score(float("nan")), as_score(None)
    ((0.9, None), (None, 'nan'), (None, 'none'))
    """
    if value is None:
        return None, "none"
    number = as_number(value)
    if number is None or isinstance(number, bool):
        return None, "not a number"
    number = float(number)
    if math.isnan(number):
        return None, "nan"
    if math.isinf(number):
        return None, "inf"
    return number, None


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, JSONValue]:
    """Every logged value that JSON can hold: numbers as numbers, strings as strings.

    Non-finite floats are kept as strings ("nan", "inf") so the files stay strict JSON.
    Values that are neither (whole tensors, lists) are left out: they are not metrics.
    """
    out: dict[str, JSONValue] = {}
    for key, value in metrics.items():
        if isinstance(value, str) or value is None:
            out[str(key)] = value
            continue
        number = as_number(value)
        if number is None:
            continue
        if isinstance(number, float) and not math.isfinite(number):
            out[str(key)] = str(number)
        else:
            out[str(key)] = number
    return out


def describe(value: Any) -> str:
    """What a value is, in words, for messages: its type and, for arrays, its shape.

    >>> describe("high"), describe([0.5, 0.7])
    ("the string 'high'", 'a list of 2 elements')
    """
    if isinstance(value, str):
        return f"the string {value!r}"
    shape = getattr(value, "shape", None)
    kind = f"{type(value).__module__.split('.')[0]}.{type(value).__name__}"
    if shape is not None:
        return f"a {kind} of shape {tuple(shape)}"
    if isinstance(value, (list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value)} elements"
    return f"a {kind}"


class ScoreTypeError(TypeError):
    """A monitored value that cannot be a score by its type or shape (a string, a tensor of
    several elements). The message says what it holds and how to make it one number."""

    def __init__(self, name: str, value: Any, epoch: int) -> None:
        super().__init__(
            f"{name!r} is {describe(value)} at epoch {epoch}, not one number, so it cannot be a "
            "score. Log one number under that name: average per-class values (torchmetrics' "
            "average='macro', keras.metrics.F1Score(average='macro')), or log each element "
            "under its own name and monitor one of them."
        )


def closest_key(name: str, keys: list[str]) -> str | None:
    """The logged key that looks most like ``name``, for "did you mean" messages."""
    matches = difflib.get_close_matches(name, keys, n=1, cutoff=0.5)
    return matches[0] if matches else None


class MissingMetricError(KeyError):
    """A metric the saver needs was not logged. The message names what was, and a close match."""

    def __init__(self, name: str, keys: list[str], what: str = "monitor") -> None:
        logged = ", ".join(repr(k) for k in sorted(keys)) or "none"
        guess = closest_key(name, keys)
        hint = f" Did you mean {guess!r}?" if guess else ""
        self.message = (
            f"{what} {name!r} is not among the logged metrics ({logged}).{hint} "
            f"Log it, or set {what} to one of these names."
        )
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message
