"""What a run has decided so far: the rules' state, the kept records, the rolling ``last``.

A :class:`RunState` is a value: an evaluation plans the next one from it, the saver keeps the
state of its last commit to fall back on when a write fails, and the manifest stores it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bestsave.manifest import Manifest
from bestsave.policy import PolicyState
from bestsave.record import Record


@dataclass(frozen=True)
class RunHeader:
    """The manifest's fixed part: who the run is and what it monitors, under which rules."""

    run: dict[str, Any]
    monitors: dict[str, str]
    """Every monitored metric and its mode; the first is the one ``best`` follows."""
    policy: dict[str, Any]

    @property
    def monitor(self) -> str:
        return next(iter(self.monitors))

    @property
    def mode(self) -> str:
        return self.monitors[self.monitor]


@dataclass(frozen=True)
class RunState:
    """A run's decisions up to an evaluation."""

    policies: Mapping[str, PolicyState]
    """Each monitor's rules' state."""
    evaluations: int = 0
    last_epoch: int | None = None
    kept: tuple[Record, ...] = ()
    """Records of the files kept now."""
    last: Record | None = None
    warned: frozenset[str] = field(default_factory=frozenset)
    """Warnings told once per run, by key."""

    @classmethod
    def new(cls, monitors: list[str]) -> RunState:
        return cls({name: PolicyState() for name in monitors})

    @classmethod
    def of(cls, manifest: Manifest, monitors: list[str], dirpath: str) -> RunState:
        """The state ``manifest`` stores, its records located in ``dirpath``."""
        state = manifest.state
        policies = state.get("policies", {})
        located = [r.moved(dirpath) for r in manifest.kept]
        return cls(
            {m: PolicyState.from_dict(policies.get(m, {})) for m in monitors},
            evaluations=int(state.get("evaluations", 0)),
            last_epoch=state.get("last_epoch"),
            kept=tuple(located),
            last=manifest.last.moved(dirpath) if manifest.last else None,
            warned=frozenset(state.get("warned", [])),
        )

    def stored(self, history_bytes: int) -> dict[str, Any]:
        """The state as the manifest stores it."""
        return {
            "policies": {name: s.to_dict() for name, s in self.policies.items()},
            "evaluations": self.evaluations,
            "last_epoch": self.last_epoch,
            "history_bytes": history_bytes,
            "warned": sorted(self.warned),
        }
