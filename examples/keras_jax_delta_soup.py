"""Keras 3 on JAX: keep every epoch within ``delta`` of the best val AUC, then average them.

``BestModelCheckpoint`` replaces ``keras.callbacks.ModelCheckpoint``. With ``delta`` it keeps a
near-best ensemble: every epoch whose validation AUC is within ``delta`` of the best so far
(members that fall further behind a new best are deleted). The ensemble's weights are then
averaged into one model, a "model soup" (Wortsman et al., 2022), and the soup and the single best
epoch are compared on a held-out test set that neither training nor checkpointing has seen.

    python examples/keras_jax_delta_soup.py --epochs 30 --dir runs/keras_soup
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported

import argparse
from pathlib import Path

import keras
import numpy as np
from sklearn.datasets import make_classification
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from bestsave.adapters.keras import BestModelCheckpoint
from bestsave.soup import soup

DELTA = 0.003
"""How far behind the best validation AUC an epoch may be and still join the ensemble."""


def make_data(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train, validation and test splits of an imbalanced binary problem (10% positives)."""
    x, y = make_classification(
        n_samples=4000,
        n_features=20,
        n_informative=6,
        weights=[0.9],
        flip_y=0.02,
        class_sep=0.8,
        random_state=seed,
    )
    x, y = x.astype("float32"), y.astype("float32")
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.5, stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def make_model(lr: float = 3e-3, compile: bool = True) -> keras.Model:
    """A small MLP; ``compile=False`` for a model that only predicts."""
    model = keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    if not compile:
        return model
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc")],
    )
    return model


def train(
    dirpath: str, epochs: int = 30, seed: int = 0, delta: float = DELTA
) -> BestModelCheckpoint:
    """Train, keeping the epochs within ``delta`` of the best val AUC in ``dirpath``."""
    keras.utils.set_random_seed(seed)
    data = make_data(seed)
    model = make_model()
    checkpoint = BestModelCheckpoint(
        os.path.join(dirpath, "{epoch:02d}-{val_auc:.4f}.weights.h5"),
        monitor="val_auc",
        mode="max",
        save_best_only=True,
        delta=delta,
    )
    model.fit(
        *data["train"],
        validation_data=data["val"],
        epochs=epochs,
        batch_size=64,
        callbacks=[checkpoint],
        verbose=0,
    )
    return checkpoint


def held_out_auc(weights: str | os.PathLike[str], seed: int = 0) -> float:
    """AUC on the held-out test split of a model holding the weights in the file ``weights``."""
    # Not compiled: the file's optimizer state has nothing to load into, and is not needed.
    model = make_model(compile=False)
    model.load_weights(weights)
    x, y = make_data(seed)["test"]
    return float(roc_auc_score(y, model.predict(x, batch_size=1024, verbose=0).ravel()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--delta", type=float, default=DELTA)
    parser.add_argument("--dir", default="runs/keras_soup")
    args = parser.parse_args()

    print(f"Keras {keras.__version__} on the {keras.backend.backend()} backend")
    checkpoint = train(args.dir, epochs=args.epochs, delta=args.delta)
    best = checkpoint.best_record
    assert best is not None
    print(f"\nkept in {checkpoint.dirpath} (best first; file names count epochs from 1):")
    why = {"best": "a new best when saved", "ensemble": f"within {args.delta} of the best"}
    for r in checkpoint.kept:
        print(
            f"  {r.name}  val_auc={r.score:.4f}  val_loss={r.metrics['val_loss']:.4f}  "
            f"kept as {why.get(r.kind, r.kind)}"
        )

    soup_path = Path(args.dir) / "soup.weights.h5"
    members = soup(checkpoint.dirpath, soup_path)
    print(f"\nsoup of {len(members)} checkpoints written to {soup_path}")
    print("held-out test AUC:")
    print(f"  single best ({best.name}): {held_out_auc(best.path):.4f}")
    print(f"  soup of the ensemble ({len(members)} members): {held_out_auc(soup_path):.4f}")


if __name__ == "__main__":
    main()
