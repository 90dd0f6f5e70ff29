"""Rebuilding a run's manifest from its records and history: what ``bestsave repair`` runs.

A manifest can be lost or damaged (a disk that filled up under another program, a hand edit, a
copy that left it behind). Everything it says is also written elsewhere: each kept checkpoint
has its record (``.bestsave/<run>/<stem>.json``) and every evaluation its line in
``history.jsonl``. :func:`repair` reads those, checks every checkpoint against its record's
sha256, and writes a new manifest; the damaged one is kept beside it as
``bestsave.json.damaged``. Checkpoints whose file is missing or changed are left out and
reported.

Example:
    >>> import os, tempfile
    >>> from bestsave import BestSaver, load_best
    >>> d = tempfile.mkdtemp()
    >>> saver = BestSaver(d, monitor="val_loss", top_k=2, name="run")
    >>> for epoch, loss in enumerate([0.9, 0.4, 0.6]):
    ...     _ = saver.step(epoch, {"val_loss": loss}, write=lambda p: open(p, "w").write("w"))
    >>> saver.close()
    >>> os.remove(os.path.join(d, ".bestsave", "run", "bestsave.json"))
    >>> report = repair(d)
    >>> [r.epoch for r in report.kept], report.lost, load_best(d).epoch
    ([1, 2], [], 1)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from bestsave.layout import META, RunFiles
from bestsave.manifest import Manifest, find_run
from bestsave.monitor import Monitor, resolve_mode
from bestsave.plan import ordered
from bestsave.policy import Policy, PolicyState
from bestsave.record import Record, join
from bestsave.store import Store, open_store

__all__ = ["Repaired", "repair"]


@dataclass
class Repaired:
    """What :func:`repair` rebuilt."""

    manifest: Manifest
    """The new manifest, written to the run's folder."""
    kept: list[Record] = field(default_factory=list)
    """The checkpoints it lists, checked against their records."""
    lost: list[str] = field(default_factory=list)
    """What could not be recovered, one line each (a missing or changed file, a record that
    is not readable)."""


def repair(
    dirpath: str | os.PathLike[str], run: str | None = None, **storage_options: Any
) -> Repaired:
    """Rebuild the manifest of the run in ``dirpath`` from its records and history.

    Args:
        dirpath: The directory given to the saver (a local path or an fsspec URL).
        run: The run's name, when the directory holds several (``.bestsave/<run>``).
        storage_options: Passed to fsspec for remote URLs.

    Raises:
        FileNotFoundError: the directory holds no run's records.
        ValueError: the records name no monitor to rebuild the run's state from.
    """
    store = open_store(os.fspath(dirpath), **storage_options)
    # A run whose manifest is lost is still there by its records.
    runs = [n for n in store.folders(META) if store.names(f"{META}/{n}")]
    name = find_run(store, run, runs, verb="repair")
    files = RunFiles(name)
    damaged = store.read_text(files.manifest)
    salvaged = _salvage(damaged)
    records, extension, lost = _records(store, files)
    lines, history_bytes = _history(store.read_text(files.history) or "")
    extension = str(salvaged.get("policy", {}).get("extension", extension))
    kept = _checked(store, records, lost)
    policies = _policies(salvaged, records, f"run {name!r} in {store.url}")
    first = next(iter(policies))
    states = {m: _state(p, kept, lines, m == first) for m, p in policies.items()}
    best = policies[first].best(states[first], kept)
    manifest = Manifest(
        dirpath=store.url,
        run=dict(salvaged.get("run") or (records[0].run if records else {})),
        monitor=first,
        mode=policies[first].monitor.mode,
        policy=dict(salvaged.get("policy") or {"extension": extension}),
        kept=ordered(kept, policies),
        best_name=best.name if best else None,
        last=_last(store, lines, extension, salvaged),
        state={
            "policies": {m: s.to_dict() for m, s in states.items()},
            "evaluations": len(lines),
            "last_epoch": lines[-1].get("epoch") if lines else None,
            "history_bytes": history_bytes,
            "warned": [],
        },
        monitors={m: p.monitor.mode for m, p in policies.items()},
        name=name,
    )
    if damaged is not None:
        store.write_text(files.manifest + ".damaged", damaged)
    store.write_text(files.manifest, manifest.to_json())
    return Repaired(manifest, manifest.kept, lost)


def _checked(store: Store, records: list[Record], lost: list[str]) -> list[Record]:
    """The records whose file is there and holds the bytes they describe; the others are
    told in ``lost``."""
    kept = []
    for record in records:
        if not store.exists(record.name):
            lost.append(f"{record.name}: its file is missing ({_what(record)})")
        elif record.sha256 and store.digest(record.name) != (record.bytes, record.sha256):
            lost.append(f"{record.name}: its file differs from its record ({_what(record)})")
        else:
            kept.append(replace(record, path=join(store.url, record.name)))
    return kept


def _salvage(text: str | None) -> dict[str, Any]:
    """What is still readable of a damaged manifest: its run info, monitors and policy."""
    try:
        data = json.loads(text or "")
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for key, kind in (("run", dict), ("monitors", dict), ("policy", dict)):
        if isinstance(data.get(key), kind):
            out[key] = data[key]
    return out


def _records(store: Store, files: RunFiles) -> tuple[list[Record], str, list[str]]:
    """The run's records, the checkpoints' extension (a record is named after its file,
    less the extension), and the records that are not readable."""
    records, extension, lost = [], "", []
    for entry in files.records(store):
        try:
            data = json.loads(store.read_text(f"{files.folder}/{entry}") or "")
            record = Record.from_dict(data)
        except (ValueError, TypeError, AttributeError):
            lost.append(f"{files.folder}/{entry}: not a readable record")
            continue
        records.append(record)
        stem = entry[: -len(".json")]
        if record.name.startswith(stem):
            extension = record.name[len(stem) :]
    return sorted(records, key=lambda r: r.id), extension, lost


def _history(text: str) -> tuple[list[dict[str, Any]], int]:
    """The history's evaluations up to the first line a crash cut short, and their size."""
    lines, size = [], 0
    for line in text.splitlines(keepends=True):
        try:
            entry = json.loads(line)
        except ValueError:
            break
        if not (line.endswith("\n") and isinstance(entry, dict)):
            break
        lines.append(entry)
        size += len(line.encode("utf-8"))
    return lines, size


def _policies(salvaged: dict[str, Any], records: list[Record], run: str) -> dict[str, Policy]:
    """The rules that rank the run's checkpoints: its monitors, and its tie-break."""
    monitors = {str(k): str(v) for k, v in (salvaged.get("monitors") or {}).items()}
    if not monitors:
        for record in records:
            if record.ranked and record.monitor:
                monitors.setdefault(record.monitor, record.mode)
    if not monitors:
        raise ValueError(
            f"cannot rebuild {run}: neither its records nor what is left of its manifest name "
            "the monitored metric; start a new run in another directory"
        )
    tie = salvaged.get("policy", {}).get("tie_break")
    tie_break = None
    if isinstance(tie, list) and len(tie) == 2:
        tie_break = Monitor(str(tie[0]), resolve_mode(str(tie[0]), str(tie[1])))
    return {
        m: Policy(Monitor(m, resolve_mode(m, mode)), tie_break=tie_break)
        for m, mode in monitors.items()
    }


def _state(
    policy: Policy, kept: list[Record], lines: list[dict[str, Any]], first: bool
) -> PolicyState:
    """The rules' state after the history: the kept checkpoints ranked, the best, the peak and
    how many evaluations passed since the best."""
    monitor = policy.monitor
    ranked = policy.ranked(
        policy.candidate(r) for r in kept if r.ranked and r.monitor == monitor.name
    )
    scores = [
        line.get("score") if first else (line.get("scores") or {}).get(monitor.name)
        for line in lines
    ]
    valid = [s for s in scores if isinstance(s, (int, float))]
    best = ranked[0] if ranked else None
    return PolicyState(
        best=best.score if best else None,
        best_id=best.id if best else None,
        peak=(max(valid) if monitor.mode == "max" else min(valid)) if valid else None,
        since_improvement=len(lines) - 1 - best.id if best and lines else 0,
        ranked=ranked,
    )


def _last(
    store: Store, lines: list[dict[str, Any]], extension: str, salvaged: dict[str, Any]
) -> Record | None:
    """The rolling ``last`` file, with its latest evaluation's values (it has no record of its
    own: the manifest held it)."""
    template = str(salvaged.get("policy", {}).get("last_name", "last"))
    name = template + extension
    if "{" in template or not lines or not store.exists(name):
        return None
    line = lines[-1]
    size, sha = store.digest(name)
    return Record(
        path=join(store.url, name),
        kind="last",
        epoch=int(line.get("epoch", 0)),
        step=line.get("step"),
        monitor="",
        mode="",
        score=None,
        metrics=dict(line.get("metrics") or {}),
        time=str(line.get("time", "")),
        elapsed_s=float(line.get("elapsed_s", 0.0)),
        bytes=size,
        sha256=sha,
        id=len(lines) - 1,
    )


def _what(record: Record) -> str:
    return f"the {record.kind} checkpoint of epoch {record.epoch}"
