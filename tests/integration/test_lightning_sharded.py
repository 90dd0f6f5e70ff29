"""BestCheckpoint under Lightning's sharding strategies: real ``Trainer.fit`` on 2 CPU processes
(gloo, Lightning's own launcher), ``data/lightning/sharded_run.py``.

``ModelParallelStrategy`` (FSDP2) and ``FSDPStrategy`` (FSDP1) with sharded state dicts keep
folders of ``torch.distributed.checkpoint`` shards plus ``meta.pt``, written by both processes in
the background, which the strategy itself loads: ``fit(ckpt_path="best")`` starts from the best
epoch's weights, and a fit resumed from ``last`` keeps what an uninterrupted one keeps. Their
full state dicts are single files, and do the same. DeepSpeed is refused with what to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from lightning.pytorch.strategies import DeepSpeedStrategy

from bestsave import load_manifest
from bestsave.adapters.lightning import BestCheckpoint
from bestsave.verify import load_history, verify

DATA = Path(__file__).parent / "data" / "lightning"
SHARDS = [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # what the strategies write


def run(out: Path, kind: str, *extra: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(DATA), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    args = [sys.executable, str(DATA / "sharded_run.py"), str(out), kind, *extra]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    if extra:
        return {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}
    return json.loads((out / "report.json").read_text())


def model_weights(path: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The model's weights in a Lightning checkpoint, a folder of shards or a file."""
    if os.path.isdir(path):
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        whole = tmp_path / f"{len(list(tmp_path.iterdir()))}.pt"
        dcp_to_torch_save(path, whole)
        state = torch.load(whole, weights_only=True)
        return state.get("state_dict", state.get("model"))
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("kind", ["mp", "fsdp", "mp_full", "fsdp_full"])
def test_sharding_strategies_keep_the_best_and_resume_through_lightning(tmp_path, kind):
    report = run(tmp_path, kind)
    a, b = tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints"

    manifest = load_manifest(a)
    assert [r.epoch for r in manifest.kept] == [4, 1]
    assert manifest.best.path == report["best_path"] and report["best_epoch"] == 4
    for record in [*manifest.kept, manifest.last]:
        if kind.endswith("_full"):
            assert os.path.isfile(record.path) and not record.parts
        else:  # the strategy's own layout, every rank's part checked
            assert sorted(os.listdir(record.path)) == SHARDS == sorted(record.parts)
    assert verify(a) == []

    # fit(ckpt_path="best") loads bestsave's best through the strategy.
    assert report["resumed_at"] == 5 and report["resumed_from_best_weights"]

    # A fit resumed from last (epoch 2) keeps its best (0.8) and ends as the uninterrupted one.
    assert report["interrupted_last"] == str(b / "last.ckpt")
    resumed = load_manifest(b)
    assert [(r.name, r.epoch) for r in resumed.kept] == [(r.name, r.epoch) for r in manifest.kept]
    assert [line["decision"]["is_best"] for line in load_history(b)] == [
        True, True, False, False, True, False,
    ]  # fmt: skip
    assert verify(b) == []
    best, again = (
        model_weights(manifest.best.path, tmp_path),
        model_weights(resumed.best.path, tmp_path),
    )
    assert best.keys() == again.keys() and all(torch.equal(best[k], again[k]) for k in best)


def test_an_exception_on_one_rank_ends_both_without_a_hang_the_last_commit_intact(tmp_path):
    reports = run(tmp_path, "mp", "fail_one")
    assert reports[1]["error"] == "RuntimeError: scripted failure"
    assert reports[0]["error"] is not None  # its peer is gone
    dirpath = tmp_path / "a" / "checkpoints"
    manifest = load_manifest(dirpath)
    assert [r.epoch for r in manifest.kept] == [1, 0] and manifest.last.epoch == 1
    assert verify(dirpath) == []  # nothing half-written left: each rank finished its writes


def test_save_on_exception_keeps_a_sharded_checkpoint_written_by_every_rank(tmp_path):
    reports = run(tmp_path, "mp", "fail_all")
    assert [reports[r]["error"] for r in (0, 1)] == ["RuntimeError: scripted failure"] * 2
    dirpath = tmp_path / "a" / "checkpoints"
    manifest = load_manifest(dirpath)
    exception = [r for r in manifest.kept if r.kind == "exception"]
    assert [r.epoch for r in exception] == [2] and sorted(exception[0].parts) == SHARDS
    assert manifest.best.epoch == 1
    assert verify(dirpath) == []


def test_deepspeed_is_refused_with_what_to_do_instead(tmp_path):
    # A DeepSpeedStrategy as the Trainer holds one (DeepSpeed itself need not be installed:
    # the refusal comes first).
    trainer = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    checkpoint = BestCheckpoint(dirpath=tmp_path, monitor="val_loss")
    with pytest.raises(ValueError, match="cannot keep DeepSpeedStrategy's checkpoints") as e:
        checkpoint.setup(trainer, None, "fit")  # type: ignore[arg-type]
    assert "Use ModelCheckpoint with DeepSpeed, or train with FSDPStrategy" in str(e.value)
    assert os.listdir(tmp_path) == []
