"""Training curves from a run's ``history.jsonl``: what ``bestsave plot`` draws.

One panel per metric, the monitored one first, each evaluation a point. On the monitored panel
the checkpoints kept now are marked and the best is a star; a dotted line marks the best epoch on
every panel. A validation metric is drawn beside its training counterpart when both were logged
(``val_loss`` with ``train_loss``, Keras's ``val_loss`` with ``loss``, fastai's ``valid_loss``
with ``train_loss``).

matplotlib is imported when a plot is drawn, never by ``import bestsave``, and only through its
object-oriented API: no pyplot, no global backend switch, so plotting from a notebook or a
training script leaves their figures alone.

Example:
    >>> import os, tempfile
    >>> from bestsave import BestSaver
    >>> from bestsave.plot import plot_history
    >>> run = tempfile.mkdtemp()
    >>> saver = BestSaver(run, monitor="val_loss", trackers=())
    >>> for epoch, (train, val) in enumerate([(0.9, 1.0), (0.6, 0.7), (0.4, 0.8)]):
    ...     _ = saver.step(epoch, {"train_loss": train, "val_loss": val},
    ...                    write=lambda p: open(p, "w").write("weights"))
    >>> out = plot_history(run, os.path.join(run, "curve.svg"))
    >>> open(out).read().count("<svg")
    1
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

from bestsave.manifest import load_manifest
from bestsave.metrics import MissingMetricError, as_number
from bestsave.verify import load_history

__all__ = ["FORMATS", "counterpart", "plot_history"]

FORMATS = (".png", ".svg", ".pdf")

_VALIDATION = ("val", "valid", "validation")
_TRAINING = ("train", "training")


def plot_history(
    dirpath: str | os.PathLike[str],
    output: str | os.PathLike[str],
    metrics: Sequence[str] = (),
    *,
    title: str | None = None,
    run: str | None = None,
    **storage_options: Any,
) -> str:
    """Plot the run in ``dirpath`` to ``output`` (``.png``, ``.svg`` or ``.pdf``); returns it.

    Args:
        dirpath: The run's directory (a local path or an fsspec URL).
        output: The image to write; its extension picks the format.
        metrics: More logged metrics to plot, one panel each, below the monitored one.
        title: The figure's title; the run's directory and monitor by default.
        run: The run's name, when the directory holds several.
        storage_options: Passed to fsspec for remote URLs.
    """
    out = os.fspath(output)
    if os.path.splitext(out)[1].lower() not in FORMATS:
        raise ValueError(
            f"cannot tell the image format of {out!r}; end its name with {', '.join(FORMATS)}"
        )
    manifest = load_manifest(dirpath, run, **storage_options)
    history = load_history(dirpath, manifest.name, **storage_options)
    if not history:
        raise ValueError(f"the run in {manifest.dirpath} has no evaluation yet; nothing to plot")
    logged = list(dict.fromkeys(k for line in history for k in line.get("metrics", {})))
    for name in metrics:
        if name not in logged:
            raise MissingMetricError(name, logged, what="metric")
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError("bestsave plot needs matplotlib: pip install 'bestsave[cli]'") from None

    x, xlabel = _x_axis(history)
    panels = list(dict.fromkeys([manifest.monitor, *metrics]))
    figure = Figure(figsize=(7.5, 1.0 + 2.6 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    best = manifest.best
    best_x = x[best.id] if best is not None and 0 <= best.id < len(x) else None
    for ax, name in zip(axes, panels, strict=True):
        _panel(ax, x, history, name, counterpart(name, logged), best_x)
    _mark_kept(axes[0], manifest, x, _series(history, manifest.monitor), best)
    for ax in axes:
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel(xlabel)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
    run = os.path.basename(str(manifest.dirpath).rstrip("/")) or str(manifest.dirpath)
    figure.suptitle(title if title is not None else f"{run}: {manifest.monitor} ({manifest.mode})")
    figure.savefig(out, dpi=120)
    return out


def _panel(
    ax: Any,
    x: list[float],
    history: list[dict[str, Any]],
    name: str,
    partner: str | None,
    best_x: float | None,
) -> None:
    """One metric's panel: its curve, its training or validation counterpart's, the best."""
    ax.plot(x, _series(history, name), marker=".", color="C0", label=name)
    ax.margins(x=0.04, y=0.12)
    if partner is not None:
        ax.plot(x, _series(history, partner), marker=".", linestyle="--", color="C1", label=partner)
    if best_x is not None:
        ax.axvline(best_x, color="C2", linestyle=":", linewidth=1)
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)


def counterpart(name: str, logged: Iterable[str]) -> str | None:
    """The training metric that goes with validation metric ``name``, or the reverse.

    >>> counterpart("val_loss", ["loss", "train_loss", "val_loss"])
    'train_loss'
    >>> counterpart("val_auc", ["auc", "val_auc"]), counterpart("train_loss", ["val_loss"])
    ('auc', 'val_loss')
    """
    role, base = _role(name)
    wanted = {"val": ("train", "plain"), "train": ("val",), "plain": ("val",)}[role]
    candidates = {k: _role(k) for k in logged if k != name}
    for want in wanted:
        for key, (key_role, key_base) in candidates.items():
            if key_role == want and key_base == base:
                return key
    return None


def _role(name: str) -> tuple[str, str]:
    """("val" | "train" | "plain", the name without its role prefix and ``_epoch`` suffix)."""
    low = name.lower()
    for role, prefixes in (("val", _VALIDATION), ("train", _TRAINING)):
        for prefix in prefixes:
            for sep in "_/-":
                if low.startswith(prefix + sep):
                    return role, _base(low[len(prefix) + 1 :])
    return "plain", _base(low)


def _base(name: str) -> str:
    # Lightning logs "train_loss_epoch" beside "val_loss" when a metric is logged per step too.
    return name.removesuffix("_epoch")


def _x_axis(history: list[dict[str, Any]]) -> tuple[list[float], str]:
    """Epochs when each evaluation has its own, else steps, else the evaluation's index (a run
    restarted without ``last`` repeats epochs; several evaluations per epoch share one)."""
    for key in ("epoch", "step"):
        values = [line.get(key) for line in history]
        numbers = [v for v in values if isinstance(v, int)]
        if len(numbers) == len(values) and all(a < b for a, b in pairwise(numbers)):
            return [float(v) for v in numbers], key
    return [float(i) for i in range(len(history))], "evaluation"


def _series(history: list[dict[str, Any]], name: str) -> list[float]:
    """The metric per evaluation; NaN (a gap) where it was not logged or not a finite number."""
    out = []
    for line in history:
        value = as_number(line.get("metrics", {}).get(name))
        ok = value is not None and not isinstance(value, bool) and math.isfinite(value)
        out.append(float(value) if ok else math.nan)  # type: ignore[arg-type]
    return out


def _mark_kept(ax: Any, manifest: Any, x: list[float], y: list[float], best: Any) -> None:
    """Circle the evaluations whose checkpoints are kept now; star the best."""
    best_id = best.id if best is not None else None
    kept = sorted(
        {
            r.id
            for r in manifest.kept
            if r.kind != "exception"
            and r.id != best_id
            and 0 <= r.id < len(x)
            and not math.isnan(y[r.id])
        }
    )
    if kept:
        ax.scatter(
            [x[i] for i in kept],
            [y[i] for i in kept],
            s=60,
            facecolors="none",
            edgecolors="C0",
            linewidths=1.5,
            zorder=3,
            label=f"kept ({len(kept)})",
        )
    if best is not None and 0 <= best.id < len(x):
        ax.scatter(
            [x[best.id]],
            [best.score],
            marker="*",
            s=260,
            color="gold",
            edgecolors="black",
            linewidths=0.8,
            zorder=4,
            label=f"best: epoch {best.epoch}, {best.score:.4g}",
        )
