"""Weights & Biases tracker: a real offline run, read back from its ``.wandb`` file.

A plain PyTorch loop (TorchCheckpointer) reports a scripted validation loss whose best epoch is
not the last, so a tracker that used the last epoch's metrics would be caught.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
wandb = pytest.importorskip("wandb")

from wandb_reader import BLOCK, read_run

from bestsave import BestSaver, BestSaveWarning, load_best
from bestsave.adapters.torch import TorchCheckpointer
from bestsave.trackers import WandbTracker, resolve_trackers
from bestsave.trackers.wandb import EVICTED_KEY, prune_evicted

VAL_LOSS = [0.9, 0.5, 0.3, 0.45, 0.6]  # best at epoch 2; the last epoch is worse
BEST = 2


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
            "val_acc": round(1 - val_loss, 4),
            "train_loss": loss.item(),
        }
        if log is not None:
            log(metrics)
        ckpt.step(epoch, metrics, model=model, optimizer=optimizer, step=4 * (epoch + 1))
    ckpt.close()
    return weights


def as_json(record):
    return json.loads(json.dumps(record.to_dict(), default=str))


def md5_b64(path):
    return base64.b64encode(hashlib.md5(Path(path).read_bytes()).digest()).decode()


def test_new_bests_are_model_artifacts_with_their_epochs_metrics(wandb_dir, tmp_path):
    run = wandb.init(project="bestsave-test")
    ckpt = TorchCheckpointer(
        tmp_path / "ckpt",
        monitor="val_loss",
        trackers=["wandb"],
        hparams={"lr": 0.1, "notes": "x" * 70_000},  # a record larger than two 32 KiB blocks
        async_write=False,  # every new best is written (in the background, a newer one may
    )  # replace it before it is, and only written files are logged)
    weights = train(ckpt, log=run.log)
    run.finish()

    best = load_best(tmp_path / "ckpt")
    assert best.epoch == BEST
    logged = read_run(wandb_dir, run.id)
    versions = logged.artifacts(type="model")
    assert [v.metadata["epoch"] for v in versions] == [0, 1, 2]  # one version per new best
    version = versions[-1]
    assert version.name == f"model-{run.id}"
    assert sorted(version.aliases) == ["best", "epoch-2", "latest"]
    # Each new best was logged with the alias; W&B moves it to the latest one that claims it.
    assert all("best" in v.aliases and f"epoch-{i}" in v.aliases for i, v in enumerate(versions))
    assert version.metadata == as_json(best)  # the record, multi-block metadata intact
    assert version.metadata["run"]["hparams"]["notes"] == "x" * 70_000
    assert os.path.getsize(logged.path) > 2 * BLOCK

    # The file W&B will upload is the best checkpoint, and holds the best epoch's weights.
    (entry,) = version.files.values()
    assert entry.path == best.name and entry.size == best.bytes
    assert entry.digest == md5_b64(best.path)
    state = torch.load(best.path, weights_only=True)
    for key, tensor in weights[BEST].items():
        torch.testing.assert_close(state["model"][key], tensor)

    summary = logged.summary
    for name, value in best.metrics.items():
        assert summary[f"best_{name}"] == value
    assert summary["best_epoch"] == BEST and summary["best_step"] == 4 * (BEST + 1)
    assert summary["val_loss"] == VAL_LOSS[-1] != summary["best_val_loss"]  # last epoch's


def test_upload_end_logs_only_the_final_best_from_the_writer_thread(wandb_dir, tmp_path):
    tracker = WandbTracker(upload="end", aliases=["best", "candidate"])  # built before the run:
    run = wandb.init(project="bestsave-test")  # it binds the run when the saver is built
    ckpt = TorchCheckpointer(tmp_path / "ckpt", monitor="val_loss", trackers=[tracker])
    train(ckpt)  # background writes: trackers hear of new files from the writer thread
    assert tracker.run is run
    run.finish()

    best = load_best(tmp_path / "ckpt")
    logged = read_run(wandb_dir, run.id)
    (version,) = logged.artifacts(type="model")
    assert sorted(version.aliases) == ["best", "candidate", "epoch-2", "latest"]
    assert version.metadata == as_json(best)
    assert logged.summary["best_val_loss"] == VAL_LOSS[BEST]
    assert logged.summary["best_epoch"] == BEST


def test_a_checkpoint_in_remote_storage_is_referenced_not_uploaded(wandb_dir, tmp_path):
    pytest.importorskip("fsspec")
    run = wandb.init(project="bestsave-test")
    saver = BestSaver(f"memory://{tmp_path.name}", monitor="val_loss", trackers=[WandbTracker()])
    for epoch, loss in enumerate([0.5, 0.2, 0.4]):
        saver.step(epoch, {"val_loss": loss}, write=lambda p, e=epoch: Path(p).write_text(f"w{e}"))
    saver.close()
    run.finish()
    version = read_run(wandb_dir, run.id).artifacts(type="model")[-1]
    (entry,) = version.files.values()
    assert entry.ref == saver.best.path == f"memory://{tmp_path.name}/{saver.best.name}"
    assert version.metadata["sha256"] == saver.best.sha256


PRUNE_LOSS = [0.9, 0.5, 0.7, 0.3, 0.4, 0.2]
"""top_k=2 evicts epochs 0, 2, 1 and 4; keep_every_n_epochs=2 also keeps epochs 1, 3, 5, so
epoch 1's bytes stay on disk after its top-k file goes."""


def prune_run(tmp_path, tracker):
    ckpt = TorchCheckpointer(
        tmp_path / "ckpt",
        monitor="val_loss",
        top_k=2,
        keep_every_n_epochs=2,
        trackers=[tracker],
        async_write=False,  # every kept file is written, so the evictions are known in advance
    )
    train(ckpt, scores=PRUNE_LOSS)
    on_disk = {p.name for p in (tmp_path / "ckpt").glob("*.pth")}
    assert on_disk == {r.name for r in ckpt.kept}
    return ckpt


def test_prune_offline_lists_what_it_would_delete(wandb_dir, tmp_path):
    run = wandb.init(project="bestsave-test")
    ckpt = prune_run(tmp_path, WandbTracker(upload="kept", prune=True))
    run.finish()

    logged = read_run(wandb_dir, run.id)
    versions = logged.artifacts(type="model")
    assert [v.metadata["epoch"] for v in versions] == [0, 1, 2, 3, 4, 5]  # periodic: same bytes
    assert sorted(versions[2].aliases) == ["epoch-2", "latest"]  # a top-k file is not "best"
    assert [v.metadata["epoch"] for v in versions if "best" in v.aliases] == [0, 1, 3, 5]
    evicted = logged.summary[EVICTED_KEY]
    assert [e["epoch"] for e in evicted] == [0, 2, 4]  # epoch 1's bytes are still kept
    remaining = {v.metadata["sha256"] for v in versions} - {e["sha256"] for e in evicted}
    assert remaining == {r.sha256 for r in ckpt.kept}  # after pruning, the run mirrors the disk

    # After `wandb sync`, prune_evicted deletes exactly those versions. (A stand-in for the
    # public API, holding what the run logged.)
    api = FakeApi(logged.summary, versions)
    deleted = prune_evicted(f"team/bestsave-test/{run.id}", api=api)
    assert deleted == [f"model-{run.id}:v0", f"model-{run.id}:v2", f"model-{run.id}:v4"]
    assert prune_evicted(f"team/bestsave-test/{run.id}", api=api) == []  # safe to repeat


def test_prune_online_deletes_the_evicted_versions(wandb_dir, tmp_path):
    # No W&B server here: a stand-in run that is online and records what is deleted.
    run = FakeRun()
    ckpt = prune_run(tmp_path, WandbTracker(run=run, upload="kept", prune=True))
    deleted = [v for v in run.versions if v.deleted]
    assert [v.artifact.metadata["epoch"] for v in deleted] == [0, 2, 4]
    assert all(v.waited for v in deleted)  # deleted once the upload finished
    kept = {v.artifact.metadata["sha256"] for v in run.versions if not v.deleted}
    assert kept == {r.sha256 for r in ckpt.kept}
    assert [e["epoch"] for e in run.summary[EVICTED_KEY]] == [0, 2, 4]


def test_auto_uses_the_active_run_and_nothing_otherwise(wandb_dir, tmp_path):
    assert resolve_trackers("auto") == []  # wandb imported, no run
    run = wandb.init(project="bestsave-test")
    saver = BestSaver(tmp_path / "ckpt", monitor="val_loss")  # trackers="auto" by default
    (tracker,) = saver.trackers
    assert isinstance(tracker, WandbTracker) and tracker.run is run
    for epoch, loss in enumerate([0.5, 0.2, 0.4]):
        saver.step(epoch, {"val_loss": loss}, write=lambda p: Path(p).write_text("w"))
    saver.close()
    run.finish()
    logged = read_run(wandb_dir, run.id)
    assert logged.summary["best_val_loss"] == 0.2
    assert resolve_trackers("auto") == []


def test_import_bestsave_imports_no_tracker_library(tmp_path):
    code = (
        "import sys, bestsave, bestsave.trackers, bestsave.trackers.wandb\n"
        "s = bestsave.BestSaver(sys.argv[1], monitor='val_loss')\n"
        "s.step(0, {'val_loss': 1.0}, write=lambda p: open(p, 'w').write('w'))\n"
        "s.close()\n"
        "assert s.trackers == [], s.trackers\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'mlflow')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ckpt")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class Raising:
    def on_save(self, record, path):
        raise ConnectionError("network down")

    on_evict = on_end = on_save


@pytest.mark.parametrize("broken", ["finished run", "no run", "raising tracker"])
def test_a_failing_tracker_warns_and_training_goes_on(wandb_dir, tmp_path, broken):
    if broken == "finished run":
        run = wandb.init(project="bestsave-test")
        run.finish()  # logging to it now raises
        tracker = WandbTracker(run=run)
    elif broken == "no run":
        tracker = WandbTracker()
    else:
        tracker = Raising()
    ckpt = TorchCheckpointer(tmp_path / "ckpt", monitor="val_loss", trackers=[tracker])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights = train(ckpt)
    failures = [str(w.message) for w in caught if issubclass(w.category, BestSaveWarning)]
    assert failures and all("checkpoint on disk is unaffected" in m for m in failures)
    if broken == "no run":
        assert "call wandb.init() before training" in failures[0]
        assert wandb.run is None  # the tracker starts no run of its own
    best = load_best(tmp_path / "ckpt")
    assert best.epoch == BEST
    state = torch.load(best.path, weights_only=True)
    torch.testing.assert_close(state["model"]["weight"], weights[BEST]["weight"])


def test_bad_options_say_how_to_fix_them():
    with pytest.raises(ValueError, match="upload must be one of"):
        WandbTracker(upload="sometimes")
    with pytest.raises(ValueError, match="artifact_name"):
        WandbTracker(artifact_name="team/model")
    with pytest.raises(ValueError, match="list of names"):
        WandbTracker(aliases="best")
    with pytest.raises(ValueError, match="unknown tracker 'tensorboard'"):
        resolve_trackers(["tensorboard"])
    with pytest.raises(TypeError, match="lacks on_evict, on_end"):
        resolve_trackers([type("OnlySave", (), {"on_save": lambda self, r, p: None})()])


# -- stand-ins for what only a W&B server can do ----------------------------------------------


class FakeVersion:
    """A logged version: wait() and delete() as on wandb.Artifact."""

    def __init__(self, artifact, qualified_name=""):
        self.artifact, self.qualified_name = artifact, qualified_name
        self.type, self.metadata = artifact.type, artifact.metadata
        self.waited = self.deleted = False

    def wait(self):
        self.waited = True
        return self

    def delete(self, delete_aliases=False):
        assert delete_aliases, "a version with aliases needs delete_aliases=True"
        self.deleted = True


class FakeRun:
    """An online run: logs versions into a list."""

    id, entity, project, offline = "fake", "team", "bestsave-test", False

    def __init__(self):
        self.summary, self.versions = {}, []

    def log_artifact(self, artifact, aliases=None):
        self.versions.append(FakeVersion(artifact))
        return self.versions[-1]


class FakeApi:
    """``wandb.Api`` for one synced run, built from what the offline run logged."""

    def __init__(self, summary, versions):
        self.summary = summary
        self.versions = [
            FakeVersion(v, f"team/bestsave-test/{v.name}:v{i}") for i, v in enumerate(versions)
        ]

    def run(self, path):
        return self

    def logged_artifacts(self):
        return [v for v in self.versions if not v.deleted]
