"""One run, one writer; several runs in one directory."""

import json
import socket
import subprocess
import sys
import textwrap

import pytest

from bestsave import BestSaver, load_best, load_manifest
from bestsave.lock import DirectoryLockedError

pytestmark = pytest.mark.core

LOCK = ".bestsave/epoch=epoch-val_loss=score/lock"

HOLDER = textwrap.dedent(
    """
    import sys, time
    from bestsave import BestSaver, load_best, load_manifest
    saver = BestSaver(sys.argv[1], monitor="val_loss")
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_a_second_run_on_a_locked_directory_names_the_holder(tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(HOLDER)
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryLockedError, match=rf"pid {holder.pid}.*another directory"):
            BestSaver(run_dir, monitor="val_loss")
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock is stale and taken over
    saver = BestSaver(run_dir, monitor="val_loss")
    saver.step(0, {"val_loss": 1.0}, write=lambda p: open(p, "w").write("x"))
    saver.close()
    assert not (run_dir / LOCK).exists()


def test_a_lock_from_another_host_is_respected(tmp_path):
    (tmp_path / LOCK).parent.mkdir(parents=True)
    (tmp_path / LOCK).write_text(
        json.dumps({"host": socket.gethostname() + "-other", "pid": 1, "run": "abc", "since": 0})
    )
    with pytest.raises(DirectoryLockedError, match=r"run abc.*delete"):
        BestSaver(tmp_path, monitor="val_loss")


def test_the_lock_is_released_at_close_and_taken_again_at_the_next_step(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_loss")
    assert (tmp_path / LOCK).exists()
    saver.close()
    assert not (tmp_path / LOCK).exists()
    saver.step(0, {"val_loss": 1.0}, write=lambda p: open(p, "w").write("x"))
    assert (tmp_path / LOCK).exists()
    saver.close()


def write(text):
    return lambda path: open(path, "w").write(text)


def test_savers_with_other_file_names_share_a_directory(tmp_path):
    best = BestSaver(tmp_path, monitor="val_loss", filename="best-{epoch}")
    every = BestSaver(tmp_path, monitor="val_loss", top_k=0, keep_every_n_epochs=1,
                      filename="{epoch}")  # fmt: skip
    for epoch, loss in enumerate([0.5, 0.4, 0.6]):
        for saver in (best, every):
            saver.step(epoch, {"val_loss": loss}, write=write(f"{saver.files.name} {epoch}"))
    best.close()
    every.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bestsave", "0", "1", "2", "best-1"]
    assert load_best(tmp_path, run="best-epoch").name == "best-1"
    assert [r.name for r in load_manifest(tmp_path, run="epoch").kept] == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"2 runs .*'best-epoch'.*run="):
        load_best(tmp_path)


def test_a_newer_saver_of_the_same_run_in_this_process_takes_it_over(tmp_path):
    # A notebook cell run again: the first saver was never closed.
    first = BestSaver(tmp_path, monitor="val_loss", filename="model", overwrite=True)
    first.step(0, {"val_loss": 0.5}, write=write("first"))
    second = BestSaver(tmp_path, monitor="val_loss", filename="model", overwrite=True)
    with pytest.raises(RuntimeError, match=r"another saver .* since opened run 'model'"):
        first.step(1, {"val_loss": 0.1}, write=write("late"))
    second.step(0, {"val_loss": 0.7}, write=write("second"))
    second.close()
    first.close()  # leaves the second's lock alone
    assert (tmp_path / "model").read_text() == "second"
    assert load_best(tmp_path).score == 0.7
