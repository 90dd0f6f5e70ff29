"""From the results of the benchmark's runs to the figures the issue asks for, as Markdown.

A run's result is what ``workloads.run`` writes (``fit_s``, ``cpu_s``, ``epochs``, ``saves``,
``hwm_mb``). For each framework and configuration (``none``, ``theirs``, ``ours``):

- **blocking per save**: the pause at the end of an epoch that saves minus the pause at the end
  of one that does not, medians over the epochs of one run (when a run has no epoch without a
  save, the no-callback runs' pauses stand in), then the median over runs. The pause runs from
  the end of the epoch's last batch (or validation) to the start of the next epoch: the time
  the training loop spent in end-of-epoch callbacks, the checkpoint callback's included;
- **first save** and **later saves**: the same for epoch 0 alone, and for the saves after it
  (bestsave allocates its host buffers at the first save, then reuses them);
- **total overhead per save**: (median fit time with the callback - median fit time without)
  / number of saves; the fit includes the final wait for pending writes;
- **CPU per save**: the same for the CPU time of the process (every thread): the work a save
  adds, which other jobs on a shared machine inflate far less than wall time;
- **peak extra memory**: median peak RSS (``VmHWM``) at the end of the last epoch, minus the
  no-callback runs'.

>>> run = {"fit_s": 10.0, "cpu_s": 19.0, "saves": [0, 2], "hwm_mb": 900.0,
...        "epochs": [[0, 1, 1.5], [1.5, 2.5, 2.6], [2.6, 3.6, 4.0], [4.0, 5.0, 5.1]]}
>>> base = {"fit_s": 9.0, "cpu_s": 18.0, "saves": [0, 2], "hwm_mb": 500.0,
...         "epochs": [[0, 1, 1.1], [1.1, 2.1, 2.2], [2.2, 3.2, 3.3], [3.3, 4.3, 4.4]]}
>>> f = figures([run], [base])
>>> [round(x, 3) for x in (f.blocking_s, f.first_save_s, f.later_s, f.total_s, f.cpu_s)]
[0.35, 0.4, 0.3, 0.5, 0.5]
>>> f.extra_mb
400.0
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_TRAINER_SAVES = '`save_strategy="epoch"`, `save_total_limit=1`'
FRAMEWORKS = {
    # name: (label, their callback, ours, whether bestsave writes in the background there)
    "torch": ("plain PyTorch", "`torch.save` in the loop", "`TorchCheckpointer`", True),
    "lightning": ("Lightning", "`ModelCheckpoint`", "`BestCheckpoint`", True),
    "lightning_ddp": ("Lightning DDP, 2 processes", "`ModelCheckpoint`", "`BestCheckpoint`", True),
    "keras": ("Keras 3 (torch backend)", "`ModelCheckpoint`", "`BestModelCheckpoint`", False),
    "fastai": ("fastai", "`SaveModelCallback`", "`SaveBestModelCallback`", True),
    "transformers": ("Transformers `Trainer`", _TRAINER_SAVES, "`BestSaveCallback`", True),
    "fsdp": ("FSDP2, 2 processes", "`dcp.save`", "`TorchCheckpointer`", True),
}
ASYNC = {"fsdp": "`dcp.async_save`"}
"""Frameworks with an asynchronous save of their own (config ``theirs_async``): bestsave's
total overhead must be no more than its."""
OWN_LIMIT = {"fsdp"}
"""Frameworks whose runs hold their own limit (config ``limit``: each process copying its shards
into host memory allocated beforehand, both at once) and whose state is spread over processes."""
# "At most two copies of the state": a few MB of interpreter and I/O buffers are not a copy.
COPIES_SLACK = 0.05


@dataclass
class Figures:
    fit_s: float
    blocking_s: float
    first_save_s: float
    later_s: float
    total_s: float
    cpu_s: float
    extra_mb: float


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _pauses(run: dict[str, Any]) -> list[float]:
    return [end - trained for _, trained, end in run["epochs"]]


def figures(runs: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]]) -> Figures:
    """The figures of one configuration's ``runs`` against the no-callback ``baseline`` runs."""
    base_pause = _median([p for run in baseline for p in _pauses(run)])
    blocking, first, later = [], [], []
    for run in runs:
        pauses = _pauses(run)
        saves = sorted(run["saves"])
        other = [p for e, p in enumerate(pauses) if e not in saves]
        reference = _median(other) if other else base_pause
        extra = [pauses[e] - reference for e in saves if e < len(pauses)]
        blocking.append(_median(extra))
        first.append(extra[0] if extra else math.nan)
        later.append(_median(extra[1:]))
    saves_per_run = len(runs[0]["saves"]) if runs else 0

    def per_save(key: str) -> float:
        added = _median([r[key] for r in runs]) - _median([r[key] for r in baseline])
        return added / saves_per_run if saves_per_run else math.nan

    return Figures(
        fit_s=_median([r["fit_s"] for r in runs]),
        blocking_s=_median(blocking),
        first_save_s=_median(first),
        later_s=_median(later),
        total_s=per_save("fit_s"),
        cpu_s=per_save("cpu_s"),
        extra_mb=_median([r["hwm_mb"] for r in runs]) - _median([r["hwm_mb"] for r in baseline]),
    )


def _s(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f} s"


def _ratio(a: float, b: float) -> str:
    return "n/a" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}"


def _mb(x: float, state_mb: float) -> str:
    if math.isnan(x):
        return "n/a"
    size = f"{x:+.0f} MB" if abs(x) >= 10 else f"{x:+.2f} MB"
    return f"{size} ({x / state_mb:.2f}x state)" if state_mb else size


def _check(ok: bool, text: str) -> str:
    return ("met: " if ok else "MISSED: ") + text


def _targets(
    theirs: Figures,
    ours: Figures,
    background: bool,
    copy_s: float,
    state_mb: float,
    asynchronous: Figures | None = None,
) -> str:
    """The issue's targets for one framework, each met or missed."""
    if asynchronous is not None:
        return "; ".join([
            _check(ours.blocking_s <= 1.5 * copy_s, "blocking <= 1.5x limit"),
            _check(ours.total_s <= theirs.total_s / 3, "total <= 1/3 of `dcp.save`"),
            _check(ours.total_s <= asynchronous.total_s, "total <= `dcp.async_save`"),
        ])  # fmt: skip
    if background:
        checks = [
            _check(ours.blocking_s <= 1.5 * copy_s, "blocking <= 1.5x limit"),
            _check(ours.total_s <= theirs.total_s / 3, "total <= 1/3 of theirs"),
        ]
    else:
        checks = [_check(ours.total_s <= theirs.total_s, "total <= theirs")]
    if state_mb:
        checks.append(_check(ours.extra_mb <= (2 + COPIES_SLACK) * state_mb, "memory <= 2 copies"))
    return "; ".join(checks)


def markdown(
    results: dict[str, dict[str, list[dict[str, Any]]]],
    errors: dict[str, str],
    limit: dict[str, float],
    header: Sequence[str],
) -> str:
    """The benchmark's report: ``results[framework][config]`` holds each run's result;
    ``errors[framework]`` says why a framework has none; ``limit`` holds the medians of the
    limit runs (``copy_s``, ``clone_s``, ``torch_save_s``, ``state_mb``)."""
    copy_s, state_mb = limit.get("copy_s", math.nan), limit.get("state_mb", 0.0)
    table = [
        "| framework | callback | fit | blocking per save | first / later saves | "
        "total overhead per save | CPU per save | peak extra memory |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratios = [
        "| framework | blocking: ours / theirs | blocking: ours / limit | "
        "total: ours / theirs | total: ours / limit | targets |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, (label, theirs_label, ours_label, background) in FRAMEWORKS.items():
        # A DDP process copies with its share of the cores (Lightning sets its threads).
        limit_s = limit.get("copy_ddp_s", copy_s) if name == "lightning_ddp" else copy_s
        if name in errors:
            table.append(f"| {label} | {errors[name]} | | | | | | |")
            ratios.append(f"| {label} | | | | | {errors[name]} |")
            continue
        if name not in results:
            continue
        runs = results[name]
        per_process_mb = state_mb
        if name in OWN_LIMIT:
            own = runs.get("limit", [])
            limit_s = _median([r["copy_s"] for r in own])
            per_process_mb = _median([r["state_mb"] for r in own]) / 2 if own else 0.0
        base = runs.get("none", [])
        table.append(
            f"| {label} | no checkpoint callback | {_s(_median([r['fit_s'] for r in base]))}"
            " | | | | | |"
        )
        fig = {}
        configs = [("theirs", theirs_label), ("ours", ours_label)]
        if name in ASYNC:
            configs.insert(1, ("theirs_async", ASYNC[name]))
        for config, callback in configs:
            if not runs.get(config):
                continue
            f = fig[config] = figures(runs[config], base)
            table.append(
                f"| | {callback} | {_s(f.fit_s)} | {_s(f.blocking_s)} | "
                f"{_s(f.first_save_s)} / {_s(f.later_s)} | {_s(f.total_s)} | {_s(f.cpu_s)} | "
                f"{_mb(f.extra_mb, per_process_mb)} |"
            )
        if "theirs" in fig and "ours" in fig:
            t, o, a = fig["theirs"], fig["ours"], fig.get("theirs_async")
            targets = _targets(t, o, background, limit_s, per_process_mb, a)
            ratios.append(
                f"| {label} | {_ratio(o.blocking_s, t.blocking_s)} | "
                f"{_ratio(o.blocking_s, limit_s)} | {_ratio(o.total_s, t.total_s)} | "
                f"{_ratio(o.total_s, limit_s)} | {targets} |"
            )
            if a is not None:
                ratios.append(
                    f"| {label}, against {ASYNC[name]} | {_ratio(o.blocking_s, a.blocking_s)} | "
                    f"| {_ratio(o.total_s, a.total_s)} | | |"
                )
    table.append(
        f"| limit | copy into preallocated host memory | | {_s(copy_s)} | | {_s(copy_s)} | | |"
    )
    ddp_s = limit.get("copy_ddp_s", math.nan)
    if "lightning_ddp" in results:
        table.append(
            f"| limit, DDP | the same with one DDP process's threads | | {_s(ddp_s)} | | "
            f"{_s(ddp_s)} | | |"
        )
    for name in OWN_LIMIT & results.keys():
        own_s = _median([r["copy_s"] for r in results[name].get("limit", [])])
        table.append(
            f"| limit, {FRAMEWORKS[name][0]} | each process copies its shards into preallocated "
            f"host memory | | {_s(own_s)} | | {_s(own_s)} | | |"
        )
    notes = [
        f"Limit: copying the state into host memory allocated beforehand takes {_s(copy_s)} "
        f"({_s(ddp_s)} with the threads Lightning gives each of two DDP processes, the limit "
        f"for the DDP rows); a fresh `clone()` {_s(limit.get('clone_s', math.nan))}; "
        f"`torch.save` of the state dict to the same disk "
        f"{_s(limit.get('torch_save_s', math.nan))}.",
        "",
        DEFINITIONS,
    ]
    return "\n".join([*header, "", *table, "", *ratios, "", *notes]) + "\n"


DEFINITIONS = (
    "*Blocking per save*: how much longer the end of an epoch that saves takes than the end of "
    "one that does not (from the epoch's last batch to the next epoch's start; medians over "
    "saves, then over repeats); *first / later saves*: the same for the first save, and for "
    "the saves after it (the first may allocate host buffers). "
    "*Total overhead per save*: (fit time with the callback - fit time without any) / saves, "
    "medians over repeats; it counts the background writer slowing the other epochs and the "
    "wait for pending writes at the end of fit. *CPU per save*: the same for the process's CPU "
    "time (all threads), which other jobs on the machine inflate far less than wall time. "
    "*Peak extra memory*: peak resident memory at the end of the last epoch minus the "
    "no-callback runs' (the first process's, against its share of the state, for FSDP2). "
    "Each configuration runs in a fresh process; the checkpoint directory "
    "is deleted after each run."
)
