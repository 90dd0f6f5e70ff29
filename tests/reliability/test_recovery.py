"""A damaged or lost manifest is never written over and never a traceback: a clear error says
what is wrong and how to recover, and ``bestsave repair`` rebuilds it from the records and the
history. Smaller mistakes at the start (a file for a directory, a directory that cannot be
written, a bad format spec) are errors naming the path and the fix; warnings name the user's
line."""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

from bestsave import BestSaver, BestSaveWarning, ManifestError, load_best, load_manifest
from bestsave.cli import main
from bestsave.repair import repair
from bestsave.store import TMP_PREFIX
from bestsave.verify import load_history, verify

from .conftest import leftovers
from .test_faults import read_only

pytestmark = pytest.mark.core

SCORES = [0.9, 0.4, 0.6, 0.3, 0.5, 0.7, 0.8, 0.35]  # val_loss: top-2 keeps epochs 3 and 7


def writer(text: str) -> Any:
    return lambda path: open(path, "w").write(text)


def run(path: Path, scores: list[float] = SCORES, **options: Any) -> BestSaver:
    saver = BestSaver(
        path, monitor="val_loss", top_k=2, save_last=True, name="run", trackers=(), **options
    )
    for epoch, loss in enumerate(scores):
        saver.step(epoch, {"val_loss": loss, "train_loss": 1 - loss}, write=writer(f"e{epoch}"))
    saver.close()
    return saver


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` and a digest of its bytes."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


MANIFEST = Path(".bestsave/run/bestsave.json")
DAMAGE = {
    "a list": "[1, 2, 3]",
    "an empty object": "{}",
    "cut short": None,  # the first half of the real one
    "a bad field": '{"monitor": "val_loss", "mode": "min", "kept": [1], "state": {}}',
}


@pytest.fixture(params=list(DAMAGE), ids=list(DAMAGE))
def damaged(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    run(tmp_path)
    text = (tmp_path / MANIFEST).read_text()
    damage = DAMAGE[request.param]
    (tmp_path / MANIFEST).write_text(text[: len(text) // 2] if damage is None else damage)
    return tmp_path


def test_a_damaged_manifest_is_an_error_that_names_the_repair_and_changes_nothing(damaged):
    before = snapshot(damaged)
    for options in ({"resume": True}, {}, {"overwrite": True}):
        with pytest.raises(ManifestError, match=r"not a readable bestsave manifest.*repair"):
            BestSaver(damaged, monitor="val_loss", top_k=2, save_last=True, name="run", **options)
    for call in (load_manifest, load_best, verify, load_history):
        with pytest.raises(ManifestError, match="Nothing was changed"):
            call(damaged)
    assert snapshot(damaged) == before


@pytest.mark.parametrize("command", ["ls", "show", "verify", "plot", "soup"])
def test_every_command_on_a_damaged_manifest_is_one_line_with_the_fix(damaged, command, capsys):
    extra = {"plot": ["-o", str(damaged / "x.png")], "soup": ["-o", str(damaged / "s.pth")]}
    assert main([command, str(damaged), *extra.get(command, [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bestsave: error: ") and err.count("\n") == 1
    assert "bestsave repair" in err


def test_repair_rebuilds_the_same_best_and_the_run_resumes(damaged, capsys):
    assert main(["repair", str(damaged)]) == 0
    assert "2 checkpoints checked against their records, best epoch=003" in capsys.readouterr().out
    assert (damaged / ".bestsave/run/bestsave.json.damaged").exists()
    best = load_best(damaged)
    assert (best.epoch, best.score, Path(best.path).read_text()) == (3, 0.3, "e3")
    assert [r.epoch for r in load_manifest(damaged).kept] == [3, 7]
    assert load_manifest(damaged).last.epoch == 7
    assert len(load_history(damaged)) == len(SCORES)
    # Resumed, the run goes on as if nothing had happened: 0.32 enters the top 2.
    resumed = BestSaver(
        damaged, monitor="val_loss", top_k=2, save_last=True, name="run", resume=True
    )
    assert resumed.evaluations == len(SCORES) and resumed.best.epoch == 3
    resumed.step(8, {"val_loss": 0.32}, write=writer("e8"))
    resumed.close()
    assert [r.epoch for r in load_manifest(damaged).kept] == [3, 8]


def test_a_missing_manifest_beside_the_records_is_never_written_over(tmp_path):
    run(tmp_path)
    (tmp_path / MANIFEST).unlink()
    before = snapshot(tmp_path)
    with pytest.raises(ManifestError, match=r"missing, but 2 records .*bestsave repair"):
        BestSaver(tmp_path, monitor="val_loss", top_k=2, save_last=True, name="run")
    assert snapshot(tmp_path) == before  # not the last file, not the history
    done = repair(tmp_path)
    assert done.lost == [] and load_best(tmp_path).epoch == 3
    assert verify(tmp_path) == []


def test_a_first_commit_killed_before_its_manifest_landed_starts_afresh(tmp_path):
    """The kill left only temporary files (the manifest's and a record's, half written):
    no run was ever committed there, so the next start is a new run and cleans them."""
    folder = tmp_path / ".bestsave" / "run"
    folder.mkdir(parents=True)
    (folder / f"{TMP_PREFIX}1a2b3c4d-bestsave.json").write_text('{"format": ')
    (folder / f"{TMP_PREFIX}5e6f7a8b-epoch=000-val_loss=0.5000.json").write_text("{")
    saver = BestSaver(tmp_path, monitor="val_loss", name="run")
    saver.step(0, {"val_loss": 0.5}, write=writer("e0"))
    saver.close()
    assert load_best(tmp_path).epoch == 0
    assert leftovers(tmp_path) == [] and verify(tmp_path) == []


def test_repair_reports_what_it_cannot_recover(tmp_path, capsys):
    run(tmp_path)
    (tmp_path / MANIFEST).unlink()
    (tmp_path / "epoch=007-val_loss=0.3500").write_text("changed")
    assert main(["repair", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "lost: epoch=007-val_loss=0.3500: its file differs from its record" in out
    assert [r.epoch for r in load_manifest(tmp_path).kept] == [3]


def test_a_directory_path_that_is_a_file_is_an_error_naming_it(tmp_path):
    file = tmp_path / "ckpt"
    file.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match=rf"{file} is a file.*pass a directory path"):
        BestSaver(file, monitor="val_loss")
    with pytest.raises(NotADirectoryError, match=rf"{file} is a file"):
        BestSaver(file / "sub", monitor="val_loss")


def test_a_directory_that_cannot_be_written_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with read_only(folder), pytest.raises(PermissionError, match=rf"cannot write in {folder}"):
        BestSaver(folder, monitor="val_loss")


def test_a_format_spec_no_value_takes_is_an_error_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"\{val_loss:\.3q\} is not a format"):
        BestSaver(tmp_path, monitor="val_loss", filename="{epoch}-{val_loss:.3q}")
    assert not any(tmp_path.iterdir())


def test_warnings_name_the_line_that_called_bestsave(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_loss")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saver.step(0, {"val_loss": float("nan")}, write=writer("x"))  # this line
        saver.close()
    ours = [w for w in caught if issubclass(w.category, BestSaveWarning)]
    assert ours and all(os.path.samefile(w.filename, __file__) for w in ours)


def test_ls_on_a_file_says_to_pass_its_directory(tmp_path, capsys):
    saver = run(tmp_path)
    assert main(["ls", saver.best.path]) == 2
    assert f"is a file; pass the directory that holds it ({tmp_path})" in capsys.readouterr().err


def test_ls_shows_a_score_with_one_precision_in_every_column(tmp_path, capsys):
    saver = BestSaver(tmp_path, monitor="val_auroc", trackers=())
    saver.step(0, {"val_auroc": 0.94139, "val_loss": 0.31234}, write=writer("e0"))
    saver.close()
    assert main(["ls", str(tmp_path), "--metric", "val_auroc", "--metric", "val_loss"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "epoch=000" in line)
    cells = [c.strip() for c in row.replace("│", "|").split("|")]
    assert cells.count("0.94139") == 2 and "0.31234" in cells


def test_a_run_that_only_read_is_left_as_it_was(tmp_path):
    run(tmp_path)
    copy = tmp_path.parent / (tmp_path.name + "-copy")
    shutil.copytree(tmp_path, copy)
    load_best(copy)
    load_history(copy)
    verify(copy)
    assert snapshot(copy) == snapshot(tmp_path)
