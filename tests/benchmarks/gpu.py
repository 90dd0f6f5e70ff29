"""Saving from GPU memory: ``TorchCheckpointer`` against ``torch.save`` in a plain PyTorch loop.

The model (six 4096x4096 layers, 403 MB of state) trains on the GPU for 12 epochs; the scripted
loss improves at epochs 0, 1, 2, 4, 7 and 11 (six saves). Each configuration runs ``--repeats``
times in this process, after one warm-up fit; the limit is a copy of the state from the GPU into
pinned host memory allocated beforehand. Needs a CUDA device.

    python tests/benchmarks/gpu.py [--repeats 3] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch

from bestsave.adapters.torch import TorchCheckpointer

SAVES = (0, 1, 2, 4, 7, 11)
EPOCHS = 12


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(6)]).cuda()


def limits() -> dict[str, float]:
    """Seconds to copy the state to host memory: pinned and pageable buffers allocated
    beforehand, and a fresh ``.cpu()`` (medians)."""
    state = model().state_dict()
    out = {}
    for name, pinned in (("pinned", True), ("pageable", False)):
        dst = {
            k: torch.empty(v.shape, dtype=v.dtype, pin_memory=pinned).zero_()
            for k, v in state.items()
        }
        times = []
        for _ in range(7):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for k, v in state.items():
                dst[k].copy_(v, non_blocking=pinned)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        copy = {k: v.cpu() for k, v in state.items()}
        times.append(time.perf_counter() - start)
        del copy
    out["fresh"] = statistics.median(times)
    return out


def fit(config: str, steps: int) -> dict[str, float]:
    """One fit; its time, and how much longer a saving epoch's end takes than another's."""
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)
    x = torch.randn(256, 4096, device="cuda")
    where = tempfile.mkdtemp(prefix="bestsave-cuda-")
    ckpt = TorchCheckpointer(where, monitor="loss", mode="min") if config == "ours" else None
    ends, loss = [], 100.0
    torch.cuda.synchronize()
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        for _ in range(steps):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
        torch.cuda.synchronize()
        trained = time.perf_counter()
        if epoch in SAVES:
            loss -= 1
        if ckpt is not None:
            ckpt.step(epoch, {"loss": loss}, model=net, optimizer=opt)
        elif config == "theirs" and epoch in SAVES:
            state = {"model": net.state_dict(), "optimizer": opt.state_dict()}
            torch.save(state, os.path.join(where, f"epoch={epoch}.pth"))
        ends.append(time.perf_counter() - trained)
    if ckpt is not None:
        ckpt.close()
    torch.cuda.synchronize()
    fit_s = time.perf_counter() - start
    if ckpt is not None:  # the best file holds the weights the loop ended with
        assert ckpt.best is not None
        best = torch.load(ckpt.best.path, map_location="cpu", weights_only=True)["model"]
        assert all(torch.equal(best[k], v.cpu()) for k, v in net.state_dict().items())
    shutil.rmtree(where)
    other = statistics.median(t for e, t in enumerate(ends) if e not in SAVES)
    saves = [ends[e] - other for e in SAVES]
    return {"fit": fit_s, "blocking": statistics.median(saves), "first": saves[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="fits of each configuration (3)")
    p.add_argument("--steps", type=int, default=30, help="training steps per epoch (30)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures saves from GPU memory")
    limit = limits()
    fit("none", args.steps)  # warm-up: kernels, the caching allocators
    runs: dict[str, list[dict[str, Any]]] = {"none": [], "theirs": [], "ours": []}
    for _ in range(args.repeats):
        for config in runs:
            runs[config].append(fit(config, args.steps))
    none = statistics.median(r["fit"] for r in runs["none"])
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; {os.cpu_count()} cores")
    print(
        f"limit: {limit['pinned']:.4f} s into pinned memory allocated beforehand "
        f"({limit['pageable']:.4f} s pageable, {limit['fresh']:.4f} s for a fresh .cpu())"
    )
    print("| callback | fit | blocking per save | first save | total overhead per save |")
    print("| --- | ---: | ---: | ---: | ---: |")
    names = {"none": "none", "theirs": "`torch.save` in the loop", "ours": "`TorchCheckpointer`"}
    for config, results in runs.items():
        fit_s = statistics.median(r["fit"] for r in results)
        if config == "none":
            print(f"| {names[config]} | {fit_s:.3f} s | | | |")
            continue
        blocking = statistics.median(r["blocking"] for r in results)
        first = statistics.median(r["first"] for r in results)
        print(
            f"| {names[config]} | {fit_s:.3f} s | {blocking:.4f} s | {first:.4f} s "
            f"| {(fit_s - none) / len(SAVES):.4f} s |"
        )


if __name__ == "__main__":
    main()
