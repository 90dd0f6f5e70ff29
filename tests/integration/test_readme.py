"""The README's quick starts run as written: each snippet is executed with the tiny model and
data it names defined around it, so the README cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def snippets() -> dict[str, str]:
    """The Python blocks of the Quick start, by the heading above each."""
    text = README.read_text()
    start = text.index("## Quick start")
    section = text[start : text.index("\n## ", start + 1)]
    found: dict[str, str] = {}
    for heading, body in re.findall(r"### (.+?)\n(.*?)(?=\n### |\Z)", section, re.S):
        blocks = re.findall(r"```python\n(.*?)```", body, re.S)
        if blocks:
            found[heading.split(" (")[0]] = blocks[0]
    return found


SNIPPETS = snippets()


def run(snippet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **names: Any) -> dict:
    monkeypatch.chdir(tmp_path)  # the snippets write to relative paths, as a script would
    namespace = dict(names)
    exec(compile(snippet, str(README), "exec"), namespace)
    return namespace


def test_every_framework_has_a_snippet():
    assert set(SNIPPETS) == {
        "Plain PyTorch",
        "PyTorch Lightning",
        "fastai",
        "Keras 3",
        "Hugging Face Transformers",
        "No framework at all",
    }


def test_plain_pytorch(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(64, 4), torch.randn(64, 1)

    def train_one_epoch(model, optimizer):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    def evaluate(model):
        with torch.no_grad():
            loss = torch.nn.functional.mse_loss(model(x), y).item()
        return {"val_auroc": 1 / (1 + loss), "val_loss": loss}

    names = run(
        SNIPPETS["Plain PyTorch"],
        tmp_path,
        monkeypatch,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        train_one_epoch=train_one_epoch,
        evaluate=evaluate,
    )
    assert names["best"].metrics["val_auroc"] == max(
        r.metrics["val_auroc"] for r in names["ckpt"].kept
    )


def test_pytorch_lightning(tmp_path, monkeypatch):
    L = pytest.importorskip("lightning")
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "data" / "lightning"))
    from lightning_scripted import ScriptedModel, data

    script = [0.5, 0.6, 0.55, 0.7, 0.65] * 4
    dm = L.LightningDataModule.from_datasets(data(seed=0), data(n=16, seed=1), data(n=16, seed=2))
    names = run(
        SNIPPETS["PyTorch Lightning"],
        tmp_path,
        monkeypatch,
        L=L,
        model=ScriptedModel(script=script, monitor="val_f1"),
        dm=dm,
    )
    assert names["checkpoint"].best_record.epoch == 3


def test_fastai(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("fastai")
    import fastai.callback.schedule  # noqa: F401 - fit_one_cycle, as `fastai.*.all` imports it
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import MatthewsCorrCoef, accuracy

    class Points(torch.utils.data.Dataset):
        loss_func = CrossEntropyLossFlat()  # what fastai's own datasets tell the Learner

        def __init__(self, n: int, seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, 4, generator=g)
            self.y = (self.x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).long()

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> tuple[Any, Any]:
            return self.x[i], self.y[i]

    dls = DataLoaders.from_dsets(Points(64, 0), Points(32, 1), bs=16, device="cpu")
    names = run(
        SNIPPETS["fastai"],
        tmp_path,
        monkeypatch,
        Learner=Learner,
        dls=dls,
        model=torch.nn.Linear(4, 2),
        accuracy=accuracy,
        MatthewsCorrCoef=MatthewsCorrCoef,
    )
    assert (tmp_path / "models" / "model.pth").is_file()
    assert names["save"].best_record.kind == "best"


def test_keras(tmp_path, monkeypatch):
    keras = pytest.importorskip("keras")
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    x, xv = rng.normal(size=(64, 4)).astype("float32"), rng.normal(size=(32, 4)).astype("float32")
    y, yv = (x[:, :1] > 0).astype("float32"), (xv[:, :1] > 0).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
    names = run(SNIPPETS["Keras 3"], tmp_path, monkeypatch, model=model, x=x, y=y, xv=xv, yv=yv)
    assert len(list((tmp_path / "ckpt").glob("*.weights.h5"))) == 3
    assert names["checkpoint"].best_record.metrics["val_auc"] == max(
        r.metrics["val_auc"] for r in names["checkpoint"].kept
    )


def test_hugging_face_transformers(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16)  # fmt: skip
    model = transformers.BertForSequenceClassification(config)
    rows = [{"input_ids": torch.randint(0, 16, (6,)), "labels": i % 2} for i in range(16)]
    scores = iter([0.5, 0.8, 0.6, 0.7, 0.65])
    names = run(
        SNIPPETS["Hugging Face Transformers"],
        tmp_path,
        monkeypatch,
        model=model,
        train=rows,
        val=rows,
        f1=lambda _: {"f1": next(scores)},
        Trainer=transformers.Trainer,
        TrainingArguments=lambda *a, **k: transformers.TrainingArguments(
            *a, report_to=[], disable_tqdm=True, use_cpu=True, **k
        ),
    )
    best = names["best"].best
    assert (best.epoch, best.metrics["eval_f1"]) == (1, 0.8)
    assert transformers.AutoModelForSequenceClassification.from_pretrained(best.path)


def test_no_framework(tmp_path, monkeypatch):
    losses = [0.9, 0.5, 0.7, 0.4, 0.6, 0.45, 0.8, 0.55, 0.35, 0.65]
    names = run(
        SNIPPETS["No framework at all"],
        tmp_path,
        monkeypatch,
        train_and_evaluate=lambda epoch: losses[epoch],
        save_my_model=lambda path: Path(path).write_text("weights"),
    )
    assert names["load_best"]("checkpoints/").epoch == 8
