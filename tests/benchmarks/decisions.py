"""What a decision costs the training loop when nothing is saved (``nox -s bench``).

10,000 evaluations with ``top_k=5``: the first five scores are kept, every later one is worse,
so each step judges, records history and commits the manifest but writes no checkpoint. The
loop pays for the decision; the history line and manifest are committed by the background
writer. Prints the median and 99th percentile of ``step()`` and the total including the final
flush.

    python tests/benchmarks/decisions.py --evaluations 10000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from bestsave import BestSaver


def measure(evaluations: int, top_k: int = 5) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        saver = BestSaver(d, monitor="val_loss", top_k=top_k, trackers=())
        times = []
        for epoch in range(evaluations):
            loss = 1.0 / (epoch + 1) if epoch < top_k else 2.0 + epoch
            metrics = {"val_loss": loss, "train_loss": loss / 2, "val_acc": 0.5}
            start = time.perf_counter()
            saver.step(epoch, metrics, write=lambda p: open(p, "w").write("w"))
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        saver.close()
        flush = time.perf_counter() - start
    later = sorted(times[top_k:])
    return {
        "median_ms": statistics.median(later) * 1e3,
        "p99_ms": later[int(0.99 * (len(later) - 1))] * 1e3,
        "total_s": sum(times) + flush,
        "flush_s": flush,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=10_000)
    args = parser.parse_args()
    r = measure(args.evaluations)
    print(
        f"{args.evaluations} evaluations, top_k=5, nothing saved after the first five: "
        f"step() median {r['median_ms']:.3f} ms, 99th percentile {r['p99_ms']:.3f} ms; "
        f"total {r['total_s']:.2f} s including the final flush ({r['flush_s']:.2f} s)"
    )


if __name__ == "__main__":
    main()
