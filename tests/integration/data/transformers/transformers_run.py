"""One Trainer run for the resume test: a tiny BERT (no dropout, so a resumed run repeats an
uninterrupted one exactly), evaluated every 2 steps for 16 steps with a scripted accuracy, kept
by ``BestSaveCallback(top_k=2, save_last=True, patience=5)``.

    python transformers_run.py OUT [--kill-at STEP] [--resume]

``--kill-at`` sends the process SIGKILL when that step ends (the write of the evaluation before
it may still be in flight); ``--resume`` continues the run from ``OUT/last``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys

import torch

with contextlib.redirect_stdout(io.StringIO()):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

from bestsave.adapters.transformers import BestSaveCallback

ACCURACY = {2: 0.5, 4: 0.6, 6: 0.55, 8: 0.8, 10: 0.7, 12: 0.75, 14: 0.65, 16: 0.78}


class Script(TrainerCallback):
    """Scores each evaluation by the step it follows; kills the process at ``kill_at``."""

    def __init__(self, kill_at: int | None) -> None:
        self.step, self.kill_at = 0, kill_at

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.step = state.global_step
        if state.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def metrics(self, _: object) -> dict[str, float]:
        return {"accuracy": ACCURACY[self.step]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(2, 16, (6,), generator=g), "labels": i % 2}
            for i in range(32)]  # fmt: skip
    script = Script(args.kill_at)
    best = BestSaveCallback(monitor="eval_accuracy", top_k=2, save_last=True, patience=5,
                            resume=args.resume)  # fmt: skip
    backend = "gloo" if "LOCAL_RANK" in os.environ else None  # under torchrun, on the CPU
    training = TrainingArguments(args.out, eval_strategy="steps", eval_steps=2, max_steps=16,
                                 save_strategy="no", per_device_train_batch_size=4,
                                 learning_rate=0.01, report_to=[], disable_tqdm=True,
                                 log_level="error", logging_steps=2, use_cpu=True,
                                 ddp_backend=backend)  # fmt: skip
    trainer = Trainer(BertForSequenceClassification(config), training, train_dataset=rows,
                      eval_dataset=rows[:8], compute_metrics=script.metrics,
                      callbacks=[script, best])  # fmt: skip
    last = os.path.join(args.out, "last") if args.resume else None
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train(resume_from_checkpoint=last)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip the interpreter's shutdown: gloo's threads can still hold tensors then, and freeing
    # them there can abort the process after everything is saved (pytorch/pytorch#179291).
    sys.stdout.flush()
    os._exit(0)
