"""SaveBestModelCallback driven by a real fastai Learner (CPU, tiny model, synthetic data).

Most tests monitor a scripted metric (one chosen value per epoch) so that which epochs are best
is known in advance; the weights each epoch ends with are captured by a small callback and
compared with what the callback saved and loaded. The drop-in tests run the same training
through fastai's SaveModelCallback and ours and compare what a user sees: the files in
``models/`` and what ``learn.load`` reads from them.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastai")

import fastai.callback.schedule  # noqa: F401  (Learner.fit_one_cycle)
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from fastai.data.core import DataLoaders, Datasets
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import MatthewsCorrCoef, RocAucBinary, accuracy
from fastai.test_utils import synth_learner
from fastai_scripted import Scripted  # tests/ is on pytest's pythonpath
from runfiles import checkpoints, run_folder
from torch import nn

from bestsave import BestSaveWarning, ChecksumError, MissingMetricError, fetch, load_manifest
from bestsave.adapters.fastai import SaveBestModelCallback

pytestmark = [
    # fastai's own Learner.load and load_learner warn about things outside bestsave.
    pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:load_learner:UserWarning"),
    pytest.mark.filterwarnings("ignore:Saved file doesn't contain an optimizer state"),
    # The scripted metric's name, "score", says nothing of its direction: fastai's rule
    # (higher is better) applies, with a warning that test_mode_* checks.
    pytest.mark.filterwarnings("ignore:bestsave cannot tell from its name whether 'score'"),
]

# -- helpers ------------------------------------------------------------------------------------


class WeightLog(Callback):
    """The model's weights at the end of every epoch, and whether ``save_model`` saw a new best.

    Runs after the Recorder and before the savers (which may stop training in after_epoch).
    """

    order = 55

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.trained = False

    def before_epoch(self) -> None:
        self.trained = False

    def before_train(self) -> None:
        self.trained = True

    def after_epoch(self) -> None:
        if self.trained:  # not learn.validate()
            self.weights[self.epoch] = weights(self.learn)


class NewBestLog(Callback):
    """Epochs where ``learn.save_model.new_best`` was set (after the savers ran)."""

    order = 70

    def before_fit(self) -> None:
        self.epochs: list[int] = []

    def after_epoch(self) -> None:
        if self.learn.save_model.new_best:
            self.epochs.append(self.epoch)


class Events:
    """A tracker that remembers what the saver told it."""

    def __init__(self) -> None:
        self.saved: list = []
        self.ended: list = []

    def on_save(self, record, path) -> None:
        self.saved.append(record)

    def on_evict(self, record) -> None:
        pass

    def on_end(self, best) -> None:
        self.ended.append(best)


def seed(n: int = 0) -> None:
    random.seed(n)
    np.random.seed(n)
    torch.manual_seed(n)


def regression_learner(path: Path, metrics=(), cbs=(), n: int = 48, **kwargs) -> Learner:
    seed()
    x = torch.randn(n, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1)
    data = list(zip(x, y))
    dls = DataLoaders.from_dsets(data[: n * 3 // 4], data[n * 3 // 4 :], bs=8, device="cpu")
    return Learner(
        dls,
        nn.Linear(3, 1),
        loss_func=nn.MSELoss(),
        metrics=list(metrics),
        cbs=list(cbs),
        path=path,
        **kwargs,
    )


def classification_learner(path: Path, metrics=(), cbs=()) -> Learner:
    seed()
    x = torch.randn(64, 4)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    data = list(zip(x, y))
    dls = DataLoaders.from_dsets(data[:48], data[48:], bs=8, device="cpu")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return Learner(
        dls,
        model,
        loss_func=CrossEntropyLossFlat(),
        metrics=list(metrics),
        cbs=list(cbs),
        path=path,
    )


def fit(learn: Learner, n_epoch: int, cbs=(), lr: float = 0.05, **kwargs) -> None:
    with learn.no_bar(), learn.no_logging():
        learn.fit(n_epoch, lr=lr, cbs=list(cbs), **kwargs)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def weights(learn: Learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learn.model.state_dict().items()}


def files(directory: Path) -> dict[str, float]:
    """Every file under ``directory`` (bestsave's own included), with its modification time."""
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def loaded(path: Path, fname: str, **kwargs) -> dict[str, torch.Tensor]:
    """The weights ``learn.load(fname)`` puts into a fresh learner under ``path``."""
    other = regression_learner(path, n=40)
    other.load(fname, with_opt=False, **kwargs)
    return weights(other)


def better_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("Better model found")]


# -- saving the best ----------------------------------------------------------------------------


def test_saves_each_improvement_and_loads_the_best(tmp_path, capsys):
    scores = [0.3, 0.5, 0.4, 0.6, 0.55]
    events = Events()
    save = SaveBestModelCallback(monitor="score", trackers=[events])
    log = WeightLog()
    learn = regression_learner(tmp_path, metrics=[Scripted(scores)])
    fit(learn, len(scores), cbs=[save, log])

    assert better_lines(capsys.readouterr().out) == [
        "Better model found at epoch 0 with score value: 0.3.",
        "Better model found at epoch 1 with score value: 0.5.",
        "Better model found at epoch 3 with score value: 0.6.",
    ]
    best = save.best_record
    assert (best.epoch, best.score, best.kind) == (3, 0.6, "best")
    assert [r.epoch for r in save.kept] == [3]
    assert [r.epoch for r in events.saved] == [0, 1, 3] and events.ended[-1].epoch == 3

    # The file is learn.path/learn.model_dir/fname.pth, where fastai's callback puts it, the
    # only one there; it holds the weights the model had at epoch 3, and so does the learner.
    models = tmp_path / "models"
    assert best.path == str(models / "model.pth")
    assert checkpoints(models) == {"model.pth"}
    assert same(torch.load(fetch(best), weights_only=True), log.weights[3])
    assert same(weights(learn), log.weights[3])
    assert same(loaded(tmp_path, "model"), log.weights[3])  # fastai's own learn.load("model")
    assert save.last_saved_path == Path(best.path)
    assert save.last_saved_metadata["epoch"] == 3
    assert save.best == 0.6 and save.comp is np.greater

    # Every value the Recorder held at epoch 3, and the optimizer's hyperparameters.
    values = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[3]))
    assert {k: best.metrics[k] for k in values} == pytest.approx(values)
    assert set(best.metrics) == {"train_loss", "valid_loss", "score", "lr", "mom", "wd"}
    assert best.metrics["lr"] == pytest.approx(0.05)
    assert best.run["framework"] == "fastai" and best.run["hparams"]["n_epoch"] == 5
    # bestsave's own files are in one hidden folder, the run named after the file.
    assert load_manifest(models).best.epoch == 3
    assert (run_folder(models, "model") / "model.json").exists()


def test_default_monitor_is_valid_loss(tmp_path):
    save, log = SaveBestModelCallback(), WeightLog()
    learn = regression_learner(tmp_path)
    fit(learn, 5, cbs=[save, log], lr=0.3)
    losses = [v[1] for v in learn.recorder.values]
    assert save.best_record.epoch == int(np.argmin(losses))
    assert save.best_record.score == pytest.approx(min(losses))
    assert same(weights(learn), log.weights[save.best_record.epoch])


def test_top_k_keeps_the_k_best(tmp_path):
    scores = [0.3, 0.5, 0.4, 0.6, 0.55, 0.2]
    save, log = SaveBestModelCallback(monitor="score", top_k=3), WeightLog()
    learn = regression_learner(tmp_path, metrics=[Scripted(scores)])
    fit(learn, len(scores), cbs=[save, log])

    # Several files: each named after its epoch, as fastai's every_epoch names them.
    assert [r.epoch for r in save.kept] == [3, 4, 1]
    assert checkpoints(tmp_path / "models") == {"model_1.pth", "model_3.pth", "model_4.pth"}
    for record in save.kept:
        assert same(torch.load(fetch(record), weights_only=True), log.weights[record.epoch])
        assert same(loaded(tmp_path, f"model_{record.epoch}"), log.weights[record.epoch])
    assert same(weights(learn), log.weights[3])


def test_smooth_ignores_a_one_epoch_spike(tmp_path):
    scores = [0.2, 0.9, 0.3, 0.6, 0.7]  # smoothed: 0.2, 0.55, 0.6, 0.45, 0.65
    save, log = SaveBestModelCallback(monitor="score", smooth=2), WeightLog()
    learn = regression_learner(tmp_path, metrics=[Scripted(scores)])
    fit(learn, len(scores), cbs=[save, log])

    best = save.best_record
    assert best.epoch == 4 and best.raw_score == pytest.approx(0.7)
    assert best.score == pytest.approx(0.65)
    assert same(weights(learn), log.weights[4])


def test_several_monitors_keep_a_best_for_each(tmp_path):
    scores = [0.3, 0.5, 0.4]
    save, log = SaveBestModelCallback(monitor=["score", "valid_loss"]), WeightLog()
    learn = regression_learner(tmp_path, metrics=[Scripted(scores)])
    fit(learn, len(scores), cbs=[save, log])

    manifest = load_manifest(tmp_path / "models")
    assert save.best_record.epoch == 1 and manifest.best.monitor == "score"
    losses = [values[1] for values in learn.recorder.values]
    by_loss = manifest.best_for("valid_loss")
    assert by_loss.epoch == losses.index(min(losses))
    assert same(torch.load(fetch(by_loss), weights_only=True), log.weights[by_loss.epoch])


def test_delta_keeps_every_epoch_near_the_best(tmp_path):
    scores = [0.5, 0.8, 0.76, 0.9, 0.86, 0.6]
    save = SaveBestModelCallback(monitor="score", delta=0.05)
    learn = regression_learner(tmp_path, metrics=[Scripted(scores)])
    fit(learn, len(scores), cbs=[save])
    assert sorted(r.epoch for r in save.kept) == [3, 4]
    assert {r.kind for r in save.kept} == {"best", "ensemble"}


def test_every_epoch_saves_on_schedule_and_loads_nothing(tmp_path, capsys):
    save, log = SaveBestModelCallback(monitor="score", every_epoch=True), WeightLog()
    learn = regression_learner(tmp_path, metrics=[Scripted([0.9, 0.1, 0.5, 0.2])])
    fit(learn, 4, cbs=[save, log])

    assert better_lines(capsys.readouterr().out) == []
    assert save.best_record is None
    assert [r.epoch for r in save.kept] == [0, 1, 2, 3]
    assert {r.kind for r in save.kept} == {"periodic"}
    assert checkpoints(tmp_path / "models") == {f"model_{e}.pth" for e in range(4)}
    assert same(weights(learn), log.weights[3])  # the final weights stay
    assert save.last_saved_metadata["epoch"] == 3
    for record in save.kept:
        assert same(torch.load(fetch(record), weights_only=True), log.weights[record.epoch])
        assert same(loaded(tmp_path, f"model_{record.epoch}"), log.weights[record.epoch])


def test_every_n_epochs_keeps_epochs_0_n_2n(tmp_path):
    save = SaveBestModelCallback(monitor="score", every_epoch=2)
    learn = regression_learner(tmp_path, metrics=[Scripted([0.9, 0.1, 0.5, 0.2, 0.3])])
    fit(learn, 5, cbs=[save])
    assert [r.epoch for r in save.kept] == [0, 2, 4]  # fastai's epoch % n == 0
    assert checkpoints(tmp_path / "models") == {"model_0.pth", "model_2.pth", "model_4.pth"}


def test_at_end_leaves_the_final_model_in_fname(tmp_path, capsys):
    save, log = SaveBestModelCallback(monitor="score", at_end=True), WeightLog()
    learn = regression_learner(tmp_path, metrics=[Scripted([0.2, 0.9, 0.5, 0.4])])
    fit(learn, 4, cbs=[save, log])

    # As fastai's: the best is tracked and told, model.pth is the final model, and only it.
    assert better_lines(capsys.readouterr().out) == [
        "Better model found at epoch 0 with score value: 0.2.",
        "Better model found at epoch 1 with score value: 0.9.",
    ]
    assert save.best == 0.9 and save.best_record is None
    assert same(weights(learn), log.weights[3])  # not the best: at_end keeps the final model
    assert checkpoints(tmp_path / "models") == {"model.pth"}
    final = save.saver.last
    assert final.epoch == 3 and save.last_saved_path == tmp_path / "models" / "model.pth"
    assert same(loaded(tmp_path, "model"), log.weights[3])


def test_at_end_with_top_k_keeps_the_best_beside_the_final_model(tmp_path):
    save, log = SaveBestModelCallback(monitor="score", at_end=True, top_k=1), WeightLog()
    learn = regression_learner(tmp_path, metrics=[Scripted([0.2, 0.9, 0.5, 0.4])])
    fit(learn, 4, cbs=[save, log])
    assert checkpoints(tmp_path / "models") == {"model.pth", "model_1.pth"}
    assert same(loaded(tmp_path, "model"), log.weights[3])
    assert same(loaded(tmp_path, "model_1"), log.weights[1])


def test_with_opt_round_trip(tmp_path):
    save, log = SaveBestModelCallback(monitor="score", with_opt=True), WeightLog()
    learn = regression_learner(tmp_path, metrics=[Scripted([0.2, 0.9, 0.5])])
    fit(learn, 3, cbs=[save, log])

    best = save.best_record
    state = torch.load(fetch(best), weights_only=True)  # no pickled classes, even with opt
    assert set(state) == {"model", "opt"}
    assert same(state["model"], log.weights[1])

    # fastai's own Learner.load reads it, optimizer state included ...
    other = regression_learner(tmp_path)
    other.create_opt()
    other.load("model", with_opt=True)
    assert same(weights(other), log.weights[1])
    saved_opt = state["opt"]["state"]
    loaded_opt = other.opt.state_dict()["state"]
    assert len(loaded_opt) == len(saved_opt) > 0
    for a, b in zip(saved_opt, loaded_opt):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    # ... and so does the callback, into a fresh learner.
    fresh = regression_learner(tmp_path)
    fresh_save = SaveBestModelCallback(monitor="score", with_opt=True)
    fresh.add_cb(fresh_save)
    fresh_save.load_record(best)
    assert same(weights(fresh), log.weights[1])
    assert type(fresh.opt.hypers).__name__ == "L"


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors(v)]
    return []


def test_the_best_is_loaded_from_memory_when_it_was_the_latest_save(tmp_path):
    save, log = SaveBestModelCallback(monitor="score", with_opt=True), WeightLog()
    learn = regression_learner(tmp_path, metrics=[Scripted([0.2, 0.9, 0.5])])
    fit(learn, 3, cbs=[save, log])

    best = save.best_record
    held = save._saver.held_state(best)
    assert held is not None  # epoch 1 was the latest save: its state never left memory
    assert same(weights(learn), log.weights[1])
    state = torch.load(fetch(best), weights_only=True)
    saved, loaded = state["opt"]["state"], learn.opt.state_dict()["state"]
    assert len(saved) == len(loaded) > 0
    for a, b in zip(saved, loaded):
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    # The learner holds copies: the next save reuses the saver's buffers.
    buffers = {t.data_ptr() for t in tensors(held)}
    ours = tensors(learn.model.state_dict()) + tensors(learn.opt.state_dict())
    assert not buffers & {t.data_ptr() for t in ours}


def test_the_best_is_read_from_its_file_when_a_later_save_reused_the_memory(tmp_path):
    save, log = SaveBestModelCallback(monitor="score", save_last=True), WeightLog()
    learn = regression_learner(tmp_path, metrics=[Scripted([0.2, 0.9, 0.5])])
    fit(learn, 3, cbs=[save, log])
    assert save._saver.held_state(save.best_record) is None  # `last` of epoch 2 came after
    assert same(weights(learn), log.weights[1])


def test_reset_on_fit_starts_every_fit_afresh(tmp_path, capsys):
    script = Scripted([0.5, 0.9])
    save, log = SaveBestModelCallback(monitor="score"), WeightLog()
    learn = regression_learner(tmp_path, metrics=[script], cbs=[save, log])
    fit(learn, 2)
    script.values = [0.3, 0.4]  # worse than the first fit's best
    with pytest.warns(BestSaveWarning, match="Starting a new run there"):
        fit(learn, 2)

    assert better_lines(capsys.readouterr().out)[-2:] == [
        "Better model found at epoch 0 with score value: 0.3.",
        "Better model found at epoch 1 with score value: 0.4.",
    ]
    assert save.best_record.score == 0.4
    # As fastai's: model.pth now holds the second fit's best.
    assert checkpoints(tmp_path / "models") == {"model.pth"}
    assert same(loaded(tmp_path, "model"), log.weights[1])
    assert same(weights(learn), log.weights[1])


def test_without_reset_on_fit_a_later_fit_must_beat_the_best(tmp_path, capsys):
    script = Scripted([0.5, 0.9])
    save, log = SaveBestModelCallback(monitor="score", reset_on_fit=False), WeightLog()
    learn = regression_learner(tmp_path, metrics=[script], cbs=[save, log])
    fit(learn, 2)
    first_best = log.weights[1]
    capsys.readouterr()
    script.values = [0.3, 0.4]
    fit(learn, 2)

    assert better_lines(capsys.readouterr().out) == []
    assert save.best_record.score == 0.9
    assert same(weights(learn), first_best)  # the first fit's best is loaded again


def test_accum_metrics_matthews_and_roc_auc(tmp_path):
    metrics = [accuracy, MatthewsCorrCoef(), RocAucBinary()]
    save, log = SaveBestModelCallback(monitor="matthews_corrcoef", top_k=2), WeightLog()
    learn = classification_learner(tmp_path, metrics=metrics)
    fit(learn, 6, cbs=[save, log], lr=0.02)

    names = list(learn.recorder.metric_names[1:-1])
    assert names == ["train_loss", "valid_loss", "accuracy", "matthews_corrcoef", "roc_auc_score"]
    mcc = [v[names.index("matthews_corrcoef")] for v in learn.recorder.values]
    best = save.best_record
    assert best.epoch == mcc.index(max(mcc)) and best.score == pytest.approx(max(mcc))
    values = dict(zip(names, learn.recorder.values[best.epoch]))
    assert {k: best.metrics[k] for k in names} == pytest.approx(values)
    assert same(weights(learn), log.weights[best.epoch])


def test_patience_stops_fit(tmp_path, capsys):
    scores = [0.5, 0.6, 0.55, 0.58, 0.9, 0.95, 0.99, 1.0]
    save, log = SaveBestModelCallback(monitor="score", patience=2), WeightLog()
    learn = regression_learner(tmp_path, metrics=[Scripted(scores)])
    fit(learn, len(scores), cbs=[save, log])

    assert len(learn.recorder.values) == 4  # epochs 2 and 3 did not improve on epoch 1
    assert "No improvement since epoch 1: early stopping" in capsys.readouterr().out
    assert save.best_record.epoch == 1
    assert same(weights(learn), log.weights[1])  # the best is loaded after the stop too


def test_missing_monitor_names_the_recorder_values(tmp_path):
    learn = regression_learner(tmp_path, metrics=[Scripted([0.1, 0.2])])
    with pytest.raises(MissingMetricError) as error:
        fit(learn, 2, cbs=[SaveBestModelCallback(monitor="acuracy")])
    message = str(error.value)
    assert "'train_loss'" in message and "'valid_loss'" in message and "'score'" in message
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    ("monitor", "scores", "min_delta"),
    [
        ("score", [0.5, 0.7, 0.6, 0.7, 0.9, 0.8], 0.0),
        ("score", [0.5, 0.7, 0.75, 0.9, 0.95, 0.8], 0.1),
        ("valid_loss", None, 0.0),
    ],
)
def test_parity_with_fastai_save_model_callback(tmp_path, monitor, scores, min_delta):
    """The same run through fastai's SaveModelCallback and through ours: the same epochs are
    saved and the same weights are in the learner at the end."""
    runs = {}
    for name, cls in (("fastai", SaveModelCallback), ("bestsave", SaveBestModelCallback)):
        metrics = [Scripted(scores)] if scores else []
        save, log, bests = cls(monitor=monitor, min_delta=min_delta), WeightLog(), NewBestLog()
        learn = regression_learner(tmp_path / name, metrics=metrics)
        fit(learn, 6, cbs=[save, log, bests], lr=0.3)
        runs[name] = (bests.epochs, weights(learn), log.weights)

    (fa_epochs, fa_final, fa_log), (bs_epochs, bs_final, bs_log) = runs["fastai"], runs["bestsave"]
    assert all(same(fa_log[e], bs_log[e]) for e in fa_log)  # the two runs trained alike
    assert bs_epochs == fa_epochs and fa_epochs
    assert same(bs_final, fa_final)
    assert same(bs_final, bs_log[bs_epochs[-1]])


# -- drop-in for fastai's SaveModelCallback -----------------------------------------------------


def through_both(tmp_path: Path, fits: list, metrics=list) -> dict[str, Learner]:
    """The same training through fastai's SaveModelCallback and through ours, each in its own
    learner path: ``fits`` is a list of (n_epoch, callback arguments), one fit each, a new
    callback each time, one learner."""
    learners = {}
    for name, cls in (("fastai", SaveModelCallback), ("bestsave", SaveBestModelCallback)):
        learn = regression_learner(tmp_path / name, metrics=metrics())
        for n_epoch, kwargs in fits:
            fit(learn, n_epoch, cbs=[cls(**kwargs)], lr=0.3)
        learners[name] = learn
    return learners


@pytest.mark.parametrize(
    "fits",
    [
        [(4, {})],
        [(3, {"with_opt": True})],
        [(4, {"fname": "end", "at_end": True})],
        [(3, {"every_epoch": True})],
        [(5, {"every_epoch": 2})],
        [(3, {}), (3, {})],  # training in stages, a new callback each time
        [(2, {}), (2, {"fname": "end", "at_end": True}), (2, {"every_epoch": True})],
        [(3, {"monitor": "train_loss", "fname": "by_train"}), (3, {})],
    ],
    ids=["best", "with_opt", "at_end", "every_epoch", "every_2", "stages", "fnames", "monitors"],
)
def test_models_holds_what_fastai_would_hold(tmp_path, fits):
    """What a user of fastai's callback looks at: the names in models/, and what
    learn.load(name) reads from each (and what the learner holds after the last fit)."""
    learners = through_both(tmp_path, fits)
    stock, ours = tmp_path / "fastai", tmp_path / "bestsave"
    names = checkpoints(stock / "models")
    assert checkpoints(ours / "models") == names
    for name in names:
        stem = name.removesuffix(".pth")
        assert same(loaded(ours, stem), loaded(stock, stem)), name
    assert same(weights(learners["bestsave"]), weights(learners["fastai"]))


def test_same_best_epochs_as_fastai_with_min_delta(tmp_path, capsys):
    scores = [0.5, 0.7, 0.75, 0.9, 0.95, 0.8]
    learners = through_both(
        tmp_path, [(6, {"monitor": "score", "min_delta": 0.1})], lambda: [Scripted(scores)]
    )
    out = better_lines(capsys.readouterr().out)
    assert (
        out[:3]
        == out[3:]
        == [
            "Better model found at epoch 0 with score value: 0.5.",
            "Better model found at epoch 1 with score value: 0.7.",
            "Better model found at epoch 3 with score value: 0.9.",
        ]
    )
    assert same(loaded(tmp_path / "bestsave", "model"), loaded(tmp_path / "fastai", "model"))
    assert same(weights(learners["bestsave"]), weights(learners["fastai"]))


def test_fits_in_stages_warn_and_each_replaces_the_earlier(tmp_path):
    learn, log = regression_learner(tmp_path), WeightLog()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(2, cbs=[SaveBestModelCallback(), log])
        first = sha256(tmp_path / "models" / "model.pth")
        with pytest.warns(BestSaveWarning, match=r"holds run .*'model'.*Starting a new run"):
            learn.fit_one_cycle(3, cbs=[SaveBestModelCallback(), log])
    losses = [v[1] for v in learn.recorder.values]  # the second stage's
    best = int(np.argmin(losses))
    assert checkpoints(tmp_path / "models") == {"model.pth"}
    assert sha256(tmp_path / "models" / "model.pth") != first
    assert same(loaded(tmp_path, "model"), log.weights[best])
    assert same(weights(learn), log.weights[best])
    assert load_manifest(tmp_path / "models").best.epoch == best


class FileLog(Callback):
    """The sha256 of models/model.pth after each epoch, once the savers ran."""

    order = 70

    def __init__(self) -> None:
        self.hashes: list[str | None] = []

    def after_epoch(self) -> None:
        path = Path(self.learn.path) / self.learn.model_dir / "model.pth"
        self.hashes.append(sha256(path) if path.exists() else None)


class CrashAt(Callback):
    """Raises at the end of one epoch, before the savers see it."""

    order = 56

    def __init__(self, epoch: int) -> None:
        self.at = epoch

    def after_epoch(self) -> None:
        if self.epoch == self.at:
            raise RuntimeError("boom")


def test_the_earlier_best_stays_until_the_new_run_keeps_its_first_file(tmp_path):
    script, log = Scripted([0.2, 0.9]), WeightLog()
    learn = regression_learner(tmp_path, metrics=[script], cbs=[log])
    fit(learn, 2, cbs=[SaveBestModelCallback(monitor="score")])
    model = tmp_path / "models" / "model.pth"
    earlier, earlier_best = sha256(model), log.weights[1]

    # A new run whose first epoch keeps nothing (no valid score), then crashes: the earlier
    # run's best is whole, learn.load("model") still reads it.
    script.values = [float("nan"), 0.5]
    files_log = FileLog()
    with pytest.warns(BestSaveWarning), pytest.raises(RuntimeError, match="boom"):
        fit(learn, 2, cbs=[SaveBestModelCallback(monitor="score"), files_log, CrashAt(1)])
    assert files_log.hashes == [earlier]
    assert checkpoints(tmp_path / "models") == {"model.pth"} and sha256(model) == earlier
    assert same(loaded(tmp_path, "model"), earlier_best)
    assert load_manifest(tmp_path / "models").best.score == 0.9

    # The next run keeps its first file: then, and only then, the earlier one is gone.
    script.values = [float("nan"), 0.5, 0.4]
    files_log = FileLog()
    with pytest.warns(BestSaveWarning):
        fit(learn, 3, cbs=[SaveBestModelCallback(monitor="score"), files_log])
    assert files_log.hashes[0] == earlier
    assert checkpoints(tmp_path / "models") == {"model.pth"}
    assert same(loaded(tmp_path, "model"), log.weights[1])  # this run's epoch 1
    assert load_manifest(tmp_path / "models").best.score == 0.5


def test_a_new_run_deletes_the_files_of_the_earlier_run_of_its_name(tmp_path):
    """The one difference in models/ from fastai's callback: a file an earlier run of the same
    name kept and the new run does not write again is deleted, where fastai leaves it."""
    learners = through_both(tmp_path, [(3, {"every_epoch": True}), (1, {"every_epoch": True})])
    assert checkpoints(tmp_path / "fastai" / "models") == {f"model_{e}.pth" for e in range(3)}
    assert checkpoints(tmp_path / "bestsave" / "models") == {"model_0.pth"}
    assert same(loaded(tmp_path / "bestsave", "model_0"), weights(learners["bestsave"]))


def test_several_fnames_are_several_runs_in_models(tmp_path):
    learn = regression_learner(tmp_path, metrics=[Scripted([0.2, 0.9, 0.5])])
    fit(learn, 3, cbs=[SaveBestModelCallback()])
    fit(learn, 3, cbs=[SaveBestModelCallback(monitor="score", fname="by_score", top_k=2)])
    fit(learn, 3, cbs=[SaveBestModelCallback(fname="end", at_end=True)])
    models = tmp_path / "models"
    assert checkpoints(models) == {"model.pth", "by_score_1.pth", "by_score_2.pth", "end.pth"}
    assert {p.name for p in (models / ".bestsave").iterdir()} == {"model", "by_score_epoch", "end"}
    assert load_manifest(models, run="by_score_epoch").best.name == "by_score_1.pth"
    with pytest.raises(ValueError, match="run"):
        load_manifest(models)


def test_a_model_pth_from_outside_bestsave_is_replaced_as_fastai_would(tmp_path):
    learn, log = regression_learner(tmp_path, metrics=[Scripted([0.2, 0.9, 0.5])]), WeightLog()
    learn.save("model")  # or a run of fastai's own SaveModelCallback
    fit(learn, 3, cbs=[SaveBestModelCallback(monitor="score"), log])
    assert checkpoints(tmp_path / "models") == {"model.pth"}
    assert same(loaded(tmp_path, "model"), log.weights[1])


class SaveModelSeen(Callback):
    """Whether ``learn.save_model`` was the given callback at every epoch."""

    def __init__(self, save: Callback) -> None:
        self.save, self.seen = save, []

    def after_epoch(self) -> None:
        self.seen.append(getattr(self.learn, "save_model", None) is self.save)


@pytest.mark.parametrize("cls", [SaveModelCallback, SaveBestModelCallback])
def test_learn_save_model_is_the_callback(tmp_path, cls):
    # Passed to Learner(cbs=...): learn.save_model during and after every fit.
    save = cls()
    learn = regression_learner(tmp_path, cbs=[save])
    seen = SaveModelSeen(save)
    fit(learn, 2, cbs=[seen])
    assert seen.seen == [True, True] and learn.save_model is save
    # Passed to one fit: learn.save_model during it; fastai removes it after.
    save = cls()
    learn = regression_learner(tmp_path / "fit")
    seen = SaveModelSeen(save)
    fit(learn, 2, cbs=[save, seen])
    assert seen.seen == [True, True] and not hasattr(learn, "save_model")


def test_the_callback_object_holds_the_best_after_fit(tmp_path):
    save = SaveBestModelCallback()
    learn = synth_learner(n_trn=2, path=tmp_path)
    with learn.no_bar(), learn.no_logging():
        learn.fit(3, cbs=[save])
    losses = [v[1] for v in learn.recorder.values]
    assert save.best_record.epoch == int(np.argmin(losses))
    assert save.best_record.metrics["valid_loss"] == pytest.approx(min(losses))
    assert save.best_record.path == str(tmp_path / "models" / "model.pth")


# -- robustness ---------------------------------------------------------------------------------


def test_validate_after_fit_changes_nothing(tmp_path):
    """learn.validate() sends before_fit, after_epoch and after_fit to every callback; fastai's
    own SaveModelCallback fails there, ours must neither save, reset nor load."""
    save = SaveBestModelCallback(monitor="score")
    learn = regression_learner(tmp_path, metrics=[Scripted([0.1, 0.9, 0.2])], cbs=[save])
    fit(learn, 3)
    folder = tmp_path / "models"
    before, best_weights = files(folder), weights(learn)
    with torch.no_grad():
        learn.model.weight.add_(1.0)
    moved = weights(learn)
    with learn.no_bar():
        learn.validate()
    assert files(folder) == before
    assert same(weights(learn), moved) and not same(moved, best_weights)


class ValidateEachEpoch(Callback):
    """Calls learn.validate() from inside the fit, after the savers saw the epoch (before them,
    the nested validate would replace the Recorder's values, for every tracker)."""

    order, busy = 62, False

    def after_epoch(self) -> None:
        if not self.busy:  # validate() sends after_epoch to this callback too
            self.busy = True
            self.learn.validate()
            self.busy = False


def test_validate_inside_a_fit_changes_nothing(tmp_path):
    save, log = SaveBestModelCallback(monitor="score", top_k=2), WeightLog()
    learn = regression_learner(tmp_path, metrics=[Scripted([0.2, 0.9, 0.5, 0.7])])
    fit(learn, 4, cbs=[save, log, ValidateEachEpoch()])
    assert [r.epoch for r in save.kept] == [1, 3]
    assert same(weights(learn), log.weights[1])


class Crash(Callback):
    order = 56

    def after_epoch(self) -> None:
        if self.epoch == 1:
            raise RuntimeError("boom")


def test_a_fit_after_a_crashed_fit_starts_afresh(tmp_path):
    script = Scripted([0.9, 0.95, 0.1])
    save, log = SaveBestModelCallback(monitor="score"), WeightLog()
    learn = regression_learner(tmp_path, metrics=[script], cbs=[save, log])
    with pytest.raises(RuntimeError, match="boom"):
        fit(learn, 3, cbs=[Crash()])
    script.values = [0.3, 0.5, 0.4]
    fit(learn, 3)
    assert save.best_record.score == 0.5 and [r.epoch for r in save.kept] == [1]
    assert same(weights(learn), log.weights[1])


def test_resume_keeps_the_earlier_best(tmp_path):
    first, log = SaveBestModelCallback(monitor="score"), WeightLog()
    learn = regression_learner(tmp_path, metrics=[Scripted([0.5, 0.9, 0.6])])
    fit(learn, 3, cbs=[first, log])
    earlier_best = log.weights[1]

    # Restarted at epoch 1 (fastai skips epoch 0): the earlier best is still the one to beat.
    resumed = SaveBestModelCallback(monitor="score", resume=True)
    learn = regression_learner(tmp_path, metrics=[Scripted([0.0, 0.7, 0.8])])
    fit(learn, 3, cbs=[resumed], start_epoch=1)
    assert resumed.best_record.score == 0.9 and resumed.best_record.epoch == 1
    assert resumed.saver.evaluations == 3 + 2 and resumed.saver.last_epoch == 2
    assert same(weights(learn), earlier_best)
    assert same(loaded(tmp_path, "model"), earlier_best)


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    scores = [0.2, 0.9, 0.5]
    rank0 = SaveBestModelCallback(monitor="score")
    learn = regression_learner(tmp_path, metrics=[Scripted(scores)])
    fit(learn, 3, cbs=[rank0])
    folder = tmp_path / "models"
    before = files(folder)

    # A second process of the same run: it reaches the same decisions, writes nothing, and
    # loads the best that rank 0 wrote.
    monkeypatch.setenv("RANK", "1")
    rank1 = SaveBestModelCallback(monitor="score")
    other = regression_learner(tmp_path, metrics=[Scripted(scores)])
    fit(other, 3, cbs=[rank1])
    assert files(folder) == before
    assert rank1.saver.writer is False and rank1.best_record.epoch == 1
    assert same(weights(other), weights(learn))


_X = torch.randn(32, 3)


def _x(i: int) -> torch.Tensor:
    return _X[i]


def _y(i: int) -> torch.Tensor:
    return _X[i].sum(0, keepdim=True)


def test_export_pickles_the_learner(tmp_path):
    # learn.export() needs fastai Datasets (it empties them), not a list of pairs.
    dsets = Datasets(
        list(range(32)), tfms=[[_x], [_y]], splits=[list(range(24)), list(range(24, 32))]
    )
    save = SaveBestModelCallback(monitor="score")
    learn = Learner(
        dsets.dataloaders(bs=8, device="cpu"),
        nn.Linear(3, 1),
        loss_func=nn.MSELoss(),
        metrics=[Scripted([0.2, 0.9])],
        cbs=[save],
        path=tmp_path,
    )
    fit(learn, 2)
    learn.export("export.pkl")
    loaded = load_learner(tmp_path / "export.pkl")
    assert isinstance(loaded.save_model, SaveBestModelCallback)
    assert loaded.save_model.saver is None and loaded.save_model.fname == "model"


def test_loading_checks_the_file_and_runs_no_pickled_code(tmp_path):
    save = SaveBestModelCallback(monitor="score")
    learn = regression_learner(tmp_path, metrics=[Scripted([0.2, 0.9])], cbs=[save])
    fit(learn, 2)
    best = save.best_record

    # A changed file is refused before it is read.
    Path(best.path).write_bytes(Path(best.path).read_bytes()[:-8] + b"tampered")
    with pytest.raises(ChecksumError):
        save.load_record(best)

    # A pickle that would run code is refused by torch.load(weights_only=True).
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "ran"
    with open(evil, "wb") as f:
        pickle.dump(_Evil(str(marker)), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        save.load_record(replace(best, path=str(evil), sha256="", bytes=0))
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_arguments_are_checked_up_front():
    with pytest.raises(ValueError, match="comp"):
        SaveBestModelCallback(comp=np.equal)
    with pytest.raises(ValueError, match="every_epoch and at_end"):
        SaveBestModelCallback(every_epoch=True, at_end=True)
    with pytest.raises(ValueError, match="every_epoch must be"):
        SaveBestModelCallback(every_epoch=-2)
    with pytest.raises(ValueError, match="top_k"):
        SaveBestModelCallback(top_k=-2)
    with pytest.raises(ValueError, match="patience"):
        SaveBestModelCallback(patience=0)
    with pytest.raises(ValueError, match="min_delta"):
        SaveBestModelCallback(min_delta=-0.1)
    with pytest.raises(ValueError, match="fname must be a plain file name"):
        SaveBestModelCallback(fname="a/b")
    with pytest.raises(ValueError, match="filename template"):
        SaveBestModelCallback(filename="a/{epoch}")


# -- the direction of the monitored value --------------------------------------------------------


@pytest.mark.parametrize(
    ("monitor", "comp"),
    [
        ("valid_loss", np.less),
        ("train_loss", np.less),
        ("error_rate", np.less),
        ("accuracy", np.greater),
        ("matthews_corrcoef", np.greater),
        ("roc_auc_score", np.greater),
    ],
)
def test_mode_of_known_names_is_fastais_without_a_word(monitor, comp):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = SaveBestModelCallback(monitor=monitor)
    assert ours.comp is comp is SaveModelCallback(monitor=monitor).comp


@pytest.mark.parametrize("monitor", ["my_metric", "crossentropyloss", "top_errorness"])
def test_mode_of_unknown_names_follows_fastai_with_a_warning(monitor):
    with pytest.warns(BestSaveWarning, match=f"cannot tell from its name whether '{monitor}'"):
        ours = SaveBestModelCallback(monitor=monitor)
    assert ours.comp is SaveModelCallback(monitor=monitor).comp
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SaveBestModelCallback(monitor=monitor, comp=np.less).comp is np.less


def test_mode_of_errors_fastai_would_maximise_is_min():
    # fastai maximises a name without "loss" or "error": its rmse metric, say.
    assert SaveModelCallback(monitor="rmse").comp is np.greater
    assert SaveBestModelCallback(monitor="rmse").comp is np.less


@pytest.mark.parametrize("budget, step", [(1, "streaming"), (None, "two sets")])
def test_staging_memory_bounds_the_copies_and_the_record_says_how(tmp_path, budget, step):
    scores = [0.3, 0.5, 0.4, 0.6, 0.55]
    save = SaveBestModelCallback(monitor="score", with_opt=True, staging_memory=budget)
    log = WeightLog()
    fit(regression_learner(tmp_path, metrics=[Scripted(scores)]), len(scores), cbs=[save, log])

    best = save.best_record
    assert (best.epoch, best.staging) == (3, step)
    assert same(torch.load(fetch(best), weights_only=True)["model"], log.weights[3])
