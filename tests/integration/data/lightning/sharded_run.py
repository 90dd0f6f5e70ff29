"""Fit a sharded model with BestCheckpoint on CPU: 2 gloo processes, Lightning's own launcher.

    python sharded_run.py OUT {mp,fsdp,mp_full,fsdp_full} [fail_one|fail_all]

"mp" is ``ModelParallelStrategy`` (FSDP2's ``fully_shard`` in ``configure_model``), "fsdp" is
``FSDPStrategy`` (FSDP1) with sharded state dicts; the "_full" kinds save full state dicts. In
one launch, every rank runs:

- run "a": an uninterrupted fit, the full weights captured at every epoch;
- ``fit(ckpt_path="best")`` again on run a's trainer, which must start from the best epoch's
  weights;
- run "b": the same fit interrupted after ``STOP`` epochs, then resumed from its ``last``
  checkpoint by a new Trainer.

Global rank 0 writes ``OUT/report.json``; the test checks the files. With "fail_one" or
"fail_all" a single fit raises in epoch 2 instead, on rank 1 alone or (with
``save_on_exception``) on every rank, and each rank writes what it raised to ``OUT/rank<N>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning_scripted import ScriptedModel, trainer_for
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from bestsave.adapters.lightning import BestCheckpoint

SCRIPT = [0.3, 0.8, 0.5, 0.6, 0.9, 0.7]  # top 2: epochs 4 and 1
STOP = 3  # run b stops after epochs 0-2 (kept: 1, 2), then resumes
OPTIONS: dict[str, Any] = dict(
    monitor="val_score",
    mode="max",
    save_top_k=2,
    save_last=True,
    filename="{epoch}-{val_score:.2f}",
)


class ShardedModel(ScriptedModel):
    """The scripted model, wide enough that each rank holds a shard of every weight; under
    ``ModelParallelStrategy`` it shards itself with FSDP2."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layer = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
        )

    def configure_model(self) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for module in self.layer:
                if isinstance(module, torch.nn.Linear):
                    fully_shard(module, mesh=mesh)
            fully_shard(self.layer, mesh=mesh)


class CPUFSDP(FSDPStrategy):
    """FSDPStrategy on the CPU. Lightning refuses ``FSDPStrategy`` with a CPU accelerator (not
    a subclass), and torch's FSDP1 needs ``device_id`` to be the CPU to wrap there; wrapped
    beforehand, the model takes Lightning's "already wrapped" path."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not any(isinstance(m, FSDP) for m in model.modules()):
            model = FSDP(
                model,
                device_id=torch.device("cpu"),
                sharding_strategy=self.sharding_strategy,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                **self.kwargs,
            )
        return super()._setup_model(model)


def strategy(kind: str) -> L.pytorch.strategies.Strategy:
    if kind.startswith("mp"):
        return ModelParallelStrategy(
            data_parallel_size=2,
            tensor_parallel_size=1,
            save_distributed_checkpoint=kind == "mp",
        )
    return CPUFSDP(state_dict_type="sharded" if kind == "fsdp" else "full")


def full_weights(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """The model's whole weights on global rank 0 (a collective: every rank calls it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(trainer.strategy.model, options=options)
    return {k: v.clone() for k, v in state.items()}


class Weights(L.Callback):
    """Full weights at the end of every training epoch, and when a fit starts."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, torch.Tensor]] = {}
        self.at_start: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at_start.append((trainer.current_epoch, full_weights(trainer)))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.by_epoch[trainer.current_epoch] = full_weights(trainer)


def trainer(kind: str, out: str, run: str, max_epochs: int, *callbacks: L.Callback) -> L.Trainer:
    return trainer_for(
        os.path.join(out, run),
        *callbacks,
        max_epochs=max_epochs,
        strategy=strategy(kind),
        accelerator="cpu",
        devices=2,
    )


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fail(out: str, kind: str, everywhere: bool) -> None:
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by Lightning's launcher
    torch.manual_seed(0)
    model = ShardedModel(script=SCRIPT, batch_size=4, fail_at_epoch=2 if everywhere or rank else -1)
    dirpath = os.path.join(out, "a", "checkpoints")
    checkpoint = BestCheckpoint(dirpath=dirpath, save_on_exception=everywhere, **OPTIONS)
    error = None
    try:
        trainer(kind, out, "a", len(SCRIPT), checkpoint).fit(model)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"error": error}, f)


def main(out: str, kind: str) -> None:
    torch.set_num_threads(1)

    def model() -> ShardedModel:  # the same initial weights in every run
        torch.manual_seed(0)
        return ShardedModel(script=SCRIPT, batch_size=4)

    dirs = {run: os.path.join(out, run, "checkpoints") for run in "ab"}

    weights, ours = Weights(), BestCheckpoint(dirpath=dirs["a"], **OPTIONS)
    fitted = trainer(kind, out, "a", len(SCRIPT), weights, ours)
    fitted.fit(model())
    best, best_path = ours.best_record, ours.best_model_path
    fitted.fit(model(), ckpt_path="best")  # starts again after the best epoch
    started, loaded = weights.at_start[-1]

    first = BestCheckpoint(dirpath=dirs["b"], **OPTIONS)
    trainer(kind, out, "b", STOP, first).fit(model())
    resumed = BestCheckpoint(dirpath=dirs["b"], **OPTIONS)
    trainer(kind, out, "b", len(SCRIPT), resumed).fit(model(), ckpt_path=first.last_model_path)

    if torch.distributed.get_rank() == 0:
        assert best is not None
        report = {
            "best_epoch": best.epoch,
            "best_path": best_path,
            "resumed_at": started,
            "resumed_from_best_weights": same(loaded, weights.by_epoch[best.epoch]),
            "interrupted_last": first.last_model_path,
            "resumed_best": resumed.best_model_path,
        }
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f)
    # Left to interpreter exit, gloo's threads can abort the process.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) > 3:
        fail(sys.argv[1], sys.argv[2], everywhere=sys.argv[3] == "fail_all")
    else:
        main(sys.argv[1], sys.argv[2])
        # Without the interpreter's shutdown, where gloo's threads can abort the process
        # (pytorch/pytorch#179291), once everything is written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
