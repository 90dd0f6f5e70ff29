"""Checkpoints that are folders (a sharded checkpoint, a ``save_pretrained`` folder) follow the
rules files follow: written under a temporary name, a checksum per part, renamed into place
after the commit, evicted (the whole folder) only after the commit that drops them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from runfiles import folder_writer

from bestsave import BestSaver, fetch, load_best, load_manifest
from bestsave.layout import META
from bestsave.store import TMP_PREFIX, tree_digest
from bestsave.verify import verify


def run(dirpath, scores, **options) -> BestSaver:
    saver = BestSaver(dirpath, monitor="val_loss", **options)
    for epoch, score in enumerate(scores):
        saver.step(epoch, {"val_loss": score}, write=folder_writer(f"epoch {epoch}"))
    saver.close()
    return saver


def test_kept_folders_carry_a_checksum_per_part_and_load_back(tmp_path):
    saver = run(tmp_path, [0.5, 0.4, 0.6, 0.3], top_k=2, save_last=True)
    best = load_best(tmp_path)
    assert best.epoch == 3 and saver.best.parts == best.parts
    assert sorted(best.parts) == ["config.json", "shards/part-0.bin"]
    assert (best.bytes, best.sha256) == tree_digest(best.parts)
    assert Path(fetch(best), "config.json").read_text() == "epoch 3"
    assert sorted(p for p in os.listdir(tmp_path) if p != META) == [
        "epoch=001-val_loss=0.4000",
        "epoch=003-val_loss=0.3000",
        "last",
    ]
    assert Path(tmp_path, "last", "config.json").read_text() == "epoch 3"  # replaced whole
    assert verify(tmp_path) == []


def test_verify_names_the_part_that_changed_went_missing_or_was_added(tmp_path):
    run(tmp_path, [0.5])
    folder = Path(load_best(tmp_path).path)
    (folder / "config.json").write_text("edited")
    (folder / "shards" / "part-0.bin").unlink()
    (folder / "notes.txt").write_text("added")
    problems = {(p.kind, p.name.split("/", 1)[1]) for p in verify(tmp_path)}
    assert problems == {
        ("checksum", "config.json"),
        ("missing", "shards/part-0.bin"),
        ("extra", "notes.txt"),
    }


def test_an_evicted_folder_goes_whole_and_a_resumed_run_keeps_its_folders(tmp_path):
    run(tmp_path, [0.5, 0.4], top_k=1)
    assert not (tmp_path / "epoch=000-val_loss=0.5000").exists()
    saver = BestSaver(tmp_path, monitor="val_loss", top_k=1, resume=True)
    assert saver.best.name == "epoch=001-val_loss=0.4000" and saver.best.parts
    saver.step(2, {"val_loss": 0.2}, write=folder_writer("epoch 2"))
    saver.close()
    assert [r.epoch for r in load_manifest(tmp_path).kept] == [2]
    assert not (tmp_path / "epoch=001-val_loss=0.4000").exists()
    assert verify(tmp_path) == []


def test_a_folder_a_crash_left_half_written_is_cleaned_when_the_run_resumes(tmp_path):
    saver = run(tmp_path, [0.5])
    half = tmp_path / saver.files.folder / f"{TMP_PREFIX}1234-epoch=001-val_loss=0.4000"
    (half / "shards").mkdir(parents=True)
    (half / "shards" / "part-0.bin").write_bytes(b"half")
    assert [p.kind for p in verify(tmp_path)] == ["leftover"]
    BestSaver(tmp_path, monitor="val_loss", resume=True).close()
    assert not half.exists()
    assert verify(tmp_path) == []


def test_a_periodic_twin_of_a_kept_folder_holds_the_same_parts(tmp_path):
    run(tmp_path, [0.5, 0.4], keep_every_n_epochs=2)
    kept = {r.kind: r for r in load_manifest(tmp_path).kept}
    assert kept["best"].parts == kept["periodic"].parts
    assert verify(tmp_path) == []


def test_folders_work_on_a_remote_store():
    pytest.importorskip("fsspec")
    url = "memory://bestsave-folders/run"
    run(url, [0.5, 0.4, 0.45], top_k=2)
    best = load_best(url)
    assert best.epoch == 1
    assert Path(fetch(best), "config.json").read_text() == "epoch 1"
    assert verify(url) == []
