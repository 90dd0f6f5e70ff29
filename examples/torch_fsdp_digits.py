"""A model sharded over two processes (FSDP2) keeps its 2 best epochs by validation accuracy.

Each process holds half of every layer's parameters and optimiser state (``fully_shard``), so
no process can save the model alone: every process writes its own shards of each kept
checkpoint, in the background, and the checkpoint exists once all shards are durable. The run
resumes after any interruption with the same command; ``bestsave export`` turns the best into
one ordinary file afterwards. Runs on the CPU (gloo), on scikit-learn's digits.

    torchrun --nproc-per-node 2 examples/torch_fsdp_digits.py --epochs 8 --dir runs/digits
    bestsave export runs/digits digits-best.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from bestsave.adapters.torch import TorchCheckpointer


def make_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train, validation and test splits of the 8x8 digits, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(x / 16.0, y, test_size=0.4,
                                                        stratify=y, random_state=0)  # fmt: skip
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5,
                                                    stratify=y_rest, random_state=0)  # fmt: skip
    as_tensors = lambda x, y: (torch.tensor(x, dtype=torch.float32), torch.tensor(y))  # noqa: E731
    return {
        "train": as_tensors(x_train, y_train),
        "val": as_tensors(x_val, y_val),
        "test": as_tensors(x_test, y_test),
    }


def make_model(mesh: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def accuracy(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Accuracy over the whole split: each process judges its half, then they add up."""
    x, y = data
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.no_grad():
        right = (model(x[rank::world]).argmax(1) == y[rank::world]).sum().float()
    dist.all_reduce(right)
    return float(right) / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--dir", default="runs/digits")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    data = make_data()
    model = make_model(mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    ckpt = TorchCheckpointer(args.dir, monitor="val_acc", top_k=2, save_last=True, resume=True)
    start = ckpt.restore(model, optimizer)  # every process: each loads its own shards
    x, y = data["train"]
    for epoch in range(start, args.epochs):
        generator = torch.Generator().manual_seed(epoch)
        order = torch.randperm(len(y), generator=generator)[rank::world]
        for batch in order.split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        metrics = {"val_acc": accuracy(model, data["val"])}
        ckpt.step(epoch, metrics, model=model, optimizer=optimizer)
        if rank == 0:
            print(f"epoch {epoch:2d}  val_acc={metrics['val_acc']:.4f}")

    best = ckpt.load_best(model)  # every process, as the checkpoint is sharded
    test = accuracy(model, data["test"])
    if rank == 0:
        print(f"best epoch {best.epoch}: val_acc={best.score:.4f}, test accuracy {test:.4f}")
        print(f"kept: {', '.join(r.name for r in ckpt.kept)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip the interpreter's shutdown: gloo's threads can still hold tensors then, and freeing
    # them there can abort the process after everything is saved (pytorch/pytorch#179291).
    sys.stdout.flush()
    os._exit(0)
