"""BestModelCheckpoint with real ``model.fit``: the kept files hold the best epochs' weights.

Keras fixes its backend at import, so these tests run in this process on one backend
(``KERAS_BACKEND``, torch by default) and :func:`test_on_other_backends` reruns this file in a
subprocess on each other backend.

Scores are scripted: a callback placed before the checkpoint overwrites ``logs["val_score"]``
(Keras hands every callback the same ``logs`` dict) and captures the weights at each epoch.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

from bestsave import MissingMetricError, RunExistsError, load_best, load_manifest
from bestsave.adapters.keras import BestModelCheckpoint

BACKENDS = ("torch", "jax")
CHILD = "BESTSAVE_KERAS_BACKEND_RUN"
# Keras's torch backend converts tensors with np.array(x, copy=False), which numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


class Script(keras.callbacks.Callback):
    """Sets ``logs[key]`` to ``scores[epoch]`` and keeps a copy of the weights of each epoch."""

    def __init__(self, scores, key="val_score"):
        super().__init__()
        self.scores, self.key = list(scores), key
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        logs[self.key] = self.scores[epoch]
        self.weights[epoch] = self.model.get_weights()


class Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


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
        batch_size=8,
        verbose=0,
        callbacks=callbacks,
        shuffle=False,
        **kwargs,
    )


def load_weights(path):
    """A fresh model, compiled and built as Keras asks, with the weights in ``path``."""
    model = make_model(seed=1)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
    return model.get_weights()


def assert_same_weights(actual, expected):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        np.testing.assert_array_equal(a, b)


def checkpoints(path):
    return sorted(n for n in os.listdir(path) if n.endswith((".keras", ".h5")))


def history(path):
    with open(os.path.join(path, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


# -- what is kept ------------------------------------------------------------------------------


def test_save_best_only_keeps_the_best_epochs_weights_and_logs(tmp_path):
    model, script = make_model(), Script([0.5, 0.7, 0.6, 0.8, 0.75])
    checkpoint = BestModelCheckpoint(
        tmp_path / "{epoch:02d}-{val_score:.2f}.weights.h5",
        monitor="val_score",
        save_best_only=True,
    )
    result = fit(model, [script, checkpoint], epochs=5)

    assert result.history["val_score"] == script.scores  # every callback saw the same logs
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


def test_whole_model_files_load_with_load_model(tmp_path):
    model, script = make_model(), Script([0.3, 0.9, 0.4])
    checkpoint = BestModelCheckpoint(tmp_path, monitor="val_score", save_best_only=True)
    fit(model, [script, checkpoint], epochs=3)

    assert checkpoints(tmp_path) == ["epoch=002-val_score=0.9000.keras"]
    loaded = keras.models.load_model(checkpoint.best_record.path)
    assert_same_weights(loaded.get_weights(), script.weights[1])
    x = data()[2]
    model.set_weights(script.weights[1])
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_top_k_keeps_the_k_best_and_deletes_the_rest(tmp_path):
    script = Script([0.5, 0.7, 0.6, 0.8, 0.55, 0.65])
    checkpoint = BestModelCheckpoint(
        tmp_path / "{epoch}.weights.h5", monitor="val_score", save_best_only=True, top_k=3
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
        monitor="val_score",
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


def test_min_delta_and_overwrite(tmp_path):
    first = BestModelCheckpoint(tmp_path, monitor="val_score", save_best_only=True)
    fit(make_model(), [Script([0.9]), first], epochs=1)
    old = first.best_record.path

    checkpoint = BestModelCheckpoint(
        tmp_path, monitor="val_score", save_best_only=True, min_delta=0.05, overwrite=True
    )
    fit(make_model(), [Script([0.5, 0.53, 0.6, 0.64]), checkpoint], epochs=4)

    assert [line["decision"]["is_best"] for line in history(tmp_path)] == [True, False, True, False]
    assert not os.path.exists(old)  # the earlier run's files went with overwrite=True
    assert checkpoints(tmp_path) == ["epoch=003-val_score=0.6000.keras"]


def test_keep_every_n_epochs_keeps_periodic_files_beside_the_best(tmp_path):
    script = Script([0.9, 0.5, 0.6, 0.7, 0.8])
    checkpoint = BestModelCheckpoint(
        tmp_path / "e{epoch}.weights.h5",
        monitor="val_score",
        save_best_only=True,
        keep_every_n_epochs=2,
    )
    fit(make_model(), [script, checkpoint], epochs=5)

    assert checkpoints(tmp_path) == [
        "e1.weights.h5",
        "e2-periodic.weights.h5",
        "e4-periodic.weights.h5",
    ]
    periodic = [r for r in checkpoint.kept if r.kind == "periodic"]
    assert [r.epoch for r in periodic] == [1, 3]
    assert_same_weights(load_weights(periodic[1].path), script.weights[3])


def test_save_best_only_false_keeps_every_epoch_as_keras_does(tmp_path):
    script = Script([0.5, 0.4, 0.6])
    ours = BestModelCheckpoint(tmp_path / "ours" / "{epoch:02d}.keras", monitor="val_score")
    theirs = keras.callbacks.ModelCheckpoint(tmp_path / "keras" / "{epoch:02d}.keras")
    fit(make_model(), [script, ours, theirs], epochs=3)

    assert checkpoints(tmp_path / "ours") == checkpoints(tmp_path / "keras")
    assert checkpoints(tmp_path / "ours") == ["01.keras", "02.keras", "03.keras"]
    assert ours.best_record.epoch == 2


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
        tmp_path, monitor="val_score", save_best_only=True, restore_best_weights=True, **options
    )
    fit(model, [script, checkpoint], epochs=4)

    # The best (epoch 1) is still in memory when it was the latest save of a weights file;
    # after a later save (epoch 3's periodic file), or from a `.keras` file, the file is read.
    assert (checkpoint.saver.held_state(checkpoint.best_record) is not None) == held
    assert_same_weights(model.get_weights(), script.weights[1])
    # The optimizer keeps its state, as with EarlyStopping(restore_best_weights=True).
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 4 * 4


def test_save_freq_in_batches_names_files_as_keras_does(tmp_path):
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


@pytest.mark.parametrize("threshold", [None, 0.65])
def test_parity_with_keras_model_checkpoint(tmp_path, threshold):
    """The same scores through ModelCheckpoint and BestModelCheckpoint save the same epochs."""
    scores = [0.5, 0.5, 0.7, 0.6, 0.7, 0.9, 0.1, 0.95]
    args = dict(
        monitor="val_score",
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
    args = dict(monitor="val_score", mode="max", save_best_only=True, save_weights_only=True)
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


def test_initial_value_threshold_saves_nothing_until_beaten(tmp_path):
    model, script = make_model(), Script([0.5, 0.6, 0.55])
    checkpoint = BestModelCheckpoint(
        tmp_path,
        monitor="val_score",
        save_best_only=True,
        initial_value_threshold=0.7,
        restore_best_weights=True,
    )
    with pytest.warns(UserWarning, match="no checkpoint was kept"):
        fit(model, [script, checkpoint], epochs=3)

    assert checkpoints(tmp_path) == [] and checkpoint.best_record is None
    assert checkpoint.best == 0.7
    assert_same_weights(model.get_weights(), script.weights[2])


# -- training control ---------------------------------------------------------------------------


def test_patience_stops_fit(tmp_path):
    script = Script([0.5, 0.8, 0.7, 0.75, 0.79, 0.99, 0.99])
    checkpoint = BestModelCheckpoint(tmp_path, monitor="val_score", save_best_only=True, patience=3)
    result = fit(make_model(), [script, checkpoint], epochs=7)

    assert len(result.history["loss"]) == 5  # three epochs after the best at epoch 1
    assert checkpoint.best_record.epoch == 1


def test_resume_continues_from_the_saved_best(tmp_path):
    first = BestModelCheckpoint(tmp_path, monitor="val_score", save_best_only=True)
    fit(make_model(), [Script([0.5, 0.8, 0.6]), first], epochs=3)
    best_file = first.best_record.path

    with pytest.raises(RunExistsError, match="resume=True"):
        fit(make_model(), [BestModelCheckpoint(tmp_path, monitor="val_score")], epochs=1)

    second = BestModelCheckpoint(tmp_path, monitor="val_score", save_best_only=True, resume=True)
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
    assert second.best_record.metrics["val_score"] == 0.85
    assert load_manifest(tmp_path).best.name == os.path.basename(second.best_record.path)
    assert_same_weights(load_weights(second.best_record.path), script.weights[2])


def test_resume_beside_backup_and_restore(tmp_path):
    scores = [0.5, 0.8, 0.6, 0.7, 0.9, 0.4]

    def callbacks():
        return [
            keras.callbacks.BackupAndRestore(tmp_path / "backup"),
            Script(scores),
            BestModelCheckpoint(
                tmp_path / "ckpt", monitor="val_score", save_best_only=True, resume=True
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
    checkpoint = BestModelCheckpoint(tmp_path, monitor="val_accuracy", save_best_only=True)
    with pytest.raises(MissingMetricError) as error:
        fit(make_model(), [checkpoint], epochs=2, validation=False)
    message = str(error.value)
    assert "'accuracy'" in message and "'loss'" in message and "validation_data" in message

    typo = BestModelCheckpoint(tmp_path / "typo", monitor="val_acuracy", mode="max")
    with pytest.raises(KeyError, match="Did you mean 'val_accuracy'"):
        fit(make_model(), [typo], epochs=1)


def test_mode_auto_asks_the_compiled_metric_first(tmp_path):
    # "roc" tells nothing by its name; the AUC metric says higher is better.
    model = make_model(metrics=[keras.metrics.AUC(name="roc")])
    checkpoint = BestModelCheckpoint(tmp_path, monitor="val_roc")
    fit(model, [checkpoint], epochs=1)
    assert checkpoint.saver.monitor.mode == "max"

    unknown = BestModelCheckpoint(tmp_path / "unknown", monitor="val_zeta")
    with pytest.raises(ValueError, match="mode='min' or mode='max'"):
        fit(make_model(), [Script([1.0], key="val_zeta"), unknown], epochs=1)


def test_verbose_prints_keras_style_messages(tmp_path, capsys):
    checkpoint = BestModelCheckpoint(
        tmp_path / "{epoch}.weights.h5",
        monitor="val_score",
        save_best_only=True,
        verbose=1,
        restore_best_weights=True,
    )
    fit(make_model(), [Script([0.5, 0.7, 0.6]), checkpoint], epochs=3)
    out = capsys.readouterr().out
    assert "Epoch 1: val_score improved from None to 0.50000, saving model to" in out
    assert "Epoch 2: val_score improved from 0.50000 to 0.70000" in out
    assert "Epoch 3: val_score did not improve from 0.70000" in out
    assert f"removed {tmp_path / '1.weights.h5'}" in out
    assert "Restoring model weights from the end of the best epoch: 2." in out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(filepath="m.keras", save_weights_only=True), "must end in `.weights.h5`"),
        (dict(filepath="{epoch}-{batch}.keras"), "save_freq"),
        (dict(filepath="d/", save_freq="batch"), "save_freq"),
        (dict(filepath="d/", mode="up"), "mode"),
        (dict(filepath="d/", top_k=-2), "top_k"),
        (dict(filepath="d/", patience=0), "patience"),
        (dict(filepath="{epoch}/m.keras"), "file name only"),
    ],
)
def test_bad_arguments_are_refused_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BestModelCheckpoint(**kwargs)


class SecondProcess(keras.callbacks.Callback):
    """Makes the process look like process 1 while the callbacks after it start training."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.monkeypatch = monkeypatch

    def on_train_begin(self, logs=None):
        if keras.backend.backend() == "jax":
            import jax

            self.monkeypatch.setattr(jax, "process_index", lambda: 1)
        else:
            import torch.distributed as dist

            self.monkeypatch.setattr(dist, "is_initialized", lambda: True)
            self.monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)

    def on_epoch_begin(self, epoch, logs=None):
        self.monkeypatch.undo()  # torch's DataLoader asks torch.distributed too


def test_only_process_zero_writes(tmp_path, monkeypatch):
    if keras.backend.backend() not in ("jax", "torch"):
        pytest.skip(f"no way to fake a second process on {keras.backend.backend()}")
    checkpoint = BestModelCheckpoint(tmp_path / "ckpt", monitor="val_score", top_k=2)
    fit(make_model(), [SecondProcess(monkeypatch), Script([0.5, 0.7, 0.6]), checkpoint], epochs=3)

    assert not os.path.exists(tmp_path / "ckpt")
    assert [r.epoch for r in checkpoint.kept] == [1, 2]  # the same decisions as process 0


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution is JAX's")
def test_saves_under_a_keras_distribution(tmp_path):
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    )
    try:
        model, script = make_model(), Script([0.5, 0.7, 0.6])
        checkpoint = BestModelCheckpoint(
            tmp_path / "{epoch}.weights.h5",
            monitor="val_score",
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
        tmp_path / "best.keras", monitor="val_score", save_best_only=True
    )
    fit(make_model(), [script, checkpoint], epochs=3)

    assert checkpoints(tmp_path) == ["best.keras"]
    assert checkpoint.best_record.path == str(tmp_path / "best.keras")
    assert_same_weights(
        keras.models.load_model(tmp_path / "best.keras").get_weights(), script.weights[1]
    )


# -- the other backends -------------------------------------------------------------------------


def test_smooth_ignores_a_one_epoch_spike(tmp_path):
    script = Script([0.2, 0.9, 0.3, 0.6, 0.7])  # smoothed: 0.2, 0.55, 0.6, 0.45, 0.65
    checkpoint = BestModelCheckpoint(
        tmp_path / "{epoch:02d}.weights.h5", monitor="val_score", save_best_only=True, smooth=2
    )
    fit(make_model(), [script, checkpoint], epochs=5)
    best = checkpoint.best_record
    assert best.epoch == 4 and best.raw_score == pytest.approx(0.7)
    assert checkpoints(tmp_path) == ["05.weights.h5"]
    assert_same_weights(load_weights(best.path), script.weights[4])


def test_several_monitors_keep_a_best_for_each(tmp_path):
    script = Script([0.2, 0.6, 0.4])
    checkpoint = BestModelCheckpoint(
        tmp_path, monitor=["val_score", "val_loss"], save_best_only=True
    )
    fit(make_model(), [script, checkpoint], epochs=3)
    manifest = load_manifest(tmp_path)
    assert checkpoint.best_record.epoch == 1 and manifest.best.monitor == "val_score"
    by_loss = manifest.best_for("val_loss")
    losses = [
        json.loads(line)["metrics"]["val_loss"]
        for line in (tmp_path / "history.jsonl").read_text().splitlines()
    ]
    assert by_loss.epoch == losses.index(min(losses))


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_other_backends(backend):
    """Every test above, on ``backend``, in a fresh interpreter (the backend is fixed at import)."""
    if os.environ.get(CHILD) or backend == keras.backend.backend():
        pytest.skip(f"the tests above run on {keras.backend.backend()} in this process")
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = {**os.environ, "KERAS_BACKEND": backend, CHILD: "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            __file__,
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-k",
            "not test_on_other_backends",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"on {backend}:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
