"""Writes that fail: a full disk, an I/O error, a read-only directory, a flaky remote store.

Whatever fails and wherever (serialising the checkpoint, making it durable, the history, the
manifest, the rename into place), the previous best stays intact and loadable, the error says
what happened (:class:`bestsave.WriteError` with the ``OSError`` as its cause), and training
either stops cleanly (``on_write_error="raise"``, the default: resuming later ends exactly where
a run without the fault ends) or trains on with a warning (``"warn"``: the run's files stay
consistent with its manifest and history), with background writes and without.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import bestsave.store
from bestsave import (
    BestSaver,
    BestSaveWarning,
    Staged,
    WriteError,
    fetch,
    load_best,
    load_manifest,
)
from bestsave.adapters.torch import TorchCheckpointer
from bestsave.layout import MANIFEST
from bestsave.verify import load_history, verify

from .conftest import assert_intact, crash_problems, leftovers

# val_loss by epoch: 0, 1 and 2 are each a new best, 3 is not, 4 is the best of all.
SCORES = [0.5, 0.4, 0.3, 0.35, 0.2]
FAIL_AT = 2  # the epoch whose save fails
OPTIONS: dict[str, Any] = dict(monitor="val_loss", save_last=True, trackers=())


def oserror(code: int, path: str = "") -> OSError:
    return OSError(code, os.strerror(code), path)


def settle(ckpt: TorchCheckpointer) -> None:
    """Wait until the background writer has run or failed what it was given, so that the
    next step sees the failure: where a background error surfaces is then deterministic."""
    worker = ckpt.saver._pipeline._worker
    if worker is not None:
        worker.flush()


class Training:
    """A tiny model trained one deterministic step per epoch; remembers each epoch's weights."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.weights: dict[int, dict[str, Any]] = {}

    def run(self, ckpt: TorchCheckpointer, start: int = 0, end: int = len(SCORES)) -> None:
        for epoch in range(start, end):
            self.optimizer.zero_grad()
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(epoch))
            self.model(x).pow(2).mean().backward()
            self.optimizer.step()
            self.weights[epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}
            ckpt.step(
                epoch, {"val_loss": SCORES[epoch]}, model=self.model, optimizer=self.optimizer
            )

    def run_through_fault(self, ckpt: TorchCheckpointer) -> None:
        """Epochs before ``FAIL_AT`` committed, the failing one, then the rest."""
        self.run(ckpt, 0, FAIL_AT)
        ckpt.close()
        self.run(ckpt, FAIL_AT, FAIL_AT + 1)
        settle(ckpt)
        self.run(ckpt, FAIL_AT + 1)
        ckpt.close()

    def resume(self, dirpath: Any, **storage_options: Any) -> int:
        """Start the script again after the fault is gone; returns the epoch it resumed at."""
        ckpt = TorchCheckpointer(dirpath, **OPTIONS, resume=True, storage_options=storage_options)
        start = ckpt.restore(self.model, self.optimizer)
        self.run(ckpt, start)
        ckpt.close()
        return start

    def assert_best_is(self, dirpath: Any, *epochs: int, **storage_options: Any) -> None:
        """The best file is intact, loads with weights_only=True, holds that epoch's weights."""
        assert_intact(dirpath, **storage_options)
        best = load_best(dirpath, **storage_options)
        assert best.epoch in epochs
        state = torch.load(fetch(best, **storage_options), weights_only=True)
        for key, value in state["model"].items():
            assert torch.equal(value, self.weights[best.epoch][key]), key


def outcome(dirpath: Any, **storage_options: Any) -> tuple[list[tuple[int, str, str]], list[int]]:
    """What a run ended with: its kept files and the epochs of its history."""
    kept = [(r.epoch, r.kind, r.name) for r in load_manifest(dirpath, **storage_options).kept]
    return kept, [h["epoch"] for h in load_history(dirpath, **storage_options)]


@pytest.fixture(scope="module")
def clean_outcome(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list]:
    """The same run with no fault."""
    dirpath = tmp_path_factory.mktemp("clean")
    ckpt = TorchCheckpointer(dirpath, **OPTIONS)
    Training().run(ckpt)
    ckpt.close()
    return outcome(dirpath)


def problems(dirpath: Any, **storage_options: Any) -> list[str]:
    return [str(p) for p in verify(dirpath, **storage_options)]


# -- the disk fills, or fails, while a checkpoint is written -------------------------------------


@pytest.fixture
def failing_save(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``torch.save`` of epoch ``FAIL_AT`` writes half a file, then fails with ``errno``."""
    fault: dict[str, Any] = {"errno": errno.ENOSPC, "failed": 0}
    save = torch.save

    def faulty(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(obj, dict) and obj.get("epoch") == FAIL_AT and not fault["failed"]:
            fault["failed"] += 1
            if hasattr(f, "write"):  # the adapters hand torch.save an open file
                f.write(b"half a checkpoint")
            else:
                with open(f, "wb") as out:
                    out.write(b"half a checkpoint")
            raise oserror(fault["errno"], str(getattr(f, "name", f)))
        save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", faulty)
    return fault


@pytest.mark.parametrize(
    "async_write, staging_memory",
    [(True, None), (False, None), (True, 1)],
    ids=["async", "sync", "streaming"],  # streaming: no room for a copy, written at once
)
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_a_failed_write_stops_training_cleanly_and_keeps_the_best(
    tmp_path, failing_save, clean_outcome, code, async_write, staging_memory
):
    failing_save["errno"] = code
    training = Training()
    ckpt = TorchCheckpointer(tmp_path, **OPTIONS, async_write=async_write,
                             staging_memory=staging_memory)  # fmt: skip
    async_write = async_write and staging_memory is None
    # Caught as what it is, as code written for the stock callbacks catches a full disk.
    with pytest.raises(OSError) as caught:
        training.run_through_fault(ckpt)
    assert isinstance(caught.value, WriteError) and caught.value.errno == code
    cause = caught.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == code
    assert os.strerror(code) in str(caught.value)
    assert "previous best is intact" in str(caught.value)
    assert max(training.weights) == FAIL_AT + async_write  # at the failure, or the next step
    ckpt.close()  # reported once: closing again is quiet
    training.assert_best_is(tmp_path, FAIL_AT - 1)
    assert crash_problems(tmp_path) == []

    # The disk has room again: the script is started again and resumes after the last commit.
    assert training.resume(tmp_path) == FAIL_AT
    training.assert_best_is(tmp_path, 4)
    assert not leftovers(tmp_path)
    assert problems(tmp_path) == []
    assert outcome(tmp_path) == clean_outcome


@pytest.mark.parametrize("async_write", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_with_warn_training_goes_on_past_a_failed_write(tmp_path, failing_save, code, async_write):
    failing_save["errno"] = code
    training = Training()
    ckpt = TorchCheckpointer(tmp_path, **OPTIONS, async_write=async_write, on_write_error="warn")
    with pytest.warns(BestSaveWarning, match=os.strerror(code)) as caught:
        training.run_through_fault(ckpt)
    assert "previous best is intact" in str(caught[0].message)
    assert max(training.weights) == len(SCORES) - 1  # every epoch trained
    training.assert_best_is(tmp_path, 4)
    manifest = load_manifest(tmp_path)
    assert FAIL_AT not in [r.epoch for r in manifest.kept]
    assert manifest.last.epoch == len(SCORES) - 1
    assert crash_problems(tmp_path) == []


@pytest.mark.parametrize("async_write", [True, False], ids=["async", "sync"])
def test_a_half_written_checkpoint_is_deleted_when_its_write_fails(
    tmp_path, failing_save, async_write
):
    """A full disk must not fill further: the failed write's partial file goes at once, not at
    the next start (with ``warn`` every failed epoch would leave one more)."""
    training = Training()
    ckpt = TorchCheckpointer(tmp_path, **OPTIONS, async_write=async_write, on_write_error="warn")
    with pytest.warns(BestSaveWarning, match="No space left"):
        training.run_through_fault(ckpt)
    assert leftovers(tmp_path) == []


# -- faults in the store: durability, history, the commit point, the rename ---------------------

STORE_FAULTS: dict[str, tuple[str, int, Callable[[tuple], bool] | None]] = {
    # fsync of the new checkpoint fails: it never becomes part of the run
    "publish": ("publish", errno.EIO, None),
    # the history line cannot be appended
    "history": ("append_text", errno.ENOSPC, None),
    # the commit point itself: the disk fills while the manifest is written
    "manifest": ("write_text", errno.ENOSPC, lambda args: Path(args[0]).name == MANIFEST),
    # the rename into place, after the commit, fails
    "rename": ("rename", errno.EIO, None),
}


@pytest.fixture(params=sorted(STORE_FAULTS))
def store_fault(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``LocalStore.<method>`` fails once, at its first call while epoch ``FAIL_AT`` is saved."""
    method, code, when = STORE_FAULTS[request.param]
    original = getattr(bestsave.store.LocalStore, method)
    fault = {"where": request.param, "errno": code, "failed": 0, "armed": False}

    def faulty(self: Any, *args: Any) -> Any:
        if fault["armed"] and not fault["failed"] and (when is None or when(args)):
            fault["failed"] += 1
            raise oserror(code, os.path.join(self.url, str(args[-1])))
        return original(self, *args)

    save = torch.save

    def arming_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        save(obj, f, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("epoch") == FAIL_AT:
            fault["armed"] = True

    monkeypatch.setattr(bestsave.store.LocalStore, method, faulty)
    monkeypatch.setattr(torch, "save", arming_save)
    return fault


@pytest.mark.parametrize("async_write", [True, False], ids=["async", "sync"])
def test_a_store_fault_stops_cleanly_and_resuming_ends_as_a_clean_run(
    tmp_path, store_fault, clean_outcome, async_write
):
    training = Training()
    ckpt = TorchCheckpointer(tmp_path, **OPTIONS, async_write=async_write)
    with pytest.raises(WriteError, match=os.strerror(store_fault["errno"])) as caught:
        training.run_through_fault(ckpt)
    assert isinstance(caught.value.__cause__, OSError) and store_fault["failed"] == 1
    ckpt.close()
    # A rename fails after the commit: the manifest already names epoch FAIL_AT's file (under
    # its temporary name until a resume renames it); any earlier fault leaves the previous best.
    training.assert_best_is(tmp_path, *([FAIL_AT - 1, FAIL_AT]))
    assert crash_problems(tmp_path) == []

    training.resume(tmp_path)
    training.assert_best_is(tmp_path, 4)
    assert not leftovers(tmp_path)
    assert problems(tmp_path) == []
    assert outcome(tmp_path) == clean_outcome


@pytest.mark.parametrize("async_write", [True, False], ids=["async", "sync"])
def test_a_store_fault_with_warn_trains_on_and_leaves_a_consistent_run(
    tmp_path, store_fault, async_write
):
    training = Training()
    ckpt = TorchCheckpointer(tmp_path, **OPTIONS, async_write=async_write, on_write_error="warn")
    with pytest.warns(BestSaveWarning, match=os.strerror(store_fault["errno"])):
        training.run_through_fault(ckpt)
    assert store_fault["failed"] == 1
    training.assert_best_is(tmp_path, 4)
    # The manifest, the history and the files agree when the run ends; only temporary files
    # may wait for the next start.
    assert crash_problems(tmp_path) == []
    TorchCheckpointer(tmp_path, **OPTIONS, resume=True).close()
    assert problems(tmp_path) == []
    training.assert_best_is(tmp_path, 4)


def test_with_warn_a_best_decided_while_a_background_write_fails_is_still_written(tmp_path):
    """Epoch 2's background write fails only after epochs 3 and 4 were judged. Epoch 4 was
    returned as saved and best; it must be written, not dropped with the failed job."""
    gate, started = threading.Event(), threading.Event()

    def serialize(text: str, path: str) -> None:
        if text == "epoch 2":
            started.set()
            gate.wait(30)
            raise oserror(errno.ENOSPC, path)
        with open(path, "w") as f:
            f.write(text)

    saver = BestSaver(tmp_path, monitor="val_loss", on_write_error="warn", trackers=())
    decisions = {}
    for epoch, score in enumerate(SCORES):
        decisions[epoch] = saver.step(
            epoch, {"val_loss": score}, write=Staged(lambda e=epoch: f"epoch {e}", serialize)
        )
        if epoch < FAIL_AT:
            saver.close()
        if epoch == FAIL_AT:  # in flight: a newer best cannot replace it before it fails
            assert started.wait(30)
    gate.set()
    with pytest.warns(BestSaveWarning, match="No space left"):
        saver.close()
    assert decisions[4].is_best and decisions[4].saved
    best = load_best(tmp_path)
    assert best.epoch == 4 and open(fetch(best)).read() == "epoch 4"


# -- a read-only directory -----------------------------------------------------------------------


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` read-only: chmod, or a read-only bind mount as root (chmod binds no root)."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    bind = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(
            "runs as root, where chmod does not stop writes, and a read-only bind mount is not "
            f"permitted here ({bind.stderr.decode().strip()})"
        )
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("on_write_error", ["raise", "warn"])
def test_a_directory_turned_read_only_keeps_the_best_and_says_so(tmp_path, on_write_error):
    run = tmp_path / "run"
    run.mkdir()
    training = Training()
    ckpt = TorchCheckpointer(run, **OPTIONS, async_write=False, on_write_error=on_write_error)
    training.run(ckpt, 0, FAIL_AT)
    expected = "Read-only file system|Permission denied"
    with read_only(run):
        if on_write_error == "raise":
            with pytest.raises(WriteError, match=expected):
                training.run(ckpt, FAIL_AT)
        else:
            with pytest.warns(BestSaveWarning, match=expected):
                training.run(ckpt, FAIL_AT)
        training.assert_best_is(run, FAIL_AT - 1)  # still there, still readable, still best
    ckpt.close()
    assert training.resume(run) == FAIL_AT
    training.assert_best_is(run, 4)
    assert problems(run) == []


def test_a_read_only_directory_is_refused_at_the_start_naming_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with read_only(run), pytest.raises(OSError, match=r"Read-only file system|Permission denied"):
        TorchCheckpointer(run, **OPTIONS)


def test_with_warn_closing_on_a_read_only_directory_warns_and_does_not_raise(tmp_path):
    """The run ends on a directory that turned read-only: ``close()`` cannot delete the lock,
    which must not turn "train on with a warning" into a crash at the very end."""
    run = tmp_path / "run"
    run.mkdir()
    training = Training()
    ckpt = TorchCheckpointer(run, **OPTIONS, async_write=False, on_write_error="warn")
    training.run(ckpt, 0, FAIL_AT)
    with read_only(run):
        with pytest.warns(BestSaveWarning):
            training.run(ckpt, FAIL_AT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt.close()
    training.assert_best_is(run, FAIL_AT - 1)


# -- a remote store that fails, then recovers ----------------------------------------------------


@pytest.fixture
def flaky_store() -> Iterator[dict[str, Any]]:
    """A ``flaky://`` fsspec filesystem (in memory) whose uploads fail while ``down`` is set."""
    fsspec = pytest.importorskip("fsspec")
    from fsspec.implementations.memory import MemoryFileSystem

    control: dict[str, Any] = {"down": False, "failed": 0}

    class FlakyFileSystem(MemoryFileSystem):
        protocol = "flaky"
        store: dict = {}  # noqa: RUF012 - its own files, apart from memory://
        pseudo_dirs = [""]  # noqa: RUF012

        def put_file(self, lpath: str, rpath: str, *args: Any, **kwargs: Any) -> None:
            if control["down"]:
                control["failed"] += 1
                raise ConnectionError(f"connection reset while uploading {rpath}")
            super().put_file(lpath, rpath, *args, **kwargs)

    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    control["url"] = f"flaky://bucket/{uuid.uuid4().hex}"
    yield control
    FlakyFileSystem.store.clear()


@pytest.mark.parametrize("async_write", [True, False], ids=["async", "sync"])
def test_with_warn_a_remote_store_that_fails_then_recovers(flaky_store, async_write):
    url = flaky_store["url"]
    training = Training()
    ckpt = TorchCheckpointer(url, **OPTIONS, async_write=async_write, on_write_error="warn")
    training.run(ckpt, 0, FAIL_AT)
    ckpt.close()
    flaky_store["down"] = True
    with pytest.warns(BestSaveWarning, match="connection reset"):
        training.run(ckpt, FAIL_AT, FAIL_AT + 1)
        ckpt.close()
    assert flaky_store["failed"] >= 1
    training.assert_best_is(url, FAIL_AT - 1)
    flaky_store["down"] = False
    training.run(ckpt, FAIL_AT + 1)
    ckpt.close()
    training.assert_best_is(url, 4)
    assert load_manifest(url).last.epoch == len(SCORES) - 1
    assert problems(url) == []


@pytest.mark.parametrize("async_write", [True, False], ids=["async", "sync"])
def test_a_remote_store_down_stops_training_and_a_later_resume_finishes(
    flaky_store, clean_outcome, async_write
):
    url = flaky_store["url"]
    training = Training()
    ckpt = TorchCheckpointer(url, **OPTIONS, async_write=async_write)
    training.run(ckpt, 0, FAIL_AT)
    ckpt.close()
    flaky_store["down"] = True
    with pytest.raises(WriteError, match="connection reset") as caught:
        training.run(ckpt, FAIL_AT)
        ckpt.close()
    assert isinstance(caught.value.__cause__, ConnectionError)
    ckpt.close()
    training.assert_best_is(url, FAIL_AT - 1)
    flaky_store["down"] = False
    assert training.resume(url) == FAIL_AT
    training.assert_best_is(url, 4)
    assert problems(url) == []
    kept, history = outcome(url)
    assert (kept, history) == clean_outcome


def test_a_failed_write_evicts_nothing(tmp_path):
    """top_k=2: the files a failed save would have pushed out stay, intact."""
    saver = BestSaver(tmp_path, monitor="val_loss", top_k=2, trackers=(), async_write=False)
    for epoch, score in enumerate([0.5, 0.4]):
        saver.step(epoch, {"val_loss": score}, write=lambda p: open(p, "w").write("ok"))

    def broken(path: str) -> None:
        raise oserror(errno.ENOSPC, path)

    with pytest.raises(WriteError, match="No space left"):
        saver.step(2, {"val_loss": 0.1}, write=broken)
    assert [r.epoch for r in load_manifest(tmp_path).kept] == [1, 0]
    assert_intact(tmp_path)
    saver.close()
