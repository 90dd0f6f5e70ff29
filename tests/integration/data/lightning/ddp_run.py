"""Fit the scripted model with BestCheckpoint under DDP on CPU (2 gloo processes).

    python ddp_run.py OUT {staged,mirror} [weights_only|fail]

"staged" uses strategy="ddp": global rank 0 snapshots and writes alone. "mirror" uses a DDP
strategy that overrides ``save_checkpoint``, so every rank saves through
``trainer.save_checkpoint`` as sharded strategies need. Each rank writes ``OUT/rank<N>.json``:
the files it wrote or deleted in the checkpoint directory, and what its callback knows.
"fail" makes global rank 0's third checkpoint write fail (no space left): every rank must stop
with the error instead of waiting for the other.
"""

from __future__ import annotations

import builtins
import json
import os
import sys
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io import torch_io
from lightning.pytorch.strategies import DDPStrategy
from lightning_scripted import ScriptedModel

from bestsave.adapters.lightning import BestCheckpoint

SCRIPT = [0.3, 0.7, 0.5, 0.72, 0.6, 0.65, 0.69, 0.9]
OPTIONS: dict[str, Any] = dict(
    monitor="val_score",
    mode="max",
    save_top_k=2,
    save_last=True,
    patience=3,
    filename="{epoch}-{val_score:.2f}",
)


class MirrorDDP(DDPStrategy):
    """DDP whose save_checkpoint is its own: BestCheckpoint then saves on every rank."""

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):  # type: ignore[override]
        super().save_checkpoint(checkpoint, filepath, storage_options)


def spy_on_writes(root: str, log: list[list[str]]) -> None:
    """Record every file this process creates, replaces, links or deletes under ``root``."""

    def inside(path: Any) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(root)

    real_open, real_replace, real_link, real_unlink = builtins.open, os.replace, os.link, os.unlink
    real_atomic = torch_io._atomic_save

    def spy_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if inside(file) and any(c in mode for c in "wax+"):
            log.append(["open", os.fspath(file)])
        return real_open(file, mode, *args, **kwargs)

    def spy(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if any(inside(a) for a in args):
                log.append([name, os.fspath(args[-1])])
            return real(*args, **kwargs)

        return call

    builtins.open = spy_open
    os.replace, os.link, os.unlink = (
        spy("replace", real_replace),
        spy("link", real_link),
        spy("unlink", real_unlink),
    )
    torch_io._atomic_save = spy("torch.save", real_atomic)


def fail_third_save() -> None:
    real_save, calls = torch.save, []

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(f)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(f))
        real_save(obj, f, *args, **kwargs)

    torch.save = save


def main(out: str, kind: str, weights_only: bool, fail: bool = False) -> None:
    torch.set_num_threads(1)
    if fail and int(os.environ.get("RANK", "0")) == 0:
        fail_third_save()
    dirpath = os.path.join(out, "checkpoints")
    writes: list[list[str]] = []
    spy_on_writes(dirpath, writes)
    checkpoint = BestCheckpoint(dirpath=dirpath, save_weights_only=weights_only, **OPTIONS)
    trainer = L.Trainer(
        strategy="ddp" if kind == "staged" else MirrorDDP(process_group_backend="gloo"),
        accelerator="cpu",
        devices=2,
        max_epochs=len(SCRIPT),
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    trainer.fit(ScriptedModel(script=SCRIPT, batch_size=4))
    report = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "staged": checkpoint._staged,
        "writer": checkpoint.saver.writer if checkpoint.saver else None,
        "writes": writes,
        "best_model_path": checkpoint.best_model_path,
        "best_k_models": sorted(checkpoint.best_k_models),
        "last_model_path": checkpoint.last_model_path,
        "epochs_run": trainer.current_epoch,
    }
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(report, f)
    # Left to interpreter exit, gloo's threads can abort the process ("terminate called
    # without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    extra = sys.argv[3] if len(sys.argv) > 3 else ""
    main(sys.argv[1], sys.argv[2], extra == "weights_only", extra == "fail")
