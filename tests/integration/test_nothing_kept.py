"""A run that ends with no checkpoint kept for its score says so at the end, with the reason, in
every adapter; the warning names the line of the user's script that trained."""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path

import pytest

from bestsave import BestSaveWarning

NAN = [math.nan, math.nan, math.nan]


def told(caught: list[warnings.WarningMessage], monitor: str) -> warnings.WarningMessage:
    """The end-of-run warning, checked to name the reason and this file."""
    [warning] = [
        w
        for w in caught
        if issubclass(w.category, BestSaveWarning) and "training ended" in str(w.message)
    ]
    message = str(warning.message)
    assert f"no checkpoint kept for {monitor}" in message
    assert f"{monitor} was never a valid number (nan 3 times)" in message
    assert os.path.samefile(warning.filename, __file__), warning.filename
    return warning


def test_plain_pytorch(tmp_path):
    torch = pytest.importorskip("torch")
    from bestsave.adapters.torch import TorchCheckpointer

    model = torch.nn.Linear(2, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with TorchCheckpointer(tmp_path, monitor="val_loss") as ckpt:
            for epoch, loss in enumerate(NAN):
                ckpt.step(epoch, {"val_loss": loss}, model=model)
    told(caught, "val_loss")


def test_lightning(tmp_path):
    pytest.importorskip("lightning")
    from bestsave.adapters.lightning import BestCheckpoint

    sys.path.insert(0, str(Path(__file__).parent / "data" / "lightning"))
    from lightning_scripted import ScriptedModel, trainer_for

    trainer = trainer_for(tmp_path, BestCheckpoint(monitor="val_score", mode="max"), max_epochs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ScriptedModel(script=NAN))
    told(caught, "val_score")


def test_fastai(tmp_path):
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    pytest.importorskip("fastai")
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai_scripted import Scripted

    from bestsave.adapters.fastai import SaveBestModelCallback

    x = torch.randn(32, 3)
    data = list(zip(x, x.sum(1, keepdim=True)))
    dls = DataLoaders.from_dsets(data[:24], data[24:], bs=8, device="cpu")
    learn = Learner(dls, torch.nn.Linear(3, 1), loss_func=torch.nn.MSELoss(), path=tmp_path,
                    metrics=[Scripted(NAN, "score")])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with learn.no_bar(), learn.no_logging():
            learn.fit(3, cbs=[SaveBestModelCallback(monitor="score", comp=np.greater)])
    told(caught, "score")


def test_keras(tmp_path):
    keras = pytest.importorskip("keras")
    np = pytest.importorskip("numpy")
    from bestsave.adapters.keras import BestModelCheckpoint

    class NaNs(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_auc"] = math.nan

    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    checkpoint = BestModelCheckpoint(
        str(tmp_path / "{epoch}.keras"), monitor="val_auc", save_best_only=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, x[:, :1], epochs=3, verbose=0, callbacks=[NaNs(), checkpoint])
    told(caught, "val_auc")
