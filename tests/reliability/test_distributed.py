"""Plain PyTorch with ``torch.distributed`` (gloo, 2 CPU processes): one writer, one decision.

Global rank 0 writes every file; rank 1 reaches the same decisions and writes nothing at all in
the run's directory (seen by Python's audit hooks and by wrapping ``torch.save``). When rank 0's
write fails, neither process hangs: the whole run is bounded by a timeout, and both must exit.
Lightning DDP is covered in ``tests/integration/test_lightning.py``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from bestsave import load_best, load_manifest
from bestsave.verify import verify

from .conftest import assert_intact, run_ranks


@pytest.mark.parametrize("async_write", [True, False], ids=["async", "sync"])
def test_one_writer_and_the_same_decisions_on_every_rank(tmp_path, async_write):
    reports, errors = run_ranks("ddp_torch.py", tmp_path, *([] if async_write else ["--sync"]))
    assert [r["returncode"] for r in reports] == [0, 0], errors
    rank0, rank1 = reports
    assert rank0["decisions"] == rank1["decisions"]
    assert len(rank0["decisions"]) == 8 and rank0["decisions"][-1]["should_stop"]
    assert rank1["writes"] == []
    assert any("bestsave.json" in w for w in rank0["writes"])  # the hooks do see writes
    assert_intact(tmp_path / "run")
    assert load_best(tmp_path / "run").epoch == 4
    assert [r.epoch for r in load_manifest(tmp_path / "run").kept] == [4, 5]
    assert verify(tmp_path / "run") == []


@pytest.mark.parametrize("async_write", [True, False], ids=["async", "sync"])
def test_a_failed_write_on_rank_0_stops_both_ranks_without_a_hang(tmp_path, async_write):
    options = ["--fail-at", "2", *([] if async_write else ["--sync"])]
    (rank0, rank1), _ = run_ranks("ddp_torch.py", tmp_path, *options)
    assert rank0["returncode"] != 0
    assert rank0["error"].startswith("WriteError") and "No space left" in rank0["error"]
    assert rank1["returncode"] != 0  # its next collective call failed instead of waiting
    assert rank1["writes"] == []
    # Both ranks agreed on every decision they both made.
    n = min(len(rank0["decisions"]), len(rank1["decisions"]))
    assert rank0["decisions"][:n] == rank1["decisions"][:n]
    assert_intact(tmp_path / "run")
    assert load_best(tmp_path / "run").epoch == 1
    assert all(p.kind == "leftover" for p in verify(tmp_path / "run"))


def test_with_warn_a_failed_write_on_rank_0_keeps_the_ranks_deciding_alike(tmp_path):
    """With ``on_write_error="warn"`` rank 0 forgets the file whose write failed and trains on;
    rank 1, which wrote nothing, must not decide differently from then on (a different
    ``should_stop`` would leave one rank waiting for the other in its next collective). What
    is on disk may differ: rank 0 keeps the files the lost write would have evicted, so its
    ``best`` and ``evicted`` name files that exist."""
    reports, errors = run_ranks("ddp_torch.py", tmp_path, "--fail-at", "2", "--sync", "--warn")
    assert [r["returncode"] for r in reports] == [0, 0], errors
    rank0, rank1 = reports

    def decided(decisions):
        return [{k: v for k, v in d.items() if k not in ("best", "evicted")} for d in decisions]

    assert decided(rank0["decisions"]) == decided(rank1["decisions"])
    assert rank1["writes"] == []
    assert_intact(tmp_path / "run")
    assert load_best(tmp_path / "run").epoch == 4
