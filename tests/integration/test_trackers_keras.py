"""Keras with a W&B run already active: the model artifact and summary are the best epoch's."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
wandb = pytest.importorskip("wandb")

from wandb_reader import read_run

from bestsave import load_best
from bestsave.adapters.keras import BestModelCheckpoint

# Keras's torch backend converts tensors with np.array(x, copy=False), which numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

VAL_AUC = [0.2, 0.7, 0.5, 0.6]  # best at epoch 1; the last epoch is worse


class Script(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        logs["val_auc"] = VAL_AUC[epoch]


def test_an_active_run_gets_the_best_epochs_model_and_metrics(tmp_path, wandb_dir):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 4)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, "sigmoid")])
    model.compile(keras.optimizers.Adam(0.05), "binary_crossentropy", metrics=["accuracy"])

    run = wandb.init(project="bestsave-keras")  # the run a Keras user already has open
    checkpoint = BestModelCheckpoint(
        tmp_path / "ckpt" / "{epoch:02d}.weights.h5", monitor="val_auc", save_best_only=True
    )
    model.fit(
        x[:32],
        y[:32],
        validation_data=(x[32:], y[32:]),
        epochs=len(VAL_AUC),
        batch_size=8,
        verbose=0,
        callbacks=[Script(), checkpoint],
    )
    run.finish()

    best = load_best(tmp_path / "ckpt")
    assert best.epoch == 1
    logged = read_run(wandb_dir, run_id=run.id)
    versions = logged.artifacts(type="model")
    final = next(a for a in reversed(versions) if "best" in a.aliases)
    assert final.metadata["epoch"] == 1 and "epoch-1" in final.aliases
    assert final.metadata["metrics"]["val_auc"] == pytest.approx(0.7)
    assert logged.summary["best_val_auc"] == pytest.approx(0.7)
    assert logged.summary["best_epoch"] == 1
    for key in ("val_loss", "val_accuracy", "loss"):
        assert logged.summary[f"best_{key}"] == pytest.approx(best.metrics[key])
