"""SaveBestModelCallback beside fastai's WandbCallback(log_model=True), W&B in offline mode.

The run is read back from its ``.wandb`` file (a LevelDB-log stream of protobuf records).
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import random
import struct
import time
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
from wandb.proto import wandb_internal_pb2

from bestsave.adapters.fastai import SaveBestModelCallback

BLOCK, HEADER = 32768, 7


def read_wandb(path: Path) -> list:
    """Every record of a ``.wandb`` file: a 7-byte file header, then 32 KiB blocks of records
    each with a 7-byte header (crc32c u32, length u16, type u8: 1 full, 2 first, 3 middle,
    4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, parts, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:
            pos += left
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            records.append(payload)
        elif kind == 2:
            parts = payload
        elif kind == 3:
            parts += payload
        elif kind == 4:
            records.append(parts + payload)
    return [wandb_internal_pb2.Record.FromString(r) for r in records]


def read_finished(path: Path, timeout: float = 60.0) -> list:
    """The records of a run's ``.wandb`` file once it holds the run's exit record (the W&B
    service may still be writing it when ``wandb.finish()`` returns)."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} holds no exit record after {timeout} s")
        time.sleep(0.2)


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
    save = SaveBestModelCallback(monitor="score")
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
    assert learn.wandb.log_model is True  # given back after the fit

    best = save.best_record
    assert best.epoch == 1
    (stream,) = (tmp_path / "wandb").glob(f"offline-run-*-{run.id}/run-{run.id}.wandb")
    records = read_finished(stream)
    models = [r.artifact for r in records if r.artifact.type == "model"]
    assert len(models) == 1  # one saver, one upload

    (artifact,) = models
    metadata = json.loads(artifact.metadata)
    assert metadata["epoch"] == best.epoch and metadata["metrics"] == best.metrics
    assert metadata["metrics"]["score"] == 0.9  # not the last epoch's 0.4, and not a string
    assert artifact.name == "model" and "best" in artifact.aliases
    (entry,) = artifact.manifest.contents
    md5 = base64.b64encode(hashlib.md5(Path(best.path).read_bytes()).digest()).decode()
    assert entry.path == "model.pth" and entry.digest == md5
