"""MLflow: each new best's file and record as run artifacts, its epoch's metrics as ``best_*``.

Example:
    ```python
    import mlflow
    from bestsave.adapters.torch import TorchCheckpointer
    from bestsave.trackers import MLflowTracker

    with mlflow.start_run():
        ckpt = TorchCheckpointer("ckpt/", monitor="val_loss",
                                 trackers=[MLflowTracker(register_model_name="my-model")])
        for epoch in range(10):
            ...
            ckpt.step(epoch, {"val_loss": val_loss, "train_loss": train_loss}, model=model)
        ckpt.close()                    # registers the final best as a model version
    ```

With Lightning's ``MLFlowLogger``, which logs through a client and leaves no active run, point
the tracker at the logger's run::

    logger = MLFlowLogger(tracking_uri="sqlite:///mlflow.db")
    MLflowTracker(run_id=logger.run_id, client=logger.experiment)
    # or: MLflowTracker(run_id=logger.run_id, tracking_uri="sqlite:///mlflow.db")

What the run gets, on every new best:

- ``checkpoints/<file>``: the checkpoint, and ``checkpoints/<file>.json``: its record (epoch,
  step, score, every metric of that epoch, sha256, run info). A checkpoint kept in remote storage
  (``s3://...``) is not copied: the tag ``best_checkpoint_uri`` points to it.
- metrics ``best_<metric>`` for every numeric metric of that epoch, plus ``best_epoch`` and
  ``best_step``, logged at the record's step (so their history shows each new best);
- tags ``best_epoch`` and ``best_checkpoint`` (the artifact path of the file).

MLflow offers no way to delete a run's artifacts, so evicted checkpoints stay in the run; the
``best_checkpoint`` tag always names the current best.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from bestsave.record import Record
from bestsave.trackers.common import best_values, check_upload, is_local, require

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["MLflowTracker"]

_UNSAFE = re.compile(r"[^\w./\- ]")  # characters MLflow refuses in metric names


class MLflowTracker:
    """Logs the best checkpoints of a saver to an MLflow run.

    Args:
        run_id: The run to log to. By default the run active (``mlflow.start_run()``) when the
            saver is built, on the thread that builds it. With no run the tracker warns at each
            checkpoint.
        tracking_uri: Where ``run_id`` lives (``sqlite:///mlflow.db``, ``http://host:5000``);
            default MLflow's current tracking URI.
        client: An ``MlflowClient`` to log through instead (e.g. ``MLFlowLogger.experiment``).
        upload: ``"best"`` logs every new best; ``"end"`` only the final best, when the saver
            is closed.
        artifact_path: The run's folder for checkpoints and their records.
        register_model_name: Also register the final best as a version of this registered model
            when the saver is closed (created if it does not exist); its tags give epoch,
            monitor, score and sha256.
    """

    def __init__(
        self,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        client: MlflowClient | None = None,
        upload: Literal["best", "end"] = "best",
        artifact_path: str = "checkpoints",
        register_model_name: str | None = None,
    ) -> None:
        require("mlflow", "MLflowTracker")
        check_upload(upload, ("best", "end"))
        if client is not None and tracking_uri is not None:
            raise ValueError("pass tracking_uri or client, not both: a client has its own URI")
        if run_id is None and (client is not None or tracking_uri is not None):
            raise ValueError(
                "tracking_uri and client need run_id= (e.g. MLFlowLogger.run_id); "
                "pass none of them to log to the active run"
            )
        clean = posixpath.normpath(artifact_path) if isinstance(artifact_path, str) else ""
        if not artifact_path or clean != artifact_path or clean.startswith(("/", "..", ".")):
            raise ValueError(
                f"artifact_path must be a relative folder such as 'checkpoints', not "
                f"{artifact_path!r}"
            )
        if register_model_name is not None and (
            not isinstance(register_model_name, str) or not register_model_name.strip()
        ):
            raise ValueError(f"register_model_name must be a name, not {register_model_name!r}")
        self._run_id = run_id
        self._tracking_uri = tracking_uri
        self._client = client
        self.upload = upload
        self.artifact_path = artifact_path
        self.register_model_name = register_model_name
        self._logged: set[str] = set()  # file names of the records logged
        self._registered: set[str] = set()
        self.bind()

    def bind(self) -> None:
        """Use the run active now on this thread (``mlflow.active_run()``) unless the tracker
        has one.

        MLflow's active run belongs to the thread that started it, and the saver may call
        trackers from its writer thread: the saver calls this when it is built, on the training
        thread (adapters build theirs when training starts).
        """
        mlflow = sys.modules.get("mlflow")  # not imported: no run can be active
        active = mlflow.active_run() if mlflow is not None and self._run_id is None else None
        if mlflow is not None and active is not None:
            self._run_id, self._tracking_uri = active.info.run_id, mlflow.get_tracking_uri()

    def _target(self) -> tuple[MlflowClient, str]:
        """The client and the run."""
        if self._run_id is None:
            self.bind()
        if self._run_id is None:
            raise RuntimeError(
                "no active MLflow run to log to: build the saver inside `with mlflow.start_run():`"
                ", or pass MLflowTracker(run_id=...) (with Lightning's MLFlowLogger: "
                "run_id=logger.run_id, client=logger.experiment)"
            )
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self._tracking_uri)
        return self._client, self._run_id

    @property
    def run_id(self) -> str:
        """The run logged to."""
        return self._target()[1]

    @property
    def client(self) -> MlflowClient:
        """The client logging to the run's tracking server."""
        return self._target()[0]

    # -- the saver's events ------------------------------------------------------------------

    def on_save(self, record: Record, path: str) -> None:
        """A new checkpoint was kept: logged when it is a new best and ``upload="best"``."""
        if record.kind == "best" and self.upload == "best":
            self._log(record, path)

    def on_evict(self, record: Record) -> None:
        """A kept checkpoint was deleted. MLflow cannot delete a run's artifacts: nothing to do."""

    def on_end(self, best: Record | None) -> None:
        """Training ended: the final best is logged (if not yet) and registered if asked."""
        if best is None:
            return
        if best.name not in self._logged:
            self._log(best, best.path)
        if self.register_model_name and best.name not in self._registered:
            self._register(best)

    # -- the work ----------------------------------------------------------------------------

    def _log(self, record: Record, path: str) -> None:
        from mlflow.entities import Metric, RunTag

        client, run_id = self._target()
        where = f"{self.artifact_path}/{record.name}"
        tags = {"best_epoch": str(record.epoch), "best_checkpoint": where}
        if is_local(path) and os.path.isdir(path):  # a folder checkpoint, under its own name
            client.log_artifacts(run_id, path, where)
        elif is_local(path):
            client.log_artifact(run_id, path, self.artifact_path)
        else:  # already in durable remote storage: point to it rather than copy it
            tags["best_checkpoint_uri"] = path
        client.log_text(run_id, record.to_json(), f"{where}.json")
        stamp = _millis(record.time)
        step = record.step if record.step is not None else record.epoch
        metrics = [
            Metric(key, float(value), stamp, int(step))
            for key, value in _metric_values(record).items()
        ]
        client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
        self._logged.add(record.name)

    def _register(self, best: Record) -> None:
        from mlflow.exceptions import MlflowException

        (client, run_id), name = self._target(), self.register_model_name
        assert name is not None
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name)
        source = (
            f"runs:/{run_id}/{self.artifact_path}/{best.name}" if is_local(best.path) else best.path
        )
        client.create_model_version(
            name,
            source,
            run_id=run_id,
            tags={
                "epoch": str(best.epoch),
                "monitor": best.monitor,
                "score": str(best.score),
                "sha256": best.sha256,
            },
            description=f"{best.monitor}={best.score} at epoch {best.epoch}, kept by bestsave",
        )
        self._registered.add(best.name)

    def __repr__(self) -> str:
        return f"MLflowTracker(run_id={self._run_id!r}, upload={self.upload!r})"


def _metric_values(record: Record) -> dict[str, float]:
    """The ``best_*`` values MLflow can hold: finite numbers, under names it accepts."""
    out = {}
    for key, value in best_values(record).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # None (invalid score), strings ("nan")
        if not math.isfinite(value):
            continue
        name = _UNSAFE.sub("_", key)
        if posixpath.normpath(name) == name:  # MLflow refuses names like "a//b" or "a/"
            out[name] = float(value)
    return out


def _millis(iso_time: str) -> int:
    """The evaluation's time in ms since the epoch, as MLflow stamps metrics (now if unknown)."""
    try:
        return int(datetime.fromisoformat(iso_time).timestamp() * 1000)
    except ValueError:
        return int(time.time() * 1000)
