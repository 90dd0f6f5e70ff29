"""Fine-tune a tiny BERT with the Hugging Face ``Trainer`` and keep its 2 best evaluations by F1.

The model is built from a config (nothing is downloaded) and learns to tell positive from
negative "reviews" generated from a small vocabulary, tokenized by a word-level tokenizer made
on the spot. The Trainer evaluates every 10 steps and saves nothing of its own: bestsave judges
every evaluation, keeps the two best as folders ``from_pretrained`` loads, and puts the best
weights back at the end.

    python examples/transformers_review_f1.py --steps 120 --dir runs/reviews
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random

import torch
from sklearn.metrics import f1_score
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing

with contextlib.redirect_stdout(io.StringIO()):  # its W&B integration may print at import
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
        DataCollatorWithPadding,
        PreTrainedTokenizerFast,
        Trainer,
        TrainingArguments,
    )

from bestsave.adapters.transformers import BestSaveCallback

GOOD = ["great", "moving", "sharp", "funny", "superb", "tender"]
BAD = ["dull", "clumsy", "flat", "tedious", "weak", "messy"]
OTHER = ["the", "a", "film", "plot", "acting", "was", "and", "very", "story", "ending"]


def tokenizer() -> PreTrainedTokenizerFast:
    words = ["[PAD]", "[UNK]", "[CLS]", *GOOD, *BAD, *OTHER]
    raw = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    # BERT classifies from the first position: every review starts with [CLS].
    raw.post_processor = TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]")  # fmt: skip


def reviews(n: int, seed: int) -> list[tuple[str, int]]:
    """Reviews of 6 to 10 words; positive ones hold more good words than bad, with 10% noise."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.random() < 0.5
        major, minor = (GOOD, BAD) if label else (BAD, GOOD)
        words = [*rng.choices(major, k=2), *rng.choices(minor, k=1),
                 *rng.choices(OTHER, k=rng.randint(3, 7))]  # fmt: skip
        rng.shuffle(words)
        out.append((" ".join(words), int(label) if rng.random() > 0.1 else int(not label)))
    return out


def encode(tok: PreTrainedTokenizerFast, rows: list[tuple[str, int]]) -> list[dict]:
    return [{**tok(text), "labels": label} for text, label in rows]


def f1(prediction: object) -> dict[str, float]:
    logits, labels = prediction.predictions, prediction.label_ids  # type: ignore[attr-defined]
    return {"f1": float(f1_score(labels, logits.argmax(-1)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--dir", default="runs/reviews")
    args = parser.parse_args()

    torch.manual_seed(0)
    tok = tokenizer()
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=16)  # fmt: skip
    best = BestSaveCallback(monitor="eval_f1", top_k=2, load_best_at_end=True)
    training = TrainingArguments(args.dir, eval_strategy="steps", eval_steps=10,
                                 save_strategy="no", max_steps=args.steps, learning_rate=3e-3,
                                 per_device_train_batch_size=16, report_to=[], disable_tqdm=True,
                                 log_level="error", logging_steps=10, use_cpu=True)  # fmt: skip
    trainer = Trainer(BertForSequenceClassification(config), training,
                      train_dataset=encode(tok, reviews(800, 0)),
                      eval_dataset=encode(tok, reviews(200, 1)), processing_class=tok,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=f1,
                      callbacks=[best])  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints every log
        trainer.train()

    record = best.best
    assert record is not None
    print(f"best at step {record.step}: eval_f1={record.metrics['eval_f1']:.4f}")
    print("kept: " + ", ".join(f"{r.name} (eval_f1={r.score:.4f})" for r in best.kept))
    reloaded = AutoModelForSequenceClassification.from_pretrained(record.path)
    with contextlib.redirect_stdout(io.StringIO()):
        score = trainer.evaluate(encode(tok, reviews(200, 2)))["eval_f1"]
    weights = trainer.model.state_dict()
    same = all(torch.equal(v, weights[k]) for k, v in reloaded.state_dict().items())
    print(f"test F1 of the best: {score:.4f} (the model trained on holds its weights: {same})")


if __name__ == "__main__":
    main()
