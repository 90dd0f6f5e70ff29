"""BestSaver end to end on the file system, with no framework: files, manifest, history, resume."""

import json
import os
import re
import warnings

import pytest
from runfiles import checkpoints, run_folder

from bestsave import (
    BestSaver,
    BestSaveWarning,
    MissingMetricError,
    RunExistsError,
    ScoreTypeError,
    WriteError,
    load_best,
    load_manifest,
)
from bestsave.store import TMP_PREFIX

pytestmark = pytest.mark.core


def writer(content):
    def write(path):
        with open(path, "w") as f:
            f.write(content)

    return write


def drive(saver, scores, monitor="val_acc", start=0, **extra):
    decisions = []
    for epoch, score in enumerate(scores, start=start):
        metrics = {monitor: score, "train_loss": 1.0 / (epoch + 1), **extra}
        decisions.append(
            saver.step(epoch, metrics, write=writer(f"epoch {epoch}"), step=10 * epoch)
        )
    saver.close()  # a flush: background writes are committed
    return decisions


def files(d):
    """The checkpoints in ``d``, and the run's own files (the lock is there while a saver of
    this process holds the run)."""
    folder = run_folder(d)
    own = [f".bestsave/{folder.name}/{f}" for f in os.listdir(folder) if f != "lock"]
    return sorted([*checkpoints(d), *own])


def test_keeps_best_with_sidecar_manifest_and_history(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc", extension=".pt")
    decisions = drive(saver, [0.5, 0.7, 0.6])
    assert [d.is_best for d in decisions] == [True, True, False]
    assert decisions[1].evicted[0].epoch == 0
    run = ".bestsave/epoch=epoch-val_acc=score"
    assert files(tmp_path) == [
        f"{run}/bestsave.json",
        f"{run}/epoch=001-val_acc=0.7000.json",
        f"{run}/history.jsonl",
        "epoch=001-val_acc=0.7000.pt",
    ]
    best = load_best(tmp_path)
    assert best.epoch == 1 and best.step == 10 and best.score == 0.7
    assert best.metrics == {"val_acc": 0.7, "train_loss": 0.5}
    assert open(best.path).read() == "epoch 1"
    assert best.bytes == 7 and len(best.sha256) == 64
    assert best.time.endswith("+00:00") and best.elapsed_s >= 0
    assert best.run["host"] and best.run["versions"]["python"]
    sidecar = json.loads((tmp_path / run / "epoch=001-val_acc=0.7000.json").read_text())
    assert sidecar["path"] == "epoch=001-val_acc=0.7000.pt" and sidecar["epoch"] == 1
    history = [
        json.loads(line) for line in (tmp_path / run / "history.jsonl").read_text().splitlines()
    ]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[1]["decision"] == {
        "saved": True,
        "is_best": True,
        "kind": ["best"],
        "files": ["epoch=001-val_acc=0.7000.pt"],
        "evicted": ["epoch=000-val_acc=0.5000.pt"],
    }
    assert history[2]["metrics"]["train_loss"] == pytest.approx(1 / 3)
    manifest = load_manifest(tmp_path)
    assert (manifest.monitor, manifest.mode, manifest.best.epoch) == ("val_acc", "max", 1)


def test_top_k_kept_best_first_and_saver_best(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_loss", top_k=3)
    drive(saver, [0.9, 0.5, 0.7, 0.6, 0.4, 0.8], monitor="val_loss")
    assert [r.epoch for r in saver.kept] == [4, 1, 3]
    assert saver.best.epoch == 4
    assert [r.kind for r in saver.kept] == ["best", "best", "top_k"]
    assert len(checkpoints(tmp_path)) == 3
    assert len([f for f in os.listdir(run_folder(tmp_path)) if f.startswith("epoch")]) == 3


def test_invalid_scores_warn_once_and_are_never_kept(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc", top_k=-1)
    with pytest.warns(BestSaveWarning) as caught:
        drive(saver, [float("nan"), 0.5, float("nan"), None, float("inf"), 0.6])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2  # nan, inf: once each
    assert sorted(r.epoch for r in saver.kept) == [1, 5]
    history = (run_folder(tmp_path) / "history.jsonl").read_text()
    assert "NaN" not in history  # the files stay strict JSON


def test_tensor_like_and_numpy_scores_are_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    saver = BestSaver(tmp_path, monitor="val_acc")
    saver.step(0, {"val_acc": np.float32(0.5), "n": np.int64(3)}, write=writer("a"))
    saver.step(1, {"val_acc": np.array([0.7])}, write=writer("b"))
    saver.close()
    assert saver.best.epoch == 1 and saver.best.score == pytest.approx(0.7)
    assert load_manifest(tmp_path).kept[0].metrics["val_acc"] == pytest.approx(0.7)


def test_missing_monitor_names_logged_keys_and_closest(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_loss")
    with pytest.raises(MissingMetricError, match=r"did you mean 'val_loss_epoch'\?|Did you mean"):
        saver.step(0, {"val_loss_epoch": 0.3, "train_loss": 0.2}, write=writer("x"))
    with pytest.raises(KeyError):
        saver.step(0, {}, write=writer("x"))


def test_template_with_any_metric_and_slashes_is_sanitised(tmp_path):
    saver = BestSaver(tmp_path, monitor="val/loss", filename="{epoch}-{val/loss:.2f}-{lr:.0e}")
    saver.step(3, {"val/loss": 0.123, "lr": 0.001}, write=writer("x"))
    assert saver.best.name == "3-0.12-1e-03"
    saver2 = BestSaver(tmp_path / "b", monitor="val/loss")
    saver2.step(0, {"val/loss": 0.5}, write=writer("x"))
    assert saver2.best.name == "epoch=000-val_loss=0.5000"
    assert [p.name for p in (tmp_path / "b").iterdir() if p.is_dir()] == [".bestsave"]


def test_template_errors(tmp_path):
    with pytest.raises(ValueError, match="path separator"):
        BestSaver(tmp_path, monitor="val_acc", filename="../{epoch}")
    saver = BestSaver(tmp_path, monitor="val_acc", filename="{epoch}-{val_f1:.2f}")
    with pytest.raises(KeyError, match=r"val_f1.*'train_loss', 'val_acc'"):
        saver.step(0, {"val_acc": 0.5, "train_loss": 1.0}, write=writer("x"))


def test_colliding_names_get_versions(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc", top_k=-1, filename="same")
    drive(saver, [0.1, 0.2, 0.3])
    assert sorted(r.name for r in saver.kept) == ["same", "same-v1", "same-v2"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "up"}, "mode"),
        ({"top_k": -5}, "top_k"),
        ({"delta": -1}, "delta"),
        ({"patience": 0}, "patience"),
        ({"min_delta": -0.1}, "min_delta"),
        ({"keep_every_n_epochs": 0}, "keep_every_n_epochs"),
        ({"save_last": "yes"}, "save_last"),
        ({"monitor": "val_thing"}, "mode='min' or mode='max'"),
    ],
)
def test_bad_options_are_value_errors_naming_the_fix(tmp_path, kwargs, match):
    options = {"monitor": "val_acc", **kwargs}
    with pytest.raises(ValueError, match=match):
        BestSaver(tmp_path, **options)


def test_periodic_keeps_its_own_hard_link_and_survives_eviction(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc", keep_every_n_epochs=2)
    decisions = drive(saver, [0.5, 0.6])
    assert [r.kind for r in decisions[1].records] == ["best", "periodic"]
    best, periodic = decisions[1].records
    assert os.stat(best.path).st_ino == os.stat(periodic.path).st_ino
    assert periodic.name == "epoch=001-val_acc=0.6000-periodic"
    drive(saver, [0.7, 0.8], start=2)
    # epoch 1's best file was evicted by epoch 2; its periodic twin stays
    assert os.path.exists(periodic.path) and not os.path.exists(best.path)
    assert sorted((r.kind, r.epoch) for r in saver.kept) == [
        ("best", 3),
        ("periodic", 1),
        ("periodic", 3),
    ]


@pytest.mark.parametrize("save_last", [True, "link"])
def test_last_is_a_hard_link_to_the_kept_file_of_the_same_epoch(tmp_path, save_last):
    saver = BestSaver(tmp_path, monitor="val_acc", save_last=save_last, extension=".pt")
    drive(saver, [0.5, 0.7])
    last = tmp_path / "last.pt"
    assert os.stat(last).st_ino == os.stat(saver.best.path).st_ino
    drive(saver, [0.6], start=2)  # not kept: last is written on its own
    assert last.read_text() == "epoch 2"
    assert open(saver.best.path).read() == "epoch 1"
    assert load_manifest(tmp_path).last.epoch == 2


def test_write_last_gives_last_its_own_content(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc", save_last=True)
    saver.step(0, {"val_acc": 0.5}, write=writer("weights"), write_last=writer("full state"))
    saver.close()
    assert open(saver.best.path).read() == "weights"
    assert (tmp_path / "last").read_text() == "full state"


def test_top_k_zero_writes_history_only(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc", top_k=0)
    decisions = drive(saver, [0.5, 0.7])
    assert decisions[1].is_best and not decisions[1].saved and saver.best is None
    run = ".bestsave/epoch=epoch-val_acc=score"
    assert files(tmp_path) == [f"{run}/bestsave.json", f"{run}/history.jsonl"]


def test_patience_sets_should_stop(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_loss", patience=2)
    decisions = drive(saver, [0.5, 0.6, 0.4, 0.45, 0.5], monitor="val_loss")
    assert [d.should_stop for d in decisions] == [False, False, False, False, True]
    assert saver.should_stop


def test_another_runs_directory_is_refused_then_resumed_or_overwritten(tmp_path):
    first = BestSaver(tmp_path, monitor="val_acc")
    drive(first, [0.5, 0.9])
    (tmp_path / "notes.txt").write_text("user file")
    with pytest.raises(
        RunExistsError, match=r"epoch=001-val_acc=0.9000.*resume=True.*overwrite=True"
    ):
        BestSaver(tmp_path, monitor="val_acc")
    with pytest.warns(BestSaveWarning, match=r"stays whole until this one keeps its first"):
        fresh = BestSaver(tmp_path, monitor="val_acc", overwrite=True)
    # Nothing of the earlier run goes before the new run has kept a file.
    fresh.step(0, {"val_acc": float("nan")}, write=writer("nan"))
    fresh.flush()
    assert checkpoints(tmp_path) == {"notes.txt", "epoch=001-val_acc=0.9000"}
    assert load_best(tmp_path).score == 0.9
    drive(fresh, [0.1], start=1)
    assert fresh.best.score == 0.1 and load_best(tmp_path).score == 0.1
    # Then only the earlier run's own files were deleted.
    assert checkpoints(tmp_path) == {"notes.txt", "epoch=001-val_acc=0.1000"}
    assert [json.loads(x)["epoch"] for x in (run_folder(tmp_path) / "history.jsonl").open()] == [
        0,
        1,
    ]


def test_a_run_that_kept_nothing_for_its_score_is_replaced_without_overwrite(tmp_path):
    # A typo in the monitor stops the first step; the exception checkpoint is no best.
    typo = BestSaver(tmp_path, monitor="val_los", mode="min", filename="{epoch}")
    with pytest.raises(MissingMetricError):
        typo.step(0, {"val_loss": 0.5}, write=writer("x"))
    typo.save_exception(0, writer("state at the error"))
    typo.close()
    with pytest.warns(BestSaveWarning, match=r"kept no checkpoint for its score"):
        fixed = BestSaver(tmp_path, monitor="val_loss", filename="{epoch}", resume=True)
    drive(fixed, [0.7], monitor="val_loss")
    assert load_best(tmp_path).score == 0.7
    assert checkpoints(tmp_path) == {"0"}


def test_resume_restores_best_kept_and_patience(tmp_path):
    first = BestSaver(tmp_path, monitor="val_acc", top_k=2, patience=3)
    drive(first, [0.5, 0.9, 0.8, 0.7])
    resumed = BestSaver(tmp_path, monitor="val_acc", top_k=2, patience=3, resume=True)
    assert resumed.best.epoch == 1 and [r.epoch for r in resumed.kept] == [1, 2]
    assert resumed.evaluations == 4 and resumed.last_epoch == 3
    d = drive(resumed, [0.6], start=4)[0]  # worse than both kept: nothing replaced
    assert not d.saved and d.should_stop
    assert load_best(tmp_path).epoch == 1
    assert resumed.run["id"] == first.run["id"] and resumed.run["resumes"] == 1
    history = (run_folder(tmp_path) / "history.jsonl").read_text().splitlines()
    assert len(history) == 5


def test_resume_on_missing_or_empty_directory_starts_a_new_run(tmp_path):
    saver = BestSaver(tmp_path / "new", monitor="val_acc", resume=True)
    assert saver.best is None and saver.evaluations == 0
    drive(saver, [0.3])
    assert load_best(tmp_path / "new").score == 0.3


def test_resume_with_another_monitor_is_refused(tmp_path):
    drive(BestSaver(tmp_path, monitor="val_acc", name="run"), [0.5])
    with pytest.raises(RunExistsError, match=r"monitors \{'val_acc': 'max'\}.*overwrite=True"):
        BestSaver(tmp_path, monitor="val_loss", resume=True, name="run")


def test_crash_leftovers_are_cleaned_and_committed_renames_rolled_forward(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc", save_last=True)
    drive(saver, [0.5])
    # A crash after the manifest committed epoch 1 but before its files were renamed:
    run = run_folder(tmp_path)
    pending_tmp = f".bestsave/{run.name}/{TMP_PREFIX}abcd-epoch=001-val_acc=0.9000"
    (tmp_path / pending_tmp).write_text("epoch 1")
    manifest = json.loads((run / "bestsave.json").read_text())
    record = dict(manifest["kept"][0], path="epoch=001-val_acc=0.9000", epoch=1, score=0.9, id=1)
    manifest["kept"] = [record]
    manifest["best"] = record["path"]
    manifest["pending"] = {record["path"]: pending_tmp}
    side = f".bestsave/{run.name}/epoch=000-val_acc=0.5000.json"
    manifest["evicting"] = ["epoch=000-val_acc=0.5000", side]
    (run / "bestsave.json").write_text(json.dumps(manifest))
    (run / f"{TMP_PREFIX}dead-orphan").write_text("half a file")
    assert load_best(tmp_path).path.endswith(pending_tmp)  # readable before recovery
    BestSaver(tmp_path, monitor="val_acc", save_last=True, resume=True)
    assert files(tmp_path) == [
        f".bestsave/{run.name}/bestsave.json",
        f".bestsave/{run.name}/epoch=001-val_acc=0.9000.json",
        f".bestsave/{run.name}/history.jsonl",
        "epoch=001-val_acc=0.9000",
        "last",
    ]
    assert open(load_best(tmp_path).path).read() == "epoch 1"


def test_history_is_truncated_to_the_committed_evaluations(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc")
    drive(saver, [0.5, 0.6])
    history = run_folder(tmp_path) / "history.jsonl"
    with open(history, "a") as f:
        f.write('{"epoch": 2, "uncommitted": true}\n')
    BestSaver(tmp_path, monitor="val_acc", resume=True)
    assert len(history.read_text().splitlines()) == 2


def test_failed_write_leaves_previous_best_and_no_temp(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc")
    drive(saver, [0.5])

    def broken(path):
        with open(path, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=r"No space.*previous best is intact") as caught:
        saver.step(1, {"val_acc": 0.9}, write=broken)
    assert isinstance(caught.value.__cause__, OSError)
    assert saver.best.epoch == 0 and load_best(tmp_path).epoch == 0
    assert not [f for f in files(tmp_path) if f.startswith(TMP_PREFIX)]
    assert saver.step(1, {"val_acc": 0.9}, write=writer("ok")).is_best  # nothing was recorded


def test_trackers_are_called_after_commit_and_failures_warn(tmp_path):
    events = []

    class Recorder:
        def on_save(self, record, path):
            assert os.path.exists(path)
            events.append(("save", record.epoch, record.kind))

        def on_evict(self, record):
            events.append(("evict", record.epoch))

        def on_end(self, best):
            events.append(("end", best.epoch))

    class Broken:
        def on_save(self, *args):
            raise ConnectionError("tracker server unreachable")

        on_evict = on_end = on_save

    saver = BestSaver(
        tmp_path, monitor="val_acc", trackers=[Recorder(), Broken()], async_write=False
    )
    with pytest.warns(BestSaveWarning, match="unreachable"):
        drive(saver, [0.5, 0.6])
    saver.close()
    saver.close()  # once per distinct best
    assert events == [("save", 0, "best"), ("evict", 0), ("save", 1, "best"), ("end", 1)]


def test_exception_checkpoint_is_kept_outside_the_policy(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc")
    drive(saver, [0.5])
    record = saver.save_exception(1, writer("crash state"), metrics={"exception": "boom"})
    assert record.kind == "exception" and record.name == "exception-epoch=001"
    assert saver.best.epoch == 0
    assert [r.kind for r in load_manifest(tmp_path).kept] == ["best", "exception"]


def test_non_writer_decides_the_same_and_touches_nothing(tmp_path):
    writer_saver = BestSaver(tmp_path / "w", monitor="val_acc", top_k=2)
    reader = BestSaver(tmp_path / "r", monitor="val_acc", top_k=2, writer=False)
    scores = [0.5, 0.7, 0.6, 0.8]
    a, b = drive(writer_saver, scores), drive(reader, scores)
    assert [(d.is_best, d.saved) for d in a] == [(d.is_best, d.saved) for d in b]
    assert [r.name for r in writer_saver.kept] == [r.name for r in reader.kept]
    assert not (tmp_path / "r").exists()


def test_memory_filesystem_store():
    pytest.importorskip("fsspec")
    url = "memory://bestsave-test-run"
    saver = BestSaver(url, monitor="val_loss", top_k=2, save_last=True, extension=".bin")
    drive(saver, [0.9, 0.5, 0.7, 0.6], monitor="val_loss")
    best = load_best(url)
    assert best.epoch == 1 and best.path == f"{url}/epoch=001-val_loss=0.5000.bin"
    from bestsave import fetch

    assert open(fetch(best)).read() == "epoch 1"
    resumed = BestSaver(url, monitor="val_loss", top_k=2, resume=True)
    assert [r.epoch for r in resumed.kept] == [1, 3]


def test_no_framework_is_imported_by_the_core():
    import subprocess
    import sys

    code = (
        "import sys, bestsave, bestsave.saver, bestsave.staging, bestsave.trackers;"
        "bad = [m for m in ('torch','lightning','fastai','keras','wandb','mlflow','jax') "
        "if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_warnings_are_not_repeated_after_resume(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc")
    with pytest.warns(BestSaveWarning):
        drive(saver, [float("nan")])
    resumed = BestSaver(tmp_path, monitor="val_acc", resume=True)
    with pytest.warns(BestSaveWarning) as caught:
        drive(resumed, [float("nan")], start=1)
    # The NaN is not told again; the end of this run, which kept nothing either, is.
    assert [str(w.message).split(" in ")[0] for w in caught] == [
        "training ended with no checkpoint kept for val_acc"
    ]


@pytest.mark.parametrize(
    "value, what",
    [
        ("high", "the string 'high'"),
        ([0.5, 0.7], "a list of 2 elements"),
        (pytest.param("numpy", "of shape (3,)", id="array")),
    ],
)
def test_a_value_that_cannot_be_a_score_is_an_error_at_once(tmp_path, value, what):
    if value == "numpy":
        value = pytest.importorskip("numpy").array([0.5, 0.6, 0.7])
    saver = BestSaver(tmp_path, monitor="val_f1")
    with pytest.raises(ScoreTypeError, match=rf"'val_f1' is .*{re.escape(what)}.*average='macro'"):
        saver.step(0, {"val_f1": value}, write=writer("x"))
    assert saver.evaluations == 0


@pytest.mark.parametrize(
    "options, scores, why",
    [
        (
            {},
            [float("nan"), None],
            r"val_acc was never a valid number \(nan 1 times, none 1 times\)",
        ),
        ({"baseline": 0.9}, [0.5, 0.6], r"no val_acc beat baseline=0.9"),
        ({"warmup": 5}, [0.5, 0.6], r"every evaluation was within warmup=5"),
    ],
)
def test_a_run_that_kept_nothing_for_its_score_says_so_at_the_end(tmp_path, options, scores, why):
    saver = BestSaver(tmp_path, monitor="val_acc", **options)
    with pytest.warns(BestSaveWarning, match=rf"training ended with no checkpoint .*: {why}"):
        drive(saver, scores)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drive(BestSaver(tmp_path / "zero", monitor="val_acc", top_k=0), [0.5])  # none wanted


def test_other_ranks_resume_read_only(tmp_path):
    first = BestSaver(tmp_path, monitor="val_acc", patience=3)
    drive(first, [0.5, 0.9, 0.8])
    other = BestSaver(tmp_path, monitor="val_acc", patience=3, resume=True, writer=False)
    assert other.best.epoch == 1 and other.evaluations == 3
    assert other.step(3, {"val_acc": 0.7}).should_stop is False  # 2 without improvement
    assert other.step(4, {"val_acc": 0.7}).should_stop


def test_hyperparameters_that_json_cannot_hold_are_recorded_as_text(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc", hparams={"lr": float("nan"), "obj": object})
    drive(saver, [0.5])
    assert load_best(tmp_path).run["hparams"]["lr"] == "nan"


def test_a_file_not_of_this_run_is_versioned_or_replaced(tmp_path):
    (tmp_path / "model.pt").write_text("saved by hand")
    versioned = BestSaver(tmp_path / ".", monitor="val_acc", filename="model", extension=".pt")
    drive(versioned, [0.5])
    assert versioned.best.name == "model-v1.pt"
    assert (tmp_path / "model.pt").read_text() == "saved by hand"
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.pt").write_text("saved by hand")
    replacing = BestSaver(other, monitor="val_acc", filename="model", extension=".pt",
                          version_names=False)  # fmt: skip
    drive(replacing, [0.5])
    assert replacing.best.name == "model.pt" and (other / "model.pt").read_text() == "epoch 0"


def test_a_replacing_run_keeps_the_earlier_best_until_it_keeps_a_checkpoint(tmp_path):
    drive(BestSaver(tmp_path, monitor="val_acc", save_last=True), [0.9])
    with pytest.warns(BestSaveWarning):
        new = BestSaver(tmp_path, monitor="val_acc", save_last=True, overwrite=True)
    # A NaN first epoch writes no last over the earlier run's; an exception's state is kept.
    new.step(0, {"val_acc": float("nan")}, write=writer("nan epoch"))
    new.save_exception(0, writer("state at the error"))
    new.flush()
    assert load_best(tmp_path).score == 0.9
    assert (tmp_path / "last").read_text() == "epoch 0"
    assert (tmp_path / "exception-epoch=000").read_text() == "state at the error"
    drive(new, [0.5], start=1)
    manifest = load_manifest(tmp_path)
    assert manifest.best.score == 0.5 and manifest.last.epoch == 1
    assert [r.kind for r in manifest.kept] == ["best", "exception"]
    assert checkpoints(tmp_path) == {"epoch=001-val_acc=0.5000", "exception-epoch=000", "last"}
