"""A run directory written by the previous release (manifest format 2) reads, verifies and
resumes: the on-disk format is a promise to every run already on disk.

The directory is built from fixed text, as that release wrote it for
``BestSaver(d, monitor="val_loss", top_k=2, save_last=True, extension=".pt")`` over the losses
0.9, 0.4, 0.6, 0.5, a crash having interrupted nothing.
"""

from __future__ import annotations

from pathlib import Path

from bestsave import BestSaver, load_best
from bestsave.verify import load_history, verify

RUN = ".bestsave/epoch=epoch-val_loss=score"

RUN_INFO = """{"id": "cabe49e546ef", "started": "2026-12-05T17:11:05.176+00:00", "host": "vm",
  "pid": 1953, "framework": "none", "versions": {"python": "3.11.7", "bestsave": "0.1.0"}}"""


def _record(epoch: int, kind: str, loss: float, sha256: str, elapsed: float) -> str:
    return f"""{{"path": "epoch={epoch:03d}-val_loss={loss:.4f}.pt", "kind": "{kind}",
  "epoch": {epoch}, "step": null, "monitor": "val_loss", "mode": "min", "score": {loss},
  "metrics": {{"val_loss": {loss}, "val_acc": {1 - loss:.1f}}},
  "time": "2026-12-05T17:11:05.195+00:00", "elapsed_s": {elapsed}, "bytes": 19,
  "sha256": "{sha256}", "run": {RUN_INFO}, "id": {epoch}, "raw_score": {loss}}}"""


SHA1 = "c3963dbe01fae188192ec68370078bc9e2000dcd83ab2f3cbf582827d078e024"
SHA3 = "73284b6aee11a52e8b21ebcc6870f183780981fe438991334ec1f66993a56eaa"
BEST = _record(1, "best", 0.4, SHA1, 0.011)
SECOND = _record(3, "top_k", 0.5, SHA3, 0.019)

HISTORY = "".join(
    f'{{"epoch": {e}, "step": null, "time": "2026-12-05T17:11:05.19{e}+00:00", '
    f'"elapsed_s": 0.01{e}, "score": {loss}, "raw_score": {loss}, '
    f'"metrics": {{"val_loss": {loss}, "val_acc": {1 - loss:.1f}}}, '
    f'"decision": {{"saved": true, "is_best": {best}, "kind": ["{kind}"], '
    f'"files": ["epoch={e:03d}-val_loss={loss:.4f}.pt"], "evicted": [{evicted}]}}}}\n'
    for e, loss, best, kind, evicted in [
        (0, 0.9, "true", "best", ""),
        (1, 0.4, "true", "best", ""),
        (2, 0.6, "false", "top_k", '"epoch=000-val_loss=0.9000.pt"'),
        (3, 0.5, "false", "top_k", '"epoch=002-val_loss=0.6000.pt"'),
    ]
)

MANIFEST = f"""{{
 "format": 2,
 "run": {RUN_INFO[:-1]}, "started_ts": 1796490665.1764457}},
 "monitor": "val_loss", "mode": "min", "monitors": {{"val_loss": "min"}},
 "policy": {{"smooth": null, "tie_break": null, "warmup": 0, "min_delta": 0.0, "top_k": 2,
  "delta": null, "keep_every_n_epochs": null, "periodic_start": null, "patience": null,
  "baseline": null, "save_last": true, "filename": "epoch={{epoch:03d}}-{{monitor}}={{score:.4f}}",
  "last_name": "last", "extension": ".pt"}},
 "best": "epoch=001-val_loss=0.4000.pt",
 "kept": [{BEST}, {SECOND}],
 "last": {
    SECOND.replace(
        '"path": "epoch=003-val_loss=0.5000.pt", "kind": "top_k"',
        '"path": "last.pt", "kind": "last"',
    )
},
 "state": {{"policies": {{"val_loss": {{"best": 0.4, "best_id": 1, "best_secondary": null,
   "peak": 0.4, "since_improvement": 2, "ranked": [[1, 0.4, null], [3, 0.5, null]],
   "recent": [], "ema": null}}}},
  "evaluations": 4, "last_epoch": 3, "history_bytes": {len(HISTORY.encode())}, "warned": []}},
 "pending": {{}},
 "evicting": []
}}
"""


def _previous_release_run(d: Path) -> None:
    (d / RUN).mkdir(parents=True)
    (d / RUN / "bestsave.json").write_text(MANIFEST)
    (d / RUN / "history.jsonl").write_text(HISTORY)
    (d / RUN / "epoch=001-val_loss=0.4000.json").write_text(BEST)
    (d / RUN / "epoch=003-val_loss=0.5000.json").write_text(SECOND)
    (d / "epoch=001-val_loss=0.4000.pt").write_text("weights of epoch 1\n")
    (d / "epoch=003-val_loss=0.5000.pt").write_text("weights of epoch 3\n")
    (d / "last.pt").write_text("weights of epoch 3\n")


def test_previous_release_run_loads_and_verifies(tmp_path: Path) -> None:
    _previous_release_run(tmp_path)
    assert verify(tmp_path) == []
    best = load_best(tmp_path)
    assert (best.epoch, best.metrics["val_acc"]) == (1, 0.6)
    assert Path(best.path).read_text() == "weights of epoch 1\n"
    assert [line["epoch"] for line in load_history(tmp_path)] == [0, 1, 2, 3]


def test_previous_release_run_resumes(tmp_path: Path) -> None:
    _previous_release_run(tmp_path)
    saver = BestSaver(
        tmp_path, monitor="val_loss", top_k=2, save_last=True, extension=".pt", resume=True
    )
    assert (saver.best.epoch, saver.evaluations, saver.last_epoch) == (1, 4, 3)
    assert saver.run["id"] == "cabe49e546ef"

    # Not better than the best and not among the two best: nothing changes.
    assert not saver.step(4, {"val_loss": 0.7}, write=lambda p: Path(p).write_text("4\n")).saved
    # The new best pushes out the second best of the earlier release's files.
    decision = saver.step(5, {"val_loss": 0.3}, write=lambda p: Path(p).write_text("5\n"))
    saver.close()

    assert decision.is_best
    assert [r.epoch for r in decision.evicted] == [3]
    assert [r.epoch for r in saver.kept] == [5, 1]
    assert not (tmp_path / "epoch=003-val_loss=0.5000.pt").exists()
    assert Path(load_best(tmp_path).path).read_text() == "5\n"
    assert verify(tmp_path) == []
    assert [line["epoch"] for line in load_history(tmp_path)] == [0, 1, 2, 3, 4, 5]
    assert load_best(tmp_path).run["resumes"] == 1
