"""A plain PyTorch run in a process whose memory is capped so that the live state fits beside
one more copy of it, but not beside two.

    python capped_train.py DIR [--staging-memory SIZE] [--cgroup CGROUP]

After the model is built, the cap is set to what is in use plus 1.8 times the state's size:
the address space (``RLIMIT_AS``; allocations past it fail), or with ``--cgroup`` the memory
limit of that cgroup, which the process joins first (past it, the kernel kills the process).
Training then saves the best with ``TorchCheckpointer`` (the staging budget taken
from the machine unless ``--staging-memory`` is given) and prints one JSON line: the best epoch,
how its file was staged, whether the file holds that epoch's weights, and the error that ended
the run, if one did.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import traceback
import warnings

import torch

from bestsave.adapters.torch import TorchCheckpointer

SCORES = [0.9, 0.7, 0.8, 0.5, 0.6]  # best at epoch 3


def address_space() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def cap_cgroup(cgroup: str, headroom: int) -> None:
    """Limit ``cgroup`` (v2, or v1's memory controller), which this process has joined, to
    its usage plus ``headroom``."""
    limit, usage = "memory.max", "memory.current"
    if not os.path.exists(os.path.join(cgroup, limit)):
        limit, usage = "memory.limit_in_bytes", "memory.usage_in_bytes"
    with open(os.path.join(cgroup, usage)) as f:
        used = int(f.read())
    with open(os.path.join(cgroup, limit), "w") as f:
        f.write(str(used + headroom))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--staging-memory", default=None)
    parser.add_argument("--cgroup", default=None)
    args = parser.parse_args()
    if args.cgroup:
        with open(os.path.join(args.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(12)])  # 201 MB
    size = sum(p.nbytes for p in model.state_dict().values())
    x = torch.randn(4, 2048)
    model(x).sum().backward()  # gradients and the autograd engine's threads exist before the cap
    model.zero_grad(set_to_none=False)
    if args.cgroup:
        cap_cgroup(args.cgroup, int(1.8 * size))
    else:
        cap = address_space() + int(1.8 * size)
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
    report: dict[str, object] = {"state_mb": size // 10**6, "error": None}
    expected = None
    try:
        ckpt = TorchCheckpointer(args.dir, monitor="val_loss", save_weights_only=True,
                                 staging_memory=args.staging_memory, trackers=())  # fmt: skip
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            for epoch, loss in enumerate(SCORES):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.01 * (epoch + 1))
                if loss == min(SCORES):
                    expected = {k: v[:4].clone() for k, v in model.state_dict().items()}
                ckpt.step(epoch, {"val_loss": loss}, model=model)
            ckpt.close()
        # Checking the file needs memory of its own: the cap is lifted first.
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
        best = ckpt.best
        assert best is not None and expected is not None
        saved = torch.load(best.path, mmap=True)["model"]
        report.update(
            best=best.epoch,
            staging=best.staging,
            weights_match=all(torch.equal(saved[k][:4], v) for k, v in expected.items()),
            warnings=[str(w.message) for w in said],
        )
    except BaseException as e:
        report["error"] = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()
    print(json.dumps(report))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
