"""Sharded checkpoints: FSDP2 (``fully_shard``) on 2 CPU processes over gloo, saved by
``TorchCheckpointer`` as ``torch.distributed.checkpoint`` folders (``scripts/fsdp_torch.py``).

Every rank writes its own shards in the background; rank 0 commits the manifest only once every
rank's shards are durable; a rank whose write fails makes the save fail on both, with the
previous best intact; the best loads back on two processes and on one (resharded); a resumed
run ends as an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from bestsave import load_best, load_manifest
from bestsave.adapters.torch import TorchCheckpointer
from bestsave.cli import main
from bestsave.verify import verify

from .conftest import SCRIPTS, leftovers, run_ranks

SHARDS = [".metadata", "__0_0.distcp", "__1_0.distcp"]


def script() -> object:
    spec = importlib.util.spec_from_file_location("fsdp_torch", SCRIPTS / "fsdp_torch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weights(out: Path, epoch: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"weights-{epoch}.pt")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], list[str]]:
    tmp = tmp_path_factory.mktemp("sharded")
    reports, errors = run_ranks("fsdp_torch.py", tmp)
    return tmp, reports, errors


def test_every_rank_writes_its_shards_and_rank_0_commits_them(sharded_run):
    tmp, (rank0, rank1), errors = sharded_run
    assert [rank0["returncode"], rank1["returncode"]] == [0, 0], errors
    assert rank0["decisions"] == rank1["decisions"]
    manifest = load_manifest(tmp / "run")
    assert [r.epoch for r in manifest.kept] == [5, 7]
    for record in [*manifest.kept, manifest.last]:
        assert sorted(p.name for p in Path(record.path).iterdir()) == SHARDS
        assert sorted(record.parts) == SHARDS
        assert record.bytes == sum(size for size, _ in record.parts.values())
    assert verify(tmp / "run") == []
    assert leftovers(tmp / "run") == []


def test_the_best_loads_back_on_every_rank_and_resharded_on_one_process(sharded_run):
    tmp, reports, _ = sharded_run
    assert [(r["best"], r["best_weights_match"]) for r in reports] == [(5, True), (5, True)]
    model = script().make_model(None)  # not sharded: DCP reshards the two ranks' shards
    checkpointer = TorchCheckpointer(tmp / "run", monitor="val_loss", top_k=2, save_last=True,
                                     resume=True)  # fmt: skip
    assert checkpointer.load_best(model).epoch == 5
    assert same(model.state_dict(), weights(tmp / "out", 5))


def test_export_makes_one_torch_file_of_the_sharded_best(sharded_run, tmp_path):
    tmp, _, _ = sharded_run
    out = tmp_path / "best.pth"
    done = subprocess.run(
        [sys.executable, "-m", "bestsave", "export", str(tmp / "run"), str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    state = torch.load(out, weights_only=True)
    assert same(state["model"], weights(tmp / "out", 5))
    assert set(state) >= {"model", "optimizer"}


def test_the_command_line_lists_shows_and_verifies_a_sharded_run(sharded_run, capsys):
    tmp, _, _ = sharded_run
    run = str(tmp / "run")
    assert main(["ls", run, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [row["epoch"] for row in listed["checkpoints"]] == [5, 7, 7]  # and last
    assert main(["show", f"{run}/epoch=005-val_loss=0.2000.pth", "--json"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["parts"]) == SHARDS
    assert main(["verify", run]) == 0
    capsys.readouterr()
    part = tmp / "run" / "epoch=007-val_loss=0.2500.pth" / "__1_0.distcp"
    original = part.read_bytes()
    try:
        part.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        assert main(["verify", run]) == 1
        assert "__1_0.distcp" in capsys.readouterr().out
    finally:
        part.write_bytes(original)


def test_a_resumed_run_keeps_what_an_uninterrupted_one_keeps(sharded_run, tmp_path):
    whole, _, _ = sharded_run
    first, errors = run_ranks("fsdp_torch.py", tmp_path, "--epochs", "4")
    assert [r["returncode"] for r in first] == [0, 0], errors
    resumed, errors = run_ranks("fsdp_torch.py", tmp_path, "--resume")
    assert [r["returncode"] for r in resumed] == [0, 0], errors
    assert [(r["restored"], r["restored_weights_match"]) for r in resumed] == [(4, True)] * 2
    kept = [(r.name, r.epoch) for r in load_manifest(tmp_path / "run").kept]
    assert kept == [(r.name, r.epoch) for r in load_manifest(whole / "run").kept]
    for epoch in (5, 7):
        assert same(weights(tmp_path / "out", epoch), weights(whole / "out", epoch))
    assert verify(tmp_path / "run") == []


@pytest.mark.parametrize("failing", [0, 1], ids=["rank0", "rank1"])
def test_a_rank_whose_write_fails_fails_the_save_on_every_rank(tmp_path, failing):
    reports, errors = run_ranks(
        "fsdp_torch.py", tmp_path, "--fail-at", "3", "--fail-rank", str(failing)
    )
    assert [r["returncode"] for r in reports] == [1, 1], errors
    for report in reports:
        assert len(report["decisions"]) == 4  # both stop at the failed save, neither hangs
        assert report["error"].startswith("WriteError")
        assert f"rank {failing} (OSError: [Errno 27] File too large)" in report["error"]
    assert load_best(tmp_path / "run").epoch == 1  # the previous best
    assert [r.epoch for r in load_manifest(tmp_path / "run").kept] == [1, 2]
    assert verify(tmp_path / "run") == []
    assert leftovers(tmp_path / "run") == []


@pytest.mark.parametrize(
    "budget, staging",
    [("[1, 100000]", ["streaming", "streaming"]), ("[100000, 1]", ["two sets", "two sets"]),
     ("6000", ["one set", "one set"])],
    ids=["rank 0 streams", "rank 1 streams", "one set each"],
)  # fmt: skip
def test_the_staging_budget_is_per_rank_and_every_step_keeps_the_same(tmp_path, budget, staging):
    # Each rank holds about 4 KB of shards: 1 byte leaves no room for a copy, 6 KB one set.
    reports, errors = run_ranks("fsdp_torch.py", tmp_path, "--staging-memory", budget)
    assert [r["returncode"] for r in reports] == [0, 0], errors
    assert [(r["best"], r["best_weights_match"]) for r in reports] == [(5, True), (5, True)]
    manifest = load_manifest(tmp_path / "run")
    assert [r.epoch for r in manifest.kept] == [5, 7]
    # The record says how rank 0 wrote its shards; each rank keeps to its own budget.
    assert [r.staging for r in manifest.kept] == staging
    budgets = json.loads(budget)
    for rank, report in enumerate(reports):
        own = budgets[rank] if isinstance(budgets, list) else budgets
        told = " ".join(report["warnings"])
        assert ("no copy fits" in told) == (own == 1), (rank, told)
        assert ("one copy fits" in told) == (own == 6000), (rank, told)
    assert verify(tmp_path / "run") == []
