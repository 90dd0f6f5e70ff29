"""BestCheckpoint with a real Lightning Trainer on CPU.

The monitored metric follows a script (``val_score = script[epoch]``), so which epochs are kept
is known in advance; the weights are real, captured at every epoch and compared with the files.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pickle
import subprocess
import sys
from copy import deepcopy
from datetime import timedelta
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from bestsave import BestSaveWarning, MissingMetricError, load_manifest
from bestsave.adapters.lightning import BestCheckpoint
from bestsave.verify import load_history

DATA = Path(__file__).parent / "data" / "lightning"
sys.path.insert(0, str(DATA))
scripted = importlib.import_module("lightning_scripted")
ScriptedModel, CaptureWeights = scripted.ScriptedModel, scripted.CaptureWeights
trainer_for, fit = scripted.trainer_for, scripted.fit

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated.*"),
]


def kept_epochs(dirpath, kinds=("best", "top_k", "ensemble")):
    return sorted(r.epoch for r in load_manifest(dirpath).kept if r.kind in kinds)


def history(dirpath):
    return load_history(dirpath)


def assert_weights(path, expected):
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key


# -- the Trainer's checkpoint callback -------------------------------------------------------------


def test_top1_best_file_holds_best_epochs_weights_metrics_and_hparams(tmp_path):
    checkpoint = BestCheckpoint(monitor="val_score", mode="max")
    trainer, _, weights = fit(tmp_path, [0.2, 0.6, 0.4, 0.5], checkpoint)

    assert trainer.checkpoint_callback is checkpoint
    assert trainer.checkpoint_callbacks == [checkpoint]  # no default ModelCheckpoint beside it
    assert checkpoint.dirpath == os.path.realpath(tmp_path / "checkpoints")
    best = checkpoint.best_record
    assert best.epoch == 1 and best.kind == "best"
    assert checkpoint.best_model_path == best.path
    assert os.path.basename(best.path) == "epoch=1-step=8.ckpt"  # Lightning's default name
    assert checkpoint.best_model_score.item() == pytest.approx(0.6)
    assert os.listdir(checkpoint.dirpath).count("epoch=1-step=8.ckpt") == 1
    assert kept_epochs(checkpoint.dirpath) == [1]
    assert_weights(best.path, weights[1])

    # Everything logged at that evaluation, train and validation, plus the hyperparameters.
    assert set(best.metrics) >= {"train_loss", "val_loss", "val_score"}
    assert best.metrics["val_score"] == pytest.approx(0.6)
    assert best.step == 8
    assert best.run["framework"] == "lightning"
    assert best.run["hparams"]["script"] == [0.2, 0.6, 0.4, 0.5]
    assert best.run["hparams"]["lr"] == 0.05

    loaded = ScriptedModel.load_from_checkpoint(checkpoint.best_model_path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, weights[1][key]), key
    assert list(loaded.hparams.script) == [0.2, 0.6, 0.4, 0.5]


def test_top_k_keeps_the_k_best_and_exposes_model_checkpoint_attributes(tmp_path):
    checkpoint = BestCheckpoint(
        monitor="val_score", mode="max", save_top_k=2, filename="{epoch}-{val_score:.2f}"
    )
    _, _, weights = fit(tmp_path, [0.1, 0.5, 0.3, 0.4, 0.2], checkpoint)

    dirpath = checkpoint.dirpath
    assert kept_epochs(dirpath) == [1, 3]
    assert sorted(n for n in os.listdir(dirpath) if n.endswith(".ckpt")) == [
        "epoch=1-val_score=0.50.ckpt",
        "epoch=3-val_score=0.40.ckpt",
    ]
    paths = {os.path.basename(p): v.item() for p, v in checkpoint.best_k_models.items()}
    assert paths == pytest.approx(
        {"epoch=1-val_score=0.50.ckpt": 0.5, "epoch=3-val_score=0.40.ckpt": 0.4}
    )
    assert os.path.basename(checkpoint.kth_best_model_path) == "epoch=3-val_score=0.40.ckpt"
    assert checkpoint.kth_value.item() == pytest.approx(0.4)
    assert checkpoint.current_score.item() == pytest.approx(0.2)
    assert checkpoint.last_model_path == ""
    for record in load_manifest(dirpath).kept:
        assert_weights(record.path, weights[record.epoch])


def test_delta_ensemble_keeps_every_epoch_near_the_best(tmp_path):
    script = [0.5, 0.8, 0.78, 0.6, 0.82, 0.76, 0.79]
    uncapped = BestCheckpoint(dirpath=tmp_path / "all", monitor="val_score", mode="max", delta=0.05)
    fit(tmp_path, script, uncapped)
    # Within 0.05 of the best seen so far: 0.82 at epoch 4 pushes 0.76 out, 0.79 joins.
    assert kept_epochs(uncapped.dirpath) == [1, 2, 4, 6]
    assert uncapped.best_record.epoch == 4
    assert {r.kind for r in load_manifest(uncapped.dirpath).kept} == {"best", "ensemble"}

    capped = BestCheckpoint(
        dirpath=tmp_path / "capped", monitor="val_score", mode="max", delta=0.05, save_top_k=3
    )
    fit(tmp_path, script, capped)
    assert kept_epochs(capped.dirpath) == [1, 4, 6]  # the worst member leaves first


def test_every_n_epochs_says_how_often_to_check(tmp_path):
    checkpoint = BestCheckpoint(monitor="val_score", mode="max", every_n_epochs=2)
    # The best score (0.9 at epoch 2) is never checked: only epochs 1, 3 and 5 are.
    fit(tmp_path, [0.1, 0.3, 0.9, 0.5, 0.95, 0.4], checkpoint)
    assert [line["epoch"] for line in history(checkpoint.dirpath)] == [1, 3, 5]
    assert kept_epochs(checkpoint.dirpath) == [3]


@pytest.mark.parametrize("save_last", [True, "link"])
def test_save_last_keeps_a_full_state_last_and_resolves_ckpt_path_last(tmp_path, save_last):
    checkpoint = BestCheckpoint(monitor="val_score", mode="max", save_last=save_last)
    trainer, model, weights = fit(tmp_path, [0.2, 0.6, 0.4, 0.7], checkpoint)

    last = os.path.join(checkpoint.dirpath, "last.ckpt")
    assert checkpoint.last_model_path == last
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["epoch"] == 3 and "optimizer_states" in state and "loops" in state
    assert_weights(last, weights[3])
    # The last evaluation was also the best: last.ckpt is that file, not a second copy.
    assert os.stat(last).st_ino == os.stat(checkpoint.best_model_path).st_ino

    trainer.test(model, ckpt_path="last", verbose=False)
    assert trainer.ckpt_path == last
    for key, value in model.test_weights.items():
        assert torch.equal(value, weights[3][key]), key


def test_save_weights_only_keeps_weights_and_a_full_last(tmp_path):
    checkpoint = BestCheckpoint(
        monitor="val_score", mode="max", save_weights_only=True, save_last=True
    )
    _, _, weights = fit(tmp_path, [0.2, 0.6, 0.4], checkpoint)

    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
    assert "optimizer_states" not in best and "callbacks" not in best
    assert_weights(checkpoint.best_model_path, weights[1])
    last = torch.load(checkpoint.last_model_path, map_location="cpu", weights_only=False)
    assert "optimizer_states" in last  # last is for resuming
    loaded = ScriptedModel.load_from_checkpoint(checkpoint.best_model_path)
    assert torch.equal(loaded.layer.weight, weights[1]["layer.weight"])


def test_patience_stops_training_through_trainer_should_stop(tmp_path):
    checkpoint = BestCheckpoint(monitor="val_score", mode="max", patience=3)
    trainer, _, _ = fit(tmp_path, [0.5, 0.7, 0.6, 0.65, 0.68, 0.9, 0.95], checkpoint)
    assert trainer.should_stop
    assert [line["epoch"] for line in history(checkpoint.dirpath)] == [0, 1, 2, 3, 4]
    assert checkpoint.best_record.epoch == 1


def test_trainer_test_ckpt_path_best_loads_the_best_epochs_weights(tmp_path):
    checkpoint = BestCheckpoint(monitor="val_loss_scripted", mode="min", save_top_k=2)
    trainer, model, weights = fit(
        tmp_path, [0.9, 0.4, 0.6, 0.5], checkpoint, model_kwargs={"monitor": "val_loss_scripted"}
    )
    trainer.test(model, ckpt_path="best", verbose=False)
    assert trainer.ckpt_path == checkpoint.best_model_path
    assert checkpoint.best_record.epoch == 1
    for key, value in model.test_weights.items():
        assert torch.equal(value, weights[1][key]), key
    # Loading the best for testing does not rewind the run's state.
    assert checkpoint.best_record.epoch == 1 and len(checkpoint.best_k_models) == 2


def test_resume_in_a_new_trainer_continues_best_kept_set_and_patience(tmp_path):
    script = [0.3, 0.9, 0.5, 0.6, 0.7, 0.8, 0.95]

    def callback():
        return BestCheckpoint(
            dirpath=tmp_path / "ckpt",
            monitor="val_score",
            mode="max",
            save_top_k=2,
            patience=3,
            save_last=True,
        )

    first = callback()
    fit(tmp_path, script, first, max_epochs=3)
    assert kept_epochs(first.dirpath) == [1, 2]
    best_sha = first.best_record.sha256

    second = callback()
    trainer, _, weights = fit(tmp_path, script, second, max_epochs=len(script), ckpt_path="last")
    assert trainer.ckpt_path == first.last_model_path  # "last" resolves to our last.ckpt
    # A fresh saver would call epoch 3 (0.6) the best. The resumed one keeps epoch 1, keeps
    # the two best of the whole run, and stops when the third evaluation since epoch 1 fails.
    assert second.best_record.epoch == 1 and second.best_record.sha256 == best_sha
    assert second.best_model_score.item() == pytest.approx(0.9)
    assert kept_epochs(second.dirpath) == [1, 4]
    assert [line["epoch"] for line in history(second.dirpath)] == [0, 1, 2, 3, 4]
    assert trainer.should_stop
    assert_weights(load_manifest(second.dirpath).kept[1].path, weights[4])
    assert not any("epoch=2" in n for n in os.listdir(second.dirpath))


def test_a_second_fit_in_the_same_directory_starts_afresh_as_model_checkpoint_does(tmp_path):
    first = BestCheckpoint(monitor="val_score", mode="max", save_top_k=2)
    fit(tmp_path, [0.2, 0.4, 0.3], first)
    earlier = set(first.best_k_models)
    # A NaN first epoch keeps nothing: the earlier run stays whole until the new one keeps a file.
    again = BestCheckpoint(monitor="val_score", mode="max", save_top_k=2)
    with pytest.warns(BestSaveWarning, match=r"stays whole until this one keeps its first"):
        fit(tmp_path, [math.nan], again, max_epochs=1)
    assert load_manifest(again.dirpath).best.path == first.best_model_path
    assert all(os.path.exists(p) for p in earlier)
    third = BestCheckpoint(monitor="val_score", mode="max", save_top_k=2)
    with pytest.warns(BestSaveWarning):
        fit(tmp_path, [0.5, 0.1], third)
    assert third.best_record.epoch == 0 and load_manifest(third.dirpath).best.epoch == 0
    names = sorted(n for n in os.listdir(third.dirpath) if n.endswith(".ckpt"))
    assert names == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]


# -- names, scores and errors --------------------------------------------------------------------


def test_metric_names_with_slashes_work_in_monitor_and_filename(tmp_path):
    checkpoint = BestCheckpoint(monitor="val/loss", save_top_k=2, filename="{epoch}-{val/loss:.3f}")
    assert checkpoint.mode == "min"  # inferred from the name
    fit(tmp_path, [0.9, 0.3, 0.5, 0.4], checkpoint, model_kwargs={"monitor": "val/loss"})
    names = sorted(n for n in os.listdir(checkpoint.dirpath) if n.endswith(".ckpt"))
    assert names == ["epoch=1-val_loss=0.300.ckpt", "epoch=3-val_loss=0.400.ckpt"]
    folders = [n for n in os.listdir(checkpoint.dirpath) if n != ".bestsave"]
    assert all(os.path.isfile(os.path.join(checkpoint.dirpath, n)) for n in folders)  # no "val/"
    assert checkpoint.best_record.metrics["val/loss"] == pytest.approx(0.3)

    plain = BestCheckpoint(
        dirpath=tmp_path / "plain",
        monitor="val/loss",
        filename="e{epoch}-{val/loss:.1f}",
        auto_insert_metric_name=False,
    )
    fit(tmp_path, [0.9, 0.3], plain, model_kwargs={"monitor": "val/loss"})
    assert os.path.basename(plain.best_model_path) == "e1-0.3.ckpt"


def test_nan_scores_warn_and_are_never_best_nor_kept(tmp_path):
    checkpoint = BestCheckpoint(monitor="val_score", mode="max", save_top_k=-1, verbose=True)
    with pytest.warns(BestSaveWarning, match="nan"):
        fit(tmp_path, [0.2, math.nan, 0.5, math.nan, 0.4], checkpoint)
    assert kept_epochs(checkpoint.dirpath) == [0, 2, 4]
    assert checkpoint.best_record.epoch == 2
    assert checkpoint.best_model_score.item() == pytest.approx(0.5)
    assert all(math.isfinite(v.item()) for v in checkpoint.best_k_models.values())
    assert [line["score"] for line in history(checkpoint.dirpath)][1] is None


def test_a_missing_monitor_names_what_was_logged(tmp_path):
    checkpoint = BestCheckpoint(monitor="val_scor", mode="max")
    with pytest.raises(MissingMetricError, match="val_score"):
        fit(tmp_path, [0.2, 0.4], checkpoint)


def test_a_name_the_table_cannot_place_is_min_as_in_lightning_with_a_warning():
    with pytest.warns(UserWarning, match=r"'early_stop_on'.*mode='min', ModelCheckpoint's default"):
        checkpoint = BestCheckpoint(monitor="early_stop_on")
    assert checkpoint.mode == "min"


def test_arguments_are_checked_at_construction():
    with pytest.raises(ValueError, match="patience"):
        BestCheckpoint(monitor="val_loss", patience=0)
    with pytest.raises(ValueError, match="delta"):
        BestCheckpoint(monitor="val_loss", delta=-1)
    with pytest.raises(ValueError, match="path separator"):
        BestCheckpoint(monitor="val_loss", filename="sub/{epoch}")
    with pytest.raises(Exception, match="save_top_k"):
        BestCheckpoint(monitor="val_loss", save_top_k=-2)


def test_save_on_exception_keeps_the_state_at_the_failure(tmp_path):
    checkpoint = BestCheckpoint(monitor="val_score", mode="max", save_on_exception=True)
    with pytest.raises(RuntimeError, match="scripted failure"):
        fit(tmp_path, [0.2, 0.6, 0.4, 0.5], checkpoint, model_kwargs={"fail_at_epoch": 2})
    records = load_manifest(checkpoint.dirpath).kept
    failure = next(r for r in records if r.kind == "exception")
    assert failure.epoch == 2 and failure.step == 10  # the third batch of epoch 2 failed
    assert "scripted failure" in failure.metrics["exception"]
    assert torch.load(failure.path, map_location="cpu", weights_only=False)["state_dict"]
    assert checkpoint.best_record.epoch == 1


def test_every_n_train_steps_evaluates_at_those_steps(tmp_path):
    checkpoint = BestCheckpoint(monitor="train_loss_step", every_n_train_steps=3, save_top_k=-1)

    class StepLogged(ScriptedModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss_step", loss)
            return loss

    model = StepLogged(script=[0.1, 0.2])
    trainer_for(tmp_path, checkpoint, max_epochs=2).fit(model)  # 4 steps an epoch
    assert [line["step"] for line in history(checkpoint.dirpath)] == [3, 6]


def test_train_time_interval_evaluates_when_the_interval_has_passed(tmp_path):
    checkpoint = BestCheckpoint(
        monitor="train_loss_step", save_top_k=-1, train_time_interval=timedelta(0)
    )

    class StepLogged(ScriptedModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss_step", loss)
            return loss

    trainer_for(tmp_path, checkpoint, max_epochs=1).fit(StepLogged())
    assert [line["step"] for line in history(checkpoint.dirpath)] == [1, 2, 3, 4]


def test_no_monitor_keeps_the_latest_as_model_checkpoint_does(tmp_path):
    for top_k in (1, -1):
        theirs = ModelCheckpoint(dirpath=tmp_path / f"theirs{top_k}", save_top_k=top_k)
        fit(tmp_path, [0.1, 0.2, 0.3], theirs)
        ours = BestCheckpoint(dirpath=tmp_path / f"ours{top_k}", save_top_k=top_k)
        fit(tmp_path, [0.1, 0.2, 0.3], ours)
        assert sorted(n for n in os.listdir(ours.dirpath) if n.endswith(".ckpt")) == sorted(
            os.listdir(theirs.dirpath)
        )
        assert (
            os.path.basename(ours.best_model_path)
            == os.path.basename(theirs.best_model_path)
            == "epoch=2-step=12.ckpt"
        )


def test_loggers_that_upload_checkpoints_read_its_attributes(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    checkpoint = BestCheckpoint(monitor="val_score", mode="max", save_top_k=2, trackers=())
    logger = WandbLogger(project="bestsave-test", save_dir=str(tmp_path), log_model="all")
    try:
        fit(tmp_path, [0.1, 0.5, 0.3, 0.4], checkpoint, logger=logger)
    finally:
        logger.experiment.finish()
    # Lightning's default directory under the logger, and every file we saved was uploaded
    # when it was saved (epochs 0 and 2 were evicted later).
    assert checkpoint.dirpath == os.path.realpath(
        tmp_path / "bestsave-test" / logger.version / "checkpoints"
    )
    uploaded = sorted(os.path.basename(p) for p in logger._logged_model_time)
    assert uploaded == [f"epoch={e}-step={4 * (e + 1)}.ckpt" for e in range(4)]


def test_default_dirpath_follows_the_logger_as_lightning_does(tmp_path):
    checkpoint = BestCheckpoint(monitor="val_score", mode="max")
    logger = CSVLogger(tmp_path, name="exp")
    fit(tmp_path, [0.2, 0.3], checkpoint, logger=logger)
    assert checkpoint.dirpath == os.path.realpath(tmp_path / "exp" / "version_0" / "checkpoints")
    assert os.path.isfile(checkpoint.best_model_path)


# -- LightningCLI, parity with ModelCheckpoint ----------------------------------------------------


def test_lightning_cli_builds_it_from_a_yaml_config(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["train.py"])

    cli = LightningCLI(
        ScriptedModel,
        save_config_callback=None,
        args=[
            "fit",
            "--config",
            str(DATA / "cli_config.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    checkpoint = cli.trainer.checkpoint_callback
    assert isinstance(checkpoint, BestCheckpoint)
    assert cli.trainer.checkpoint_callbacks == [checkpoint]
    assert checkpoint.save_last == "link" and checkpoint.options.patience == 3
    # Script [0.2, 0.6, 0.4, 0.5, 0.3]: best at epoch 1, top 2 = epochs 1 and 3.
    assert kept_epochs(checkpoint.dirpath) == [1, 3]
    assert os.path.basename(checkpoint.best_model_path) == "epoch=01-val_score=0.60.ckpt"


@pytest.mark.parametrize(
    ("mode", "save_top_k", "every_n_epochs", "script"),
    [
        ("max", 1, None, [0.3, 0.5, 0.5, 0.2, 0.6, 0.6, 0.4, 0.55]),
        ("max", 3, None, [0.3, 0.5, 0.5, 0.2, 0.6, 0.6, 0.4, 0.55]),
        ("max", -1, None, [0.3, 0.5, 0.5, 0.2, 0.6, 0.6, 0.4, 0.55]),
        ("min", 2, None, [0.9, 0.7, 0.8, 0.7, 0.6, 0.65, 0.95, 0.61]),
        ("min", 2, 2, [0.9, 0.7, 0.8, 0.7, 0.6, 0.65, 0.95, 0.61]),
    ],
)
def test_parity_with_model_checkpoint_on_the_same_metrics(
    tmp_path, mode, save_top_k, every_n_epochs, script
):
    options = dict(
        monitor="val_score",
        mode=mode,
        save_top_k=save_top_k,
        every_n_epochs=every_n_epochs,
        filename="{epoch}",
    )
    theirs = ModelCheckpoint(dirpath=tmp_path / "theirs", **options)
    fit(tmp_path, script, theirs)
    ours = BestCheckpoint(dirpath=tmp_path / "ours", **options)
    fit(tmp_path, script, ours)

    def epochs(paths):
        return sorted(int(os.path.basename(p)[len("epoch=") : -len(".ckpt")]) for p in paths)

    assert kept_epochs(ours.dirpath) == epochs(theirs.best_k_models)
    assert epochs(ours.best_k_models) == epochs(theirs.best_k_models)
    assert epochs([ours.best_model_path]) == epochs([theirs.best_model_path])
    assert ours.best_model_score.item() == pytest.approx(theirs.best_model_score.item())
    assert epochs([ours.kth_best_model_path]) == epochs([theirs.kth_best_model_path])


def test_the_latest_file_saved_is_last_as_in_model_checkpoint(tmp_path):
    script = [0.3, 0.5, 0.4]
    theirs = ModelCheckpoint(dirpath=tmp_path / "theirs", monitor="val_score", save_last=True)
    fit(tmp_path, script, theirs)
    ours = BestCheckpoint(dirpath=tmp_path / "ours", monitor="val_score", save_last=True)
    fit(tmp_path, script, ours)
    # ModelCheckpoint saves last after the top-k file, so it is the latest saved.
    assert os.path.basename(theirs._last_checkpoint_saved) == "last.ckpt"
    assert os.path.basename(ours._last_checkpoint_saved) == "last.ckpt"


# -- DDP ------------------------------------------------------------------------------------------


def run_ddp(out, kind, weights_only=False):
    args = [sys.executable, str(DATA / "ddp_run.py"), str(out), kind]
    if weights_only:
        args.append("weights_only")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(DATA), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize(("kind", "weights_only"), [("staged", False), ("mirror", True)])
def test_ddp_writes_on_one_process_and_keeps_what_one_process_keeps(tmp_path, kind, weights_only):
    ddp = importlib.import_module("ddp_run")
    rank0, rank1 = run_ddp(tmp_path / "ddp", kind, weights_only)

    assert rank0["world_size"] == 2 and rank0["staged"] == (kind == "staged")
    assert rank0["writer"] is True and rank1["writer"] is False
    assert rank0["writes"] and rank1["writes"] == []  # only global rank 0 touched the files
    for key in ("best_model_path", "best_k_models", "last_model_path", "epochs_run"):
        assert rank0[key] == rank1[key], key

    single = BestCheckpoint(
        dirpath=tmp_path / "single", save_weights_only=weights_only, **ddp.OPTIONS
    )
    trainer, _, _ = fit(tmp_path, ddp.SCRIPT, single)
    ddp_dir = tmp_path / "ddp" / "checkpoints"

    def files(dirpath):
        return sorted(n for n in os.listdir(dirpath))

    assert files(ddp_dir) == files(single.dirpath)
    assert kept_epochs(ddp_dir) == kept_epochs(single.dirpath) == [1, 3]
    assert rank0["epochs_run"] == trainer.current_epoch  # patience stopped both at epoch 6
    assert os.path.basename(rank0["best_model_path"]) == os.path.basename(single.best_model_path)
    assert load_manifest(ddp_dir).best.epoch == 3


def test_ddp_a_failed_write_on_rank_0_stops_both_processes_without_a_hang(tmp_path):
    out = tmp_path / "ddp"
    args = [sys.executable, str(DATA / "ddp_run.py"), str(out), "staged", "fail"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(DATA), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "No space left on device" in done.stderr
    assert not (out / "rank0.json").exists() and not (out / "rank1.json").exists()
    best = load_manifest(out / "checkpoints").best  # the best before the failure is intact
    assert best is not None and os.path.exists(best.path)


# -- choosing better: smoothed scores and several monitors ---------------------------------------


def test_smooth_ignores_a_one_epoch_spike(tmp_path):
    checkpoint = BestCheckpoint(monitor="val_score", mode="max", smooth=2)
    _, _, weights = fit(tmp_path, [0.2, 0.9, 0.3, 0.6, 0.7], checkpoint)
    best = checkpoint.best_record  # smoothed: 0.2, 0.55, 0.6, 0.45, 0.65
    assert best.epoch == 4 and best.raw_score == pytest.approx(0.7)
    assert best.score == pytest.approx(0.65)
    assert_weights(best.path, weights[4])


def test_several_monitors_keep_a_best_for_each(tmp_path):
    checkpoint = BestCheckpoint(monitor=["val_score", "val_loss"], mode="max")
    _, _, weights = fit(tmp_path, [0.2, 0.6, 0.4, 0.5], checkpoint)
    manifest = load_manifest(checkpoint.dirpath)
    assert checkpoint.best_record.epoch == 1 and checkpoint.best_record.monitor == "val_score"
    by_loss = manifest.best_for("val_loss")
    losses = {e: r["metrics"]["val_loss"] for e, r in enumerate(history(checkpoint.dirpath))}
    assert by_loss.epoch == min(losses, key=losses.get)
    assert_weights(by_loss.path, weights[by_loss.epoch])


# -- drop-in habits --------------------------------------------------------------------------------


def test_the_exception_checkpoint_is_named_by_the_template_as_in_lightning(tmp_path):
    checkpoint = BestCheckpoint(
        dirpath=tmp_path / "ckpt", filename="{epoch}", save_on_exception=True, monitor="val_score"
    )
    with pytest.raises(RuntimeError, match="scripted failure"):
        fit(tmp_path, [0.2, 0.6, 0.4], checkpoint, model_kwargs={"fail_at_epoch": 1})
    record = next(r for r in load_manifest(tmp_path / "ckpt").kept if r.kind == "exception")
    assert record.name == "epoch=1.ckpt" and record.epoch == 1  # ModelCheckpoint's name
    assert os.path.isfile(record.path) and checkpoint.best_record.name == "epoch=0.ckpt"


def test_the_callback_pickles_and_deep_copies_before_and_after_fit(tmp_path):
    checkpoint = BestCheckpoint(monitor="val_score", mode="max", save_top_k=2)
    assert vars(pickle.loads(pickle.dumps(checkpoint))) == vars(checkpoint)
    fit(tmp_path, [0.2, 0.6, 0.4], checkpoint)
    copy = pickle.loads(pickle.dumps(checkpoint))
    assert copy.best_model_path == checkpoint.best_model_path and copy.saver is None
    assert deepcopy(checkpoint).best_k_models.keys() == checkpoint.best_k_models.keys()


def test_a_checkpoint_written_by_model_checkpoint_restores_into_ours(tmp_path):
    theirs = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_score", mode="max")
    fit(tmp_path, [0.2, 0.6], theirs)
    ours = BestCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_score", mode="max")
    assert ours.state_key == theirs.state_key  # the callback state is found under its key
    state = torch.load(theirs.best_model_path, weights_only=True)["callbacks"][ours.state_key]
    ours.load_state_dict(state)
    assert ours.best_model_path == theirs.best_model_path


def test_two_callbacks_that_differ_in_their_monitor_share_the_directory(tmp_path):
    by_loss = BestCheckpoint(monitor="val_loss")
    by_score = BestCheckpoint(monitor="val_score", mode="max")
    fit(tmp_path, [0.2, 0.6, 0.4], by_loss, by_score)
    assert by_loss.dirpath == by_score.dirpath
    assert by_score.best_record.epoch == 1
    assert load_manifest(by_score.dirpath, run="epoch=epoch-step=step.val_score").best.epoch == 1
    assert os.path.isfile(by_loss.best_model_path) and os.path.isfile(by_score.best_model_path)


class ManualModel(ScriptedModel):
    """Manual optimisation that keeps the weights from before each step, as Lightning's
    ModelCheckpoint documents (``self.saved_models``)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.saved_models: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.saved_models[batch_idx] = {
            k: v.detach().clone() for k, v in self.layer.state_dict().items()
        }
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.log("train_loss", loss)
        return loss


def test_manual_optimisation_saves_the_weights_from_before_the_step(tmp_path):
    checkpoint = BestCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="train_loss", every_n_train_steps=2, save_top_k=-1
    )
    model = ManualModel()
    trainer_for(tmp_path, checkpoint, max_epochs=1, limit_val_batches=0).fit(model)
    for record in load_manifest(tmp_path / "ckpt").kept:
        state = torch.load(record.path, weights_only=True)["state_dict"]
        before = model.saved_models[record.step - 1]  # one epoch: the batch of that step
        assert torch.equal(state["layer.weight"], before["weight"])


@pytest.mark.parametrize("budget, step", [(1, "streaming"), (None, "two sets")])
def test_staging_memory_bounds_the_copies_and_the_record_says_how(tmp_path, budget, step):
    checkpoint = BestCheckpoint(monitor="val_score", mode="max", save_last=True,
                                staging_memory=budget)  # fmt: skip
    _, _, weights = fit(tmp_path, [0.2, 0.6, 0.4, 0.5], checkpoint)

    best = checkpoint.best_record
    assert (best.epoch, best.staging) == (1, step)
    assert_weights(best.path, weights[1])
    assert load_manifest(checkpoint.dirpath).last.staging == step
