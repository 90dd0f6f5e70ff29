"""Read a W&B run back from its ``.wandb`` file, to check what an offline run logged.

An offline run (``WANDB_MODE=offline``) writes everything it would send to
``<WANDB_DIR>/wandb/offline-run-<time>-<id>/run-<id>.wandb``. The file is a LevelDB-log stream:

- a 7-byte header: ``:W&B``, the magic number 0xBEE1 (u16, little-endian), the version (u8, 0);
- 32 KiB blocks holding chunks, each a 7-byte header (checksum u32, length u16, type u8) and
  its payload. Type 1 is a whole record; 2, 3 and 4 are the first, middle and last chunks of a
  record split across blocks. A block's tail shorter than a chunk header is zero padding.
- the checksum is CRC-32 (zlib's) of the type byte then the payload: W&B's variant of LevelDB's
  masked CRC-32C;
- each record is a ``wandb.proto.wandb_internal_pb2.Record``: run, config, history, summary,
  artifact, ... records in the order the run made them.

Example:
    ```python
    run = wandb.init(mode="offline")
    run.summary["best_val_loss"] = 0.3
    run.finish()
    logged = read_run(run.settings.sync_file)         # or read_run(wandb_dir, run_id=...)
    logged.summary["best_val_loss"]                   # 0.3
    [(a.name, a.aliases, a.metadata["epoch"]) for a in logged.artifacts(type="model")]
    ```
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

# The generated classes depend on the protobuf version installed; type checkers cannot see them.
pb: Any = wandb_internal_pb2

__all__ = [
    "LoggedArtifact",
    "RunFile",
    "find_run_file",
    "read_payloads",
    "read_records",
    "read_run",
]

MAGIC = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class CorruptRunFile(ValueError):
    """The file is not a W&B run file, or a chunk fails its checksum."""


def read_payloads(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """Every record's bytes, chunks joined. A record cut off at the end (a run still writing,
    or killed) is left out, as LevelDB's reader does."""
    data = Path(path).read_bytes()
    if data[:HEADER] != MAGIC:
        raise CorruptRunFile(f"{path} is not a W&B run file (header {data[:HEADER]!r})")
    pos, parts = HEADER, bytearray()
    while True:
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # zero padding at a block's end
            pos += room
            continue
        if pos + HEADER > len(data):
            return
        checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        start, pos = pos + HEADER, pos + HEADER + length
        if kind == 0 and length == 0:  # zeros: the writer's padding, or a file cut short
            continue
        if pos > len(data):
            return
        payload = data[start:pos]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != checksum:
            raise CorruptRunFile(f"{path}: chunk at byte {start - HEADER} fails its checksum")
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            parts = bytearray(payload)
        elif kind == MIDDLE:
            parts += payload
        elif kind == LAST:
            yield bytes(parts + payload)
            parts = bytearray()
        else:
            raise CorruptRunFile(f"{path}: unknown chunk type {kind} at byte {start - HEADER}")


def read_records(path: str | os.PathLike[str]) -> list[Any]:
    """The run's records (``wandb_internal_pb2.Record``), in order."""
    records = []
    for payload in read_payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def find_run_file(wandb_dir: str | os.PathLike[str], run_id: str | None = None) -> Path:
    """The ``.wandb`` file of run ``run_id`` (or of the only run) under ``wandb_dir``."""
    found = sorted(Path(wandb_dir).rglob(f"run-{run_id or '*'}.wandb"))
    if len(found) != 1:
        names = ", ".join(str(p) for p in found) or "none"
        raise FileNotFoundError(
            f"expected one run file for run {run_id or '*'} under {wandb_dir}, found {names}"
        )
    return found[0]


@dataclass
class LoggedArtifact:
    """One artifact version as the run logged it."""

    name: str
    type: str
    aliases: list[str]
    metadata: dict[str, Any]
    digest: str
    description: str
    files: dict[str, Any]
    """Path inside the artifact -> entry (``size``, ``digest``: base64 MD5, ``ref`` for a
    reference, ``local_path``: the staged copy W&B will upload)."""


@dataclass
class RunFile:
    """What one run logged, rebuilt from its records."""

    path: Path
    records: list[Any] = field(repr=False)
    """``wandb_internal_pb2.Record`` messages, in the order the run made them."""

    def of(self, kind: str) -> list[Any]:
        """Records of one type (``"summary"``, ``"artifact"``, ``"history"``, ...), unwrapped."""
        return [getattr(r, kind) for r in self.records if r.WhichOneof("record_type") == kind]

    @property
    def run(self) -> Any:
        """The ``RunRecord``: id, project, entity, config, start time."""
        runs = self.of("run")
        if not runs:
            raise ValueError(f"{self.path} holds no run record")
        return runs[0]

    @property
    def summary(self) -> dict[str, Any]:
        """The run's final summary: every summary update applied in order."""
        out: dict[str, Any] = {}
        for run in self.of("run"):
            _apply(out, run.summary)
        for summary in self.of("summary"):
            _apply(out, summary)
        return out

    @property
    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for run in self.of("run"):
            _apply(out, run.config)
        for config in self.of("config"):
            _apply(out, config)
        return out

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per ``run.log`` step."""
        return [
            {_key(item): json.loads(item.value_json) for item in h.item} for h in self.of("history")
        ]

    def artifacts(self, type: str | None = None, name: str | None = None) -> list[LoggedArtifact]:
        """The logged artifact versions, in logging order."""
        out = []
        for a in self.of("artifact"):
            if (type is None or a.type == type) and (name is None or a.name == name):
                out.append(
                    LoggedArtifact(
                        name=a.name,
                        type=a.type,
                        aliases=list(a.aliases),
                        metadata=json.loads(a.metadata) if a.metadata else {},
                        digest=a.digest,
                        description=a.description,
                        files={e.path: e for e in a.manifest.contents},
                    )
                )
        return out


def read_run(
    path: str | os.PathLike[str], run_id: str | None = None, timeout: float = 30.0
) -> RunFile:
    """Read a finished run from its ``.wandb`` file, or from a directory holding it (``WANDB_DIR``).

    ``run.finish()`` can return before W&B's service has written the file out (seen with the
    first run of a process), so this waits up to ``timeout`` seconds for the run's ``exit``
    record and for the file to stop growing. ``timeout=0`` reads what is there now.
    """
    file = Path(path)
    if file.is_dir():
        file = find_run_file(file, run_id)
    deadline = time.monotonic() + timeout
    size, records = -1, read_records(file)
    while time.monotonic() < deadline:
        finished = any(r.WhichOneof("record_type") == "exit" for r in records)
        if finished and file.stat().st_size == size:
            break
        size = file.stat().st_size
        time.sleep(0.05)
        records = read_records(file)
    return RunFile(file, records)


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _apply(out: dict[str, Any], update: Any) -> None:
    """Apply a summary or config record (``update``/``remove`` items) to ``out``."""
    for item in update.update:
        if item.key:
            out[item.key] = json.loads(item.value_json)
        else:  # nested_key ["a", "b"] sets out["a"]["b"]
            node = out
            for part in item.nested_key[:-1]:
                node = node.setdefault(part, {})
            node[item.nested_key[-1]] = json.loads(item.value_json)
    for item in getattr(update, "remove", ()):
        node = out
        keys = [item.key] if item.key else list(item.nested_key)
        for part in keys[:-1]:
            node = node.get(part, {})
        node.pop(keys[-1], None)
