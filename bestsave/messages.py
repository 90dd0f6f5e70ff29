"""Warnings that point at the user's own line.

A warning raised deep inside a framework's callback machinery is little use when it names a line
in bestsave or in Lightning's loop: :func:`warn` attributes it to the first caller outside
bestsave and the frameworks that call it, the line that started training or saving.
"""

from __future__ import annotations

import sys
import warnings


class BestSaveWarning(UserWarning):
    """A problem that bestsave works around, told once per run."""


# Their frames are skipped: they call bestsave's callbacks, and the user calls them.
_SKIPPED = frozenset(
    {"bestsave", "lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities",
     "fastai", "fastcore", "keras", "tensorflow", "jax", "torch", "transformers"}
)  # fmt: skip


def warn(message: str, category: type[Warning] = BestSaveWarning) -> None:
    """Warn, naming the user's line: the first caller outside bestsave and the frameworks."""
    frame, level = sys._getframe(1), 2
    while (
        frame.f_back is not None
        and str(frame.f_globals.get("__name__", "")).split(".")[0] in _SKIPPED
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
