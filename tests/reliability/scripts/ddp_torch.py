"""One rank of a plain PyTorch DDP run (gloo, CPU) that saves with ``TorchCheckpointer``.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python ddp_torch.py DIR OUT [--fail-at EPOCH] [--sync] [--warn]

Every rank trains the same DDP model and judges the all-reduced ``val_loss``. ``--fail-at`` makes
global rank 0's checkpoint write of that epoch fail with ENOSPC. Each rank writes
``OUT/rank<r>.json`` after every epoch: the decisions it got, the error that ended it if any, and
every write it made inside DIR (Python's audit hooks see ``open``, renames, links and deletions;
``torch.save`` writes in C++, so its calls are recorded by wrapping it).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# val_loss before the all-reduce adds each rank's 0.01 * rank: 0, 1, 2 and 4 are new bests.
SCORES = [0.5, 0.4, 0.3, 0.35, 0.2, 0.25, 0.3, 0.28]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def watch_writes(dirpath: str) -> list[str]:
    """Record every write this process makes under ``dirpath``."""
    root = os.path.realpath(dirpath)
    writes: list[str] = []

    def inside(path: Any) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(
            os.fsdecode(path)
        ).startswith(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and inside(args[0]):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & WRITE_FLAGS:
                writes.append(f"open {args[0]}")
        elif event in ("os.rename", "os.link", "shutil.copyfile") and inside(args[1]):
            writes.append(f"{event} {args[1]}")
        elif event in ("os.remove", "os.mkdir", "os.truncate", "os.rmdir") and inside(args[0]):
            writes.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    save = torch.save

    def recorded_save(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        if inside(f):
            writes.append(f"torch.save {f}")
        save(obj, f, *a, **k)

    torch.save = recorded_save
    return writes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("out")
    parser.add_argument("--fail-at", type=int, default=None)
    parser.add_argument("--sync", action="store_true")
    parser.add_argument("--warn", action="store_true")
    args = parser.parse_args()

    from bestsave.adapters.torch import TorchCheckpointer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    writes = watch_writes(args.dir)
    if rank == 0 and args.fail_at is not None:
        save = torch.save

        def full_disk(obj: Any, f: Any, *a: Any, **k: Any) -> None:
            if isinstance(obj, dict) and obj.get("epoch") == args.fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            save(obj, f, *a, **k)

        torch.save = full_disk

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = TorchCheckpointer(
        args.dir,
        monitor="val_loss",
        top_k=2,
        save_last=True,
        patience=3,
        trackers=(),
        async_write=not args.sync,
        on_write_error="warn" if args.warn else "raise",
    )
    report: dict[str, Any] = {"rank": rank, "decisions": [], "error": None, "writes": writes}

    def dump() -> None:
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump(report, f, indent=1)

    try:
        for epoch, score in enumerate(SCORES):
            optimizer.zero_grad()
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(10 * epoch + rank))
            model(x).pow(2).mean().backward()  # the gradients' all-reduce
            optimizer.step()
            val = torch.tensor(score + 0.01 * rank)
            dist.all_reduce(val)
            d = ckpt.step(epoch, {"val_loss": val / world}, model=model.module, optimizer=optimizer)
            report["decisions"].append(
                {
                    "epoch": epoch,
                    "is_best": d.is_best,
                    "saved": d.saved,
                    "file": d.record.name if d.record else None,
                    "evicted": [r.name for r in d.evicted],
                    "should_stop": d.should_stop,
                    "best": ckpt.best.name if ckpt.best else None,
                }
            )
            dump()
            if d.should_stop:
                break
        ckpt.close()
    except BaseException as e:
        report["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        dump()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
