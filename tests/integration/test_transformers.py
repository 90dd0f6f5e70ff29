"""Hugging Face ``Trainer`` with ``BestSaveCallback``: real Trainer runs on the CPU, a tiny BERT
built from a config (no download), a tokenizer built from a word list, generated data, and a
scripted metric so that the best evaluation is known.
"""

from __future__ import annotations

import contextlib
import io
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
with contextlib.redirect_stdout(io.StringIO()):  # its W&B integration may print at import
    transformers = pytest.importorskip("transformers")
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        PreTrainedTokenizerFast,
        Trainer,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from bestsave import BestSaveWarning, load_best, load_manifest
from bestsave.adapters.transformers import BestSaveCallback
from bestsave.verify import Leftover, verify

WORDS = ["[PAD]", "[UNK]", "good", "bad", "film", "plot", "very", "not", "a", "the"]


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    raw = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]")


def data(n: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(2, len(WORDS), (6,), generator=g)
        rows.append({"input_ids": ids, "labels": int((ids == 2).any())})
    return rows


def model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16)  # fmt: skip
    return BertForSequenceClassification(config)


class Scripted:
    """``compute_metrics`` giving ``eval_accuracy`` from a script, one value per evaluation."""

    def __init__(self, scores: list[float]) -> None:
        self.scores, self.calls = scores, 0

    def __call__(self, _: object) -> dict[str, float]:
        score = self.scores[min(self.calls, len(self.scores) - 1)]
        self.calls += 1
        return {"accuracy": score}


class Weights(TrainerCallback):
    """The model's weights at each evaluation, by global step."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_evaluate(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self.at[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}


def train(out: Path, scores: list[float], *callbacks: TrainerCallback, **arguments: object):
    """A Trainer evaluated every 2 steps (16 steps), saving nothing of its own by default."""
    options = dict(eval_strategy="steps", eval_steps=2, save_strategy="no", max_steps=16,
                   per_device_train_batch_size=4, learning_rate=0.01, report_to=[],
                   disable_tqdm=True, log_level="error", logging_steps=2, use_cpu=True)  # fmt: skip
    options.update(arguments)
    trainer = Trainer(model(), TrainingArguments(str(out), **options), train_dataset=data(),
                      eval_dataset=data(8), compute_metrics=Scripted(scores),
                      processing_class=tokenizer(), callbacks=list(callbacks))  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its logs
        trainer.train()
    return trainer


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


SCORES = [0.5, 0.6, 0.55, 0.8, 0.7, 0.75, 0.65, 0.6]  # evaluations at steps 2, 4, ..., 16


def test_the_best_is_chosen_among_every_evaluation_and_loads_with_from_pretrained(tmp_path):
    weights, best = Weights(), BestSaveCallback(monitor="eval_accuracy")
    trainer = train(tmp_path, SCORES, weights, best)

    record = best.best
    assert (record.step, record.score, record.kind) == (8, 0.8, "best")
    assert record.path == str(tmp_path / "checkpoint-8")
    assert [r.step for r in best.kept] == [8]
    assert load_best(tmp_path) == record and verify(tmp_path) == []
    # Everything of that evaluation, the training log before it, the arguments that matter.
    assert record.metrics["eval_accuracy"] == 0.8 and "eval_loss" in record.metrics
    assert "loss" in record.metrics and "learning_rate" in record.metrics
    assert record.run["framework"] == "transformers"
    assert record.run["hparams"]["learning_rate"] == 0.01
    assert record.run["hparams"]["model_type"] == "bert"

    loaded = AutoModelForSequenceClassification.from_pretrained(record.path)
    assert same(loaded.state_dict(), weights.at[8])
    assert AutoTokenizer.from_pretrained(record.path)("good film")["input_ids"] == [2, 4]
    # The Trainer's own view names the same best.
    state = trainer.state
    assert (state.best_metric, state.best_global_step) == (0.8, 8)
    assert state.best_model_checkpoint == record.path


def test_top_k_and_delta_keep_what_the_core_rules_keep(tmp_path):
    top = BestSaveCallback(monitor="eval_accuracy", top_k=3)
    train(tmp_path / "top", SCORES, top)
    assert [(r.step, r.score) for r in top.kept] == [(8, 0.8), (12, 0.75), (10, 0.7)]
    assert sorted(p.name for p in (tmp_path / "top").glob("checkpoint-*")) == [
        "checkpoint-10", "checkpoint-12", "checkpoint-8"]  # fmt: skip

    near = BestSaveCallback(monitor="eval_accuracy", delta=0.06)
    train(tmp_path / "near", SCORES, near)
    assert sorted(r.step for r in near.kept) == [8, 12]  # within 0.06 of 0.8


def test_load_best_at_end_puts_the_best_weights_back(tmp_path):
    weights = Weights()
    trainer = train(tmp_path, SCORES, weights,
                    BestSaveCallback(monitor="eval_accuracy", load_best_at_end=True))  # fmt: skip
    assert same(trainer.model.state_dict(), weights.at[8])
    assert not same(trainer.model.state_dict(), weights.at[16])


def test_patience_stops_training_through_the_trainer(tmp_path):
    trainer = train(tmp_path, SCORES, BestSaveCallback(monitor="eval_accuracy", patience=2))
    assert trainer.state.global_step == 12  # no better after step 8 at steps 10 and 12


def test_the_same_best_as_the_trainers_own_where_both_see_it(tmp_path):
    """With evaluation and saving at every epoch, the Trainer's load_best_model_at_end and
    bestsave choose the same evaluation, named alike (``eval_`` prefix or not, as the Trainer)."""
    scores = [0.5, 0.8, 0.6, 0.7]
    theirs = train(tmp_path / "theirs", scores, eval_strategy="epoch", save_strategy="epoch",
                   load_best_model_at_end=True, metric_for_best_model="accuracy",
                   max_steps=-1, num_train_epochs=4)  # fmt: skip
    ours = BestSaveCallback(monitor="accuracy")
    train(tmp_path / "ours", scores, ours, eval_strategy="epoch", max_steps=-1,
          num_train_epochs=4)  # fmt: skip
    assert theirs.state.best_global_step == ours.best.step == 16
    assert theirs.state.best_metric == ours.best.score == 0.8
    assert ours.best.epoch == 1  # the second epoch, 0-based as every bestsave record
    assert ours.best.monitor == "eval_accuracy"


def test_a_trainer_that_also_saves_is_told_how_to_leave_saving_to_bestsave(tmp_path):
    with pytest.warns(BestSaveWarning, match="save_strategy='no'"):
        train(tmp_path, SCORES, BestSaveCallback(monitor="eval_accuracy"), save_strategy="steps",
              save_steps=8)  # fmt: skip
    manifest = load_manifest(tmp_path)
    assert manifest.best.step == 8


def test_bad_arguments_are_refused_with_the_fix(tmp_path):
    with pytest.raises(TypeError, match="did you mean patience"):
        BestSaveCallback(monitor="eval_f1", patiance=3)
    with pytest.raises(ValueError, match="load_best_at_end must be True or False"):
        BestSaveCallback(load_best_at_end="yes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BestSaveCallback()  # eval_loss, min: the Trainer's default metric
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    args.fsdp = "full_shard"  # as a sharded run sets it; it is refused before any training
    with pytest.raises(ValueError, match="DeepSpeed or FSDP"):
        BestSaveCallback().on_train_begin(args, TrainerState(), TrainerControl())


RUN = Path(__file__).parent / "data" / "transformers" / "transformers_run.py"


def run_script(out: Path, *options: str) -> int:
    return subprocess.run([sys.executable, str(RUN), str(out), *options], timeout=300,
                          capture_output=True).returncode  # fmt: skip


def test_a_killed_run_resumes_from_last_and_ends_as_an_uninterrupted_one(tmp_path):
    assert run_script(tmp_path / "whole") == 0
    assert run_script(tmp_path / "killed", "--kill-at", "9") == -signal.SIGKILL
    # The previous best intact; a write the kill interrupted is a leftover the resume deletes.
    assert all(isinstance(p, Leftover) for p in verify(tmp_path / "killed"))
    assert run_script(tmp_path / "killed", "--resume") == 0

    whole, resumed = load_manifest(tmp_path / "whole"), load_manifest(tmp_path / "killed")
    assert [(r.step, r.score) for r in resumed.kept] == [(r.step, r.score) for r in whole.kept]
    assert [(r.step, r.score) for r in whole.kept] == [(8, 0.8), (16, 0.78)]
    assert resumed.last.step == 16
    for record in whole.kept:  # the same weights, so the same files
        theirs = Path(record.path) / "model.safetensors"
        ours = tmp_path / "killed" / record.name / "model.safetensors"
        assert ours.read_bytes() == theirs.read_bytes(), record.name
    assert verify(tmp_path / "killed") == []
    assert (tmp_path / "killed" / "last" / "rng_state.pth").is_file()


def test_two_process_ddp_writes_once_and_keeps_what_one_process_keeps(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", port, str(RUN), str(tmp_path)]  # fmt: skip
    assert subprocess.run(launch, timeout=300, capture_output=True).returncode == 0
    manifest = load_manifest(tmp_path)
    assert [(r.step, r.score) for r in manifest.kept] == [(8, 0.8), (16, 0.78)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".bestsave", "checkpoint-16", "checkpoint-8", "last"]  # fmt: skip
    assert verify(tmp_path) == []
    # Each process's generators, in the file the Trainer resumes that process from.
    last = tmp_path / "last"
    assert not (last / "rng_state.pth").exists()
    for index in (0, 1):
        states = torch.load(last / f"rng_state_{index}.pth", weights_only=False)
        assert {"python", "numpy", "cpu"} <= set(states)


def test_an_evaluation_after_training_is_not_a_candidate(tmp_path):
    best = BestSaveCallback(monitor="eval_accuracy")
    trainer = train(tmp_path, [*SCORES, 0.99], best)  # 0.99: the test set's evaluation
    with contextlib.redirect_stdout(io.StringIO()):
        assert trainer.evaluate(data(8))["eval_accuracy"] == 0.99
    assert best.best.step == 8 and len(load_manifest(tmp_path).kept) == 1


def test_the_trainers_own_wandb_run_gets_the_best_evaluations_record(wandb_dir, tmp_path):
    wandb = pytest.importorskip("wandb")
    from wandb_reader import read_run

    best = BestSaveCallback(monitor="eval_accuracy")  # trackers="auto": the Trainer's W&B run
    train(tmp_path, SCORES, best, report_to=["wandb"], run_name="bestsave-test")
    run = wandb.run
    assert run is not None
    run.finish()

    logged = read_run(wandb_dir, run.id)
    versions = logged.artifacts(type="model")
    assert versions[-1].metadata["step"] == 8 and "best" in versions[-1].aliases
    folder = Path(best.best.path)
    assert sorted(versions[-1].files) == sorted(f"{folder.name}/{p.name}" for p in folder.iterdir())
    assert logged.summary["best_eval_accuracy"] == 0.8
    assert logged.summary["best_step"] == 8


def test_the_trainers_own_mlflow_run_gets_the_best_checkpoint_folder(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "bestsave-test")
    monkeypatch.chdir(tmp_path)  # the experiment's artifacts go to ./mlruns
    mlflow.set_tracking_uri(uri)
    try:
        best = BestSaveCallback(monitor="eval_accuracy")  # trackers="auto": the Trainer's run
        train(tmp_path / "out", SCORES, best, report_to=["mlflow"])
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs(client.get_experiment_by_name("bestsave-test").experiment_id)
    assert run.data.tags["best_checkpoint"].endswith("/checkpoint-8")
    folder = run.data.tags["best_checkpoint"]
    logged = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, folder)}
    assert logged == {p.name for p in Path(best.best.path).iterdir()}


def test_core_options_pass_through_and_dirpath_places_the_run(tmp_path):
    # Two monitors, each keeping its own best; a periodic copy every 2 epochs; files elsewhere.
    best = BestSaveCallback(monitor=["eval_accuracy", "loss"], keep_every_n_epochs=2,
                            dirpath=tmp_path / "kept")  # fmt: skip
    train(tmp_path / "out", [0.5, 0.8, 0.6, 0.7], best, eval_strategy="epoch", max_steps=-1,
          num_train_epochs=4)  # fmt: skip
    assert best.best.epoch == 1 and best.best.monitor == "eval_accuracy"
    kept = load_manifest(tmp_path / "kept").kept
    assert {r.monitor for r in kept if r.kind == "best"} == {"eval_accuracy", "eval_loss"}
    assert {r.epoch for r in kept if r.kind == "periodic"} == {1, 3}
    assert not list((tmp_path / "out").glob("checkpoint-*"))
