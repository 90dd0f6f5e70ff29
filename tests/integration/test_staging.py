"""Snapshots into reused host buffers: the training thread copies, it does not allocate."""

import hashlib
import io
import subprocess
import sys
import textwrap
import threading

import pytest

torch = pytest.importorskip("torch")

from bestsave.hashing import HashingFile
from bestsave.jobs import Abandoned, Captured
from bestsave.staging import Stager
from bestsave.store import file_digest


def test_the_second_snapshot_reuses_buffers_allocated_beside_training():
    stager = Stager()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
    first = stager.snapshot({"model": model.state_dict(), "epoch": 0})
    stager._warming.join()  # the spare set is allocated in a helper thread
    spare = {id(t) for t in stager._slots[1].values()}
    with torch.no_grad():
        model[0].weight.add_(1)
    second = stager.snapshot({"model": model.state_dict(), "epoch": 1})
    assert {id(t) for t in second.state["model"].values()} == spare
    assert stager._warming is None  # nothing was allocated, so nothing more to warm
    assert torch.equal(second.state["model"]["0.weight"], model[0].weight)
    assert torch.equal(first.state["model"]["0.weight"] + 1, model[0].weight)
    first.release()
    second.release()
    third = stager.snapshot({"model": model.state_dict(), "epoch": 2})
    assert len(stager._slots) == 2
    third.release()


def test_reserved_buffers_make_the_first_snapshot_a_copy(tmp_path):
    stager = Stager()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
    stager.reserve({"model": model.state_dict()})  # when training starts
    warming = stager._warming
    warming.join()
    reserved = {id(t) for t in stager._slots[0].values()}
    assert len(reserved) == 4
    stager.reserve({"model": model.state_dict()})  # already reserved: nothing more
    assert stager._warming is warming

    with torch.no_grad():
        model[0].weight.add_(1)
    first = stager.snapshot({"model": model.state_dict(), "opt": {"m": torch.ones(3)}})
    assert {id(t) for t in first.state["model"].values()} == reserved
    assert torch.equal(first.state["model"]["0.weight"], model[0].weight)
    assert first.state["opt"]["m"].tolist() == [1, 1, 1]  # not reserved: allocated now
    stager._warming.join()  # the spare set, for the next snapshot, as without reserve
    assert set(stager._slots[1]) == set(stager._slots[0])
    first.release()


def test_a_file_written_through_hashing_file_has_the_digest_read_back(tmp_path):
    state = {"w": torch.randn(1000, 100), "epoch": 3}
    path = tmp_path / "x.pth"
    with HashingFile(path) as f:
        torch.save(state, f)
    assert f.digest() == file_digest(path)
    assert f.digest()[1] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])


def test_torch_save_of_a_snapshot_hands_over_its_buffers_without_waiting(tmp_path):
    stager = Stager()
    state = {"a": torch.randn(512, 1024), "b": torch.randn(300, 1000), "c": torch.ones(3)}
    snap = stager.snapshot({"model": state, "epoch": 3})
    path = tmp_path / "x.pth"
    with HashingFile(path, stable=snap.spans()) as f:
        torch.save(snap.state, f)
        queued = len(f._queued)  # the two large tensors' blocks, hashed and written later
    assert queued >= 4
    plain = io.BytesIO()
    torch.save(snap.state, plain)
    assert path.read_bytes() == plain.getvalue()
    assert f.digest() == file_digest(path)
    snap.release()


def test_a_torch_save_given_up_partway_stops_with_abandoned(tmp_path):
    snap = Stager().snapshot({"a": torch.randn(512, 1024), "b": torch.randn(512, 1024)})

    def serialize(snapshot, f):
        write = f.write

        def then_abandon(b):
            n = write(b)
            content.abandon()  # a flush found that the pending write deletes this file
            return n

        f.write = then_abandon
        torch.save(snapshot.state, f)

    content = Captured(serialize, snap, stream=True)
    with pytest.raises(Abandoned):
        content.materialize(str(tmp_path / "x.pth"))
    content.release()


def test_a_torch_save_given_up_while_its_tensors_are_written_stops_with_abandoned(
    tmp_path, monkeypatch
):
    snap = Stager().snapshot({"a": torch.randn(512, 1024), "b": torch.randn(512, 1024)})
    abandoned, puts = threading.Event(), []
    put = HashingFile._put

    def put_after_abandon(self, view):
        if threading.current_thread() is not threading.main_thread():  # a tensor handed over
            puts.append(len(view))
            assert abandoned.wait(10)
        put(self, view)

    def serialize(snapshot, f):
        torch.save(snapshot.state, f)  # returns once every tensor is handed over
        content.abandon()  # a flush found that the pending write deletes this file
        abandoned.set()

    monkeypatch.setattr(HashingFile, "_put", put_after_abandon)
    content = Captured(serialize, snap, stream=True)
    with pytest.raises(Abandoned):
        content.materialize(str(tmp_path / "x.pth"))
    assert puts == [512 * 1024 * 4]  # the second tensor is not written
    content.release()


def test_numpy_arrays_are_copied_into_reused_buffers_too():
    import numpy as np

    stager = Stager()
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.int64)]
    first = stager.snapshot(weights)
    weights[0] += 10  # training goes on: the snapshot does not change
    assert first.state[0].tolist() == [[0, 1, 2], [3, 4, 5]]
    stager._warming.join()
    spare = [id(a) for a in stager._slots[1].values()]
    second = stager.snapshot(weights)
    assert [id(a) for a in second.state] == spare  # allocated beside training, reused now
    np.testing.assert_array_equal(second.state[0], weights[0])
    assert sorted(second.spans()) == sorted((a.ctypes.data, a.nbytes) for a in second.state)
    first.release()
    second.release()


def test_a_process_that_exits_while_buffers_are_allocated_exits_cleanly(tmp_path):
    # The spare set is allocated in a helper thread right after the first snapshot; a script
    # that saves once and ends must not be torn down inside that allocation.
    script = textwrap.dedent(
        """
        import torch
        from bestsave.staging import Stager

        state = {f"w{i}": torch.randn(1024, 1024) for i in range(8)}
        Stager().snapshot(state).release()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "terminate called" not in done.stderr
