"""fastai tabular on an imbalanced set: keep the 3 best epochs by MCC, the best logged to W&B.

Only 5% of the rows are positive, so a model that answers "negative" to everything scores 95%
accuracy. The Matthews correlation coefficient (MCC) is 0 for such a model, so
``SaveBestModelCallback`` (fastai's ``SaveModelCallback`` with bestsave's options) monitors
``matthews_corrcoef`` and keeps the 3 best epochs, as ``models/mcc_<epoch>.pth``; after ``fit``
the learner holds the best one. The example prints the kept epochs, and the epoch accuracy would
have chosen, for comparison. Running it again starts a new run in the same place, as fastai's
callback would: the earlier run's files go once the new run has kept its first one.

W&B runs offline (no account needed; ``wandb sync`` uploads the run later). The best model goes
to the W&B run as a ``model`` artifact whose metadata is the best epoch's record (its metrics,
not the last epoch's):

- where fastai's ``WandbCallback`` works, it logs the training curves and uploads the best model
  (``log_model=True`` uploads ``learn.save_model``, which is this callback);
- since fastai's PR #4164 (checked with fastai 2.8.12 and fastcore 2.2.41), ``WandbCallback``
  fails in ``before_fit``: its config logging calls fastcore's ``init_args`` on plain values
  (fastai issue #4173). There the example logs through bestsave's own tracker
  (``trackers=["wandb"]``) into a ``wandb.init`` run instead, and says so: the artifact gets the
  aliases ``best`` and ``epoch-N``, and the run's summary ``best_<metric>`` for every metric of
  the best epoch.

    python examples/fastai_mcc_wandb.py --epochs 12 --dir runs/fastai_mcc
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd
import torch
import wandb
from fastai.callback.core import Callback
from fastai.metrics import MatthewsCorrCoef, accuracy
from fastai.tabular.all import (
    CategoryBlock,
    Normalize,
    TabularDataLoaders,
    set_seed,
    tabular_learner,
)
from fastai.tabular.learner import TabularLearner
from sklearn.datasets import make_classification

from bestsave.adapters.fastai import SaveBestModelCallback
from bestsave.verify import load_history


def make_data(seed: int = 0) -> tuple[pd.DataFrame, list[int]]:
    """3,000 rows of 12 numeric features with 5% positives, and the validation rows' indices."""
    x, y = make_classification(
        n_samples=3000,
        n_features=12,
        n_informative=5,
        weights=[0.95],
        flip_y=0.01,
        class_sep=0.9,
        random_state=seed,
    )
    df = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    df["target"] = y
    return df, list(range(2400, 3000))


def make_learner(dirpath: str, seed: int = 0) -> TabularLearner:
    df, valid_idx = make_data(seed)
    dls = TabularDataLoaders.from_df(
        df,
        path=dirpath,
        cont_names=[c for c in df.columns if c != "target"],
        y_names="target",
        y_block=CategoryBlock(),
        procs=[Normalize],
        valid_idx=valid_idx,
        bs=128,
        device="cpu",
    )
    return tabular_learner(dls, layers=[32, 16], metrics=[accuracy, MatthewsCorrCoef()])


def wandb_callback_works() -> bool:
    """Whether fastai's ``WandbCallback`` can start here (see fastai issue #4173)."""
    from fastai.callback.wandb import _format_config

    try:
        _format_config({"flag": True, "bs": 64})
    except (TypeError, NameError):
        return False
    return True


def train(dirpath: str, epochs: int = 12, seed: int = 0) -> SaveBestModelCallback:
    """Train with the 3 best epochs by MCC in ``dirpath/models`` and the W&B run in
    ``dirpath/wandb``. The W&B run is left open: finish it with ``wandb.finish()``."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", dirpath)
    os.environ.setdefault("WANDB_SILENT", "true")
    # A model this small trains fastest on one thread; several spend their time waiting for
    # each other.
    torch.set_num_threads(1)
    set_seed(seed, reproducible=True)
    learn = make_learner(dirpath, seed)
    callbacks: list[Callback] = []
    trackers: list[str] = []
    if wandb_callback_works():
        from fastai.callback.wandb import WandbCallback

        callbacks.append(WandbCallback(log_preds=False, log_model=True))
    else:
        trackers.append("wandb")
    save = SaveBestModelCallback(
        monitor="matthews_corrcoef", top_k=3, fname="mcc", trackers=trackers
    )
    wandb.init(project="bestsave-examples", dir=os.environ["WANDB_DIR"], mode="offline")
    # Added to the learner, so that after the fit ``save.learn.validate()`` checks the weights
    # it left there; WandbCallback only to this fit, so that validate() logs nothing more.
    learn.add_cb(save)
    with learn.no_bar(), learn.no_logging():  # main() prints the epochs
        learn.fit_one_cycle(epochs, 1e-2, cbs=callbacks)
    return save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--dir", default="runs/fastai_mcc")
    args = parser.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)

    save = train(args.dir, epochs=args.epochs)
    run = wandb.run
    assert run is not None and save.saver is not None
    kept = {r.epoch: r for r in save.kept}
    why = {"best": "kept: a new best when saved", "top_k": "kept: among the 3 best"}
    lines = load_history(save.saver.dirpath, run=save.saver.files.name)
    print(f"\nepoch  valid_loss  accuracy  matthews_corrcoef    (files in {save.saver.dirpath})")
    for line in lines:
        m, record = line["metrics"], kept.get(line["epoch"])
        row = (
            f"{line['epoch']:>5}  {m['valid_loss']:>10.4f}  {m['accuracy']:>8.4f}  "
            f"{m['matthews_corrcoef']:>17.4f}    {why[record.kind] if record else ''}"
        )
        print(row.rstrip())

    best = save.best_record
    assert best is not None
    by_accuracy = max(lines, key=lambda line: (line["metrics"]["accuracy"], -line["epoch"]))
    print(
        f"\nbest epoch by MCC: {best.epoch} (MCC {best.metrics['matthews_corrcoef']:.4f}, "
        f"accuracy {best.metrics['accuracy']:.4f})"
    )
    print(
        f"best epoch by accuracy: {by_accuracy['epoch']} "
        f"(MCC {by_accuracy['metrics']['matthews_corrcoef']:.4f}, "
        f"accuracy {by_accuracy['metrics']['accuracy']:.4f})"
    )
    with save.learn.no_bar():
        _, accuracy_now, mcc_now = save.learn.validate()
    print(
        f"the learner holds the best epoch's weights: validation MCC {mcc_now:.4f}, "
        f"accuracy {accuracy_now:.4f}"
    )
    if wandb_callback_works():
        artifact = f"{save.fname}:best (alias epoch-{best.epoch}), logged by WandbCallback"
    else:
        print("\nfastai's WandbCallback cannot start here (fastai issue #4173)")
        artifact = f"model-{run.id}:best (alias epoch-{best.epoch}), logged by bestsave's tracker"
    print(f"\nW&B run {run.id} (offline, in {run.dir}):")
    print(f"  artifact {artifact}")
    for key in sorted(run.summary.keys()):
        value = run.summary[key]
        if key.startswith("best_"):
            print(f"  summary {key} = {f'{value:.4f}' if isinstance(value, float) else value}")
    wandb.finish()


if __name__ == "__main__":
    main()
