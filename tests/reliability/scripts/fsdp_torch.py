"""One rank of a sharded plain-PyTorch run: FSDP2 (``fully_shard``) on the CPU over gloo, saved
with ``TorchCheckpointer`` as ``torch.distributed.checkpoint`` folders.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python fsdp_torch.py DIR OUT [--epochs N] [--resume] [--fail-at EPOCH --fail-rank R]
                                     [--storage-options JSON] [--staging-memory SIZE]

Every rank trains the same model on the same batches and judges the same ``val_loss``
(:func:`score`: ``SCORES``, then a slow fall). Rank 0 writes ``OUT/weights-<epoch>.pt`` (the full
weights after that epoch, before its save) and every rank ``OUT/rank<r>.json``: the decisions,
the epoch restored from, the error that ended it, whether ``load_best`` put the best epoch's
weights back, and its host name. DIR may be a URL (``s3://...``, with ``--storage-options`` for
fsspec). A resumed run also loads the best it resumes with into a fresh model first (the
previous run's best, on a new process group). ``--fail-at`` makes rank R's writes fail from that
epoch's save on (files over 1 KiB exceed its file size limit, ``EFBIG``).

The kill tests fork ranks from a server that imported this module (:func:`run_in_child`); they
learn the run's progress as it goes (``ready``, ``stepped`` after each evaluation, ``done``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import socket
import sys
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from bestsave.adapters.torch import TorchCheckpointer

SCORES = [0.5, 0.4, 0.45, 0.3, 0.35, 0.2, 0.33, 0.25]

Progress = Callable[..., None]
"""Called as ``progress(event, epoch, **facts)``."""


def score(epoch: int) -> float:
    """The scripted val_loss of ``epoch``: ``SCORES``, then a slow fall with noise, so that the
    best and the top 2 keep changing over a longer run."""
    if epoch < len(SCORES):
        return SCORES[epoch]
    return round(0.3 * 0.93 ** (epoch - len(SCORES)) + random.Random(epoch).uniform(0, 0.1), 4)


def make_model(mesh: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    if mesh is not None:
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> None:
    generator = torch.Generator().manual_seed(epoch)
    for _ in range(3):
        x = torch.randn(8, 16, generator=generator)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def save_weights(weights: dict[str, torch.Tensor], out: str, epoch: int) -> None:
    """``OUT/weights-<epoch>.pt``, whole or not at all (the kill tests kill mid-run)."""
    path = os.path.join(out, f"weights-{epoch}.pt")
    torch.save(weights, path + ".tmp")
    os.replace(path + ".tmp", path)


def main(
    argv: list[str] | None = None,
    progress: Progress = lambda event, epoch, **facts: None,
    wait_go: Callable[[], None] = lambda: None,
) -> None:
    """Train, reporting ``ready`` (after restoring; then waiting for ``wait_go``), ``stepped``
    after each evaluation (rank 0) and ``done``; exits 1 when an error ended the run."""
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=len(SCORES))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--fail-at", type=int, default=None)
    parser.add_argument("--fail-rank", type=int, default=0)
    parser.add_argument("--storage-options", type=json.loads, default={})
    parser.add_argument("--staging-memory", type=json.loads, default=None,
                        help="per rank: a size, or a list of one per rank")  # fmt: skip
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = make_model(mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    report: dict[str, Any] = {"decisions": [], "error": None, "host": socket.gethostname()}
    path = os.path.join(args.out, f"rank{rank}.json")

    budget = args.staging_memory
    budget = budget[rank] if isinstance(budget, list) else budget
    ckpt = TorchCheckpointer(args.dir, monitor="val_loss", top_k=2, save_last=True,
                             resume=args.resume, storage_options=args.storage_options,
                             staging_memory=budget)  # fmt: skip
    start = report["restored"] = ckpt.restore(model, optimizer)
    if args.resume and start > 0:
        restored = full_weights(model)  # a collective: every rank
        report["restored_weights_match"] = _same(restored, _saved(args.out, start - 1))
        previous = make_model(mesh)
        best = ckpt.load_best(previous)
        report["resumed_best"] = best.epoch
        report["resumed_best_weights_match"] = _same(
            full_weights(previous), _saved(args.out, best.epoch)
        )
    progress("ready", start, **report)
    wait_go()
    said: list[str] = []  # what the run warned of, in its report
    report["warnings"] = said
    warnings.showwarning = lambda message, *_: said.append(str(message))
    try:
        for epoch in range(start, args.epochs):
            train_epoch(model, optimizer, epoch)
            weights = full_weights(model)  # a collective: every rank
            if rank == 0:
                save_weights(weights, args.out, epoch)
            if args.fail_at == epoch and rank == args.fail_rank:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
            d = ckpt.step(epoch, {"val_loss": score(epoch)}, model=model, optimizer=optimizer)
            report["decisions"].append({"epoch": epoch, "saved": d.saved, "is_best": d.is_best})
            if rank == 0:
                progress("stepped", epoch)
            if args.fail_at is not None:
                ckpt.saver.flush()  # the failure surfaces at this epoch on every rank
        ckpt.close()
        best = ckpt.load_best(make_model(mesh))
        fresh = make_model(mesh)
        ckpt.load_best(fresh)
        report["best"] = best.epoch
        report["staging"] = [r.staging for r in ckpt.kept]
        report["best_weights_match"] = _same(full_weights(fresh), _saved(args.out, best.epoch))
    except Exception as e:
        report["error"] = f"{type(e).__name__}: {e}"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        with open(path, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()
    progress("done", args.epochs - 1, **report)
    # Leave without the interpreter's shutdown: gloo's threads can still hold tensors then, and
    # freeing them there aborts the process (pytorch/pytorch#179291), after all is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if report["error"] else 0)


def run_in_child(conn: Any, rank: int, world: int, port: int, argv: list[str]) -> None:
    """Entry point of a rank forked by the kill tests: progress goes through ``conn`` (an
    exception's traceback too), and the run waits after ``ready`` until the test says go."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip

    def progress(event: str, epoch: int, **facts: Any) -> None:
        conn.send((event, epoch, facts))

    try:
        main(argv, progress, conn.recv)
    except Exception:  # the test shows what ended the rank
        progress("error", -1, traceback=traceback.format_exc())
        raise


def _saved(out: str, epoch: int) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out, f"weights-{epoch}.pt"))  # type: ignore[no-any-return]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


if __name__ == "__main__":
    main()
