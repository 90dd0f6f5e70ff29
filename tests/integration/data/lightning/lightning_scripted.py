"""A tiny LightningModule whose monitored metric follows a script, so decisions are known.

``val_score`` (or the name given as ``monitor``) is ``script[current_epoch]`` at every validation;
``train_loss`` and ``val_loss`` are real losses of a 4->1 linear model on fixed data.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


def data(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class ScriptedModel(L.LightningModule):
    def __init__(
        self,
        script: Sequence[float] = (0.1, 0.5, 0.3, 0.4),
        monitor: str = "val_score",
        lr: float = 0.05,
        batch_size: int = 8,
        fail_at_epoch: int = -1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)
        self.test_weights: dict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        if self.current_epoch == self.hparams.fail_at_epoch and batch_idx == 2:
            raise RuntimeError("scripted failure")
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def on_validation_epoch_end(self) -> None:
        self.log(self.hparams.monitor, float(self.hparams.script[self.current_epoch]))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self(x), y))

    def on_test_start(self) -> None:
        self.test_weights = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(data(seed=0), batch_size=self.hparams.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(data(n=16, seed=1), batch_size=16)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(data(n=16, seed=2), batch_size=16)


class CaptureWeights(L.Callback):
    """The model's weights at the end of every training epoch, when checkpoints are taken."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.weights[trainer.current_epoch] = {  # on the CPU, as the files load
            k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()
        }


def trainer_for(root, *callbacks, max_epochs, **kwargs) -> L.Trainer:
    """A quiet Trainer: no logger, progress bar, summary or sanity check."""
    options = dict(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        log_every_n_steps=1,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def fit(root, script, *callbacks, max_epochs=None, ckpt_path=None, model_kwargs=None, **kwargs):
    """Fit the scripted model; returns the trainer, the model and its captured weights."""
    capture = CaptureWeights()
    model = ScriptedModel(script=list(script), **(model_kwargs or {}))
    trainer = trainer_for(root, capture, *callbacks, max_epochs=max_epochs or len(script), **kwargs)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model, capture.weights
