"""The benchmark runs end to end and prints its table (on a model of a few hundred parameters).

Timings are never asserted: on a tiny model they are noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).parent / "run.py"
TINY = [
    "--layers",
    "2",
    "--width",
    "16",
    "--fsdp-layers",
    "2",
    "--fsdp-width",
    "16",
    "--epochs",
    "3",
    "--samples",
    "4",
    "--batch",
    "2",
]


def bench(tmp_path: Path, frameworks: str) -> tuple[str, dict]:
    out, raw = tmp_path / "results.md", tmp_path / "raw.json"
    options = ["--repeats", "1", "--frameworks", frameworks, "--out", str(out), "--raw", str(raw)]
    proc = subprocess.run(
        [sys.executable, str(RUN), *TINY, *options, "--tmpdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert table in proc.stdout  # the table is printed, and written for the README
    assert list(tmp_path.glob("bestsave-bench-*")) == []  # every run's checkpoints are gone
    return table, json.loads(raw.read_text())


def test_plain_torch_benchmark_prints_the_table(tmp_path: Path) -> None:
    table, raw = bench(tmp_path, "torch")
    assert "| plain PyTorch | no checkpoint callback |" in table
    assert "`torch.save` in the loop" in table and "`TorchCheckpointer`" in table
    assert "copy into preallocated host memory" in table
    assert "Machine: " in table and "torch 2" in table
    assert "improves at epochs 0, 1, 2 (3 saves)" in table
    runs = raw["results"]["torch"]
    assert sorted(runs) == ["none", "ours", "theirs"]
    assert [len(r["epochs"]) for r in runs["ours"]] == [3]


@pytest.mark.slow
def test_every_framework_benchmark_prints_its_rows(tmp_path: Path) -> None:
    table, raw = bench(tmp_path, "torch,lightning,lightning_ddp,keras,fastai")
    assert raw["errors"] == {}
    for callback in ("`BestCheckpoint`", "`BestModelCheckpoint`", "`SaveBestModelCallback`"):
        assert callback in table
    assert table.count("| no checkpoint callback |") == 5
    assert "| Lightning DDP, 2 processes | no checkpoint callback |" in table


def test_transformers_benchmark_compares_the_trainers_own_saves(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    table, raw = bench(tmp_path, "transformers")
    assert raw["errors"] == {}
    assert "| Transformers `Trainer` | no checkpoint callback |" in table
    assert '| | `save_strategy="epoch"`, `save_total_limit=1` |' in table
    assert "| | `BestSaveCallback` |" in table


def test_fsdp_benchmark_compares_dcp_save_and_async_save(tmp_path: Path) -> None:
    table, raw = bench(tmp_path, "fsdp")
    assert raw["errors"] == {}
    assert "| FSDP2, 2 processes | no checkpoint callback |" in table
    for callback in ("`dcp.save`", "`dcp.async_save`", "`TorchCheckpointer`"):
        assert f"| | {callback} |" in table
    assert "| limit, FSDP2, 2 processes | each process copies its shards" in table
    assert "total <= `dcp.async_save`" in table
    assert "FSDP2 workload: two processes" in table
    runs = raw["results"]["fsdp"]
    assert sorted(runs) == ["limit", "none", "ours", "theirs", "theirs_async"]
    assert [len(r["epochs"]) for r in runs["ours"]] == [3]
    assert runs["limit"][0]["state_mb"] > 0


def test_budget_benchmark_prints_a_row_per_step(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(RUN.parent / "budget.py"), "--layers", "2", "--width", "16",
         "--epochs", "3", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("| none |", "| torch.save |", "| two sets | ", "| one set | ", "| streaming | "):
        assert row in proc.stdout
    # A state of 2 KB cannot be chunked (a spool needs 32 MiB): that row streams.
    cells = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ")]
    taken = {row[0][2:]: row[2] for row in cells[2:] if row[2]}  # past the header
    assert taken == {"two sets": "two sets", "one set": "one set", "chunked": "streaming",
                     "streaming": "streaming"}  # fmt: skip
