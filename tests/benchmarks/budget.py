"""Staging within a memory budget (``nox -s bench``): the plain-PyTorch workload of ``run.py``
(403 MB of state, six saves) with ``staging_memory`` set to force each step (two buffer sets,
one, chunked, streaming), beside no checkpoint callback and ``torch.save`` in the loop, each
configuration ``--repeats`` times in a fresh process.

    python tests/benchmarks/budget.py                  # the table for the README
    python tests/benchmarks/budget.py --mb 80 --repeats 1

Prints blocking and total overhead per save and the peak extra memory of each step, and checks
the targets: peak extra host memory at most the budget plus one chunk (the spool's unit) on
every step, and with one buffer set, blocking per save at most the copy limit plus one whole
write (the longest a save can wait for the write in flight).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import load, machine, run_child
from summary import Figures, figures

from bestsave.memory import CHUNK, format_size

STEPS = {"two sets": 2.1, "one set": 1.5, "chunked": 0.5, "streaming": 0.0025}
"""Each step, and the budget that forces it, in states."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=6, help="square layers in the model (6)")
    p.add_argument("--width", type=int, default=4096, help="width of each layer (4096)")
    p.add_argument("--mb", type=float, help="state size in MB; sets --width for --layers")
    p.add_argument("--epochs", type=int, default=12, help="epochs per fit (12)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration (3)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    args = p.parse_args(argv)
    if args.mb is not None:
        args.width = max(1, round(math.sqrt(args.mb * 1e6 / 4 / args.layers)))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmpdir = tempfile.gettempdir()
    base = {"framework": "torch", "layers": args.layers, "width": args.width,
            "epochs": args.epochs, "samples": 16, "batch": 8}  # fmt: skip
    state = args.layers * (args.width**2 + args.width) * 4
    configs: dict[str, dict[str, Any]] = {"none": {"config": "none"},
                                          "torch.save": {"config": "theirs"}}  # fmt: skip
    for step, states in STEPS.items():
        configs[step] = {"config": "ours", "staging_memory": int(states * state)}
    load_start = load()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    limits: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        spec = {**base, "framework": "limit", "config": "limit"}
        result, error = run_child({**spec, "dir": tempfile.mkdtemp(dir=tmpdir)}, args.timeout)
        if result is None:
            print(f"limit failed: {error}", file=sys.stderr)
            return 1
        limits.append(result)
        for name, config in configs.items():
            spec = {**base, **config, "dir": tempfile.mkdtemp(dir=tmpdir)}
            result, error = run_child(spec, args.timeout)
            if result is None:
                print(f"{name} failed: {error}", file=sys.stderr)
                return 1
            runs[name].append(result)
            print(f"[{repeat + 1}/{args.repeats}] {name}: fit {result['fit_s']:.2f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    copy_s = statistics.median(r["copy_s"] for r in limits)
    write_s = statistics.median(r["torch_save_s"] for r in limits)
    print(
        f"Machine: {machine(tmpdir)}. Load average {load_start} at the start, {load()} at "
        f"the end.\n\nWorkload: {args.layers} x Linear({args.width}, {args.width}), "
        f"{state / 1e6:.0f} MB of state, {args.epochs} epochs, 6 saves; medians of "
        f"{args.repeats} runs, each in a fresh process. Limits: a copy into host memory "
        f"allocated beforehand {copy_s:.3f} s; `torch.save` of the state {write_s:.3f} s.\n"
    )
    print(
        "| configuration | `staging_memory` | step taken | fit | blocking per save | total "
        "overhead per save | peak extra memory | targets |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for name, config in configs.items():
        f = figures(runs[name], runs["none"])
        budget = config.get("staging_memory")
        taken = {r.get("staged") for r in runs[name]} - {None}
        print(f"| {name} | {format_size(budget) if budget else ''} | {', '.join(sorted(taken))} | "
              f"{f.fit_s:.3f} s | "
              f"{_s(f, 'blocking_s', name)} | {_s(f, 'total_s', name)} | "
              f"{_mb(f.extra_mb * 1e6) if name != 'none' else ''} | "
              f"{_targets(name, f, budget, copy_s, write_s)} |")  # fmt: skip
    return 0


def _targets(name: str, f: Figures, budget: int | None, copy_s: float, write_s: float) -> str:
    if budget is None:
        return ""
    checks = [_check(f.extra_mb * 1e6 <= budget + CHUNK, "peak extra <= budget + one chunk")]
    if name == "one set":
        checks.append(_check(f.blocking_s <= copy_s + write_s,
                             "blocking <= copy limit + one write"))  # fmt: skip
    return "; ".join(checks)


def _check(ok: bool, text: str) -> str:
    return ("met: " if ok else "MISSED: ") + text


def _s(f: Figures, key: str, name: str) -> str:
    return "" if name == "none" else f"{getattr(f, key):.3f} s"


def _mb(size: float) -> str:
    return f"{size / 1e6:+.0f} MB" if size < 0 else f"{size / 1e6:.0f} MB"


if __name__ == "__main__":
    sys.exit(main())
