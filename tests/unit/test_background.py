"""Background writes: errors surface, newer bests replace pending ones, eviction waits."""

import gc
import json
import os
import threading
import warnings

import pytest
from runfiles import checkpoints, run_folder

from bestsave import BestSaver, BestSaveWarning, Staged, WriteError, load_best, load_manifest
from bestsave.jobs import Captured

pytestmark = pytest.mark.core


class Snapshot:
    live = 0
    peak = 0
    lock = threading.Lock()

    def __init__(self, text):
        self.text = text
        with Snapshot.lock:
            Snapshot.live += 1
            Snapshot.peak = max(Snapshot.peak, Snapshot.live)

    def release(self):
        with Snapshot.lock:
            Snapshot.live -= 1


def staged(text, gate=None, check=None, fail=None):
    def serialize(snapshot, path):
        if gate is not None:
            gate.wait(10)
        if check is not None:
            check()
        if fail is not None:
            raise fail
        with open(path, "w") as f:
            f.write(snapshot.text)

    return Staged(lambda: Snapshot(text), serialize)


def test_a_failed_background_write_raises_at_the_next_step_and_keeps_the_best(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc")
    saver.step(0, {"val_acc": 0.5}, write=staged("e0"))
    saver.close()
    saver.step(1, {"val_acc": 0.9}, write=staged("e1", fail=OSError(5, "Input/output error")))
    saver._pipeline._worker.flush()
    with pytest.raises(WriteError, match="Input/output error") as caught:
        saver.step(2, {"val_acc": 0.1}, write=staged("e2"))
    assert isinstance(caught.value.__cause__, OSError)
    assert saver.best.epoch == 0 and load_best(tmp_path).epoch == 0
    assert open(load_best(tmp_path).path).read() == "e0"
    assert not [f for f in os.listdir(run_folder(tmp_path)) if f.startswith(".bestsave-tmp-")]


def test_a_failed_background_write_raises_at_close(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc")
    saver.step(0, {"val_acc": 0.5}, write=staged("e0", fail=ValueError("cannot pickle")))
    with pytest.raises(WriteError, match="cannot pickle"):
        saver.close()
    saver.close()  # reported once; the saver stays usable
    saver.step(1, {"val_acc": 0.6}, write=staged("e1"))
    saver.close()
    assert load_best(tmp_path).epoch == 1


def test_warn_mode_trains_on_after_a_failed_write(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc", on_write_error="warn")
    saver.step(0, {"val_acc": 0.5}, write=staged("e0"))
    saver.step(1, {"val_acc": 0.9}, write=staged("e1", fail=OSError(28, "No space left")))
    saver._pipeline._worker.flush()
    with pytest.warns(BestSaveWarning, match="No space left"):
        saver.step(2, {"val_acc": 0.7}, write=staged("e2"))
    saver.close()
    # epoch 1 was never written: epoch 2 beat the best that exists
    assert [r.epoch for r in saver.kept] == [2]
    assert open(load_best(tmp_path).path).read() == "e2"


def test_a_newer_best_replaces_a_pending_one_that_has_not_started(tmp_path):
    gate, started = threading.Event(), threading.Event()
    written = []

    def tracking(text, **kw):
        w = staged(text, **kw)

        def serialize(snapshot, path):
            written.append(snapshot.text)
            started.set()
            w.serialize(snapshot, path)

        return Staged(w.capture, serialize)

    Snapshot.live = Snapshot.peak = 0
    saver = BestSaver(tmp_path, monitor="val_acc")
    saver.step(0, {"val_acc": 0.5}, write=tracking("e0", gate=gate))
    started.wait(10)  # e0 is in flight, blocked
    saver.step(1, {"val_acc": 0.6}, write=tracking("e1"))  # pending
    saver.step(2, {"val_acc": 0.7}, write=tracking("e2"))  # replaces the pending e1
    gate.set()
    saver.close()
    assert written == ["e0", "e2"]
    # e1's snapshot was freed before e2's was taken
    assert Snapshot.peak == 2 and Snapshot.live == 0
    assert [r.epoch for r in load_manifest(tmp_path).kept] == [2]
    history = [
        json.loads(x) for x in (run_folder(tmp_path) / "history.jsonl").read_text().splitlines()
    ]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert checkpoints(tmp_path) == {"epoch=002-val_acc=0.7000"}
    assert sorted(os.listdir(run_folder(tmp_path))) == [
        "bestsave.json",
        "epoch=002-val_acc=0.7000.json",
        "history.jsonl",
    ]


def streamed(text, blocks, gate=None, started=None):
    """A write of ``blocks`` pieces through the file object the saver hands over; it waits for
    ``gate`` after the first piece."""

    def serialize(snapshot, f):
        for i in range(blocks):
            f.write(f"{snapshot.text}:{i};".encode())
            if i == 0 and started is not None:
                started.set()
            if i == 0 and gate is not None:
                gate.wait(10)
            written.append((snapshot.text, i))

    written = []
    return Staged(lambda: Snapshot(text), serialize, stream=True), written


@pytest.mark.parametrize("top_k", [1, 2])
def test_at_flush_a_write_the_pending_one_would_delete_is_abandoned(tmp_path, monkeypatch, top_k):
    abandoned, gate, started = threading.Event(), threading.Event(), threading.Event()
    abandon = Captured.abandon

    def spy(self):
        abandoned.set()
        abandon(self)

    monkeypatch.setattr(Captured, "abandon", spy)
    saver = BestSaver(tmp_path, monitor="val_acc", top_k=top_k)
    first, first_written = streamed("e0", 5, gate=gate, started=started)
    saver.step(0, {"val_acc": 0.5}, write=first)
    assert started.wait(10)  # e0 is in flight, waiting after its first block
    second, _ = streamed("e1", 5)
    saver.step(1, {"val_acc": 0.6}, write=second)  # pending: with top_k=1 it evicts e0
    flushing = threading.Thread(target=saver.close)
    flushing.start()
    if top_k == 1:
        assert abandoned.wait(10)
    else:
        flushing.join(0.5)  # it waits for e0, which it keeps
        assert not abandoned.is_set()
    gate.set()
    flushing.join(10)
    assert not flushing.is_alive()
    kept = [r.epoch for r in load_manifest(tmp_path).kept]
    history = [
        json.loads(x) for x in (run_folder(tmp_path) / "history.jsonl").read_text().splitlines()
    ]
    assert [h["epoch"] for h in history] == [0, 1]
    assert load_best(tmp_path).path.endswith("epoch=001-val_acc=0.6000")
    assert open(load_best(tmp_path).path).read() == "".join(f"e1:{i};" for i in range(5))
    if top_k == 1:
        assert kept == [1]
        assert len(first_written) == 1  # stopped at its next block
        assert history[1]["decision"]["evicted"] == ["epoch=000-val_acc=0.5000"]
        leftovers = [*os.listdir(tmp_path), *os.listdir(run_folder(tmp_path))]
        assert not [n for n in leftovers if "epoch=000" in n or "tmp" in n]
    else:
        assert sorted(kept) == [0, 1] and len(first_written) == 5


def test_eviction_waits_for_the_replacement_to_be_committed(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc")
    saver.step(0, {"val_acc": 0.5}, write=staged("e0"))
    saver.close()
    old = load_best(tmp_path).path

    def old_best_still_there():
        assert os.path.exists(old)
        assert load_best(tmp_path).epoch == 0

    saver.step(1, {"val_acc": 0.9}, write=staged("e1", check=old_best_still_there))
    saver.close()
    assert not os.path.exists(old) and load_best(tmp_path).epoch == 1


def test_a_newer_saver_of_the_run_waits_for_the_writes_of_a_dropped_older_one(tmp_path):
    """A notebook cell run again after a fit the user stopped: nothing refers to the first
    saver any more (it was never closed, and the garbage collector may free it at any time),
    yet its write in the background lands before the second saver takes the run over."""
    gate = threading.Event()

    def serialize(text, path):
        gate.wait(10)
        with open(path, "w") as f:
            f.write(text)

    first = BestSaver(tmp_path, monitor="val_acc", filename="model", overwrite=True)
    first.step(0, {"val_acc": 0.5}, write=Staged(lambda: "first", serialize))
    del first
    gc.collect()
    threading.Timer(0.2, gate.set).start()
    with pytest.warns(BestSaveWarning, match=r"its best is model .*Starting a new run"):
        second = BestSaver(tmp_path, monitor="val_acc", filename="model", overwrite=True)
    second.step(0, {"val_acc": 0.4}, write=staged("second"))
    second.close()
    assert (tmp_path / "model").read_text() == "second"
    assert load_best(tmp_path).score == 0.4 and len(load_manifest(tmp_path).kept) == 1


def test_at_most_two_snapshots_are_held(tmp_path):
    Snapshot.live = Snapshot.peak = 0
    gate = threading.Event()
    threading.Timer(0.3, gate.set).start()
    saver = BestSaver(tmp_path, monitor="val_acc", top_k=5)
    for epoch in range(5):  # every one is kept, so none can replace another
        saver.step(epoch, {"val_acc": 0.1 * epoch}, write=staged(f"e{epoch}", gate=gate))
    saver.close()
    assert Snapshot.peak <= 2 and Snapshot.live == 0
    assert sorted(r.epoch for r in saver.kept) == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling classes")
def test_the_writer_runs_only_on_cores_training_leaves_idle(tmp_path):
    policies = []
    saver = BestSaver(tmp_path, monitor="val_acc")
    saver.step(
        0,
        {"val_acc": 0.5},
        write=staged("e0", check=lambda: policies.append(os.sched_getscheduler(0))),
    )
    saver.close()
    assert policies == [os.SCHED_IDLE]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the training thread is left as it was


def test_sync_and_background_write_the_same_files(tmp_path):
    for mode in (True, False):
        saver = BestSaver(
            tmp_path / str(mode),
            monitor="val_acc",
            top_k=2,
            async_write=mode,
            keep_every_n_epochs=2,
            save_last=True,
        )
        for epoch, score in enumerate([0.3, 0.5, 0.4, 0.6]):
            saver.step(epoch, {"val_acc": score}, write=staged(f"e{epoch}"))
        saver.close()
    a, b = (sorted(checkpoints(tmp_path / m)) for m in ("True", "False"))
    assert a == b
    assert sorted(os.listdir(run_folder(tmp_path / "True"))) == sorted(
        os.listdir(run_folder(tmp_path / "False"))
    )
    for name in a:
        assert (tmp_path / "True" / name).read_text() == (tmp_path / "False" / name).read_text()


def test_a_failed_capture_after_replacing_a_pending_write_loses_only_that_write(tmp_path):
    gate, started = threading.Event(), threading.Event()

    def capture_fails():
        raise MemoryError("no room for the snapshot")

    saver = BestSaver(tmp_path, monitor="val_acc", on_write_error="warn")
    e0 = staged("e0", gate=gate)

    def in_flight(snapshot, path):
        started.set()
        e0.serialize(snapshot, path)

    saver.step(0, {"val_acc": 0.5}, write=Staged(e0.capture, in_flight))
    started.wait(10)
    saver.step(1, {"val_acc": 0.6}, write=staged("e1"))  # pending, then taken back
    with pytest.warns(BestSaveWarning, match="no room for the snapshot"):
        saver.step(2, {"val_acc": 0.7}, write=Staged(capture_fails, lambda s, p: None))
    gate.set()
    with pytest.warns(BestSaveWarning, match="released for a newer one"):
        saver.close()
    saver.step(3, {"val_acc": 0.65}, write=staged("e3"))
    saver.close()
    # e1 was never written; e0 stayed the best until e3 beat it
    manifest = load_manifest(tmp_path)
    assert [r.epoch for r in manifest.kept] == [3]
    assert open(load_best(tmp_path).path).read() == "e3"
    history = [
        json.loads(x) for x in (run_folder(tmp_path) / "history.jsonl").read_text().splitlines()
    ]
    assert [h["epoch"] for h in history] == [0, 1, 3]
    assert history[1]["decision"]["saved"] is False
    assert Snapshot.live == 0
    assert not [f for f in os.listdir(run_folder(tmp_path)) if f.startswith(".bestsave-tmp-")]


@pytest.mark.parametrize("async_write", [True, False], ids=["background", "sync"])
def test_the_latest_save_stays_in_memory_until_the_next_snapshot(tmp_path, async_write):
    np = pytest.importorskip("numpy")
    from bestsave.staging import Stager

    stager, weights = Stager(), [np.zeros(3)]

    def serialize(snapshot, path):
        with open(path, "wb") as f:
            np.save(f, snapshot.state[0])

    def write():
        return Staged(lambda: stager.snapshot(weights), serialize)

    saver = BestSaver(tmp_path, monitor="val_acc", save_last=True, async_write=async_write)
    weights[0] += 1
    saver.step(0, {"val_acc": 0.5}, write=write())
    saver.close()
    best = saver.best
    assert saver.held_state(best)[0].tolist() == [1, 1, 1]
    weights[0] += 1  # training goes on: the held state is the saved one
    assert saver.held_state(best)[0].tolist() == [1, 1, 1]

    saver.step(1, {"val_acc": 0.4}, write=write())  # not better: only `last` is saved
    saver.close()
    assert saver.held_state(best) is None  # its buffers now hold epoch 1
    assert saver.held_state(saver.last)[0].tolist() == [2, 2, 2]


def test_a_failed_write_of_a_fixed_name_keeps_the_file_it_would_have_replaced(tmp_path):
    np = pytest.importorskip("numpy")
    from bestsave.staging import Stager
    from bestsave.verify import verify

    stager, weights = Stager(), [np.zeros(3)]

    def serialize(snapshot, path):
        if snapshot.state[0][0] == 2:
            raise OSError(28, "No space left on device")
        with open(path, "wb") as f:
            np.save(f, snapshot.state[0])

    saver = BestSaver(tmp_path, monitor="val_acc", filename="best", on_write_error="warn")
    for epoch, score in enumerate([0.5, 0.6]):
        weights[0] += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BestSaveWarning)
            write = Staged(lambda: stager.snapshot(weights), serialize)
            saver.step(epoch, {"val_acc": score}, write=write)
            saver.close()
    # Epoch 1's write failed: `best` still holds epoch 0, and the run still lists it.
    for best in (saver.best, load_manifest(tmp_path).best):
        assert (best.epoch, best.score) == (0, 0.5)
    assert list(verify(tmp_path)) == []
    assert np.load(load_best(tmp_path).path).tolist() == [1, 1, 1]
    # The snapshot in memory is epoch 1's, never written: it does not pass for the best.
    assert saver.held_state(saver.best) is None


def test_a_capture_that_is_not_a_stager_snapshot_is_not_held(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc")
    saver.step(0, {"val_acc": 0.5}, write=staged("e0"))
    saver.close()
    assert saver.held_state(saver.best) is None
