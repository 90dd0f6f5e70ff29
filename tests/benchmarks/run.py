"""Time bestsave against each framework's own checkpoint callback (``nox -s bench``).

Trains a model of about 100M float32 parameters (six 4096x4096 layers, 403 MB of state) for 12
epochs on a few samples, with a scripted metric that improves at epochs 0, 1, 2, 4, 7 and 11
(six saves), once without a checkpoint callback, once with the framework's own and once with
bestsave's, each configuration ``--repeats`` times in a fresh process (Lightning also with DDP,
two processes on the CPU), and prints for each framework the blocking and total overhead per
save, their ratios to the framework's own and to the limit (a copy of the state into host memory
allocated beforehand), and the peak extra memory. The FSDP2 workload (``fsdp``) trains a model
sharded over two processes with Adam (201 MB of model and optimiser state in all) and compares
bestsave with ``dcp.save`` and ``dcp.async_save``.

    python tests/benchmarks/run.py                                  # the full benchmark
    python tests/benchmarks/run.py --mb 40 --epochs 6 --repeats 1   # small, for CI
    python tests/benchmarks/run.py --frameworks torch,lightning --out results.md
    python tests/benchmarks/run.py --from-raw raw.json      # the table of an earlier run

The table is Markdown, with the machine it ran on, ready for the README.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from summary import ASYNC, FRAMEWORKS, OWN_LIMIT, markdown
from workloads import improves

HERE = Path(__file__).resolve().parent
CONFIGS = ("none", "theirs", "ours")
ASYNC_CONFIGS = ("none", "theirs", "theirs_async", "ours")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=6, help="square layers in the model (6)")
    p.add_argument("--width", type=int, default=4096, help="width of each layer (4096)")
    p.add_argument("--mb", type=float, help="state size in MB; sets --width for --layers")
    p.add_argument("--fsdp-layers", type=int, default=4, help="layers of the FSDP2 model (4)")
    p.add_argument(
        "--fsdp-width",
        type=int,
        default=2048,
        help="width of the FSDP2 model's layers (2048: 201 MB of model and Adam state)",
    )
    p.add_argument("--epochs", type=int, default=12, help="epochs per fit (12)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration (3)")
    p.add_argument("--samples", type=int, default=16, help="training samples (16)")
    p.add_argument("--batch", type=int, default=8, help="batch size (8)")
    p.add_argument(
        "--frameworks",
        default=",".join(FRAMEWORKS),
        help="comma-separated, from: " + ", ".join(FRAMEWORKS),
    )
    p.add_argument("--out", help="also write the Markdown table to this file")
    p.add_argument("--raw", help="write every run's measurements to this JSON file")
    p.add_argument("--from-raw", help="measure nothing: print the table of a --raw file")
    p.add_argument("--tmpdir", help="where checkpoints are written (default: the system's temp)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run before giving up")
    args = p.parse_args(argv)
    if args.mb is not None:
        # layers * (width^2 + width) * 4 bytes = mb * 1e6
        args.width = max(1, round(math.sqrt(args.mb * 1e6 / 4 / args.layers)))
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = sorted(set(frameworks) - set(FRAMEWORKS))
    if unknown:
        p.error(f"unknown framework(s) {unknown}: choose from {', '.join(FRAMEWORKS)}")
    args.frameworks = frameworks
    for name in (
        "layers",
        "width",
        "fsdp_layers",
        "fsdp_width",
        "epochs",
        "repeats",
        "samples",
        "batch",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def configs_of(framework: str) -> tuple[str, ...]:
    return ASYNC_CONFIGS if framework in ASYNC else CONFIGS


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND="torch",  # Keras trains the same torch model, no TensorFlow needed
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PYTHONWARNINGS="ignore",
    )
    return env


def run_child(spec: dict[str, Any], timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run one configuration in a fresh process; its result, or None and why it failed."""
    fd, result = tempfile.mkstemp(prefix="bestsave-bench-", suffix=".json")
    os.close(fd)
    spec = {**spec, "result": result}
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE / "workloads.py"), json.dumps(spec)],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            return None, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        with open(result) as f:
            return json.load(f), ""
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    finally:
        os.unlink(result)
        shutil.rmtree(spec["dir"], ignore_errors=True)  # every run starts on an empty directory


def machine(tmpdir: str) -> str:
    """CPU, cores, memory, OS, versions and the checkpoints' filesystem, in one line."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    ram = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f", {int(line.split()[1]) / 2**20:.1f} GiB RAM"
    except OSError:
        pass
    versions = []
    for dist in ("torch", "lightning", "keras", "fastai"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
    return (
        f"{cpu}, {os.cpu_count()} cores{ram}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, {', '.join(versions)}; "
        f"checkpoints written to {tmpdir}{filesystem(tmpdir)}"
    )


def filesystem(path: str) -> str:
    """`` (ext4 on /dev/vda)``: the mount that holds ``path``, where /proc/mounts says."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    real = os.path.realpath(path)
    best = max(
        (m for m in mounts if len(m) > 2 and (real + "/").startswith(m[1].rstrip("/") + "/")),
        key=lambda m: len(m[1]),
        default=None,
    )
    return f" ({best[2]} on {best[0]})" if best else ""


def load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _busy(load_average: str) -> bool:
    """Whether other processes kept at least one core busy when the benchmark started."""
    try:
        return float(load_average) >= 1.0
    except ValueError:
        return False


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every configuration ``args.repeats`` times; the raw results and the table's header."""
    tmpdir = args.tmpdir or tempfile.gettempdir()
    base = {
        "layers": args.layers,
        "width": args.width,
        "epochs": args.epochs,
        "samples": args.samples,
        "batch": args.batch,
    }
    saves = [e for e in range(args.epochs) if improves(e)]
    started, load_start = time.time(), load()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {f: {} for f in args.frameworks}
    errors: dict[str, str] = {}
    limits: list[dict[str, Any]] = []
    total = args.repeats * (1 + sum(len(configs_of(f)) + (f in OWN_LIMIT) for f in args.frameworks))
    done = 0

    def progress(what: str, text: str) -> None:
        nonlocal done
        done += 1
        print(f"[{done}/{total}] {what}: {text}", file=sys.stderr, flush=True)

    for repeat in range(args.repeats):
        spec = {**base, "framework": "limit", "config": "limit"}
        spec["dir"] = tempfile.mkdtemp(prefix="bestsave-bench-", dir=tmpdir)
        result, error = run_child(spec, args.timeout)
        if result is not None:
            limits.append(result)
        progress(f"limit #{repeat + 1}", f"{result['copy_s']:.3f} s" if result else error)
        # Each repeat runs the configurations in another order, so that none always follows
        # the same neighbour (dirty pages, caches, the other jobs on a shared machine).
        for framework in args.frameworks:
            configs = configs_of(framework)
            order = configs[repeat % len(configs) :] + configs[: repeat % len(configs)]
            if framework in OWN_LIMIT:
                order = ("limit", *order)
            for config in order:
                if framework in errors:
                    progress(f"{framework} {config} #{repeat + 1}", "skipped")
                    continue
                spec = {**base, "framework": framework, "config": config}
                if framework == "fsdp":
                    spec.update(layers=args.fsdp_layers, width=args.fsdp_width)
                spec["dir"] = tempfile.mkdtemp(prefix="bestsave-bench-", dir=tmpdir)
                result, error = run_child(spec, args.timeout)
                if result is None:
                    unavailable = "ImportError" in error or "ModuleNotFoundError" in error
                    errors[framework] = (
                        f"pending: the adapter cannot be imported ({error})"
                        if unavailable
                        else f"failed: {error}"
                    )
                    progress(f"{framework} {config} #{repeat + 1}", errors[framework])
                    continue
                results[framework].setdefault(config, []).append(result)
                done_text = (
                    f"copy {result['copy_s']:.3f} s" if config == "limit"
                    else f"fit {result['fit_s']:.2f} s"
                )  # fmt: skip
                progress(f"{framework} {config} #{repeat + 1}", done_text)

    params = args.layers * (args.width**2 + args.width)
    fsdp_params = args.fsdp_layers * (args.fsdp_width**2 + args.fsdp_width)
    fsdp = (
        [
            "",
            f"FSDP2 workload: two processes on the CPU (gloo), each with half the cores, train "
            f"{args.fsdp_layers} x Linear({args.fsdp_width}, {args.fsdp_width}) = "
            f"{fsdp_params / 1e6:.1f}M float32 parameters sharded over both with Adam "
            f"({fsdp_params * 12 / 1e6:.0f} MB of model and optimiser state in all, half on each "
            f"process) and save model and optimiser at the same epochs: `dcp.save` into one "
            f"folder; `dcp.async_save` over a gloo group of its own, each save waiting for the "
            f"previous one as its documentation advises; `TorchCheckpointer` (the best only). "
            f"Timings are the first process's; a fit ends when both processes are done.",
        ]
        if "fsdp" in args.frameworks
        else []
    )
    header = [
        f"Machine: {machine(tmpdir)}.",
        "",
        f"Workload: {args.layers} x Linear({args.width}, {args.width}) = {params / 1e6:.1f}M "
        f"float32 parameters ({params * 4 / 1e6:.0f} MB of state), plain SGD, {args.samples} "
        f"samples in batches of {args.batch}, {args.epochs} epochs; the monitored metric "
        f"improves at epochs {', '.join(map(str, saves))} ({len(saves)} saves). Each "
        f"configuration ran {args.repeats} time{'s' if args.repeats > 1 else ''}, each in a "
        f"fresh process; figures are medians. Load average {load_start} at the start and "
        f"{load()} at the end ({(time.time() - started) / 60:.0f} min)"
        + ("; other jobs shared the cores." if _busy(load_start) else "."),
        *fsdp,
    ]
    return {
        "args": vars(args),
        "header": header,
        "limit": limits,
        "results": results,
        "errors": errors,
    }


def render(raw: dict[str, Any]) -> str:
    """The Markdown report of ``raw`` (what :func:`measure` returns)."""
    limit = {
        key: statistics.median(r[key] for r in raw["limit"])
        for key in ("copy_s", "copy_ddp_s", "clone_s", "torch_save_s", "state_mb")
        if raw["limit"] and all(key in r for r in raw["limit"])  # earlier runs had fewer
    }
    return markdown(raw["results"], raw["errors"], limit, raw["header"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw = json.loads(Path(args.from_raw).read_text()) if args.from_raw else measure(args)
    if args.raw:
        Path(args.raw).write_text(json.dumps(raw, indent=1))
    table = render(raw)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 1 if any(e.startswith("failed") for e in raw["errors"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
