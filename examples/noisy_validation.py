"""A small, imbalanced validation set: single best vs smoothed best vs a soup of the near-best.

With 200 validation samples of which 23 are positive, validation AUROC moves by a point or
two from one epoch to the next for no reason but chance, and the epoch with the highest value is
often just the luckiest. One training run is judged three ways, by three checkpointers that see
the same epochs and the same metrics:

- single best: the epoch with the highest validation AUROC (what every framework does);
- smoothed best: the epoch with the highest mean of the last 3 validation AUROCs (``smooth=3``),
  so one lucky epoch cannot win on its own;
- soup: every epoch within ``delta`` of the best validation AUROC is kept (the delta-ensemble),
  and their weights are averaged into one model (:func:`bestsave.soup.soup`).

Each is then scored on a held-out test set of 20,000 samples, large enough to tell them apart;
the last epoch is shown for reference. Seeds are fixed: on one machine, every run prints the same
table.

    python examples/noisy_validation.py --epochs 30 --dir runs/noisy
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from torchmetrics.classification import BinaryAUROC

from bestsave.adapters.torch import TorchCheckpointer
from bestsave.soup import soup

DELTA = 0.015
"""How far behind the best validation AUROC an epoch may be and still join the ensemble."""


def make_data(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train (6,000), validation (200) and test (20,000) splits with 10% positives."""
    x, y = make_classification(
        n_samples=26_200,
        n_features=20,
        n_informative=6,
        weights=[0.9],
        flip_y=0.03,
        class_sep=0.7,
        random_state=seed,
    )
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, train_size=6000, stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, train_size=200, stratify=y_rest, random_state=seed
    )

    def tensors(a: np.ndarray, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)

    return {
        "train": tensors(x_train, y_train),
        "val": tensors(x_val, y_val),
        "test": tensors(x_test, y_test),
    }


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 1)
    )


@torch.no_grad()
def auroc(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return BinaryAUROC()(model(x).squeeze(1).sigmoid(), y.int()).item()


def train(dirpath: str, epochs: int = 30, seed: int = 0) -> dict[str, TorchCheckpointer]:
    """Train once; three checkpointers, one per way of choosing, each in its own directory."""
    torch.manual_seed(seed)
    data = make_data(seed)
    model = make_model()
    # A high learning rate: the weights wander around a plateau from epoch to epoch, as they do
    # late in many trainings, and the small validation set cannot rank those epochs reliably.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x_train, y_train = data["train"]

    # overwrite=True: running the command again starts new runs in the same directories.
    options = dict(monitor="val_auroc", overwrite=True, trackers=(), save_weights_only=True)
    checkpointers = {
        "single": TorchCheckpointer(Path(dirpath) / "single", **options),
        "smoothed": TorchCheckpointer(Path(dirpath) / "smoothed", smooth=3, **options),
        "ensemble": TorchCheckpointer(Path(dirpath) / "ensemble", delta=DELTA, **options),
    }
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train))
        for i in range(0, len(perm), 32):
            idx = perm[i : i + 32]
            optimizer.zero_grad()
            loss_fn(model(x_train[idx]).squeeze(1), y_train[idx]).backward()
            optimizer.step()
        metrics = {"val_auroc": auroc(model, *data["val"])}
        for ckpt in checkpointers.values():
            ckpt.step(epoch, metrics, model=model, step=epoch + 1)
    for ckpt in checkpointers.values():
        ckpt.close()
    torch.save({"model": model.state_dict()}, Path(dirpath) / "last_epoch.pth")
    return checkpointers


def held_out_auroc(path: str | Path, seed: int = 0) -> float:
    """Test AUROC of the model whose weights are in the file ``path`` (under ``["model"]``)."""
    model = make_model()
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    return auroc(model, *make_data(seed)["test"])


def compare(dirpath: str, checkpointers: dict[str, TorchCheckpointer]) -> list[dict[str, str]]:
    """One row per way of choosing: what it chose, its validation AUROC and its test AUROC."""
    single, smoothed = checkpointers["single"].best, checkpointers["smoothed"].best
    assert single is not None and smoothed is not None
    members = soup(checkpointers["ensemble"].dirpath, Path(dirpath) / "soup.pth")
    last_epoch = checkpointers["single"].saver.last_epoch
    scores = [r.score for r in members if r.score is not None]
    return [
        {
            "chosen by": "single best",
            "epoch(s)": str(single.epoch),
            "val AUROC": f"{single.raw_score:.4f}",
            "test AUROC": f"{held_out_auroc(single.path):.4f}",
        },
        {
            "chosen by": "smoothed best (smooth=3)",
            "epoch(s)": str(smoothed.epoch),
            "val AUROC": f"{smoothed.raw_score:.4f} (mean of 3: {smoothed.score:.4f})",
            "test AUROC": f"{held_out_auroc(smoothed.path):.4f}",
        },
        {
            "chosen by": f"soup of the delta={DELTA} ensemble",
            "epoch(s)": ",".join(str(r.epoch) for r in sorted(members, key=lambda r: r.epoch)),
            "val AUROC": f"{min(scores):.4f} to {max(scores):.4f}",
            "test AUROC": f"{held_out_auroc(Path(dirpath) / 'soup.pth'):.4f}",
        },
        {
            "chosen by": "last epoch (for reference)",
            "epoch(s)": str(last_epoch),
            "val AUROC": "",
            "test AUROC": f"{held_out_auroc(Path(dirpath) / 'last_epoch.pth'):.4f}",
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--dir", default="runs/noisy")
    args = parser.parse_args()

    rows = compare(args.dir, train(args.dir, epochs=args.epochs))
    data = make_data()
    y_val, y_test = data["val"][1], data["test"][1]
    print(
        f"validation: {len(y_val)} samples, {int(y_val.sum())} positive; test: {len(y_test)} "
        f"samples; epochs count from 0\n"
    )
    widths = {k: max(len(k), *(len(row[k]) for row in rows)) for k in rows[0]}
    for row in [{k: k for k in rows[0]}, *rows]:
        print("  ".join(row[k].ljust(widths[k]) for k in row).rstrip())


if __name__ == "__main__":
    main()
