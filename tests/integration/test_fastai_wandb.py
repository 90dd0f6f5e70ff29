"""SaveBestModelCallback beside fastai's WandbCallback(log_model=True), W&B in offline mode.

The run is read back from its ``.wandb`` file (a LevelDB-log stream of protobuf records), once
W&B's service process, which writes it, has exited.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastai")
wandb = pytest.importorskip("wandb")
fastai_wandb = pytest.importorskip("fastai.callback.wandb")

from fastai.callback.tracker import SaveModelCallback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai_scripted import Scripted  # tests/ is on pytest's pythonpath
from torch import nn
from wandb_reader import read_run

from bestsave.adapters.fastai import SaveBestModelCallback


def _init_args(o):
    """fastcore's init_args as in 2.2.21, for objects without a ``__dict__`` too."""
    attrs = getattr(o, "__dict__", None)
    if attrs is None:
        return {}
    return {p: attrs[p] for p in inspect.signature(type(o).__init__).parameters if p in attrs}


@pytest.fixture
def wandb_callback(monkeypatch):
    """fastai's WandbCallback, made able to start.

    fastai 2.8.10-2.8.12 format the config with fastcore's ``init_args``, which fails on any
    value without a ``__dict__`` (ints, strings, tuples): fastai issue #4173. No fastcore
    release avoids it (2.2.21 lacks ``import inspect``; 2.2.22 and later call ``vars()``);
    fastai 2.8.8 predates it. Only the config logging is patched here; the artifact upload
    under test is fastai's and bestsave's own code.
    """
    try:
        fastai_wandb._format_config({"flag": True})
    except (TypeError, NameError):
        monkeypatch.setattr(fastai_wandb, "init_args", _init_args)
    return fastai_wandb.WandbCallback


def learner(path: Path, cbs: list) -> Learner:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    x = torch.randn(32, 3)
    data = list(zip(x, x.sum(1, keepdim=True)))
    dls = DataLoaders.from_dsets(data[:24], data[24:], bs=8, device="cpu")
    scores = Scripted([0.2, 0.9, 0.5, 0.4])  # the best (epoch 1) is not the last epoch
    return Learner(
        dls, nn.Linear(3, 1), loss_func=nn.MSELoss(), metrics=[scores], cbs=cbs, path=path
    )


def test_wandb_callback_uploads_the_best_with_its_epochs_record(
    tmp_path, monkeypatch, wandb_callback
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    save = SaveBestModelCallback(monitor="score", comp=np.greater)
    learn = learner(tmp_path, [wandb_callback(log_preds=False, log_model=True), save])

    # WandbCallback found ours under the name it looks for and added no saver of its own.
    assert learn.save_model is save
    assert not [cb for cb in learn.cbs if isinstance(cb, SaveModelCallback)]

    run = wandb.init(project="bestsave-fastai", dir=str(tmp_path), mode="offline")
    try:
        with learn.no_bar(), learn.no_logging():
            learn.fit(4, lr=0.05)
    finally:
        wandb.finish()
        # finish() can return while W&B's service process still writes the run's file (read
        # then, its last record is cut short); teardown waits for that process to exit.
        wandb.teardown()
    assert learn.wandb.log_model is True  # given back after the fit
    assert learn.save_model is save  # passed to Learner(cbs=...): still there after fit

    best = save.best_record
    assert best.epoch == 1 and best.path == str(tmp_path / "models" / "model.pth")
    models = read_run(tmp_path / "wandb", run.id).artifacts(type="model")
    assert len(models) == 1  # one saver, one upload

    (artifact,) = models
    assert artifact.metadata["epoch"] == best.epoch
    assert artifact.metadata["metrics"] == best.metrics
    assert artifact.metadata["metrics"]["score"] == 0.9  # not the last epoch's 0.4, nor a string
    assert artifact.name == "model" and "best" in artifact.aliases
    md5 = base64.b64encode(hashlib.md5(Path(best.path).read_bytes()).digest()).decode()
    assert list(artifact.files) == ["model.pth"] and artifact.files["model.pth"].digest == md5
