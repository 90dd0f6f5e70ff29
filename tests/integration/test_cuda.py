"""On a GPU: snapshots are copied from device memory into pinned host buffers reused from save to
save, and the files hold the best epoch's weights. Skipped where no CUDA device is present."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from bestsave import load_best, load_manifest
from bestsave.adapters.torch import TorchCheckpointer
from bestsave.staging import Stager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SCORES = [0.3, 0.5, 0.9, 0.4, 0.6]  # the best is epoch 2, two epochs before the end


def gpu_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8)
    ).cuda()


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def test_a_snapshot_of_gpu_state_is_a_pinned_copy_training_does_not_change():
    stager = Stager()
    model = gpu_model()
    expected = cpu_copy(model.state_dict())
    snap = stager.snapshot({"model": model.state_dict(), "epoch": 0})
    with torch.no_grad():  # queued on the GPU right after the copies
        for p in model.parameters():
            p.add_(1)
    torch.cuda.synchronize()
    for key, value in snap.state["model"].items():
        assert value.device.type == "cpu" and value.is_pinned(), key
        assert torch.equal(value, expected[key]), key
    stager._warming.join()  # the spare set for the next snapshot, allocated beside training
    assert all(b.is_pinned() for b in stager._slots[1].values())
    second = stager.snapshot({"model": model.state_dict(), "epoch": 1})
    assert {id(t) for t in second.state["model"].values()} == {
        id(t) for t in stager._slots[1].values()
    }
    assert torch.equal(second.state["model"]["0.weight"], model[0].weight.cpu())
    snap.release()
    second.release()


def test_buffers_reserved_for_gpu_state_are_pinned_and_taken_by_the_first_snapshot():
    stager = Stager()
    model = gpu_model()
    stager.reserve({"model": model.state_dict()})
    stager._warming.join()
    reserved = {id(t) for t in stager._slots[0].values()}
    assert all(t.is_pinned() for t in stager._slots[0].values())
    snap = stager.snapshot({"model": model.state_dict()})
    assert {id(t) for t in snap.state["model"].values()} == reserved
    assert all(torch.equal(v, model.state_dict()[k].cpu()) for k, v in snap.state["model"].items())
    snap.release()


@pytest.mark.parametrize("async_write", [True, False], ids=["background", "sync"])
def test_torch_checkpointer_on_a_gpu_keeps_the_best_epochs_state(tmp_path, async_write):
    model = gpu_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 256, device="cuda"), torch.randn(64, 8, device="cuda")
    weights = {}
    with TorchCheckpointer(tmp_path, monitor="val_acc", async_write=async_write) as ckpt:
        for epoch, score in enumerate(SCORES):
            for _ in range(3):
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
            weights[epoch] = cpu_copy(model.state_dict())
            ckpt.step(epoch, {"val_acc": score}, model=model, optimizer=optimizer)
    best = load_best(tmp_path)
    assert best.epoch == 2 and [r.epoch for r in load_manifest(tmp_path).kept] == [2]
    state = torch.load(best.path, map_location="cpu", weights_only=True)
    for key, value in state["model"].items():
        assert torch.equal(value, weights[2][key]), key
    assert state["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    fresh = gpu_model()
    ckpt.load_best(fresh, map_location="cuda")
    for key, value in fresh.state_dict().items():
        assert value.is_cuda and torch.equal(value.cpu(), weights[2][key]), key


def test_lightning_on_a_gpu_keeps_the_best_epochs_weights(tmp_path):
    pytest.importorskip("lightning")
    from bestsave.adapters.lightning import BestCheckpoint

    sys.path.insert(0, str(Path(__file__).parent / "data" / "lightning"))
    scripted = importlib.import_module("lightning_scripted")
    checkpoint = BestCheckpoint(dirpath=tmp_path, monitor="val_score", mode="max")
    _, _, weights = scripted.fit(tmp_path, SCORES, checkpoint, accelerator="gpu", devices=1)
    best = load_best(tmp_path)
    assert best.epoch == 2
    state = torch.load(best.path, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in state.items():
        assert torch.equal(value, weights[2][key]), key
