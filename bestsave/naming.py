"""File names from templates: any logged metric may appear, no name can leave the directory."""

from __future__ import annotations

import re
import string
from collections.abc import Collection, Mapping
from typing import Any

from bestsave.metrics import MissingMetricError, as_number

DEFAULT_TEMPLATE = "epoch={epoch:03d}-{monitor}={score:.4f}"

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+\-]")


def sanitize(text: str) -> str:
    """``text`` made safe inside a file name: separators and odd characters become ``_``.

    >>> sanitize("val/loss"), sanitize("../x")
    ('val_loss', '.._x')
    """
    return _UNSAFE.sub("_", text)


def check_template(template: str) -> None:
    """Refuse templates that could name a folder or a file outside the directory."""
    if not isinstance(template, str) or not template:
        raise ValueError(f"filename must be a non-empty template string, not {template!r}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"filename template {template!r} is malformed: {e}") from None
    for literal, field, spec, _ in parsed:
        if "/" in literal or "\\" in literal:
            raise ValueError(
                f"filename template {template!r} contains a path separator; put folders in "
                "the directory argument and keep the template a plain file name"
            )
        if field == "" or (field is not None and field.isdigit()):
            raise ValueError(
                f"filename template {template!r} has a positional field; name the metric, "
                "e.g. '{val_loss:.3f}'"
            )
        if spec and not any(_formats(sample, spec) for sample in (0.5, 3, "text")):
            raise ValueError(
                f"filename template {template!r}: {{{field}:{spec}}} is not a format any value "
                "takes; use a Python format spec such as '{val_loss:.3f}' or '{epoch:03d}'"
            )


def _formats(value: Any, spec: str) -> bool:
    try:
        format(value, spec)
    except (TypeError, ValueError):
        return False
    return True


def render(template: str, fields: Mapping[str, Any]) -> str:
    """Fill ``template`` from ``fields`` (epoch, step, monitor, score and every logged metric).

    A field name is looked up whole, so ``{val/loss:.3f}`` works; every value is sanitised.

    >>> render("epoch={epoch:03d}-{val/loss:.2f}", {"epoch": 3, "val/loss": 0.1234})
    'epoch=003-0.12'
    """
    out = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        out.append(literal)
        if field is None:
            continue
        if field not in fields:
            raise MissingMetricError(field, list(fields), what="filename template key")
        out.append(sanitize(_format(fields[field], spec or "", conversion)))
    name = "".join(out).lstrip(".")
    return name or "checkpoint"


def _format(value: Any, spec: str, conversion: str | None) -> str:
    if conversion == "r":
        value = repr(value)
    elif conversion == "s":
        value = str(value)
    number = as_number(value)
    if number is not None and not isinstance(number, bool):
        value = number
    elif value is None:
        value = float("nan")
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        # An integer spec on a float, or a number spec on a string: show the value plainly.
        if isinstance(value, float) and value.is_integer():
            try:
                return format(int(value), spec)
            except (TypeError, ValueError):
                pass
        return str(value)


def unique_name(stem: str, extension: str, taken: Collection[str]) -> str:
    """``stem + extension``, or with ``-v1``, ``-v2``... when that name is taken.

    >>> unique_name("epoch=1", ".pt", {"epoch=1.pt"})
    'epoch=1-v1.pt'
    """
    candidate, version = stem, 0
    while (name := candidate + extension) in taken:
        version += 1
        candidate = f"{stem}-v{version}"
    return name
