"""Weights & Biases: each new best as a ``model`` artifact, its epoch's metrics in the summary.

The stock W&B callbacks of Lightning, fastai and Keras describe a checkpoint with the metrics of
the *last* epoch; this tracker describes it with the metrics of the epoch that produced it.

Example:
    ```python
    import wandb
    from bestsave.adapters.torch import TorchCheckpointer
    from bestsave.trackers import WandbTracker

    run = wandb.init(project="demo")              # WANDB_MODE=offline works too
    ckpt = TorchCheckpointer("ckpt/", monitor="val_loss", top_k=3,
                             trackers=[WandbTracker(upload="kept", prune=True)])
    for epoch in range(10):
        ...
        ckpt.step(epoch, {"val_loss": val_loss, "train_loss": train_loss}, model=model)
    ckpt.close()
    run.summary["best_val_loss"], run.summary["best_epoch"]   # the best epoch's values
    run.finish()
    ```

What the run gets:

- On every new best: a version of the artifact ``model-<run id>`` (type ``model``) holding the
  checkpoint file, with the record as metadata (epoch, step, score, every metric of that epoch,
  sha256, run info) and the aliases ``best`` and ``epoch-N`` (W&B adds ``latest``); and
  ``best_<metric>`` in the run summary for every metric of that epoch, plus ``best_epoch`` and
  ``best_step``. ``epoch-N`` uses the record's epoch, counted from 0 as the frameworks count.
- A checkpoint kept in remote storage (``s3://...``) is added as a reference, not uploaded again.

``prune=True`` removes the versions whose files the saver deleted, so the artifact's versions
mirror the kept files:

- Online, the version is deleted with W&B's public API (``Artifact.delete``) once its upload has
  finished. Versions logged by an earlier process of a resumed run are found by their ``epoch-N``
  alias and deleted when their sha256 matches the deleted file's.
- Offline, a run cannot delete anything: W&B uploads every logged version at ``wandb sync``.
  The tracker lists each version it would have deleted in the summary key ``bestsave/evicted``
  (file name, epoch, sha256); the ``best`` alias still always sits on the current best, since
  each new best takes it. After syncing, :func:`prune_evicted` deletes the listed versions.
- Either way every eviction is listed in ``bestsave/evicted``, so a deletion that failed (network
  down) can be retried with :func:`prune_evicted`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bestsave.record import RANKED, Record
from bestsave.trackers.common import (
    Upload,
    best_values,
    check_upload,
    is_local,
    record_dict,
    require,
    uploads,
)

if TYPE_CHECKING:
    from wandb import Artifact
    from wandb.sdk.wandb_run import Run

__all__ = ["EVICTED_KEY", "WandbTracker", "prune_evicted"]

EVICTED_KEY = "bestsave/evicted"
"""Summary key listing the versions whose files the saver deleted (``prune=True``)."""

_NAME_MAXLEN = 128  # W&B's limit on artifact names


@dataclass
class _Version:
    """An artifact version this tracker logged, and the kept files whose bytes it holds."""

    artifact: Artifact
    sha256: str
    files: set[str] = field(default_factory=set)


class WandbTracker:
    """Logs kept checkpoints of a saver to a Weights & Biases run.

    Args:
        run: The run to log to. By default the run active (``wandb.run``) when the saver is
            built, or else at the first checkpoint: ``wandb.init()`` makes one, and so does
            Lightning's ``WandbLogger``. With no run the tracker warns at each checkpoint.
        upload: ``"best"`` logs a version on every new best; ``"kept"`` on every kept checkpoint
            (top-k, ensemble and periodic files too; only the best gets the ``best`` alias);
            ``"end"`` logs only the final best, when the saver is closed.
        prune: Remove the versions whose files the saver deleted, so the artifact mirrors what
            is kept on disk. Deletes online; offline it lists them (see the module's notes).
        artifact_name: The artifact's name; default ``model-<run id>``, as Lightning's
            ``WandbLogger`` names its checkpoints.
        aliases: Aliases that mark the best version; each moves to the next best. ``epoch-N`` is
            always added, and W&B adds ``latest``.

    The summary's ``best_<metric>`` values are set on every new best whatever ``upload`` says.
    """

    def __init__(
        self,
        run: Run | None = None,
        upload: Upload = "best",
        prune: bool = False,
        artifact_name: str | None = None,
        aliases: Sequence[str] = ("best",),
    ) -> None:
        require("wandb", "WandbTracker")
        check_upload(upload, ("best", "kept", "end"))
        if artifact_name is not None and (
            not isinstance(artifact_name, str)
            or not artifact_name
            or len(artifact_name) > _NAME_MAXLEN
            or set(artifact_name) & set("/:")
        ):
            raise ValueError(
                f"artifact_name must be a non-empty name of at most {_NAME_MAXLEN} characters "
                f"without '/' or ':', not {artifact_name!r}"
            )
        if isinstance(aliases, str):
            raise ValueError(f"aliases must be a list of names, e.g. [{aliases!r}], not a string")
        for alias in aliases:
            if not isinstance(alias, str) or not alias or set(alias) & set("/:"):
                raise ValueError(f"aliases must be names without '/' or ':', not {alias!r}")
        self._run = run
        self.upload = upload
        self.prune = bool(prune)
        self.artifact_name = artifact_name
        self.aliases = tuple(aliases)
        self._versions: dict[str, _Version] = {}  # content (sha256) -> the version holding it
        self._files: dict[str, str] = {}  # kept file name -> content of its version
        self._summarized: str | None = None  # file name of the record in the summary now
        self._evicted: list[dict[str, Any]] | None = None

    def bind(self) -> None:
        """Use the run active now (``wandb.run``) unless the tracker has one.

        The saver calls this when it is built, on the training thread (adapters build theirs
        when training starts, once a ``WandbLogger`` or ``wandb.init()`` has made the run).
        """
        wandb = sys.modules.get("wandb")  # not imported: no run can be active
        if self._run is None and wandb is not None and wandb.run is not None:
            self._run = wandb.run

    @property
    def run(self) -> Run:
        """The run logged to."""
        if self._run is None:
            self.bind()
        if self._run is None:
            raise RuntimeError(
                "no active W&B run to log to: call wandb.init() before training (Lightning's "
                "WandbLogger and fastai's WandbCallback need it too), or pass WandbTracker(run=...)"
            )
        return self._run

    @property
    def name(self) -> str:
        """The artifact's name."""
        return self.artifact_name or f"model-{self.run.id}"

    # -- the saver's events ------------------------------------------------------------------

    def on_save(self, record: Record, path: str) -> None:
        """A new checkpoint was kept: summary on a new best, a version when ``upload`` says."""
        if record.kind == "best":
            self._summarize(record)
        # A file with the bytes of a logged version (the periodic copy of a best) is not logged
        # again, but keeps that version alive while it is kept.
        if uploads(self.upload, record.kind) or (record.sha256 or record.name) in self._versions:
            self._log(record, path)

    def on_evict(self, record: Record) -> None:
        """A kept checkpoint was deleted: with ``prune``, its version goes too."""
        content = self._files.pop(record.name, None)
        if content is None:  # logged, if at all, by an earlier process of a resumed run
            if self.prune and uploads(self.upload, record.kind):
                self._remove(record, record.sha256, None)
            return
        version = self._versions[content]
        version.files.discard(record.name)
        if version.files:  # the same bytes are still kept under another name (periodic)
            return
        del self._versions[content]
        if self.prune:
            self._remove(record, version.sha256, version.artifact)

    def on_end(self, best: Record | None) -> None:
        """Training ended: make sure the run holds the best and its metrics.

        With ``upload="end"`` this is where the best is logged. Otherwise it only acts for a best
        this process did not log (one kept before a resume), so a finished run is not touched.
        """
        if best is None:
            return
        if self._summarized != best.name:
            self._summarize(best)
        if best.name not in self._files:
            self._log(best, best.path)

    # -- the work ----------------------------------------------------------------------------

    def _summarize(self, record: Record) -> None:
        self.run.summary.update(best_values(record))
        self._summarized = record.name

    def _log(self, record: Record, path: str) -> None:
        content = record.sha256 or record.name
        if content in self._versions:
            self._versions[content].files.add(record.name)
            self._files[record.name] = content
            return
        import wandb

        artifact = wandb.Artifact(
            self.name,
            type="model",
            description=f"{record.monitor}={record.score} at epoch {record.epoch} ({record.kind})",
            metadata=record_dict(record),
        )
        if is_local(path) and os.path.isdir(path):  # a folder checkpoint (shards, a model dir)
            artifact.add_dir(path, name=record.name)
        elif is_local(path):
            artifact.add_file(path, name=record.name)
        else:  # already in durable remote storage: point to it rather than upload a copy
            artifact.add_reference(path, name=record.name, checksum=False)
        logged = self.run.log_artifact(artifact, aliases=self._aliases(record))
        self._versions[content] = _Version(logged, record.sha256, {record.name})
        self._files[record.name] = content

    def _aliases(self, record: Record) -> list[str]:
        if record.kind == "best":
            return [*self.aliases, f"epoch-{record.epoch}"]
        if record.kind in RANKED or record.kind == "periodic":
            return [f"epoch-{record.epoch}"]
        return [f"{record.kind}-epoch-{record.epoch}"]

    def _remove(self, record: Record, sha256: str, artifact: Artifact | None) -> None:
        run = self.run
        if self._evicted is None:  # a resumed run keeps the list it had
            self._evicted = list(run.summary.get(EVICTED_KEY) or [])
        self._evicted.append({**_entry(record, sha256), "alias": self._aliases(record)[-1]})
        # Listed before deleting: a failed deletion can be retried with prune_evicted().
        run.summary[EVICTED_KEY] = list(self._evicted)
        if run.offline:
            return
        if artifact is not None:
            artifact.wait()  # a version can be deleted once its upload has finished
        else:
            artifact = self._find(record)
            if artifact is None:
                return
        artifact.delete(delete_aliases=True)

    def _find(self, record: Record) -> Artifact | None:
        """The version an earlier process of this run logged for ``record``, if any."""
        import wandb

        run = self.run
        api = wandb.Api(overrides={"base_url": run.settings.base_url})
        try:
            artifact = api.artifact(
                f"{run.entity}/{run.project}/{self.name}:{self._aliases(record)[-1]}",
                type="model",
            )
        except (wandb.errors.CommError, ValueError):
            return None  # never logged to this run (e.g. a resume into a new W&B run)
        if not _is_version_of(artifact.metadata or {}, _entry(record, record.sha256)):
            return None  # the alias has moved to another file since
        return artifact

    def __repr__(self) -> str:
        return f"WandbTracker(upload={self.upload!r}, prune={self.prune})"


def prune_evicted(run_path: str, api: Any = None) -> list[str]:
    """Delete the versions a run's saver evicted, after an offline run was synced.

    Reads the run's ``bestsave/evicted`` summary list and deletes every ``model`` version the run
    logged for a listed file (same sha256; same file name and epoch when no digest was known).
    Safe to repeat. Returns the deleted versions' names.

    Args:
        run_path: ``"entity/project/run_id"``.
        api: A ``wandb.Api``; a new one by default.

    Example, after ``wandb sync wandb/offline-run-*``:
        ```python
        from bestsave.trackers.wandb import prune_evicted

        prune_evicted("my-team/demo/1a2b3c4d")   # ['model-1a2b3c4d:v0', 'model-1a2b3c4d:v2']
        ```
    """
    if api is None:
        import wandb

        api = wandb.Api()
    run = api.run(run_path)
    entries = [e for e in run.summary.get(EVICTED_KEY) or [] if isinstance(e, dict)]
    deleted = []
    for artifact in run.logged_artifacts():
        meta = artifact.metadata or {}
        if artifact.type == "model" and any(_is_version_of(meta, e) for e in entries):
            artifact.delete(delete_aliases=True)
            deleted.append(artifact.qualified_name.rsplit("/", 1)[-1])
    return deleted


def _entry(record: Record, sha256: str) -> dict[str, Any]:
    """How an evicted file is listed."""
    return {"file": record.name, "epoch": record.epoch, "sha256": sha256}


def _is_version_of(metadata: dict[str, Any], entry: dict[str, Any]) -> bool:
    """Whether a version's metadata (a record) describes the listed file."""
    if entry.get("sha256"):
        return bool(metadata.get("sha256") == entry["sha256"])
    return (metadata.get("path"), metadata.get("epoch")) == (entry.get("file"), entry.get("epoch"))
