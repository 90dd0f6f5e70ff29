"""MLflow tracker: a real sqlite tracking store in tmp_path, read back with MlflowClient.

A plain PyTorch loop (TorchCheckpointer) reports a scripted validation loss whose best epoch is
not the last, so a tracker that used the last epoch's metrics would be caught.
"""

from __future__ import annotations

import hashlib
import json
import socket
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient

from bestsave import BestSaver, BestSaveWarning, load_best
from bestsave.adapters.torch import TorchCheckpointer
from bestsave.trackers import MLflowTracker, resolve_trackers

VAL_LOSS = [0.9, 0.5, 0.3, 0.45, 0.6]  # best at epoch 2; the last epoch is worse
BEST = 2


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """One sqlite store for the module: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def store(database, tmp_path, monkeypatch):
    """The tracking store, and a new experiment whose artifacts live under tmp_path."""
    uri = database
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment(tmp_path.name, artifact_location=str(tmp_path / "mlruns"))
    yield uri, client, experiment
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def train(ckpt, scores=VAL_LOSS, log=None):
    """A tiny regression; returns each epoch's weights. ``val_loss`` is scripted."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    weights = []
    for epoch, val_loss in enumerate(scores):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        metrics = {
            "val_loss": val_loss,
            "val/acc": round(1 - val_loss, 4),
            "train_loss": loss.item(),
        }
        if log is not None:
            log(metrics, step=4 * (epoch + 1))
        ckpt.step(epoch, metrics, model=model, optimizer=optimizer, step=4 * (epoch + 1))
    ckpt.close()
    return weights


def download(client, run_id, path, tmp_path):
    return Path(client.download_artifacts(run_id, path, str(tmp_path / "download")))


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_active_run_gets_the_best_epochs_file_record_and_metrics(store, tmp_path):
    _, client, experiment = store
    with mlflow.start_run(experiment_id=experiment) as run:
        # trackers="auto" by default; writes run in the background thread, where MLflow's
        # active run is not visible: the tracker bound the run when it was built.
        ckpt = TorchCheckpointer(tmp_path / "ckpt", monitor="val_loss")
        weights = train(ckpt, log=mlflow.log_metrics)
    run_id = run.info.run_id

    best = load_best(tmp_path / "ckpt")
    assert best.epoch == BEST
    data = client.get_run(run_id).data
    assert data.tags["best_epoch"] == str(BEST)
    assert data.tags["best_checkpoint"] == f"checkpoints/{best.name}"
    for name, value in best.metrics.items():
        assert data.metrics[f"best_{name}"] == pytest.approx(value)
    assert data.metrics["best_epoch"] == BEST and data.metrics["best_step"] == 4 * (BEST + 1)
    assert data.metrics["val_loss"] == VAL_LOSS[-1] != data.metrics["best_val_loss"]

    path = download(client, run_id, f"checkpoints/{best.name}", tmp_path)
    assert sha256(path) == best.sha256
    state = torch.load(path, weights_only=True)
    for key, tensor in weights[BEST].items():
        torch.testing.assert_close(state["model"][key], tensor)
    record = json.loads(
        download(client, run_id, f"checkpoints/{best.name}.json", tmp_path).read_text()
    )
    assert record == json.loads(json.dumps(best.to_dict(), default=str))


@pytest.mark.parametrize("how", ["tracking_uri", "client"])
def test_a_run_given_by_id_as_with_lightnings_mlflowlogger(store, tmp_path, how):
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id  # what MLFlowLogger does: no active run
    tracker = (
        MLflowTracker(run_id=run_id, tracking_uri=uri)
        if how == "tracking_uri"
        else MLflowTracker(run_id=run_id, client=client)
    )
    ckpt = TorchCheckpointer(
        tmp_path / "ckpt", monitor="val_loss", trackers=[tracker], async_write=False
    )  # written at each step, so every new best is logged
    train(ckpt)
    assert mlflow.active_run() is None  # the tracker started no run of its own

    best = load_best(tmp_path / "ckpt")
    files = sorted(f.path for f in client.list_artifacts(run_id, "checkpoints"))
    bests = [f"epoch={e:03d}-val_loss={VAL_LOSS[e]:.4f}.pth" for e in (0, 1, 2)]
    assert files == sorted(f"checkpoints/{n}{ext}" for n in bests for ext in ("", ".json"))
    history = client.get_metric_history(run_id, "best_val_loss")
    assert [(m.step, m.value) for m in history] == [(4, 0.9), (8, 0.5), (12, 0.3)]
    assert client.get_run(run_id).data.metrics["best_val/acc"] == best.metrics["val/acc"]


def test_upload_end_and_a_registered_model_version(store, tmp_path):
    uri, client, experiment = store
    tracker = MLflowTracker(upload="end", register_model_name="regressor")  # before the run:
    with mlflow.start_run(experiment_id=experiment) as run:  # bound when the saver is built
        ckpt = TorchCheckpointer(tmp_path / "ckpt", monitor="val_loss", trackers=[tracker])
        train(ckpt)
        ckpt.close()  # closing again registers nothing new
    best = load_best(tmp_path / "ckpt")
    run_id = run.info.run_id
    files = [f.path for f in client.list_artifacts(run_id, "checkpoints")]
    assert sorted(files) == [f"checkpoints/{best.name}", f"checkpoints/{best.name}.json"]

    (version,) = client.search_model_versions("name='regressor'")
    assert version.run_id == run_id and version.source == f"runs:/{run_id}/checkpoints/{best.name}"
    assert version.tags["epoch"] == str(BEST) and version.tags["sha256"] == best.sha256
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=version.source, dst_path=str(tmp_path / "registered"), tracking_uri=uri
    )
    assert sha256(local) == best.sha256


def test_a_checkpoint_in_remote_storage_is_pointed_to_not_copied(store, tmp_path):
    pytest.importorskip("fsspec")
    _, client, experiment = store
    with mlflow.start_run(experiment_id=experiment) as run:
        saver = BestSaver(f"memory://{tmp_path.name}", monitor="val_loss")  # trackers="auto"
        for epoch, loss in enumerate([0.5, 0.2, 0.4]):
            saver.step(
                epoch, {"val_loss": loss}, write=lambda p, e=epoch: Path(p).write_text(f"w{e}")
            )
        saver.close()
    best = saver.best
    data = client.get_run(run.info.run_id).data
    assert data.tags["best_checkpoint_uri"] == best.path == f"memory://{tmp_path.name}/{best.name}"
    files = [f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert f"checkpoints/{best.name}.json" in files and f"checkpoints/{best.name}" not in files


@pytest.mark.parametrize("broken", ["unreachable server", "no run"])
def test_a_failing_tracker_warns_and_training_goes_on(tmp_path, monkeypatch, broken):
    if broken == "unreachable server":
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        with socket.socket() as s:  # a loopback port with nothing listening
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tracker = MLflowTracker(run_id="0" * 32, tracking_uri=f"http://127.0.0.1:{port}")
    else:
        tracker = MLflowTracker()
    ckpt = TorchCheckpointer(tmp_path / "ckpt", monitor="val_loss", trackers=[tracker])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights = train(ckpt)
    failures = [str(w.message) for w in caught if issubclass(w.category, BestSaveWarning)]
    assert failures and all("checkpoint on disk is unaffected" in m for m in failures)
    if broken == "no run":
        assert "inside `with mlflow.start_run():`" in failures[0]
        assert mlflow.active_run() is None  # the tracker starts no run of its own
    best = load_best(tmp_path / "ckpt")
    assert best.epoch == BEST
    state = torch.load(best.path, weights_only=True)
    torch.testing.assert_close(state["model"]["weight"], weights[BEST]["weight"])


def test_auto_uses_the_active_run_and_nothing_otherwise(store):
    *_, experiment = store
    assert resolve_trackers("auto") == []
    with mlflow.start_run(experiment_id=experiment) as run:
        (tracker,) = resolve_trackers("auto")
        assert isinstance(tracker, MLflowTracker) and tracker.run_id == run.info.run_id
    assert resolve_trackers("auto") == []


def test_bad_options_say_how_to_fix_them(store):
    uri, client, _ = store
    with pytest.raises(ValueError, match="not both"):
        MLflowTracker(run_id="x", tracking_uri=uri, client=client)
    with pytest.raises(ValueError, match="need run_id"):
        MLflowTracker(tracking_uri=uri)
    with pytest.raises(ValueError, match="relative folder"):
        MLflowTracker(artifact_path="../elsewhere")
    with pytest.raises(ValueError, match="upload must be one of 'best', 'end'"):
        MLflowTracker(upload="kept")  # type: ignore[arg-type]
