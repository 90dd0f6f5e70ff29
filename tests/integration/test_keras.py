"""BestModelCheckpoint with real ``model.fit``: the kept files hold the best epochs' weights.

Keras fixes its backend at import, so these tests run in this process on one backend
(``KERAS_BACKEND``, torch by default) and :func:`test_on_other_backends` reruns this file in a
subprocess on each other backend (TensorFlow, the default for most Keras users, and JAX).

Scores are scripted: a callback placed before the checkpoint overwrites ``logs["val_auc"]``
(Keras hands every callback the same ``logs`` dict) and captures the weights at each epoch.

Where bestsave differs from ``keras.callbacks.ModelCheckpoint`` on purpose, the test that shows
it says so in its docstring ("Differs from Keras").
"""

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

from runfiles import run_folder

from bestsave import (
    BestSaveWarning,
    MissingMetricError,
    RunExistsError,
    load_best,
    load_manifest,
)
from bestsave.adapters.keras import BestModelCheckpoint

BACKENDS = ("torch", "jax", "tensorflow")
CHILD = "BESTSAVE_KERAS_BACKEND_RUN"
# Keras's torch backend converts tensors with np.array(x, copy=False), which numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


class Script(keras.callbacks.Callback):
    """Sets ``logs[key]`` to ``scores[epoch]`` and keeps a copy of the weights of each epoch."""

    def __init__(self, scores=(), key="val_auc"):
        super().__init__()
        self.scores, self.key = list(scores), key
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        if self.scores:
            logs[self.key] = self.scores[epoch]
        self.weights[epoch] = self.model.get_weights()


class Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch, error=RuntimeError):
        super().__init__()
        self.epoch, self.error = epoch, error

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise self.error("interrupted")


ON_EVERY_BACKEND = []


def on_every_backend(test):
    """Marks a test that :func:`test_on_other_backends` also runs on the other backends: one
    that takes a path of the adapter or of Keras that differs between backends (saving,
    building, the compiled metrics, the batch logs) or a habit of users of the stock callback."""
    ON_EVERY_BACKEND.append(test.__name__)
    return test


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 4)).astype("float32")
    y = (x[:, :1] + x[:, 1:2] > 0).astype("float32")
    return x[:32], y[:32], x[32:], y[32:]


def make_model(seed=0, metrics=("accuracy",)):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4, "relu"), keras.layers.Dense(1, "sigmoid")],
        name="tiny",
    )
    model.compile(keras.optimizers.Adam(0.05), "binary_crossentropy", metrics=list(metrics))
    return model


def fit(model, callbacks, epochs, validation=True, **kwargs):
    x, y, xv, yv = data()
    return model.fit(
        x,
        y,
        validation_data=(xv, yv) if validation else None,
        epochs=epochs,
        batch_size=8,  # 4 batches per epoch
        verbose=0,
        callbacks=callbacks,
        shuffle=False,
        **kwargs,
    )


def load_weights(path):
    """The weights in ``path``: a ``.keras`` model's, or a ``.weights.h5`` file loaded into a
    fresh model, compiled and built as Keras asks."""
    if str(path).endswith(".keras"):
        return keras.models.load_model(path).get_weights()
    model = make_model(seed=1)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
    return model.get_weights()


def assert_same_weights(actual, expected):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        np.testing.assert_array_equal(a, b)


def checkpoints(path):
    """What a user sees in the directory: everything but bestsave's hidden folder."""
    return sorted(n for n in os.listdir(path) if n != ".bestsave")


def history(path, run=None):
    with open(run_folder(path, run) / "history.jsonl") as f:
        return [json.loads(line) for line in f]


# -- drop-in: what ModelCheckpoint users write ---------------------------------------------------


@on_every_backend
@pytest.mark.parametrize("name", ["{epoch:02d}.keras", "{epoch:02d}.weights.h5"])
def test_no_validation_data_saves_every_epoch_as_keras_does(tmp_path, name):
    """The default monitor, val_loss, is never logged without validation data; with
    save_best_only=False Keras never reads it, and neither does bestsave."""
    weights_only = name.endswith(".weights.h5")
    script = Script()
    ours = BestModelCheckpoint(tmp_path / "ours" / name, save_weights_only=weights_only)
    theirs = keras.callbacks.ModelCheckpoint(
        tmp_path / "keras" / name, save_weights_only=weights_only
    )
    fit(make_model(), [script, ours, theirs], epochs=3, validation=False)

    assert checkpoints(tmp_path / "ours") == checkpoints(tmp_path / "keras")
    assert checkpoints(tmp_path / "ours") == [name.format(epoch=e) for e in (1, 2, 3)]
    for epoch in range(3):
        path = tmp_path / "ours" / name.format(epoch=epoch + 1)
        assert_same_weights(load_weights(path), script.weights[epoch])
    assert [line["score"] for line in history(tmp_path / "ours")] == [None] * 3


@on_every_backend
def test_save_freq_in_batches_overwrites_a_name_without_batch_as_keras_does(tmp_path):
    script = Script()
    ours = BestModelCheckpoint(tmp_path / "ours" / "{epoch:02d}.keras", save_freq=2)
    theirs = keras.callbacks.ModelCheckpoint(tmp_path / "keras" / "{epoch:02d}.keras", save_freq=2)
    fit(make_model(), [script, ours, theirs], epochs=2, validation=False)

    # Saved after batches 2 and 4 of each epoch: the epoch's file holds its last batch's weights.
    assert checkpoints(tmp_path / "ours") == checkpoints(tmp_path / "keras")
    assert checkpoints(tmp_path / "ours") == ["01.keras", "02.keras"]
    for epoch in range(2):
        path = tmp_path / "ours" / f"{epoch + 1:02d}.keras"
        assert_same_weights(load_weights(path), script.weights[epoch])
    assert [line["step"] for line in history(tmp_path / "ours")] == [2, 4, 6, 8]


@on_every_backend
def test_a_new_callback_on_the_same_filepath_starts_afresh(tmp_path):
    """Differs from Keras: the earlier run's files that the new run does not overwrite are
    deleted once it saves its first (Keras leaves them beside the new ones)."""
    name = "{epoch:02d}.keras"
    first = BestModelCheckpoint(tmp_path / "ours" / name)
    fit(make_model(), [first, keras.callbacks.ModelCheckpoint(tmp_path / "keras" / name)], 3)
    earlier = load_manifest(tmp_path / "ours").run["id"]

    script = Script()
    second = BestModelCheckpoint(tmp_path / "ours" / name)
    with pytest.warns(BestSaveWarning, match=f"holds run {earlier}.*Starting a new run"):
        fit(
            make_model(seed=1),
            [script, second, keras.callbacks.ModelCheckpoint(tmp_path / "keras" / name)],
            epochs=2,
        )

    for epoch in range(2):  # overwritten with the second fit's weights
        path = tmp_path / "ours" / name.format(epoch=epoch + 1)
        assert_same_weights(load_weights(path), script.weights[epoch])
    assert checkpoints(tmp_path / "keras") == ["01.keras", "02.keras", "03.keras"]
    assert checkpoints(tmp_path / "ours") == ["01.keras", "02.keras"]
    assert [line["epoch"] for line in history(tmp_path / "ours")] == [0, 1]


@on_every_backend
def test_fit_twice_with_the_same_callback_continues_as_keras_does(tmp_path):
    args = dict(monitor="val_auc", save_best_only=True, mode="max")
    ours = BestModelCheckpoint(tmp_path / "ours" / "{epoch:02d}.keras", **args)
    theirs = keras.callbacks.ModelCheckpoint(tmp_path / "keras" / "{epoch:02d}.keras", **args)
    model = make_model()
    fit(model, [Script([0.5, 0.7]), ours, theirs], epochs=2)
    script = Script([0.6, 0.8])
    with warnings.catch_warnings():
        warnings.simplefilter("error", BestSaveWarning)  # the same run: nothing to replace
        fit(model, [script, ours, theirs], epochs=2)

    # The best carries over: 0.6 is not saved, 0.8 is, under the second fit's epoch numbers.
    assert ours.best == theirs.best == 0.8
    saved = [(line["epoch"], line["decision"]["saved"]) for line in history(tmp_path / "ours")]
    assert saved == [(0, True), (1, True), (0, False), (1, True)]
    assert_same_weights(load_weights(tmp_path / "ours" / "02.keras"), script.weights[1])
    # Differs from Keras: the previous best's file goes (Keras leaves 01.keras).
    assert checkpoints(tmp_path / "keras") == ["01.keras", "02.keras"]
    assert checkpoints(tmp_path / "ours") == ["02.keras"]


@on_every_backend
def test_a_notebook_cell_run_again_starts_afresh(tmp_path):
    """A cell that builds a model and a callback and fits, stopped by the user, then run again
    while the first callback is still alive."""
    filepath = tmp_path / "ckpt" / "best.weights.h5"

    def cell(*extra):
        model, script = make_model(), Script()
        checkpoint = BestModelCheckpoint(filepath, save_best_only=True, save_weights_only=True)
        result = fit(model, [script, checkpoint, *extra], epochs=4)
        return checkpoint, script, result

    with pytest.raises(KeyboardInterrupt):
        cell(Interrupt(2, KeyboardInterrupt))
    with pytest.warns(BestSaveWarning, match="Starting a new run"):
        checkpoint, script, result = cell()

    losses = result.history["val_loss"]
    best = int(np.argmin(losses))
    assert checkpoints(filepath.parent) == ["best.weights.h5"]
    assert_same_weights(load_weights(filepath), script.weights[best])
    assert load_best(filepath.parent).epoch == best and checkpoint.best == min(losses)
    assert len(history(filepath.parent)) == 4


@on_every_backend
def test_an_unknown_mode_warns_and_falls_back_to_auto_as_keras_does(tmp_path):
    with pytest.warns(UserWarning, match="BestModelCheckpoint mode 'up' is unknown, fallback to"):
        checkpoint = BestModelCheckpoint(tmp_path / "m.keras", monitor="val_accuracy", mode="up")
    assert checkpoint.mode == "auto"
    fit(make_model(), [checkpoint], epochs=1)
    assert checkpoint.saver.monitor.mode == "max"


# -- what is kept ------------------------------------------------------------------------------


@on_every_backend
def test_save_best_only_keeps_the_best_epochs_weights_and_logs(tmp_path):
    model, script = make_model(), Script([0.5, 0.7, 0.6, 0.8, 0.75])
    checkpoint = BestModelCheckpoint(
        tmp_path / "{epoch:02d}-{val_auc:.2f}.weights.h5",
        monitor="val_auc",
        save_best_only=True,
    )
    result = fit(model, [script, checkpoint], epochs=5)

    assert result.history["val_auc"] == script.scores  # every callback saw the same logs
    assert checkpoints(tmp_path) == ["04-0.80.weights.h5"]  # {epoch} is 1-based, as in Keras
    best = load_best(tmp_path)
    assert best == checkpoint.best_record and best.epoch == 3 and checkpoint.best == 0.8
    assert_same_weights(load_weights(best.path), script.weights[3])

    logs = {k: v[3] for k, v in result.history.items()}
    assert best.metrics == pytest.approx({**logs, "learning_rate": 0.05})
    assert best.step == 4 * 4  # optimizer iterations: 4 batches per epoch
    assert best.run["framework"] == "keras"
    assert best.run["hparams"]["model_name"] == "tiny"
    assert best.run["hparams"]["params"] == model.count_params() == 25
    record = json.loads((run_folder(tmp_path) / "04-0.80.json").read_text())
    assert record["epoch"] == 3 and record["path"] == "04-0.80.weights.h5"


@on_every_backend
def test_a_sequential_without_input_is_recorded_once_built(tmp_path):
    """Keras builds such a model at its first batch (on TensorFlow, after fit's start)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(4, "relu"), keras.layers.Dense(1, "sigmoid")])
    model.compile("adam", "binary_crossentropy")
    checkpoint = BestModelCheckpoint(tmp_path / "best.keras", save_best_only=True)
    fit(model, [checkpoint], epochs=1)
    assert load_best(tmp_path).run["hparams"]["params"] == model.count_params() == 25


@on_every_backend
def test_whole_model_files_load_with_load_model(tmp_path):
    model, script = make_model(), Script([0.3, 0.9, 0.4])
    checkpoint = BestModelCheckpoint(tmp_path, monitor="val_auc", save_best_only=True)
    fit(model, [script, checkpoint], epochs=3)

    assert checkpoints(tmp_path) == ["epoch=002-val_auc=0.9000.keras"]
    loaded = keras.models.load_model(checkpoint.best_record.path)
    assert_same_weights(loaded.get_weights(), script.weights[1])
    x = data()[2]
    model.set_weights(script.weights[1])
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_top_k_keeps_the_k_best_and_deletes_the_rest(tmp_path):
    script = Script([0.5, 0.7, 0.6, 0.8, 0.55, 0.65])
    checkpoint = BestModelCheckpoint(
        tmp_path / "{epoch}.weights.h5", monitor="val_auc", save_best_only=True, top_k=3
    )
    fit(make_model(), [script, checkpoint], epochs=6)

    assert [r.epoch for r in checkpoint.kept] == [3, 1, 5]
    assert checkpoints(tmp_path) == ["2.weights.h5", "4.weights.h5", "6.weights.h5"]
    for record in checkpoint.kept:
        assert_same_weights(load_weights(record.path), script.weights[record.epoch])


class Tracker:
    def __init__(self):
        self.events = []

    def on_save(self, record, path):
        self.events.append(("save", record.epoch))

    def on_evict(self, record):
        self.events.append(("evict", record.epoch))

    def on_end(self, best):
        self.events.append(("end", best.epoch))


def test_delta_keeps_every_epoch_near_the_best_and_tells_trackers(tmp_path):
    script, tracker = Script([0.60, 0.80, 0.77, 0.70, 0.84, 0.81]), Tracker()
    checkpoint = BestModelCheckpoint(
        tmp_path,
        monitor="val_auc",
        delta=0.05,
        trackers=[tracker],
        async_write=False,  # every kept file is written: in the background a newer one may
        # replace a pending one (and its events) before it starts
    )
    fit(make_model(), [script, checkpoint], epochs=6)

    # 0.80 and 0.77 joined, then 0.84 raised the bar to 0.79: 0.77 left, 0.81 joined.
    assert sorted(r.epoch for r in checkpoint.kept) == [1, 4, 5]
    assert checkpoint.best_record.epoch == 4
    assert len(checkpoints(tmp_path)) == 3
    assert tracker.events == [
        ("save", 0),
        ("evict", 0),
        ("save", 1),
        ("save", 2),
        ("evict", 2),
        ("save", 4),
        ("save", 5),
        ("end", 4),
    ]


def test_min_delta(tmp_path):
    checkpoint = BestModelCheckpoint(
        tmp_path, monitor="val_auc", save_best_only=True, min_delta=0.05
    )
    fit(make_model(), [Script([0.5, 0.53, 0.6, 0.64]), checkpoint], epochs=4)

    assert [line["decision"]["is_best"] for line in history(tmp_path)] == [True, False, True, False]
    assert checkpoints(tmp_path) == ["epoch=003-val_auc=0.6000.keras"]


def test_keep_every_n_epochs_keeps_periodic_files_beside_the_best(tmp_path):
    script = Script([0.9, 0.5, 0.6, 0.7, 0.8])
    checkpoint = BestModelCheckpoint(
        tmp_path / "e{epoch}.weights.h5",
        monitor="val_auc",
        save_best_only=True,
        keep_every_n_epochs=2,
    )
    fit(make_model(), [script, checkpoint], epochs=5)

    assert checkpoints(tmp_path) == ["e1.weights.h5", "e2.weights.h5", "e4.weights.h5"]
    periodic = [r for r in checkpoint.kept if r.kind == "periodic"]
    assert [r.epoch for r in periodic] == [1, 3]
    assert_same_weights(load_weights(periodic[1].path), script.weights[3])


def test_save_best_only_false_with_a_fixed_name_overwrites_it_as_keras_does(tmp_path):
    script = Script([0.5, 0.4, 0.6])
    ours = BestModelCheckpoint(tmp_path / "ours" / "model.keras", monitor="val_auc")
    theirs = keras.callbacks.ModelCheckpoint(tmp_path / "keras" / "model.keras")
    fit(make_model(), [script, ours, theirs], epochs=3)

    assert checkpoints(tmp_path / "ours") == checkpoints(tmp_path / "keras") == ["model.keras"]
    assert_same_weights(load_weights(tmp_path / "ours" / "model.keras"), script.weights[2])
    # Every score is recorded, though none decides what is kept.
    assert [line["score"] for line in history(tmp_path / "ours")] == [0.5, 0.4, 0.6]
    assert ours.best_record is None and [r.epoch for r in ours.kept] == [2]


@on_every_backend
@pytest.mark.parametrize(
    ("options", "held"),
    [
        (dict(save_weights_only=True), True),
        (dict(save_weights_only=True, keep_every_n_epochs=1), False),
        ({}, False),
    ],
    ids=["weights-from-memory", "weights-after-a-later-save", "keras-file"],
)
def test_restore_best_weights_loads_the_best_epoch_into_the_model(tmp_path, options, held):
    model, script = make_model(), Script([0.5, 0.9, 0.6, 0.7])
    checkpoint = BestModelCheckpoint(
        tmp_path, monitor="val_auc", save_best_only=True, restore_best_weights=True, **options
    )
    fit(model, [script, checkpoint], epochs=4)

    # The best (epoch 1) is still in memory when it was the latest save of a weights file;
    # after a later save (epoch 3's periodic file), or from a `.keras` file, the file is read.
    assert (checkpoint.saver.held_state(checkpoint.best_record) is not None) == held
    assert_same_weights(model.get_weights(), script.weights[1])
    # The optimizer keeps its state, as with EarlyStopping(restore_best_weights=True).
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 4 * 4


@on_every_backend
def test_save_freq_in_batches_names_files_as_keras_does(tmp_path):
    """Differs from Keras: a name ending in .weights.h5 holds weights without
    save_weights_only=True (Keras would write a legacy whole-model file there)."""
    template = "{epoch:02d}-{batch:02d}.weights.h5"
    ours = BestModelCheckpoint(tmp_path / "ours" / template, monitor="loss", save_freq=3)
    theirs = keras.callbacks.ModelCheckpoint(
        tmp_path / "keras" / template, save_weights_only=True, save_freq=3
    )
    fit(make_model(), [ours, theirs], epochs=2)

    # 4 batches per epoch: saved after 3 batches, then 3 more (batch 2 of epoch 2).
    assert checkpoints(tmp_path / "ours") == checkpoints(tmp_path / "keras")
    assert checkpoints(tmp_path / "ours") == ["01-03.weights.h5", "02-02.weights.h5"]
    lines = history(tmp_path / "ours")
    assert [(line["epoch"], line["step"]) for line in lines] == [(0, 3), (1, 6)]
    assert "val_loss" not in lines[0]["metrics"] and "loss" in lines[0]["metrics"]
    assert_same_weights(
        load_weights(tmp_path / "ours" / "02-02.weights.h5"),
        load_weights(tmp_path / "keras" / "02-02.weights.h5"),
    )


@on_every_backend
@pytest.mark.parametrize("threshold", [None, 0.65])
def test_parity_with_keras_model_checkpoint(tmp_path, threshold):
    """The same scores through ModelCheckpoint and BestModelCheckpoint save the same epochs.

    Differs from Keras: a new best replaces the previous best's file; Keras leaves every
    improvement's file when the name holds {epoch}."""
    scores = [0.5, 0.5, 0.7, 0.6, 0.7, 0.9, 0.1, 0.95]
    args = dict(
        monitor="val_auc",
        mode="max",
        save_best_only=True,
        save_weights_only=True,
        initial_value_threshold=threshold,
    )
    ours = BestModelCheckpoint(tmp_path / "ours" / "{epoch:02d}.weights.h5", **args)
    theirs = keras.callbacks.ModelCheckpoint(tmp_path / "keras" / "{epoch:02d}.weights.h5", **args)
    fit(make_model(), [Script(scores), ours, theirs], epochs=len(scores))

    saved_by_keras = [int(name[:2]) - 1 for name in checkpoints(tmp_path / "keras")]
    saved_by_us = [
        line["epoch"] for line in history(tmp_path / "ours") if line["decision"]["saved"]
    ]
    assert saved_by_us == saved_by_keras
    assert saved_by_keras == ([2, 5, 7] if threshold else [0, 2, 5, 7])
    assert ours.best == theirs.best == 0.95
    assert checkpoints(tmp_path / "ours") == ["08.weights.h5"]


def h5_tree(path):
    """Every group's attributes and every dataset's values in an HDF5 file, by path."""
    import h5py

    tree = {}

    def visit(name, obj):
        attrs = {k: str(v) for k, v in obj.attrs.items()}
        tree[name] = (attrs, obj[()] if isinstance(obj, h5py.Dataset) else None)

    with h5py.File(path, "r") as f:
        tree["/"] = ({k: str(v) for k, v in f.attrs.items()}, None)
        f.visititems(visit)
    return tree


@on_every_backend
def test_weights_files_written_from_a_snapshot_match_keras_own(tmp_path):
    """A weights file is written in the background from copied variables; it holds what
    model.save_weights writes, groups, attributes and values alike."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, "relu"),
            keras.layers.BatchNormalization(),  # non-trainable variables too
            keras.layers.Dropout(0.1),  # no variables: no group
            keras.layers.Dense(1, "sigmoid"),
        ]
    )
    model.compile(keras.optimizers.Adam(0.05), "binary_crossentropy")
    scores = [0.5, 0.7, 0.6, 0.8]
    args = dict(monitor="val_auc", mode="max", save_best_only=True, save_weights_only=True)
    ours = BestModelCheckpoint(tmp_path / "ours" / "{epoch:02d}.weights.h5", **args)
    theirs = keras.callbacks.ModelCheckpoint(tmp_path / "keras" / "{epoch:02d}.weights.h5", **args)
    script = Script(scores)
    fit(model, [script, ours, theirs], epochs=len(scores))

    ours_tree = h5_tree(load_best(tmp_path / "ours").path)
    keras_tree = h5_tree(tmp_path / "keras" / "04.weights.h5")
    assert ours_tree.keys() == keras_tree.keys()
    for name, (attrs, value) in keras_tree.items():
        assert ours_tree[name][0] == attrs, name
        if value is not None:
            np.testing.assert_array_equal(ours_tree[name][1], value, err_msg=name)


@pytest.mark.parametrize("options", [{}, dict(top_k=2)], ids=["best", "top-k"])
def test_initial_value_threshold_saves_nothing_until_beaten(tmp_path, options):
    """Differs from Keras: the threshold also applies to top_k and delta, bestsave's own."""
    model, script = make_model(), Script([0.5, 0.6, 0.55])
    checkpoint = BestModelCheckpoint(
        tmp_path,
        monitor="val_auc",
        save_best_only=True,
        initial_value_threshold=0.7,
        restore_best_weights=True,
        **options,
    )
    with pytest.warns(BestSaveWarning) as caught:
        fit(model, [script, checkpoint], epochs=3)
    messages = " ".join(str(w.message) for w in caught)
    assert "no val_auc beat baseline=0.7" in messages
    assert "the model keeps the weights of its last epoch" in messages

    assert checkpoints(tmp_path) == [] and checkpoint.best_record is None
    assert checkpoint.best == 0.7
    assert_same_weights(model.get_weights(), script.weights[2])


# -- training control ---------------------------------------------------------------------------


def test_patience_stops_fit(tmp_path):
    script = Script([0.5, 0.8, 0.7, 0.75, 0.79, 0.99, 0.99])
    checkpoint = BestModelCheckpoint(tmp_path, monitor="val_auc", save_best_only=True, patience=3)
    result = fit(make_model(), [script, checkpoint], epochs=7)

    assert len(result.history["loss"]) == 5  # three epochs after the best at epoch 1
    assert checkpoint.best_record.epoch == 1


def test_resume_continues_from_the_saved_best(tmp_path):
    first = BestModelCheckpoint(tmp_path, monitor="val_auc", save_best_only=True)
    fit(make_model(), [Script([0.5, 0.8, 0.6]), first], epochs=3)
    best_file = first.best_record.path

    second = BestModelCheckpoint(tmp_path, monitor="val_auc", save_best_only=True, resume=True)
    script = Script([0.7, 0.75, 0.85])
    fit(make_model(seed=2), [script, second], epochs=3)

    # 0.7 and 0.75 would be a fresh run's best; the resumed run still holds 0.8 until 0.85.
    decisions = [(line["score"], line["decision"]["saved"]) for line in history(tmp_path)]
    assert decisions == [
        (0.5, True),
        (0.8, True),
        (0.6, False),
        (0.7, False),
        (0.75, False),
        (0.85, True),
    ]
    assert not os.path.exists(best_file)
    assert second.best_record.metrics["val_auc"] == 0.85
    assert load_manifest(tmp_path).best.name == os.path.basename(second.best_record.path)
    assert_same_weights(load_weights(second.best_record.path), script.weights[2])

    other = BestModelCheckpoint(tmp_path, monitor="val_auc", mode="min", resume=True)
    with pytest.raises(RunExistsError, match="cannot resume"):
        fit(make_model(), [Script([0.5]), other], epochs=1)


@on_every_backend
def test_resume_beside_backup_and_restore(tmp_path):
    scores = [0.5, 0.8, 0.6, 0.7, 0.9, 0.4]

    def callbacks():
        return [
            keras.callbacks.BackupAndRestore(tmp_path / "backup"),
            Script(scores),
            BestModelCheckpoint(
                tmp_path / "ckpt", monitor="val_auc", save_best_only=True, resume=True
            ),
        ]

    crashed = callbacks()
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(make_model(), [*crashed, Interrupt(3)], epochs=6)
    crashed[2].saver.close()  # what the end of the crashed process does (atexit)
    assert load_best(tmp_path / "ckpt").epoch == 1

    second = callbacks()
    result = fit(make_model(seed=3), second, epochs=6)

    assert len(result.history["loss"]) == 3  # BackupAndRestore resumed at epoch 3
    assert [line["epoch"] for line in history(tmp_path / "ckpt")] == [0, 1, 2, 3, 4, 5]
    best = load_best(tmp_path / "ckpt")
    assert best.epoch == 4 and best.score == 0.9
    assert_same_weights(load_weights(best.path), second[1].weights[4])


# -- errors, modes, messages ----------------------------------------------------------------------


def test_missing_monitor_is_an_error_listing_the_logged_keys(tmp_path):
    """Differs from Keras: with save_best_only=True a monitor that is not logged is an error;
    Keras warns and saves every epoch, so a misspelt name would keep the last epoch as the
    best (Keras's own test, Case 5 of model_checkpoint_test.py, expects the warning)."""
    checkpoint = BestModelCheckpoint(tmp_path, monitor="val_accuracy", save_best_only=True)
    with pytest.raises(MissingMetricError) as error:
        fit(make_model(), [checkpoint], epochs=2, validation=False)
    message = str(error.value)
    assert "'accuracy'" in message and "'loss'" in message and "validation_data" in message
    assert checkpoints(tmp_path) == []

    typo = BestModelCheckpoint(
        tmp_path / "typo", monitor="val_acuracy", mode="max", save_best_only=True
    )
    with pytest.raises(KeyError, match="Did you mean 'val_accuracy'"):
        fit(make_model(), [typo], epochs=1)


@on_every_backend
def test_mode_auto_asks_the_compiled_metric_first(tmp_path):
    # "roc" tells nothing by its name; the AUC metric says higher is better.
    model = make_model(metrics=[keras.metrics.AUC(name="roc")])
    checkpoint = BestModelCheckpoint(tmp_path, monitor="val_roc")
    fit(model, [checkpoint], epochs=1)
    assert checkpoint.saver.monitor.mode == "max"

    # Neither a compiled metric nor the name tells: an error, as in Keras.
    unknown = BestModelCheckpoint(tmp_path / "unknown", monitor="val_zeta")
    with pytest.raises(ValueError, match="mode='min' or mode='max'"):
        fit(make_model(), [Script([1.0], key="val_zeta"), unknown], epochs=1)


def test_verbose_prints_keras_style_messages(tmp_path, capsys):
    checkpoint = BestModelCheckpoint(
        tmp_path / "{epoch}.weights.h5",
        monitor="val_auc",
        save_best_only=True,
        verbose=1,
        restore_best_weights=True,
    )
    fit(make_model(), [Script([0.5, 0.7, 0.6]), checkpoint], epochs=3)
    out = capsys.readouterr().out
    assert "Epoch 1: val_auc improved from None to 0.50000, saving model to" in out
    assert "Epoch 2: val_auc improved from 0.50000 to 0.70000" in out
    assert "Epoch 3: val_auc did not improve from 0.70000" in out
    assert f"removed {tmp_path / '1.weights.h5'}" in out
    assert "Restoring model weights from the end of the best epoch: 2." in out

    every = BestModelCheckpoint(tmp_path / "every" / "{epoch}.keras", verbose=1)
    fit(make_model(), [every], epochs=1)
    assert f"Epoch 1: saving model to {tmp_path / 'every' / '1.keras'}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(filepath="m.keras", save_weights_only=True), "must end in `.weights.h5`"),
        (dict(filepath="{epoch}-{batch}.keras"), "save_freq"),
        (dict(filepath="d/", save_freq="batch"), "Unrecognized save_freq"),
        (dict(filepath="d/", top_k=-2), "top_k"),
        (dict(filepath="d/", patience=0), "patience"),
        (dict(filepath="d/", restore_best_weights=True), "save_best_only=True"),
        # Differs from Keras, which makes a directory per value.
        (dict(filepath="{epoch}/m.keras"), "file name only"),
    ],
)
def test_bad_arguments_are_refused_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BestModelCheckpoint(**kwargs)


class SecondProcess(keras.callbacks.Callback):
    """Makes the process look like process 1 to the callbacks after it at each epoch's end."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.monkeypatch = monkeypatch

    def on_epoch_end(self, epoch, logs=None):
        if keras.backend.backend() == "jax":
            import jax

            self.monkeypatch.setattr(jax, "process_index", lambda: 1)
        else:
            import torch.distributed as dist

            self.monkeypatch.setattr(dist, "is_initialized", lambda: True)
            self.monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)

    def on_epoch_begin(self, epoch, logs=None):
        self.monkeypatch.undo()  # torch's DataLoader asks torch.distributed too

    on_train_end = on_epoch_begin


@on_every_backend
def test_only_process_zero_writes(tmp_path, monkeypatch):
    if keras.backend.backend() not in ("jax", "torch"):
        pytest.skip(f"no way to fake a second process on {keras.backend.backend()}")
    checkpoint = BestModelCheckpoint(tmp_path / "ckpt", monitor="val_auc", top_k=2)
    fit(make_model(), [Script([0.5, 0.7, 0.6]), SecondProcess(monkeypatch), checkpoint], 3)

    assert not os.path.exists(tmp_path / "ckpt")
    assert [r.epoch for r in checkpoint.kept] == [1, 2]  # the same decisions as process 0


@on_every_backend
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution is JAX's")
def test_saves_under_a_keras_distribution(tmp_path):
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    )
    try:
        model, script = make_model(), Script([0.5, 0.7, 0.6])
        checkpoint = BestModelCheckpoint(
            tmp_path / "{epoch}.weights.h5",
            monitor="val_auc",
            save_best_only=True,
            restore_best_weights=True,
        )
        fit(model, [script, checkpoint], epochs=3)
    finally:
        keras.distribution.set_distribution(None)
    assert checkpoints(tmp_path) == ["2.weights.h5"]
    assert_same_weights(model.get_weights(), script.weights[1])
    assert_same_weights(load_weights(checkpoint.best_record.path), script.weights[1])


def test_a_fixed_file_name_holds_the_latest_best(tmp_path):
    script = Script([0.5, 0.7, 0.6])
    checkpoint = BestModelCheckpoint(
        tmp_path / "best.keras", monitor="val_auc", save_best_only=True
    )
    fit(make_model(), [script, checkpoint], epochs=3)

    assert checkpoints(tmp_path) == ["best.keras"]
    assert checkpoint.best_record.path == str(tmp_path / "best.keras")
    assert_same_weights(load_weights(tmp_path / "best.keras"), script.weights[1])


def test_two_callbacks_in_one_directory_are_two_runs(tmp_path):
    """A whole model and its weights, saved by two callbacks under one name, as with Keras."""
    script = Script([0.5, 0.7, 0.6])
    models = BestModelCheckpoint(tmp_path / "best.keras", monitor="val_auc", save_best_only=True)
    weights = BestModelCheckpoint(
        tmp_path / "best.weights.h5", monitor="val_auc", save_best_only=True
    )
    fit(make_model(), [script, models, weights], epochs=3)

    assert checkpoints(tmp_path) == ["best.keras", "best.weights.h5"]
    for name in checkpoints(tmp_path):
        assert_same_weights(load_weights(tmp_path / name), script.weights[1])
    assert (
        load_best(tmp_path, run="best.keras").epoch
        == load_best(tmp_path, run="best.weights.h5").epoch
        == 1
    )


def test_smooth_ignores_a_one_epoch_spike(tmp_path):
    script = Script([0.2, 0.9, 0.3, 0.6, 0.7])  # smoothed: 0.2, 0.55, 0.6, 0.45, 0.65
    checkpoint = BestModelCheckpoint(
        tmp_path / "{epoch:02d}.weights.h5", monitor="val_auc", save_best_only=True, smooth=2
    )
    fit(make_model(), [script, checkpoint], epochs=5)
    best = checkpoint.best_record
    assert best.epoch == 4 and best.raw_score == pytest.approx(0.7)
    assert checkpoints(tmp_path) == ["05.weights.h5"]
    assert_same_weights(load_weights(best.path), script.weights[4])


def test_several_monitors_keep_a_best_for_each(tmp_path):
    script = Script([0.2, 0.6, 0.4])
    checkpoint = BestModelCheckpoint(tmp_path, monitor=["val_auc", "val_loss"], save_best_only=True)
    fit(make_model(), [script, checkpoint], epochs=3)
    manifest = load_manifest(tmp_path)
    assert checkpoint.best_record.epoch == 1 and manifest.best.monitor == "val_auc"
    by_loss = manifest.best_for("val_loss")
    losses = [line["metrics"]["val_loss"] for line in history(tmp_path)]
    assert by_loss.epoch == losses.index(min(losses))


# -- the other backends -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_other_backends(backend):
    """The tests marked ``on_every_backend``, on ``backend``, in a fresh interpreter (the
    backend is fixed at import); the others exercise bestsave's rules, the same on every one."""
    if os.environ.get(CHILD) or backend == keras.backend.backend():
        pytest.skip(f"the tests above run on {keras.backend.backend()} in this process")
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = {**os.environ, "KERAS_BACKEND": backend, CHILD: "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *(f"{__file__}::{name}" for name in ON_EVERY_BACKEND),
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"on {backend}:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"


@pytest.mark.parametrize("budget, step", [(1, "streaming"), (None, "two sets")])
def test_staging_memory_bounds_the_copies_and_the_record_says_how(tmp_path, budget, step):
    model, script = make_model(), Script([0.5, 0.7, 0.6, 0.8, 0.75])
    checkpoint = BestModelCheckpoint(tmp_path / "best.weights.h5", monitor="val_auc",
                                     save_best_only=True, staging_memory=budget)  # fmt: skip
    fit(model, [script, checkpoint], epochs=5)

    best = load_best(tmp_path)
    assert (best.epoch, best.staging) == (3, step)
    assert_same_weights(load_weights(best.path), script.weights[3])
