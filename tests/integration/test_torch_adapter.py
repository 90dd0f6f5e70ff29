"""TorchCheckpointer with real training: the best file holds the best epoch's weights."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from runfiles import checkpoints, run_folder

torch = pytest.importorskip("torch")

from bestsave import load_best, load_manifest
from bestsave.adapters.torch import TorchCheckpointer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))


def test_example_best_file_holds_the_best_epochs_weights_and_metrics(tmp_path):
    import torch_imbalanced_auroc as example

    captured = {}

    def on_epoch(epoch, model, metrics):
        captured[epoch] = ({k: v.clone() for k, v in model.state_dict().items()}, dict(metrics))

    ckpt = example.train(str(tmp_path), epochs=6, on_epoch=on_epoch)
    best = load_best(tmp_path)
    scores = {e: m["val_auroc"] for e, (_, m) in captured.items()}
    assert best.epoch == max(scores, key=scores.get)
    assert len(ckpt.kept) == 3
    weights, metrics = captured[best.epoch]
    assert best.metrics == pytest.approx(metrics)
    model = example.make_model()
    ckpt.load_best(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert best.run["framework"] == "torch" and best.run["hparams"]["hidden"] == 64
    assert "torch" in best.run["versions"]


def tiny_setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, scheduler


def train_epoch(model, optimizer, scheduler):
    optimizer.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()


@pytest.mark.parametrize("save_last", [False, True], ids=["from-memory", "from-file"])
def test_load_best_brings_back_the_best_epochs_weights(tmp_path, save_last):
    model, optimizer, scheduler = tiny_setup()
    ckpt = TorchCheckpointer(tmp_path, monitor="val_loss", save_last=save_last)
    weights = {}
    for epoch, loss in enumerate([0.5, 0.2, 0.4]):
        train_epoch(model, optimizer, scheduler)
        weights[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        ckpt.step(epoch, {"val_loss": loss}, model=model)
    best = ckpt.load_best(model)
    # Without `last`, the best (epoch 1) was the latest save and is still in memory; with it,
    # epoch 2's `last` reused those buffers and the file is read.
    assert (ckpt.saver.held_state(best) is None) == save_last
    assert best.epoch == 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[1][key]), key
        assert not torch.equal(value, weights[2][key]), key


def test_restore_brings_back_model_optimizer_scheduler_and_epoch(tmp_path):
    model, optimizer, scheduler = tiny_setup()
    ckpt = TorchCheckpointer(tmp_path, monitor="val_loss", save_last=True)
    for epoch, loss in enumerate([0.5, 0.4, 0.6]):
        train_epoch(model, optimizer, scheduler)
        ckpt.step(epoch, {"val_loss": loss}, model=model, optimizer=optimizer, scheduler=scheduler)
    ckpt.close()

    model2, optimizer2, scheduler2 = tiny_setup()
    resumed = TorchCheckpointer(tmp_path, monitor="val_loss", save_last=True, resume=True)
    assert resumed.restore(model2, optimizer2, scheduler2) == 3
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert optimizer2.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert resumed.best.epoch == 1


def test_restore_on_a_new_directory_starts_at_zero(tmp_path):
    model, optimizer, _ = tiny_setup()
    ckpt = TorchCheckpointer(tmp_path / "fresh", monitor="val_loss", resume=True)
    assert ckpt.restore(model, optimizer) == 0


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from bestsave.adapters.torch import TorchCheckpointer
    dirpath, scores = sys.argv[1], [float(s) for s in sys.argv[2].split(",")]
    torch.manual_seed(len(scores))
    model = torch.nn.Linear(3, 1)
    ckpt = TorchCheckpointer(dirpath, monitor="val_acc", save_last=True, resume=True)
    start = ckpt.restore(model)
    for epoch in range(start, start + len(scores)):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        ckpt.step(epoch, {"val_acc": scores[epoch - start]}, model=model)
    ckpt.close()
    print(start, ckpt.best.epoch)
    """
)


def test_resume_in_a_new_process_never_replaces_a_better_best(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)
    run_dir = tmp_path / "run"

    def run(scores):
        out = subprocess.run(
            [sys.executable, str(script), str(run_dir), scores],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.split()

    assert run("0.5,0.9,0.7") == ["0", "1"]
    assert run("0.6,0.8") == ["3", "1"]  # resumed at epoch 3; worse scores keep epoch 1
    best = load_best(run_dir)
    assert best.epoch == 1 and best.score == 0.9
    weights = torch.load(best.path, weights_only=True)["model"]["weight"]
    assert torch.all(weights == 1.0)
    assert len(load_manifest(run_dir).kept) == 1


def test_exception_inside_the_context_keeps_an_exception_checkpoint(tmp_path):
    model, optimizer, _ = tiny_setup()
    ckpt = TorchCheckpointer(tmp_path, monitor="val_loss")
    with pytest.raises(KeyboardInterrupt), ckpt:
        ckpt.step(0, {"val_loss": 0.5}, model=model, optimizer=optimizer)
        with torch.no_grad():
            model.weight.add_(1.0)
        raise KeyboardInterrupt
    record = next(r for r in load_manifest(tmp_path).kept if r.kind == "exception")
    state = torch.load(record.path, weights_only=True)
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    assert "optimizer" in state and record.metrics["exception"].startswith("KeyboardInterrupt")


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from bestsave.adapters.torch import TorchCheckpointer
    model = torch.nn.Linear(3, 1)
    with TorchCheckpointer(sys.argv[1], monitor="val_loss") as ckpt:
        ckpt.step(0, {"val_loss": 1.0}, model=model)
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()
    """
)


def test_sigterm_keeps_an_exception_checkpoint(tmp_path):
    script = tmp_path / "term.py"
    script.write_text(SIGTERM_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "Terminated" in out.stderr
    kinds = [r.kind for r in load_manifest(tmp_path / "run").kept]
    assert kinds == ["best", "exception"]


def test_only_rank_zero_writes(tmp_path):
    model, _, _ = tiny_setup()
    other = TorchCheckpointer(tmp_path / "r1", monitor="val_loss", rank=1)
    decision = other.step(0, {"val_loss": 0.5}, model=model)
    assert decision.is_best and decision.saved
    assert not (tmp_path / "r1").exists()


def test_weights_only_kept_files_and_full_last(tmp_path):
    model, optimizer, _ = tiny_setup()
    ckpt = TorchCheckpointer(tmp_path, monitor="val_loss", save_last=True, save_weights_only=True)
    ckpt.step(0, {"val_loss": 0.5}, model=model, optimizer=optimizer)
    ckpt.close()
    assert set(torch.load(ckpt.best.path, weights_only=True)) == {"model", "epoch", "step"}
    assert "optimizer" in torch.load(tmp_path / "last.pth", weights_only=True)


def test_load_detects_a_tampered_file(tmp_path):
    from bestsave import ChecksumError

    model, _, _ = tiny_setup()
    ckpt = TorchCheckpointer(tmp_path, monitor="val_loss")
    ckpt.step(0, {"val_loss": 0.5}, model=model)
    ckpt.close()
    with open(ckpt.best.path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="modified or truncated"):
        ckpt.load(ckpt.best, model)


def test_sigterm_handler_is_restored_after_the_context(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with TorchCheckpointer(tmp_path, monitor="val_loss"):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_smoothing_and_several_monitors_in_a_real_loop(tmp_path):
    model, optimizer, scheduler = tiny_setup()
    ckpt = TorchCheckpointer(tmp_path, monitor=["val_auroc", "val_loss"], smooth=2, top_k=1)
    auroc = [0.60, 0.95, 0.62, 0.80, 0.81]  # a one-epoch spike at epoch 1
    loss = [0.9, 0.8, 0.5, 0.6, 0.7]
    weights = {}
    for epoch in range(5):
        train_epoch(model, optimizer, scheduler)
        weights[epoch] = model.weight.detach().clone()
        ckpt.step(epoch, {"val_auroc": auroc[epoch], "val_loss": loss[epoch]}, model=model)
    ckpt.close()
    # smoothed AUROC: 0.60, 0.775, 0.785, 0.71, 0.805 -> epoch 4, not the spike
    best = ckpt.best
    assert best.epoch == 4 and best.raw_score == 0.81
    assert ckpt.best_for("val_loss").epoch == 3  # smoothed loss: .9 .85 .65 .55 .65
    state = ckpt.load(best)
    assert torch.equal(state["model"]["weight"], weights[4])


def test_background_and_synchronous_writes_hold_the_same_tensors(tmp_path):
    states = {}
    for background in (True, False):
        model, optimizer, scheduler = tiny_setup()
        ckpt = TorchCheckpointer(
            tmp_path / str(background),
            monitor="val_loss",
            top_k=2,
            save_last=True,
            async_write=background,
        )
        for epoch, loss in enumerate([0.5, 0.4, 0.6, 0.3]):
            train_epoch(model, optimizer, scheduler)
            ckpt.step(epoch, {"val_loss": loss}, model=model, optimizer=optimizer)
        ckpt.close()
        states[background] = {r.name: ckpt.load(r) for r in [*ckpt.kept, ckpt.saver.last]}
    assert states[True].keys() == states[False].keys()
    for name, state in states[True].items():
        other = states[False][name]
        for key, value in state["model"].items():
            assert torch.equal(value, other["model"][key]), (name, key)
        assert state["epoch"] == other["epoch"]


def test_closing_gives_up_a_finishing_write_the_newer_best_replaces(tmp_path, monkeypatch):
    from bestsave.hashing import HashingFile
    from bestsave.jobs import Captured

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    closing, gate, puts = threading.Event(), threading.Event(), []
    put, close, abandon = HashingFile._put, HashingFile.close, Captured.abandon

    def gated_put(self, view):
        if threading.current_thread().name.startswith("bestsave-put"):  # a tensor handed over
            puts.append(os.path.basename(self.name))
            assert gate.wait(10)
        put(self, view)

    def noted_close(self):
        closing.set()  # torch.save has handed every tensor over
        close(self)

    def spy(self):
        abandon(self)
        gate.set()

    monkeypatch.setattr(HashingFile, "_put", gated_put)
    monkeypatch.setattr(HashingFile, "close", noted_close)
    monkeypatch.setattr(Captured, "abandon", spy)

    def train():
        optimizer.zero_grad()
        model(torch.randn(8, 512)).pow(2).mean().backward()
        optimizer.step()

    ckpt = TorchCheckpointer(tmp_path, monitor="val_loss")
    train()
    ckpt.step(0, {"val_loss": 0.5}, model=model)
    assert closing.wait(10)  # epoch 0's write waits for its tensors to be written
    train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.step(1, {"val_loss": 0.2}, model=model)  # pending, and it evicts epoch 0
    ckpt.close()

    assert len([n for n in puts if "epoch=000" in n]) == 1  # given up after its first tensor
    best = load_best(tmp_path)
    assert best.epoch == 1 and best.metrics == {"val_loss": 0.2}
    state = torch.load(best.path, weights_only=True)
    for key, value in weights.items():
        assert torch.equal(state["model"][key], value), key
    assert [r.epoch for r in load_manifest(tmp_path).kept] == [1]
    # Neither epoch 0's file, its record nor a temporary file is left, beside the checkpoints
    # or in the run's own folder.
    run = run_folder(tmp_path)
    left = [*os.listdir(tmp_path), *os.listdir(run)]
    assert not [n for n in left if "epoch=000" in n or "tmp" in n]
    history = (run / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [0, 1]


# -- runs in a directory: the core's rules, the files in .bestsave/<run>/ ---------------------


def fit(ckpt, losses, model=None, optimizer=None, start=0):
    """Step ``ckpt`` through ``losses`` (one per epoch from ``start``) and close it."""
    if model is None:
        model, optimizer, _ = tiny_setup()
    for epoch, loss in enumerate(losses, start):
        ckpt.step(epoch, {"val_loss": loss}, model=model, optimizer=optimizer)
    ckpt.close()
    return ckpt


def test_another_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    from bestsave import BestSaveWarning, RunExistsError

    first = fit(TorchCheckpointer(tmp_path, monitor="val_loss", save_last=True), [0.5, 0.3])
    kept = first.best.name
    assert checkpoints(tmp_path) == {kept, "last.pth"}
    assert (run_folder(tmp_path) / f"{kept[: -len('.pth')]}.json").is_file()
    with pytest.raises(RunExistsError, match="resume=True"):
        TorchCheckpointer(tmp_path, monitor="val_loss", save_last=True)
    assert load_best(tmp_path).name == kept  # refused, and nothing touched

    with pytest.warns(BestSaveWarning, match="stays whole until"):
        fresh = TorchCheckpointer(tmp_path, monitor="val_loss", save_last=True, overwrite=True)
    model, optimizer, _ = tiny_setup()
    assert fresh.restore(model, optimizer) == 0  # a new run
    assert load_best(tmp_path).name == kept  # the earlier run is whole until the first commit
    fit(fresh, [0.9], model, optimizer)
    assert load_best(tmp_path).epoch == 0 and load_best(tmp_path).score == 0.9
    assert checkpoints(tmp_path) == {"epoch=000-val_loss=0.9000.pth", "last.pth"}


def test_runs_named_apart_share_a_directory(tmp_path):
    fit(TorchCheckpointer(tmp_path, monitor="val_loss", name="a"), [0.5, 0.3])
    fit(TorchCheckpointer(tmp_path, monitor="val_loss", name="b", filename="b-{epoch}"), [0.4])
    assert sorted(p.name for p in (tmp_path / ".bestsave").iterdir()) == ["a", "b"]
    assert load_best(tmp_path, run="a").epoch == 1
    assert load_best(tmp_path, run="b").name == "b-0.pth"
    with pytest.raises(ValueError, match="run="):
        load_best(tmp_path)
    # Another rank reads its own run's best from the directory.
    model, _, _ = tiny_setup()
    other = TorchCheckpointer(tmp_path, monitor="val_loss", name="b", resume=True, rank=1)
    assert other.load_best(model).name == "b-0.pth"


def test_resume_warns_when_the_directory_holds_only_differently_named_runs(tmp_path):
    from bestsave import BestSaveWarning

    fit(TorchCheckpointer(tmp_path, monitor="val_loss", save_last=True), [0.5])
    ckpt = TorchCheckpointer(
        tmp_path, monitor="val_loss", save_last=True, resume=True, filename="{epoch}"
    )
    model, optimizer, _ = tiny_setup()
    with pytest.warns(BestSaveWarning, match="no run named 'epoch' to resume"):
        assert ckpt.restore(model, optimizer) == 0


def test_an_exception_right_after_restore_keeps_the_restored_epochs_state(tmp_path):
    model, optimizer, _ = tiny_setup()
    first = TorchCheckpointer(tmp_path, monitor="val_loss", save_last=True)
    fit(first, [0.5, 0.4, 0.6], model, optimizer)
    ckpt = TorchCheckpointer(tmp_path, monitor="val_loss", save_last=True, resume=True)
    model2, optimizer2, _ = tiny_setup()
    with pytest.raises(RuntimeError, match="data loader"), ckpt:
        assert ckpt.restore(model2, optimizer2) == 3
        raise RuntimeError("data loader died")
    record = next(r for r in load_manifest(tmp_path).kept if r.kind == "exception")
    assert record.name == "exception-epoch=002.pth" and record.epoch == 2
    state = torch.load(record.path, weights_only=True)
    assert state["epoch"] == 2
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    assert (run_folder(tmp_path) / "exception-epoch=002.json").is_file()
    # Resuming again starts after the last committed epoch; the exception file stays kept.
    again = TorchCheckpointer(tmp_path, monitor="val_loss", save_last=True, resume=True)
    assert again.restore(*tiny_setup()[:2]) == 3
    assert "exception-epoch=002.pth" in {r.name for r in again.kept}
    again.close()
