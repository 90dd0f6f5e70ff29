"""Every script in ``examples/`` runs (in a fast setting) and does what its docstring claims.

Plain PyTorch examples run in this process. The others run in a subprocess: Keras's backend is
fixed when keras is first imported, and W&B keeps a global run; a subprocess also runs the script
the way its docstring tells a user to.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from bestsave import load_manifest
from bestsave.verify import load_history

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(name: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> ModuleType:
    """Run the example's ``main()`` in this process with ``args`` as its command line."""
    module = load_example(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
    module.main()
    return module


def run_script(
    name: str,
    cwd: Path,
    *args: str,
    env: dict[str, str] | None = None,
    runner: Path | None = None,
) -> str:
    """Run ``python examples/<name>.py args`` in a fresh interpreter; returns its stdout.
    ``runner``, a script, runs instead and gets the example's path and ``args``."""
    command = [str(EXAMPLES / f"{name}.py"), *args]
    result = subprocess.run(
        [sys.executable, *([str(runner)] if runner else []), *command],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def history(dirpath: Path) -> list[dict]:
    """Every evaluation of the run in ``dirpath`` (its ``.bestsave/<run>/history.jsonl``)."""
    return load_history(dirpath)


def top(lines: list[dict], metric: str, k: int) -> list[int]:
    """The epochs of the k highest values of ``metric`` (ties: the earlier epoch, as kept)."""
    ranked = sorted(lines, key=lambda line: (-line["metrics"][metric], line["epoch"]))
    return [line["epoch"] for line in ranked[:k]]


# -- plain PyTorch -------------------------------------------------------------------------------


def test_torch_imbalanced_auroc_keeps_the_3_best_by_val_auroc(tmp_path, monkeypatch, capsys):
    run = tmp_path / "fraud"
    run_main("torch_imbalanced_auroc", monkeypatch, "--epochs", "4", "--dir", str(run))
    out = capsys.readouterr().out

    manifest = load_manifest(run)
    assert [r.epoch for r in manifest.kept] == top(history(run), "val_auroc", 3)
    assert manifest.best is not None and manifest.best.epoch == manifest.kept[0].epoch
    assert f"best epoch {manifest.best.epoch}: test AUROC" in out
    assert len(re.findall(r"^  epoch +\d+ +val_auroc=", out, re.M)) == 3


def test_noisy_validation_judges_one_run_three_ways(tmp_path, monkeypatch, capsys):
    run = tmp_path / "noisy"
    module = run_main("noisy_validation", monkeypatch, "--epochs", "8", "--dir", str(run))
    out = capsys.readouterr().out
    rows = {
        line[:34].strip(): line.split()[-1]
        for line in out.splitlines()
        if re.search(r"\d\.\d{4}$", line)
    }
    assert set(rows) == {
        "single best",
        "smoothed best (smooth=3)",
        f"soup of the delta={module.DELTA} ensemble",
        "last epoch (for reference)",
    }
    for test_auroc in rows.values():
        assert 0.5 < float(test_auroc) <= 1.0

    # The three checkpointers saw the same epochs and the same validation AUROC.
    single, smoothed, ensemble = (history(run / d) for d in ("single", "smoothed", "ensemble"))
    raw = [line["metrics"]["val_auroc"] for line in single]
    assert len(raw) == 8
    assert [line["metrics"]["val_auroc"] for line in smoothed] == raw
    assert [line["metrics"]["val_auroc"] for line in ensemble] == raw

    # Single best: the highest raw score.
    best = load_manifest(run / "single").best
    assert best is not None and best.epoch == max(range(8), key=lambda e: (raw[e], -e))
    # Smoothed best: the highest mean of the last 3 scores, and the record keeps both.
    means = [sum(raw[max(0, e - 2) : e + 1]) / len(raw[max(0, e - 2) : e + 1]) for e in range(8)]
    best = load_manifest(run / "smoothed").best
    assert best is not None and best.epoch == max(range(8), key=lambda e: (means[e], -e))
    assert best.raw_score == raw[best.epoch]
    assert math.isclose(best.score, means[best.epoch])
    # The soup averages every epoch within delta of the best score.
    kept = sorted(r.epoch for r in load_manifest(run / "ensemble").kept)
    assert kept == [e for e in range(8) if raw[e] >= max(raw) - module.DELTA]
    assert (run / "soup.pth").is_file()


def test_torch_fsdp_digits_keeps_the_2_best_sharded_and_exports_the_best(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    run = tmp_path / "digits"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node=2", str(EXAMPLES / "torch_fsdp_digits.py"),
         "--epochs", "4", "--dir", str(run)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = load_manifest(run)
    assert [r.epoch for r in manifest.kept] == top(history(run), "val_acc", 2)
    assert manifest.best is not None and len(manifest.best.parts) == 3  # metadata, 2 shards
    assert f"best epoch {manifest.best.epoch}: val_acc=" in done.stdout

    exported = tmp_path / "best.safetensors"
    subprocess.run([sys.executable, "-m", "bestsave", "export", str(run), str(exported)],
                   check=True, capture_output=True)  # fmt: skip
    from safetensors.torch import load_file

    assert load_file(exported)["0.weight"].shape == (128, 64)


# -- Keras on JAX --------------------------------------------------------------------------------


def test_keras_jax_delta_soup_averages_a_near_best_ensemble(tmp_path):
    # Not imported here: keras would pick its backend in this process.
    for package in ("keras", "jax"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    run = tmp_path / "keras"
    out = run_script(
        "keras_jax_delta_soup",
        tmp_path,
        "--epochs",
        "8",
        "--delta",
        "0.01",
        "--dir",
        str(run),
        env={"KERAS_BACKEND": "jax"},
    )

    assert "on the jax backend" in out
    manifest = load_manifest(run)
    assert "jax" in manifest.run["versions"]
    assert manifest.best is not None
    kept = manifest.kept
    assert len(kept) >= 2
    assert {r.kind for r in kept} <= {"best", "ensemble"}
    assert all(r.score >= manifest.best.score - 0.01 for r in kept)
    assert all(r.name.endswith(".weights.h5") and os.path.isfile(r.path) for r in kept)
    assert (run / "soup.weights.h5").is_file()

    single = re.search(rf"single best \({re.escape(manifest.best.name)}\): (\d\.\d+)", out)
    souped = re.search(rf"soup of the ensemble \({len(kept)} members\): (\d\.\d+)", out)
    assert single and souped, out
    for auc in (single, souped):
        assert 0.5 < float(auc.group(1)) <= 1.0


# -- Lightning with W&B --------------------------------------------------------------------------


def test_lightning_top3_f1_wandb_logs_the_best_epoch_to_wandb(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    pytest.importorskip("wandb")
    from wandb_reader import read_run  # tests/ is on pytest's pythonpath

    run = tmp_path / "lightning"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the default: the W&B run inside --dir
    out = run_script(
        "lightning_top3_f1_wandb", tmp_path, "--epochs", "4", "--dir", str(run), env=env
    )

    checkpoints = run / "checkpoints"
    manifest = load_manifest(checkpoints)
    best = manifest.best
    assert best is not None
    assert [r.epoch for r in manifest.kept] == top(history(checkpoints), "val_f1", 3)
    assert best.name == f"epoch={best.epoch:02d}-val_f1={best.score:.4f}.ckpt"

    logged = read_run(run / "wandb")
    assert logged.summary["best_val_f1"] == pytest.approx(best.metrics["val_f1"])
    assert logged.summary["best_epoch"] == best.epoch
    artifacts = logged.artifacts(type="model")
    newest_best = [a for a in artifacts if "best" in a.aliases][-1]
    assert newest_best.metadata["epoch"] == best.epoch
    assert f"epoch-{best.epoch}" in newest_best.aliases
    assert best.name in newest_best.files

    assert f"artifact model-{logged.run.run_id}:best (alias epoch-{best.epoch})" in out
    assert f"best epoch {best.epoch} ({best.name}): test F1" in out


# -- fastai with W&B -----------------------------------------------------------------------------

# Runs a script with fastai's WandbCallback able to start: fastcore's init_args as it was before
# it called vars(), so that plain values in the config are skipped (fastai issue #4173).
WITH_WANDB_CALLBACK = """
import inspect, runpy, sys
import fastai.callback.wandb as fastai_wandb

def init_args(o):
    attrs = getattr(o, "__dict__", None)
    if attrs is None:
        return {}
    return {p: attrs[p] for p in inspect.signature(type(o).__init__).parameters if p in attrs}

fastai_wandb.init_args = init_args
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("wandb_callback", ["as installed", "patched to start"])
def test_fastai_mcc_wandb_keeps_the_3_best_by_mcc(tmp_path, monkeypatch, wandb_callback):
    pytest.importorskip("fastai")
    pytest.importorskip("wandb")
    from wandb_reader import read_run  # tests/ is on pytest's pythonpath

    run = tmp_path / "fastai"
    args = ["--epochs", "4", "--dir", str(run)]
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the default: the W&B run inside --dir
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    if wandb_callback == "as installed":
        out = run_script("fastai_mcc_wandb", tmp_path, *args, env=env)
    else:
        script = tmp_path / "with_wandb_callback.py"
        script.write_text(WITH_WANDB_CALLBACK)
        out = run_script("fastai_mcc_wandb", tmp_path, *args, env=env, runner=script)
    works = "fastai's WandbCallback cannot start here" not in out
    assert works or wandb_callback == "as installed"

    saved = run / "models"
    manifest = load_manifest(saved)
    best = manifest.best
    assert best is not None
    assert [r.epoch for r in manifest.kept] == top(history(saved), "matthews_corrcoef", 3)
    mcc, acc = best.metrics["matthews_corrcoef"], best.metrics["accuracy"]
    assert f"best epoch by MCC: {best.epoch} (MCC {mcc:.4f}, accuracy {acc:.4f})" in out
    # After fit the learner validates as the best epoch did: it holds the best weights.
    assert f"best epoch's weights: validation MCC {mcc:.4f}, accuracy {acc:.4f}" in out

    logged = read_run(run / "wandb")
    versions = logged.artifacts(type="model")
    artifact = versions[-1]  # the last version logged is the best, described by its own epoch
    assert "best" in artifact.aliases and f"epoch-{best.epoch}" in artifact.aliases
    assert artifact.metadata["epoch"] == best.epoch
    assert artifact.metadata["metrics"]["matthews_corrcoef"] == pytest.approx(mcc)
    if works:  # WandbCallback(log_model=True) uploaded the callback's best file, once
        assert len(versions) == 1
        assert artifact.name == "mcc" and list(artifact.files) == ["mcc.pth"]
        assert "logged by WandbCallback" in out
    else:  # bestsave's own tracker, a version at every new best
        assert artifact.name == f"model-{logged.run.run_id}" and best.name in artifact.files
        assert logged.summary["best_matthews_corrcoef"] == pytest.approx(mcc)
        assert logged.summary["best_epoch"] == best.epoch
        assert "logged by bestsave's tracker" in out


# -- Hugging Face Transformers -------------------------------------------------------------------


def test_transformers_review_f1_keeps_the_2_best_evaluations(tmp_path):
    pytest.importorskip("transformers")
    run = tmp_path / "reviews"
    out = run_script("transformers_review_f1", tmp_path, "--steps", "60", "--dir", str(run))
    manifest = load_manifest(run)
    lines = history(run)
    assert len(lines) == 6  # an evaluation every 10 steps
    ranked = sorted(lines, key=lambda line: (-line["metrics"]["eval_f1"], line["step"]))
    assert [r.step for r in manifest.kept] == [line["step"] for line in ranked[:2]]
    assert all((run / r.name / "model.safetensors").exists() for r in manifest.kept)
    assert f"best at step {manifest.best.step}: eval_f1=" in out
    assert "the model trained on holds its weights: True" in out
