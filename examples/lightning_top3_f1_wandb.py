"""Lightning on an imbalanced problem: keep the 3 best epochs by validation F1, logged to W&B.

About 10% of the samples are positive, so the model is judged by F1 (torchmetrics) rather than
accuracy. ``BestCheckpoint`` replaces Lightning's ``ModelCheckpoint`` and finds the
``WandbLogger``'s run by itself: on every new best, the run gets a ``model`` artifact with the
aliases ``best`` and ``epoch-N`` and the epoch's record as metadata and, in its summary,
``best_<metric>`` for every metric of *that* epoch (``WandbLogger(log_model=True)`` records only
the checkpoint's score). W&B runs offline (no account needed); ``wandb sync`` uploads the run
later.

    python examples/lightning_top3_f1_wandb.py --epochs 20 --dir runs/lightning_f1
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC, BinaryF1Score

from bestsave.adapters.lightning import BestCheckpoint


def make_data(seed: int = 0) -> dict[str, TensorDataset]:
    """Train, validation and test splits of an imbalanced binary problem (10% positives)."""
    x, y = make_classification(
        n_samples=3000,
        n_features=20,
        n_informative=6,
        weights=[0.9],
        flip_y=0.02,
        class_sep=0.8,
        random_state=seed,
    )
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )

    def dataset(a: np.ndarray, b: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor(a, dtype=torch.float32), torch.tensor(b).float())

    return {
        "train": dataset(x_train, y_train),
        "val": dataset(x_val, y_val),
        "test": dataset(x_test, y_test),
    }


class Classifier(L.LightningModule):
    """A small MLP; logs loss, F1 and AUROC on validation and test sets."""

    def __init__(self, lr: float = 3e-3, hidden: int = 32, pos_weight: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(20, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
        )
        self.lr = lr
        self.loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
        self.val_f1, self.val_auroc = BinaryF1Score(), BinaryAUROC()
        self.test_f1, self.test_auroc = BinaryF1Score(), BinaryAUROC()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: Any, stage: str, f1: Metric, auroc: Metric) -> None:
        x, y = batch
        logits = self(x)
        f1.update(logits.sigmoid(), y.int())
        auroc.update(logits.sigmoid(), y.int())
        self.log(f"{stage}_loss", self.loss_fn(logits, y))
        # Logging the metric objects lets torchmetrics compute them over the whole epoch.
        self.log(f"{stage}_f1", f1)
        self.log(f"{stage}_auroc", auroc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_f1, self.val_auroc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_f1, self.test_auroc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def make_model(pos_weight: float = 1.0) -> Classifier:
    return Classifier(pos_weight=pos_weight)


def train(dirpath: str, epochs: int = 20, seed: int = 0) -> tuple[L.Trainer, BestCheckpoint]:
    """Train with the W&B run in ``dirpath/wandb`` and checkpoints in ``dirpath/checkpoints``.

    Returns the trainer (for ``trainer.test(ckpt_path="best")``) and its ``BestCheckpoint``.
    The W&B run is left open: finish it with ``wandb.finish()``.
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", dirpath)
    os.environ.setdefault("WANDB_SILENT", "true")
    L.seed_everything(seed, verbose=False)
    data = make_data(seed)
    y_train = data["train"].tensors[1]
    # Weigh the rare positives up, or the model learns to predict "negative" and F1 is 0.
    model = make_model(pos_weight=float((y_train == 0).sum() / (y_train == 1).sum()))

    checkpoint = BestCheckpoint(
        dirpath=Path(dirpath) / "checkpoints",
        filename="{epoch:02d}-{val_f1:.4f}",
        monitor="val_f1",
        mode="max",
        save_top_k=3,
    )
    logger = WandbLogger(project="bestsave-examples", save_dir=dirpath, offline=True)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[checkpoint],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        deterministic=True,
    )
    trainer.fit(
        model,
        train_dataloaders=DataLoader(data["train"], batch_size=64, shuffle=True),
        val_dataloaders=DataLoader(data["val"], batch_size=512),
    )
    return trainer, checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dir", default="runs/lightning_f1")
    args = parser.parse_args()
    # Lightning's start-up notes (no GPU, no TPU...) would bury what this example prints.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    trainer, checkpoint = train(args.dir, epochs=args.epochs)
    why = {"best": "a new best when saved", "top_k": "among the 3 best"}
    print(f"\nkept in {checkpoint.dirpath} (best first):")
    for r in checkpoint.kept:
        print(
            f"  epoch {r.epoch:>2}  val_f1={r.score:.4f}  val_auroc={r.metrics['val_auroc']:.4f}  "
            f"val_loss={r.metrics['val_loss']:.4f}  kept as {why.get(r.kind, r.kind)}"
        )

    run = wandb.run
    assert run is not None
    summary = {k: run.summary[k] for k in sorted(run.summary.keys()) if k.startswith("best_")}
    best = checkpoint.best_record
    assert best is not None
    print(f"\nW&B run {run.id} (offline, in {run.dir}):")
    print(f"  artifact model-{run.id}:best (alias epoch-{best.epoch}) holds {best.name}")
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"  summary {key} = {shown}")

    test_loader = DataLoader(make_data()["test"], batch_size=512)
    test = trainer.test(ckpt_path="best", dataloaders=test_loader, verbose=False)[0]
    print(
        f"\nbest epoch {best.epoch} ({os.path.basename(trainer.ckpt_path or '')}): "
        f"test F1 {test['test_f1']:.4f}, test AUROC {test['test_auroc']:.4f}"
    )
    wandb.finish()


if __name__ == "__main__":
    main()
