"""One run, one writer: a lock file naming the run, host and process that hold it."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from bestsave.store import Store


class DirectoryLockedError(RuntimeError):
    """Another live process is writing to the directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def acquire(store: Store, name: str, run_id: str) -> None:
    """Take the lock file ``name``, or raise naming the process that holds it.

    A lock left by a process that no longer runs on this host (a killed run) is taken over;
    one held by this process (a notebook cell run again) is shared.
    """
    me = {"host": socket.gethostname(), "pid": os.getpid(), "run": run_id, "since": time.time()}
    text = json.dumps(me)
    if store.create_exclusive(name, text):
        return
    holder = _read(store, name)
    if holder is not None and _held_elsewhere(holder, me):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
        raise DirectoryLockedError(
            f"{store.url} is being written by run {holder.get('run', '?')} (host "
            f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {since}). "
            "Use another directory, or stop that run; if it is dead, delete "
            f"{store.url}/{name}."
        )
    store.write_text(name, text)


def release(store: Store, name: str) -> None:
    """Give the lock file ``name`` back if this process holds it."""
    holder = _read(store, name)
    if (
        holder is not None
        and holder.get("host") == socket.gethostname()
        and (holder.get("pid") == os.getpid())
    ):
        store.delete(name)


def _read(store: Store, name: str) -> dict[str, Any] | None:
    text = store.read_text(name)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:  # a lock torn by a crash holds nothing
        return None
    return data if isinstance(data, dict) else None


def _held_elsewhere(holder: dict[str, Any], me: dict[str, Any]) -> bool:
    if holder.get("host") != me["host"]:
        return True  # liveness cannot be checked across hosts
    pid = holder.get("pid")
    return isinstance(pid, int) and pid != me["pid"] and _alive(pid)
