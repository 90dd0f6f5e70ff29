"""Where a run's files live: checkpoints in the directory, bestsave's own files in a hidden folder.

The checkpoint directory holds the checkpoints, named as the framework's own callback names them,
and one hidden folder, ``.bestsave``, with a folder per run::

    checkpoints/
      epoch=3-step=40.ckpt
      last.ckpt
      .bestsave/
        epoch-step/               # one run, named after its file name template
          bestsave.json           # the manifest: what the run keeps, and its state
          history.jsonl           # one line per evaluation
          epoch=3-step=40.json    # the record of epoch=3-step=40.ckpt
          lock                    # while a process writes the run
          .bestsave-tmp-*         # files being written

So a listing of ``*.ckpt`` (or ``*.pth``, ``*.keras``) shows what the stock callback would
show, and several savers can share a directory, as several stock callbacks do: one keeping the
best by ``val_loss``, another a file every 1000 steps.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from bestsave.naming import sanitize
from bestsave.store import TMP_PREFIX, Store, tmp_name

META = ".bestsave"
MANIFEST = "bestsave.json"
HISTORY = "history.jsonl"
LOCK = "lock"


def run_name(template: str, monitor: str | None = None) -> str:
    """The name of the run that writes files named by ``template``: each field by its name.

    ``{monitor}`` is the monitored metric's name, so two savers with the default template and
    different monitors are two runs.

    >>> run_name("{epoch:02d}-{val_loss:.4f}"), run_name("model")
    ('epoch-val_loss', 'model')
    >>> run_name("epoch={epoch:03d}-{monitor}={score:.4f}", "val/acc")
    'epoch=epoch-val_acc=score'
    """
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(literal)
        if field is not None:
            parts.append(monitor if field == "monitor" and monitor else field)
    return sanitize("".join(parts)).lstrip(".") or "run"


@dataclass(frozen=True)
class RunFiles:
    """The names of one run's own files, relative to the checkpoint directory.

    >>> files = RunFiles("model", ".pth")
    >>> files.manifest, files.sidecar("model.pth")
    ('.bestsave/model/bestsave.json', '.bestsave/model/model.json')
    """

    name: str
    extension: str = ""

    @property
    def folder(self) -> str:
        return f"{META}/{self.name}"

    @property
    def manifest(self) -> str:
        return f"{self.folder}/{MANIFEST}"

    @property
    def history(self) -> str:
        return f"{self.folder}/{HISTORY}"

    @property
    def lock(self) -> str:
        return f"{self.folder}/{LOCK}"

    def sidecar(self, checkpoint: str) -> str:
        """The record of ``checkpoint`` (a file name in the directory)."""
        ext = self.extension
        stem = checkpoint[: -len(ext)] if ext and checkpoint.endswith(ext) else checkpoint
        return f"{self.folder}/{stem}.json"

    def tmp(self, name: str) -> str:
        """A fresh temporary name for a file that becomes ``name``: in the run's folder, so a
        crash leaves nothing in the checkpoint directory itself."""
        return f"{self.folder}/{tmp_name(name)}"

    def records(self, store: Store) -> list[str]:
        """The sidecar records in the run's folder (not a write a crash left half done)."""
        return [
            n for n in store.names(self.folder)
            if n.endswith(".json") and not n.startswith(TMP_PREFIX) and n != MANIFEST
        ]  # fmt: skip

    def leftovers(self, store: Store) -> list[str]:
        """Temporary files (and folders) a crash left in the run's folder."""
        names = store.names(self.folder) + store.folders(self.folder)
        return [f"{self.folder}/{n}" for n in names if n.startswith(TMP_PREFIX)]


def runs_in(store: Store) -> list[str]:
    """The names of the runs whose manifest is in ``store``'s directory."""
    return [name for name in store.folders(META) if store.exists(RunFiles(name).manifest)]
