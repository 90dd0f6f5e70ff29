"""Fraud-like detection with a plain PyTorch loop: keep the 3 best epochs by validation AUROC.

About 5% of the samples are positive, so accuracy would say little: the model is judged by the
area under the ROC curve, computed with torchmetrics. Every kept checkpoint records all of its
epoch's metrics; the run can be interrupted and started again with the same command.

    python examples/torch_imbalanced_auroc.py --epochs 15 --dir runs/fraud
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

from bestsave.adapters.torch import TorchCheckpointer


def make_data(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train, validation and test splits of an imbalanced binary problem (5% positives)."""
    x, y = make_classification(
        n_samples=4000,
        n_features=20,
        n_informative=6,
        weights=[0.95],
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

    def tensors(a, b):
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
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    logits = model(x).squeeze(1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    target = y.int()
    return {
        "val_loss": loss.item(),
        "val_auroc": BinaryAUROC()(logits.sigmoid(), target).item(),
        "val_ap": BinaryAveragePrecision()(logits.sigmoid(), target).item(),
    }


def train(
    dirpath: str,
    epochs: int = 15,
    seed: int = 0,
    on_epoch: Callable[[int, torch.nn.Module, dict[str, float]], None] | None = None,
) -> TorchCheckpointer:
    """Train, keeping the 3 best epochs by validation AUROC; resumes if ``dirpath`` holds a run."""
    torch.manual_seed(seed)
    data = make_data(seed)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_train, y_train = data["train"]
    pos_weight = (y_train == 0).sum() / (y_train == 1).sum()
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    ckpt = TorchCheckpointer(
        dirpath,
        monitor="val_auroc",
        top_k=3,
        save_last=True,
        resume=True,
        hparams={"lr": 3e-3, "hidden": 64, "seed": seed},
    )
    start = ckpt.restore(model, optimizer)
    with ckpt:  # an exception or SIGTERM keeps the state it stopped at
        for epoch in range(start, epochs):
            model.train()
            perm = torch.randperm(len(x_train))
            total = 0.0
            for i in range(0, len(perm), 128):
                idx = perm[i : i + 128]
                optimizer.zero_grad()
                loss = loss_fn(model(x_train[idx]).squeeze(1), y_train[idx])
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            metrics = {"train_loss": total / len(perm), **evaluate(model, *data["val"])}
            ckpt.step(epoch, metrics, model=model, optimizer=optimizer, step=epoch + 1)
            if on_epoch is not None:
                on_epoch(epoch, model, metrics)
            if ckpt.should_stop:
                break
    return ckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--dir", default="runs/fraud")
    args = parser.parse_args()

    ckpt = train(args.dir, epochs=args.epochs)
    why = {"best": "a new best when saved", "top_k": "among the 3 best"}
    print(f"\nkept in {ckpt.dirpath} (best first):")
    for r in ckpt.kept:
        print(
            f"  epoch {r.epoch:>2}  val_auroc={r.score:.4f}  val_ap={r.metrics['val_ap']:.4f}  "
            f"train_loss={r.metrics['train_loss']:.4f}  kept as {why.get(r.kind, r.kind)}"
        )

    model = make_model()
    best = ckpt.load_best(model)
    test = evaluate(model, *make_data()["test"])
    print(
        f"\nbest epoch {best.epoch}: test AUROC {test['val_auroc']:.4f}, "
        f"test AP {test['val_ap']:.4f}"
    )


if __name__ == "__main__":
    main()
