"""bestsave.verify: every way a run's directory can differ from its manifest is found, typed, and
explained; an intact run has no problem. Runs are made by the core itself, no framework."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bestsave import BestSaver, load_manifest
from bestsave.store import TMP_PREFIX
from bestsave.verify import (
    ChecksumMismatch,
    Extra,
    Inconsistent,
    Leftover,
    Missing,
    Problem,
    load_history,
    verify,
)

pytestmark = pytest.mark.core

SCORES = [0.50, 0.70, 0.60, 0.80, 0.75, 0.65]  # val_acc per epoch: top-2 keeps epochs 3 and 4


def make_run(path: Path, **options: object) -> Path:
    saver = BestSaver(path, monitor="val_acc", top_k=2, extension=".bin", trackers=(), **options)
    for epoch, score in enumerate(SCORES):
        saver.step(
            epoch,
            {"val_acc": score, "train_loss": 1 - score},
            write=lambda p, e=epoch: Path(p).write_text(f"weights of epoch {e}"),
        )
    saver.close()
    return path


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")


def kinds(problems: list[Problem]) -> list[tuple[str, str]]:
    return [(p.kind, p.name) for p in problems]


def best_file(run: Path) -> Path:
    return Path(load_manifest(run).best.path)  # type: ignore[union-attr]


FOLDER = ".bestsave/epoch=epoch-val_acc=score"
"""The run's own files, relative to its directory."""


def sidecar(run: Path, checkpoint: Path) -> Path:
    return run / FOLDER / (checkpoint.stem + ".json")


def test_an_intact_run_has_no_problem(run: Path) -> None:
    assert verify(run) == []
    assert verify(str(run), checksums=False) == []


def test_save_last_and_periodic_files_are_checked_too(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", save_last=True, keep_every_n_epochs=2)
    assert verify(run) == []
    (run / "last.bin").unlink()  # a hard link to the periodic file of epoch 5: replace it
    (run / "last.bin").write_text("changed")
    assert kinds(verify(run)) == [("checksum", "last.bin")]


def test_a_modified_checkpoint_is_a_checksum_mismatch(run: Path) -> None:
    best = best_file(run)
    best.write_text(best.read_text().upper())  # same size, other bytes
    [problem] = verify(run)
    assert isinstance(problem, ChecksumMismatch)
    assert problem.name == best.name
    assert problem.expected_bytes == problem.actual_bytes
    assert problem.expected_sha256 != problem.actual_sha256
    assert "restore it" in problem.detail
    # Sizes alone cannot see a same-size change; a truncation they do.
    assert verify(run, checksums=False) == []
    best.write_text("short")
    assert kinds(verify(run, checksums=False)) == [("checksum", best.name)]


def test_a_missing_checkpoint_and_a_missing_sidecar(run: Path) -> None:
    best = best_file(run)
    best.unlink()
    assert kinds(verify(run)) == [("missing", best.name)]
    assert isinstance(verify(run)[0], Missing)
    sidecar(run, best).unlink()
    assert kinds(verify(run)) == [
        ("missing", f"{FOLDER}/{best.stem}.json"),
        ("missing", best.name),
    ]


def test_files_that_look_like_the_runs_but_are_not_listed_are_extra(run: Path) -> None:
    evicting = json.loads((run / FOLDER / "bestsave.json").read_text())["evicting"]
    evicted = next(  # an evicted checkpoint put back (not one the manifest is still deleting)
        name
        for line in load_history(run)
        for name in line["decision"]["evicted"]
        if name not in evicting
    )
    (run / evicted).write_text("weights of epoch 1")
    side = json.loads(sidecar(run, best_file(run)).read_text())
    (run / FOLDER / "orphan.json").write_text(json.dumps({**side, "path": "orphan-ckpt"}))
    (run / "orphan-ckpt").write_text("no extension, but a record names it")
    # Not the run's: other extensions, JSON that is no record.
    (run / "notes.txt").write_text("hello")
    (run / "config.json").write_text('{"lr": 0.1}')
    problems = verify(run)
    assert sorted(kinds(problems)) == [
        ("extra", f"{FOLDER}/orphan.json"),
        ("extra", evicted),
        ("extra", "orphan-ckpt"),
    ]
    assert all(isinstance(p, Extra) for p in problems)


def test_temporary_files_of_an_interrupted_write_are_leftovers(run: Path) -> None:
    (run / FOLDER / f"{TMP_PREFIX}1234abcd-epoch=009.bin").write_text("half")
    [problem] = verify(run)
    assert isinstance(problem, Leftover)
    assert problem.name.startswith(f"{FOLDER}/{TMP_PREFIX}")


def test_a_file_committed_but_not_renamed_is_a_leftover_with_a_fix(run: Path) -> None:
    # Simulate a crash between the manifest commit and the rename: the newest kept file still
    # sits under the temporary name the manifest recorded for it.
    manifest = json.loads((run / FOLDER / "bestsave.json").read_text())
    name = manifest["best"]
    tmp = f"{FOLDER}/{TMP_PREFIX}0123abcd-{name}"
    manifest["pending"] = {name: tmp}
    (run / FOLDER / "bestsave.json").write_text(json.dumps(manifest))
    os.replace(run / name, run / tmp)
    [problem] = verify(run)
    assert (problem.kind, problem.name) == ("leftover", tmp)
    assert name in problem.detail and "resume" in problem.detail


def test_an_evicted_file_not_yet_deleted_is_a_leftover(run: Path) -> None:
    manifest = json.loads((run / FOLDER / "bestsave.json").read_text())
    manifest["evicting"] = ["epoch=099-gone.bin"]
    (run / FOLDER / "bestsave.json").write_text(json.dumps(manifest))
    (run / "epoch=099-gone.bin").write_text("old")
    assert kinds(verify(run)) == [("leftover", "epoch=099-gone.bin")]


def test_a_sidecar_that_disagrees_with_the_manifest(run: Path) -> None:
    side = sidecar(run, best_file(run))
    data = json.loads(side.read_text())
    side.write_text(json.dumps({**data, "epoch": 42}))
    [problem] = verify(run)
    assert isinstance(problem, Inconsistent)
    assert "epoch" in problem.detail
    side.write_text("{not json")
    assert kinds(verify(run)) == [("history", f"{FOLDER}/{side.name}")]


def test_history_past_the_commit_point_is_a_leftover_and_is_not_loaded(run: Path) -> None:
    with open(run / FOLDER / "history.jsonl", "a") as f:
        f.write('{"epoch": 6, "sco')  # a crash in the middle of an append
    assert kinds(verify(run)) == [("leftover", f"{FOLDER}/history.jsonl")]
    assert len(load_history(run)) == len(SCORES)


def test_a_truncated_or_damaged_history_is_inconsistent(run: Path) -> None:
    history = run / FOLDER / "history.jsonl"
    lines = history.read_text().splitlines(keepends=True)
    history.write_text("".join(lines[:-1]))
    [problem] = verify(run)
    assert (problem.kind, problem.name) == ("history", f"{FOLDER}/history.jsonl")
    history.write_text("".join(lines[:2]) + "x" * len(lines[2]) + "".join(lines[3:]))
    assert any("line 3" in p.detail for p in verify(run))
    with pytest.raises(ValueError, match="line 3"):
        load_history(run)


def test_history_and_manifest_that_disagree_on_what_is_kept(run: Path) -> None:
    # Rewrite history so that it never evicted epoch 0's file: it should still be kept.
    history = run / FOLDER / "history.jsonl"
    entries = [json.loads(line) for line in history.read_text().splitlines()]
    first = entries[0]["decision"]["files"][0]
    for entry in entries:
        entry["decision"]["evicted"] = [n for n in entry["decision"]["evicted"] if n != first]
    text = "".join(json.dumps(e) + "\n" for e in entries)
    history.write_text(text)
    manifest = json.loads((run / FOLDER / "bestsave.json").read_text())
    manifest["state"]["history_bytes"] = len(text.encode())
    (run / FOLDER / "bestsave.json").write_text(json.dumps(manifest))
    problems = verify(run)
    assert kinds(problems) == [("history", first)]
    assert "never evicted" in problems[0].detail


def test_problems_print_on_one_line_and_convert_to_dicts(run: Path) -> None:
    best_file(run).unlink()
    [problem] = verify(run)
    assert str(problem).startswith(f"missing: {problem.name}: ")
    assert "\n" not in str(problem)
    assert problem.to_dict() == {"kind": "missing", "name": problem.name, "detail": problem.detail}


def test_load_history_returns_every_evaluation_with_its_decision(run: Path) -> None:
    history = load_history(run)
    assert [h["epoch"] for h in history] == list(range(len(SCORES)))
    assert [h["score"] for h in history] == SCORES
    assert [h["decision"]["is_best"] for h in history] == [True, True, False, True, False, False]
    assert history[0]["metrics"] == {"val_acc": 0.5, "train_loss": 0.5}


def test_a_directory_without_a_run_is_an_error_with_a_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no bestsave run .*dirpath"):
        verify(tmp_path)
    with pytest.raises(FileNotFoundError, match="no bestsave run"):
        load_history(tmp_path)


def test_a_run_on_an_fsspec_url_is_verified_too() -> None:
    pytest.importorskip("fsspec")
    url = "memory://bestsave-verify-test/run"
    make_run(url)  # type: ignore[arg-type]
    assert verify(url) == []
    import fsspec

    fs = fsspec.filesystem("memory")
    best = load_manifest(url).best.name  # type: ignore[union-attr]
    fs.pipe_file(f"/bestsave-verify-test/run/{best}", b"tampered")
    assert kinds(verify(url)) == [("checksum", best)]
    fs.rm("/bestsave-verify-test", recursive=True)
