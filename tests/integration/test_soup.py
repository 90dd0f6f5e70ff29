"""Model soups of runs made by real trainings: plain PyTorch, Lightning, fastai and Keras.

A soup must equal the average of the members' weights as they were at their epochs (captured
during training), keep integer tensors and everything else from the best, load the way the run's
checkpoints load, and refuse checkpoints that are not the same model.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from bestsave import BestSaver, ChecksumError, load_manifest
from bestsave.adapters.torch import TorchCheckpointer
from bestsave.cli import main
from bestsave.soup import average, members, soup

# Scripted validation scores per epoch; the training itself is real.
SCORES = [0.50, 0.70, 0.60, 0.80, 0.75, 0.65]  # top-2 keeps epochs 3 (best) and 4


def tiny_model(hidden: int = 8, extra: bool = False) -> torch.nn.Module:
    layers = [
        torch.nn.Linear(4, hidden),
        torch.nn.BatchNorm1d(hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 2),
    ]
    if extra:
        layers.append(torch.nn.Linear(2, 2))
    return torch.nn.Sequential(*layers)


def train_torch(
    dirpath: Path, scores: list[float], models: list[torch.nn.Module] | None = None, **options: Any
) -> dict[int, dict[str, torch.Tensor]]:
    """A short real training with TorchCheckpointer; returns each epoch's state dict.

    ``models`` gives the model trained at each epoch (one tiny model throughout by default).
    """
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    models = models or [tiny_model()] * len(scores)
    ckpt = TorchCheckpointer(dirpath, monitor="val_acc", **options)
    states = {}
    for epoch, (score, model) in enumerate(zip(scores, models)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        ckpt.step(
            epoch, {"val_acc": score, "train_loss": loss.detach()}, model=model, optimizer=optimizer
        )
        states[epoch] = copy.deepcopy(model.state_dict())
    ckpt.close()
    return states


def mean(states: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return sum(s[key].double() for s in states).div(len(states)).to(states[0][key].dtype)


def assert_soup_of(
    soup_state: dict[str, torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    best: dict[str, torch.Tensor],
) -> None:
    assert soup_state.keys() == best.keys()
    for key, value in soup_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, mean(states, key))
        else:  # num_batches_tracked: the best's, not an average
            assert torch.equal(value, best[key])


@pytest.fixture
def torch_run(tmp_path: Path) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    run = tmp_path / "run"
    return run, train_torch(run, SCORES, top_k=2)


# -- plain PyTorch ----------------------------------------------------------------------------


def test_soup_of_two_checkpoints_is_their_average(torch_run, tmp_path) -> None:
    run, states = torch_run
    out = tmp_path / "soup.pth"
    chosen = soup(run, out)
    assert [(r.epoch, r.kind) for r in chosen] == [(3, "best"), (4, "top_k")]
    result = torch.load(out, weights_only=True)
    assert_soup_of(result["model"], [states[3], states[4]], states[3])
    # Everything besides the weights is the best checkpoint's; it loads like any checkpoint.
    best = torch.load(load_manifest(run).best.path, weights_only=True)  # type: ignore[union-attr]
    assert result.keys() == best.keys() and result["epoch"] == 3
    assert result["optimizer"]["state"][0]["momentum_buffer"].equal(
        best["optimizer"]["state"][0]["momentum_buffer"]
    )
    model = tiny_model()
    model.load_state_dict(result["model"])


def test_top_n_averages_the_n_best_and_top_1_is_the_best(torch_run, tmp_path) -> None:
    run, states = torch_run
    assert [r.epoch for r in soup(run, tmp_path / "one.pth", top=1)] == [3]
    assert_soup_of(
        torch.load(tmp_path / "one.pth", weights_only=True)["model"], [states[3]], states[3]
    )
    with pytest.raises(ValueError, match="top must be an int >= 1"):
        members(run, top=0)


def test_soup_of_a_delta_ensemble(tmp_path) -> None:
    states = train_torch(tmp_path / "run", SCORES, delta=0.08)  # within 0.08 of 0.8: 3, 4
    assert [r.kind for r in members(tmp_path / "run")] == ["best", "ensemble"]
    soup(tmp_path / "run", tmp_path / "soup.pth")
    assert_soup_of(
        torch.load(tmp_path / "soup.pth", weights_only=True)["model"],
        [states[3], states[4]],
        states[3],
    )


def test_checkpoints_with_other_shapes_or_keys_are_refused(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    narrow, wide, deeper = tiny_model(8), tiny_model(16), tiny_model(8, extra=True)
    train_torch(tmp_path / "shapes", [0.5, 0.6, 0.7], [narrow, narrow, wide], top_k=-1)
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(16, 4\) in one and \(8, 4\)"):
        soup(tmp_path / "shapes", tmp_path / "soup.pth")
    assert not (tmp_path / "soup.pth").exists()
    # The CLI says so in one line; --top leaves the odd one out.
    assert main(["soup", str(tmp_path / "shapes"), "-o", str(tmp_path / "soup.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bestsave: error: cannot average") and err.count("\n") == 1
    assert (
        main(["soup", str(tmp_path / "shapes"), "-o", str(tmp_path / "soup.pth"), "--top", "1"])
        == 0
    )

    train_torch(tmp_path / "keys", [0.5, 0.6], [narrow, deeper], top_k=-1)
    with pytest.raises(ValueError, match=r"only epoch=001\S* has '4.bias', '4.weight'"):
        soup(tmp_path / "keys", tmp_path / "soup2.pth")


def test_nothing_to_average_and_unsafe_outputs_are_refused(torch_run, tmp_path) -> None:
    run, _ = torch_run
    with pytest.raises(ValueError, match="is one of the checkpoints being averaged"):
        soup(run, load_manifest(run).best.path)  # type: ignore[union-attr]
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        soup(run, tmp_path / "no" / "such" / "soup.pth")
    train_torch(tmp_path / "none", SCORES, top_k=0)
    with pytest.raises(ValueError, match=r"keeps no checkpoint for its score.*top_k > 1"):
        soup(tmp_path / "none", tmp_path / "soup.pth")


def test_a_modified_checkpoint_is_never_loaded(torch_run, tmp_path) -> None:
    run, _ = torch_run
    kept = load_manifest(run).kept[1]
    Path(kept.path).write_bytes(Path(kept.path).read_bytes()[:-10])
    with pytest.raises(ChecksumError, match=kept.name):
        soup(run, tmp_path / "soup.pth")


def test_files_of_different_formats_are_not_averaged(torch_run, tmp_path) -> None:
    run, _ = torch_run
    h5 = tmp_path / "x.weights.h5"
    with h5py.File(h5, "w") as f:
        f["layers/dense/vars/0"] = np.zeros((2, 2), "float32")
    with pytest.raises(ValueError, match="different formats"):
        average([load_manifest(run).best.path, h5], tmp_path / "soup.pth")  # type: ignore


# -- Lightning --------------------------------------------------------------------------------


def test_soup_of_a_lightning_run_loads_with_load_from_checkpoint(tmp_path) -> None:
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self, hidden: int = 8) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = tiny_model(hidden)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch: Any, _: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class KeepBest(L.Callback):
        """Drives the core the way an adapter does: one step per validation."""

        def __init__(self) -> None:
            self.saver = BestSaver(
                tmp_path / "run",
                monitor="val_f1",
                top_k=2,
                extension=".ckpt",
                framework="lightning",
                trackers=(),
            )
            self.states: dict[int, dict[str, torch.Tensor]] = {}

        def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            if trainer.sanity_checking:
                return
            epoch = trainer.current_epoch
            metrics = {**trainer.callback_metrics, "val_f1": SCORES[epoch]}
            self.saver.step(epoch, metrics, write=trainer.save_checkpoint, step=trainer.global_step)
            self.states[epoch] = copy.deepcopy(module.net.state_dict())

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    keep = KeepBest()
    trainer = L.Trainer(
        max_epochs=len(SCORES),
        callbacks=[keep],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Classifier(), loader, loader)
    keep.saver.close()

    out = tmp_path / "soup.ckpt"
    assert main(["soup", str(tmp_path / "run"), "-o", str(out)]) == 0
    result = torch.load(out, weights_only=True)
    assert result["epoch"] == 3 and result["hyper_parameters"] == {"hidden": 8}
    net = {k.removeprefix("net."): v for k, v in result["state_dict"].items()}
    assert_soup_of(net, [keep.states[3], keep.states[4]], keep.states[3])
    loaded = Classifier.load_from_checkpoint(out, weights_only=True)
    torch.testing.assert_close(
        loaded.net[0].weight, mean([keep.states[3], keep.states[4]], "0.weight")
    )


# -- fastai -----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_opt", [False, True], ids=["state-dict", "with-opt"])
def test_soup_of_a_fastai_run_loads_with_load_model(tmp_path, with_opt: bool) -> None:
    import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
    from fastai.callback.core import Callback
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner, load_model, save_model

    saver = BestSaver(
        tmp_path / "run", monitor="mcc", top_k=2, extension=".pth", framework="fastai", trackers=()
    )
    states: dict[int, dict[str, torch.Tensor]] = {}

    class KeepBest(Callback):
        order = 60  # after the Recorder has the epoch's metrics

        def after_epoch(self) -> None:
            names = self.recorder.metric_names[1:-1]
            metrics = {**dict(zip(names, self.recorder.log[1:-1])), "mcc": SCORES[self.epoch]}
            saver.step(
                self.epoch,
                metrics,
                write=lambda p: save_model(p, self.learn.model, self.learn.opt, with_opt=with_opt),
            )
            states[self.epoch] = copy.deepcopy(self.learn.model.state_dict())

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    dls = DataLoaders.from_dsets(data, data, bs=8, device="cpu")
    learn = Learner(
        dls, tiny_model(), loss_func=torch.nn.functional.cross_entropy, cbs=[KeepBest()]
    )
    with learn.no_bar(), learn.no_logging():
        learn.fit(len(SCORES), 0.1)

    out = tmp_path / "soup.pth"
    soup(tmp_path / "run", out)
    model = tiny_model()
    load_model(out, model, learn.opt, with_opt=with_opt)  # what Learner.load calls
    assert_soup_of(model.state_dict(), [states[3], states[4]], states[3])


# -- Keras ------------------------------------------------------------------------------------

KERAS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import keras
    from bestsave import BestSaver

    phase, root = sys.argv[1], sys.argv[2]
    scores = json.loads(sys.argv[3])

    def build():
        return keras.Sequential([
            keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.1, seed=1), keras.layers.Dense(1, activation="sigmoid"),
        ])

    if phase == "train":
        keras.utils.set_random_seed(0)
        model = build()
        model.compile("adam", "binary_crossentropy")
        savers = {
            ".weights.h5": BestSaver(f"{root}/weights", "val_auc", top_k=2,
                                     extension=".weights.h5", trackers=()),
            ".keras": BestSaver(f"{root}/model", "val_auc", top_k=2, extension=".keras",
                                trackers=()),
        }

        class KeepBest(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                metrics = {**logs, "val_auc": scores[epoch]}
                savers[".weights.h5"].step(epoch, metrics, write=self.model.save_weights)
                savers[".keras"].step(epoch, metrics, write=self.model.save)
                np.savez(f"{root}/epoch{epoch}.npz", *self.model.get_weights())

        x = np.random.rand(32, 4).astype("float32")
        y = (x.sum(axis=1) > 2).astype("float32")
        model.fit(x, y, epochs=len(scores), batch_size=8, validation_data=(x, y), verbose=0,
                  callbacks=[KeepBest()])
    else:  # load both soups the way Keras loads the run's files
        model = build()
        model.load_weights(f"{root}/soup.weights.h5")
        np.savez(f"{root}/loaded-weights.npz", *model.get_weights())
        model = keras.models.load_model(f"{root}/soup.keras")
        np.savez(f"{root}/loaded-model.npz", *model.get_weights())
""")


def keras(phase: str, root: Path) -> None:
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    subprocess.run(
        [sys.executable, "-c", KERAS_SCRIPT, phase, str(root), json.dumps(SCORES)],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )


def test_soup_of_a_keras_run_loads_with_load_weights_and_load_model(tmp_path) -> None:
    keras("train", tmp_path)
    for run in ("weights", "model"):
        assert [r.epoch for r in members(tmp_path / run)] == [3, 4]
    assert main(["soup", str(tmp_path / "weights"), "-o", str(tmp_path / "soup.weights.h5")]) == 0
    assert main(["soup", str(tmp_path / "model"), "-o", str(tmp_path / "soup.keras")]) == 0
    keras("load", tmp_path)

    def arrays(name: str) -> list[np.ndarray]:
        with np.load(tmp_path / name) as f:
            return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]

    best, other = arrays("epoch3.npz"), arrays("epoch4.npz")
    for loaded in (arrays("loaded-weights.npz"), arrays("loaded-model.npz")):
        assert len(loaded) == len(best)
        for got, a, b in zip(loaded, best, other):
            if np.issubdtype(a.dtype, np.floating):
                np.testing.assert_allclose(
                    got, ((a.astype("float64") + b) / 2).astype(a.dtype), rtol=1e-6
                )
            else:  # the dropout's seed state: the best's
                np.testing.assert_array_equal(got, a)
    # The optimizer's state is the best's, not an average.
    with (
        h5py.File(tmp_path / "soup.weights.h5") as soup_file,
        h5py.File(
            load_manifest(tmp_path / "weights").best.path  # type: ignore[union-attr]
        ) as best_file,
    ):
        for key in best_file["optimizer/vars"]:
            np.testing.assert_array_equal(
                soup_file["optimizer/vars"][key][()], best_file["optimizer/vars"][key][()]
            )


def keras_layout(path: str, hidden: int) -> None:
    """A Keras ``.weights.h5`` written with h5py, as Keras lays it out."""
    with h5py.File(path, "w") as f:
        f.create_group("vars").attrs["name"] = "sequential"
        f.create_group("layers/dense/vars").attrs["name"] = "dense"
        f["layers/dense/vars/0"] = np.full((4, hidden), float(hidden), "float32")
        f["layers/dense/vars/1"] = np.zeros((hidden,), "float32")
        f["optimizer/vars/0"] = np.array(hidden, "int64")


def test_keras_weights_of_other_shapes_are_refused_and_names_checked(tmp_path, capsys) -> None:
    saver = BestSaver(
        tmp_path / "run", monitor="val_auc", top_k=-1, extension=".weights.h5", trackers=()
    )
    for epoch, hidden in enumerate([4, 4, 6]):
        saver.step(
            epoch, {"val_auc": [0.5, 0.6, 0.7][epoch]}, write=lambda p, h=hidden: keras_layout(p, h)
        )
    with pytest.raises(ValueError, match=r"'layers/dense/vars/0' has shape \(4, 6\)"):
        soup(tmp_path / "run", tmp_path / "soup.weights.h5")
    assert (
        main(["soup", str(tmp_path / "run"), "-o", str(tmp_path / "soup.pth"), "--top", "1"]) == 2
    )
    assert "name the soup e.g. " in capsys.readouterr().err
    # Files of one shape average fine, the layout kept.
    saver2 = BestSaver(
        tmp_path / "run2", monitor="val_auc", top_k=2, extension=".weights.h5", trackers=()
    )
    for epoch in range(2):
        saver2.step(epoch, {"val_auc": 0.5 + epoch / 10}, write=lambda p: keras_layout(p, 4))
    soup(tmp_path / "run2", tmp_path / "soup.weights.h5")
    with h5py.File(tmp_path / "soup.weights.h5") as f:
        np.testing.assert_array_equal(f["layers/dense/vars/0"][()], np.full((4, 4), 4.0))
        assert f["vars"].attrs["name"] == "sequential"
