"""Where a saver's own files are, for tests that look at them on disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def run_folder(dirpath: str | Path, run: str | None = None) -> Path:
    """The folder of ``run`` in ``dirpath/.bestsave``, or of the only run there."""
    meta = Path(dirpath) / ".bestsave"
    if run is not None:
        return meta / run
    runs = [p for p in meta.iterdir() if (p / "bestsave.json").exists()]
    assert len(runs) == 1, f"{dirpath} holds runs {runs}"
    return runs[0]


def checkpoints(dirpath: str | Path) -> set[str]:
    """The names of the files in ``dirpath`` itself (the checkpoints)."""
    return {p.name for p in Path(dirpath).iterdir() if p.is_file()}


def folder_writer(tag: str) -> Callable[[str], None]:
    """A ``write(path)`` that writes a checkpoint that is a folder: a file, and one below."""

    def write(path: str) -> None:
        os.makedirs(os.path.join(path, "shards"))
        Path(path, "config.json").write_text(tag)
        Path(path, "shards", "part-0.bin").write_bytes(tag.encode() * 3)

    return write
