"""The training run the kill tests kill: deterministic, saves every epoch, resumes itself.

    python kill_train.py DIR [--framework torch|lightning] [--epochs N] [--sync] [--handshake]

Started again after any crash it continues the run in ``DIR`` from the epoch after the last
committed one (``resume=True``), so that killed and restarted any number of times it ends with
the same files as a run never interrupted. Everything is deterministic: the monitored metric is a
fixed function of the epoch (with two NaN epochs and a plateau that exhausts ``patience``), each
epoch's batch is drawn from a generator seeded by the epoch, and the model (a few MB, so that
writes take long enough to be killed in the middle) trains on one CPU thread.

Progress goes to ``report``: ``("ready", start_epoch)`` once the run owns the directory (after the
saver took it over and cleaned what a crash left), ``("stepped", epoch)`` after each evaluation,
``("done", last_epoch)`` after ``close()``. With a handshake the run waits after ``ready`` until
told to go, so the test can inspect the directory before anything new is written.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Callable
from typing import Any

EPOCHS = 160
PATIENCE = 25
NAN_EPOCHS = (7, 61)
IN_FEATURES, OUT_FEATURES = 256, 1024  # 1 MB of weights; 2 MB of full state with momentum
OPTIONS: dict[str, Any] = dict(monitor="val_loss", save_last=True, resume=True, trackers=())
TORCH_OPTIONS: dict[str, Any] = dict(top_k=3, keep_every_n_epochs=25, patience=PATIENCE)
LIGHTNING_OPTIONS: dict[str, Any] = dict(save_top_k=3, keep_every_n_epochs=25)
LIGHTNING_EPOCHS = 60

Report = Callable[[str, int], None]


def metric(epoch: int) -> float:
    """The scripted val_loss of ``epoch``: falls, then plateaus; NaN on two epochs."""
    if epoch in NAN_EPOCHS:
        return math.nan
    noise = random.Random(1000 + epoch).uniform(0.0, 0.2)
    return round(max(0.3, 1.0 - 0.008 * epoch) + noise, 6)


def batch(epoch: int) -> Any:
    import torch

    generator = torch.Generator().manual_seed(epoch)
    return torch.randn(16, IN_FEATURES, generator=generator)


def make_model() -> tuple[Any, Any]:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(IN_FEATURES, OUT_FEATURES)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return model, optimizer


def train_torch(
    dirpath: str,
    report: Report,
    wait_go: Callable[[], None] = lambda: None,
    *,
    async_write: bool = True,
    epochs: int = EPOCHS,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """The plain PyTorch loop, written as a user resumes one after any crash."""
    import torch

    from bestsave.adapters.torch import TorchCheckpointer

    torch.set_num_threads(1)
    model, optimizer = make_model()
    ckpt = TorchCheckpointer(
        dirpath,
        **OPTIONS,
        **TORCH_OPTIONS,
        async_write=async_write,
        storage_options=storage_options,
    )
    start = ckpt.restore(model, optimizer)
    report("ready", start)
    wait_go()
    for epoch in range(start, epochs):
        if ckpt.should_stop:  # a resumed run whose patience ran out before the crash
            break
        optimizer.zero_grad()
        loss = model(batch(epoch)).pow(2).mean()
        loss.backward()
        optimizer.step()
        ckpt.step(
            epoch,
            {"val_loss": metric(epoch), "train_loss": loss.detach()},
            model=model,
            optimizer=optimizer,
            step=epoch + 1,
        )
        report("stepped", epoch)
    ckpt.close()
    report("done", ckpt.saver.last_epoch if ckpt.saver.last_epoch is not None else -1)


def train_lightning(
    dirpath: str,
    report: Report,
    wait_go: Callable[[], None] = lambda: None,
    *,
    async_write: bool = True,
    epochs: int = LIGHTNING_EPOCHS,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """The same run with a Lightning Trainer and BestCheckpoint, resumed from ``last.ckpt``."""
    import lightning as L
    import torch

    from bestsave import BestSaver, fetch, load_manifest
    from bestsave.adapters.lightning import BestCheckpoint

    torch.set_num_threads(1)

    class Scripted(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = make_model()[0]

        def training_step(self, batch_: Any, index: int) -> Any:
            loss = self.layer(batch(self.current_epoch)).pow(2).mean()
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch_: Any, index: int) -> None:
            self.log("val_loss", metric(self.current_epoch))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(1, 1)))

        val_dataloader = train_dataloader

    class Progress(L.Callback):
        def __init__(self) -> None:
            self.started = False

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            # The checkpoint callback runs last: by the first epoch it owns the directory.
            if not self.started:
                self.started = True
                report("ready", trainer.current_epoch)
                wait_go()

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            report("stepped", trainer.current_epoch)

    options = storage_options or {}
    try:
        manifest = load_manifest(dirpath, **options)
    except FileNotFoundError:
        manifest = None
    last = manifest.last if manifest is not None else None
    checkpoint = BestCheckpoint(
        dirpath,
        **OPTIONS,
        **LIGHTNING_OPTIONS,
        async_write=async_write,
        storage_options=storage_options,
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[Progress(), checkpoint],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if manifest is not None and last is not None and last.epoch + 1 >= epochs:
        # Killed after the last evaluation was committed. A fit resumed at max_epochs returns
        # before on_train_start, so BestCheckpoint would never take the directory over and
        # finish that commit: open the run (by its name in .bestsave/) as it does, to the same
        # effect.
        BestSaver(
            dirpath,
            "val_loss",
            resume=True,
            name=manifest.name,
            extension=BestCheckpoint.FILE_EXTENSION,
            trackers=(),
            storage_options=storage_options,
        ).close()
        report("ready", epochs)
        wait_go()
    else:
        # fetch() checks the file against its sha256 (and downloads it from remote storage).
        trainer.fit(Scripted(), ckpt_path=fetch(last, **options) if last is not None else None)
    report("done", epochs - 1)


RUNS = {"torch": train_torch, "lightning": train_lightning}


def run_in_child(
    conn: Any,
    framework: str,
    dirpath: str,
    async_write: bool,
    storage_options: dict[str, Any] | None = None,
    epochs: int | None = None,
) -> None:
    """Entry point of a forked child: reports through a multiprocessing connection."""

    def report(kind: str, value: int) -> None:
        conn.send((kind, value))

    def wait_go() -> None:
        conn.recv()

    run: Any = RUNS[framework]
    more = {} if epochs is None else {"epochs": epochs}
    run(dirpath, report, wait_go, async_write=async_write, storage_options=storage_options, **more)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--framework", choices=sorted(RUNS), default="torch")
    parser.add_argument("--epochs", type=int, default=None, help="train this many epochs")
    parser.add_argument("--sync", action="store_true", help="async_write=False")
    parser.add_argument("--handshake", action="store_true", help="wait for 'go' after ready")
    args = parser.parse_args(argv)

    def report(kind: str, value: int) -> None:
        print(kind, value, flush=True)

    def wait_go() -> None:
        if args.handshake:
            sys.stdin.readline()

    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    RUNS[args.framework](args.dir, report, wait_go, async_write=not args.sync, **epochs)


if __name__ == "__main__":
    main()
