"""How much host memory staging may take, and how a save is written when the state does not
fit in it twice.

A background save copies the state into host buffers and writes it from there, so training
waits only for the copy; a second buffer set lets the next save copy while the first is still
being written. Two copies of a large state can exceed what the machine has, and a process the
kernel kills for it loses the run it was saving. :class:`Budget` bounds the buffers, and each
save takes the best step that fits (:meth:`Budget.step`):

``two sets``
    two copies fit: a save never waits for the one before it;
``one set``
    one copy fits: a save that finds the previous one still being written waits for it, then
    copies (a newer best replaces a pending copy not yet written);
``chunked``
    no copy fits: the state is serialised on the training thread into a spool of the budget's
    size that a helper thread writes out, so training waits for the write of what does not fit;
``streaming``
    nothing fits (or the writer cannot stream): the state is written straight from training's
    tensors while training waits, as a synchronous save does.

Every step writes the same bytes, commits them the same way and reports errors the same way.

>>> MB = 10**6
>>> budget = Budget(bytes=1000 * MB, pinned=400 * MB, source="staging_memory=1GB")
>>> [budget.step(size * MB, pinned=False) for size in (400, 800, 2000)]
['two sets', 'one set', 'chunked']
>>> budget.step(800 * MB, pinned=True)  # pinned buffers (state on a GPU) have less room
'chunked'
>>> Budget(bytes=MB, pinned=MB, source="staging_memory=1MB").step(800 * MB, pinned=False)
'streaming'
>>> parse_size("1.5GiB"), parse_size("512MB"), parse_size(None)
(1610612736, 512000000, None)
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

Staging = Literal["two sets", "one set", "chunked", "streaming"]
"""How a checkpoint was written from host memory (see the module's docstring)."""

LIVE: frozenset[str] = frozenset({"chunked", "streaming"})
"""The steps that read training's own tensors, so training waits while they do."""

CHUNK = 8 << 20
"""The most the spool copies at a time: peak memory is the budget plus this."""

_MIN_SPOOL = 4 * CHUNK  # a smaller spool saves less than its copies cost: stream instead
_SHARE = 2  # of the memory available at the start, staging may take 1/_SHARE
_PINNED_SHARE = 4  # and of physical memory, pinned buffers 1/_PINNED_SHARE

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}  # fmt: skip


def parse_size(value: int | str | None) -> int | None:
    """Bytes from an ``int`` or a size such as ``"8GB"`` or ``"512 MiB"``; None stays None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ValueError(
        f"staging_memory must be a whole number of bytes (an int, such as 8_000_000_000) or a "
        f"size such as '8GB' or '512MiB', not {value!r}; or None to let staging take half the "
        f"memory available when training starts"
    )


def format_size(size: int) -> str:
    """``size`` bytes for people: ``'1.5 GiB'``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Budget:
    """The host memory staging buffers may take, in bytes, and of it, pinned buffers (for a
    state on a GPU, whose copies are fastest into page-locked memory that the rest of the
    machine then cannot use)."""

    bytes: int
    pinned: int
    source: str
    """Where the numbers come from, for messages."""

    @classmethod
    def of(cls, staging_memory: int | str | None) -> Budget:
        """The budget a user set, or one taken from the machine now: half the memory this
        process may still take, and for pinned buffers at most a quarter of physical memory."""
        given = parse_size(staging_memory)
        if given is not None:
            return cls(given, given, f"staging_memory={staging_memory!r}")
        available, limit = available_memory()
        share = available // _SHARE
        pinned = min(share, physical_memory() // _PINNED_SHARE)
        return cls(share, pinned, f"half of the {format_size(available)} {limit} at the start")

    def room(self, pinned: bool) -> int:
        return min(self.bytes, self.pinned) if pinned else self.bytes

    def sets(self, size: int, pinned: bool) -> int:
        """How many copies of a state of ``size`` bytes fit (``pinned``: it lives on a GPU)."""
        return self.room(pinned) // max(size, 1)

    def step(self, size: int, pinned: bool) -> Staging:
        """The step for a state of ``size`` bytes (``pinned``: it lives on a GPU)."""
        sets = self.sets(size, pinned)
        if sets >= 2:
            return "two sets"
        if sets == 1:
            return "one set"
        return "chunked" if self.room(pinned) >= _MIN_SPOOL else "streaming"

    def describe(self, step: Staging, size: int, pinned: bool) -> str:
        """What ``step`` costs, said once when a save first takes it."""
        room = format_size(self.room(pinned))
        kind = "pinned host memory" if pinned else "host memory"
        what = {
            "two sets": "two copies fit, so a save never waits for the one before it",
            "one set": "one copy fits, so a save that finds the previous one still being "
            "written waits for that write before it copies the state",
            "chunked": f"no copy fits, so training waits while all but the last {room} of each "
            "checkpoint are written, and the rest is written in the background",
            "streaming": "no copy fits, so each checkpoint is written from training's own "
            "tensors while training waits, as a synchronous save is",
        }[step]
        return (
            f"the state to save is {format_size(size)} and staging may take {room} of "
            f"{kind} ({self.source}; pass staging_memory= to change it): {what}"
        )


def available_memory() -> tuple[int, str]:
    """The memory this process may still take, and which limit says so: the least of what the
    system has available, what its cgroup allows and what its address-space limit leaves."""
    found: list[tuple[int, str]] = []
    meminfo = _read_kib("/proc/meminfo", "MemAvailable:")
    if meminfo is not None:
        found.append((meminfo, "available"))
    cgroup = _cgroup_room()
    if cgroup is not None:
        found.append((cgroup, "left under the cgroup's memory limit"))
    address = _address_space_room()
    if address is not None:
        found.append((address, "left under the address-space limit (RLIMIT_AS)"))
    if not found:
        found.append((physical_memory(), "of physical memory"))
    return min(found)


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 8 << 30  # unknown: assume a small machine


def _read_kib(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limits (v2, or v1's memory controller),
    if it has any: the least room of its cgroup and every cgroup above it, since a limit set on
    a parent (a batch job's, with each task in a child of its own) binds the children too."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for _, controllers, path in lines:
        if controllers == "":
            root, limit, usage = "/sys/fs/cgroup", "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            root, limit, usage = (
                "/sys/fs/cgroup/memory",
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        else:
            continue
        here = PurePosixPath(path)
        rooms = [
            room
            for group in (here, *here.parents)
            if (room := _room(root + str(group).rstrip("/"), limit, usage)) is not None
        ]
        if rooms:
            return min(rooms)
    return None


def _room(where: str, limit: str, usage: str) -> int | None:
    """Bytes left under one cgroup's memory limit, or None if it has none (or cannot be read:
    a cgroup outside this container's view)."""
    try:
        with open(os.path.join(where, limit)) as f:
            most = f.read().strip()
        with open(os.path.join(where, usage)) as f:
            used = int(f.read())
    except (OSError, ValueError):
        return None
    if most == "max" or int(most) >= 1 << 60:  # v1 writes "no limit" as a huge number
        return None
    return max(0, int(most) - used)


def _address_space_room() -> int | None:
    """Bytes of address space left under ``RLIMIT_AS``, if it is set."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = _read_kib("/proc/self/status", "VmSize:")
    return max(0, soft - (used or 0))
