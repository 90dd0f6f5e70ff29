"""One directory, one writer."""

import json
import socket
import subprocess
import sys
import textwrap

import pytest

from bestsave import BestSaver
from bestsave.lock import DirectoryLockedError

pytestmark = pytest.mark.core

HOLDER = textwrap.dedent(
    """
    import sys, time
    from bestsave import BestSaver
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
    assert not (run_dir / "bestsave.lock").exists()


def test_a_lock_from_another_host_is_respected(tmp_path):
    (tmp_path / "bestsave.lock").write_text(
        json.dumps({"host": socket.gethostname() + "-other", "pid": 1, "run": "abc", "since": 0})
    )
    with pytest.raises(DirectoryLockedError, match=r"run abc.*delete"):
        BestSaver(tmp_path, monitor="val_loss")


def test_the_lock_is_released_at_close_and_taken_again_at_the_next_step(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_loss")
    assert (tmp_path / "bestsave.lock").exists()
    saver.close()
    assert not (tmp_path / "bestsave.lock").exists()
    saver.step(0, {"val_loss": 1.0}, write=lambda p: open(p, "w").write("x"))
    assert (tmp_path / "bestsave.lock").exists()
    saver.close()
