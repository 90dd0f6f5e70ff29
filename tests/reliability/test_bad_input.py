"""Bad input: each a clear error or warning, and nothing already kept is lost.

Metrics as frameworks log them (tensors, numpy scalars, Python ints) are numbers. A monitored
value that cannot be a score by its type or shape (a string, a list, a multi-element tensor) is
an error at the first evaluation that shows it; NaN and inf are never best and are warned about
once. A monitor missing on some epochs, a template naming an unlogged key or holding a bad format
spec, a template with a path separator, absurd option values, a directory path that is a file and
a damaged manifest raise errors that say how to fix them, before anything is written or changed.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")

from bestsave import (
    BestSaver,
    BestSaveWarning,
    MissingMetricError,
    ScoreTypeError,
    load_best,
    load_manifest,
)
from bestsave.adapters.torch import TorchCheckpointer
from bestsave.verify import load_history, verify

from .conftest import assert_intact


def writer(text: str) -> Any:
    return lambda path: open(path, "w").write(text)


def saver(dirpath: Path, **options: Any) -> BestSaver:
    return BestSaver(dirpath, **{"monitor": "val_loss", "trackers": (), **options})


NUMBERS = [
    torch.tensor(0.25),
    torch.tensor([0.25]),
    torch.tensor(0.25, dtype=torch.float64),
    np.float32(0.25),
    np.float64(0.25),
    np.array(0.25),
    np.array([0.25]),
    np.int64(0),
    0,
]


@pytest.mark.parametrize(
    "value",
    NUMBERS,
    ids=[
        f"{type(v).__module__}.{type(v).__name__}{tuple(getattr(v, 'shape', ()))}" for v in NUMBERS
    ],
)
def test_numbers_as_frameworks_log_them_are_scores(tmp_path, value):
    expected = 0.0 if "int" in type(value).__name__ else 0.25
    s = saver(tmp_path)
    s.step(0, {"val_loss": 0.5}, write=writer("e0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BestSaveWarning)
        d = s.step(1, {"val_loss": value, "other": value}, write=writer("e1"))
    s.close()
    assert d.is_best and d.score == expected
    assert isinstance(d.score, float)
    best = load_best(tmp_path)
    assert best.epoch == 1 and best.score == expected
    assert isinstance(best.metrics["other"], (int, float))  # JSON-ready in the records
    assert verify(tmp_path) == []


INVALID = [
    ("a string", "0.1"),
    ("a list", [0.1]),
    ("a tuple", (0.1,)),
    ("a tensor of 2", torch.tensor([0.1, 0.2])),
    ("an array of 2", np.array([0.1, 0.2])),
    ("a bool", True),
    ("a dict", {"val_loss": 0.1}),
]


@pytest.mark.parametrize("value", [v for _, v in INVALID], ids=[n for n, _ in INVALID])
def test_a_monitored_value_that_cannot_be_a_score_is_an_error_that_loses_nothing(tmp_path, value):
    s = saver(tmp_path, top_k=-1)
    s.step(0, {"val_loss": 0.5}, write=writer("e0"))
    with pytest.raises(ScoreTypeError, match=r"'val_loss' is .* at epoch 1, not one number"):
        s.step(1, {"val_loss": value}, write=writer("e1"))
    s.close()
    assert [r.epoch for r in load_manifest(tmp_path).kept] == [0]
    assert [h["score"] for h in load_history(tmp_path)] == [0.5]
    assert_intact(tmp_path)


def test_per_class_scores_name_their_shape_and_the_fix(tmp_path):
    s = saver(tmp_path, monitor="val_f1")
    with pytest.raises(ScoreTypeError) as caught:
        s.step(0, {"val_f1": torch.tensor([0.5, 0.7])}, write=writer("e0"))
    assert "torch.Tensor of shape (2,)" in str(caught.value)
    assert "average='macro'" in str(caught.value)


@pytest.mark.parametrize(
    "bad",
    [math.nan, math.inf, -math.inf, torch.tensor(math.nan), np.float32("inf")],
    ids=["nan", "inf", "-inf", "tensor-nan", "numpy-inf"],
)
def test_nan_and_inf_are_never_best_and_warned_once_per_run(tmp_path, bad):
    # mode max: an inf would beat everything, a -inf nothing; neither may be best.
    s = saver(tmp_path, monitor="val_acc", top_k=2, keep_every_n_epochs=2)
    s.step(0, {"val_acc": 0.5}, write=writer("e0"))
    with pytest.warns(BestSaveWarning) as caught:
        decisions = [s.step(e, {"val_acc": bad}, write=writer(f"e{e}")) for e in (1, 2, 3)]
    assert len([w for w in caught if issubclass(w.category, BestSaveWarning)]) == 1
    assert not any(d.is_best for d in decisions)
    d = s.step(4, {"val_acc": 0.6}, write=writer("e4"))
    s.close()
    assert d.is_best
    kept = load_manifest(tmp_path).kept
    # Epochs 1 and 3 are periodic (every 2): kept for that, never for their score.
    assert [(r.epoch, r.kind) for r in kept] == [
        (4, "best"),
        (0, "best"),
        (1, "periodic"),
        (3, "periodic"),
    ]
    assert load_best(tmp_path).epoch == 4
    assert verify(tmp_path) == []
    # A resumed run knows it warned already.
    resumed = saver(tmp_path, monitor="val_acc", top_k=2, keep_every_n_epochs=2, resume=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BestSaveWarning)
        resumed.step(5, {"val_acc": bad}, write=writer("e5"))
    resumed.close()


def test_a_monitor_logged_on_some_epochs_only_is_a_clear_error_that_loses_nothing(tmp_path):
    s = saver(tmp_path, save_last=True)
    s.step(0, {"val_loss": 0.5, "train_loss": 0.9}, write=writer("e0"))
    with pytest.raises(MissingMetricError) as caught:
        s.step(1, {"train_loss": 0.8, "val_los": 0.4}, write=writer("e1"))
    message = str(caught.value)
    assert "'val_loss' is not among the logged metrics ('train_loss', 'val_los')" in message
    assert "Did you mean 'val_los'?" in message
    assert isinstance(caught.value, KeyError)
    # Nothing was recorded for that epoch; the next one with the metric goes on as before.
    assert s.evaluations == 1
    assert s.step(2, {"val_loss": 0.4}, write=writer("e2")).is_best
    s.close()
    assert [h["epoch"] for h in load_history(tmp_path)] == [0, 2]
    assert load_best(tmp_path).epoch == 2
    assert verify(tmp_path) == []


def test_the_torch_adapter_raises_the_same_clear_error(tmp_path):
    model = torch.nn.Linear(2, 1)
    ckpt = TorchCheckpointer(tmp_path, monitor="val_loss", trackers=())
    ckpt.step(0, {"val_loss": torch.tensor(0.5)}, model=model)
    with pytest.raises(MissingMetricError, match="Did you mean 'val/loss'"):
        ckpt.step(1, {"val/loss": torch.tensor(0.4)}, model=model)
    ckpt.close()
    assert load_best(tmp_path).epoch == 0
    assert_intact(tmp_path)


def test_a_template_naming_an_unlogged_key_is_a_clear_error_that_loses_nothing(tmp_path):
    s = saver(tmp_path, filename="{epoch}-{val_acc:.2f}", top_k=2)
    with pytest.raises(MissingMetricError) as caught:
        s.step(0, {"val_loss": 0.5, "val_acx": 0.9}, write=writer("e0"))
    message = str(caught.value)
    assert "'val_acc'" in message and "Did you mean 'val_acx'?" in message
    assert s.evaluations == 0 and s.best is None
    d = s.step(0, {"val_loss": 0.5, "val_acc": 0.9}, write=writer("e0"))
    s.close()
    assert d.record.name == "0-0.90"
    assert load_best(tmp_path).epoch == 0 and verify(tmp_path) == []


@pytest.mark.parametrize(
    "template",
    ["ckpt/{epoch}", "..\\{epoch}", "{epoch}/../../escape", "/abs/{epoch}"],
)
def test_a_template_with_a_path_separator_is_refused_naming_the_fix(tmp_path, template):
    with pytest.raises(ValueError, match="path separator; put folders in the directory argument"):
        saver(tmp_path / "run", filename=template)
    assert not (tmp_path / "run").exists()


def test_metric_values_in_names_never_make_folders_or_leave_the_directory(tmp_path):
    s = saver(tmp_path / "run", filename="{tag}-{epoch}")
    d = s.step(0, {"val_loss": 0.5, "tag": "../../escape/x"}, write=writer("e0"))
    s.close()
    assert "/" not in d.record.name and (tmp_path / "run" / d.record.name).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


ABSURD: list[tuple[dict[str, Any], str]] = [
    ({"top_k": -5}, "top_k must be None or an int >= -1.*use -1 to keep every valid score"),
    ({"top_k": 1.5}, "top_k must be None or an int >= -1"),
    ({"delta": -1}, "delta must be None or a number >= 0"),
    ({"patience": 0}, "patience must be None or an int >= 1.*None never to stop"),
    ({"patience": True}, "patience must be None or an int >= 1"),
    ({"min_delta": -1}, "min_delta must be a number >= 0.*direction comes from mode"),
    ({"min_delta": math.nan}, "min_delta must be a number >= 0"),
    ({"mode": "up"}, "mode must be 'min', 'max' or 'auto', not 'up'"),
    ({"monitor": "foo"}, "pass mode='min' or mode='max'"),
    ({"monitor": ""}, "monitor must name a logged metric"),
    ({"keep_every_n_epochs": 0}, "keep_every_n_epochs must be None or an int >= 1"),
    ({"save_last": "yes"}, "save_last must be False, True or 'link', not 'yes'"),
    ({"on_write_error": "ignore"}, "on_write_error must be 'raise' or 'warn', not 'ignore'"),
    ({"filename": ""}, "filename must be a non-empty template string"),
    ({"filename": "{}"}, "positional field; name the metric"),
    ({"filename": "{epoch"}, "filename template '{epoch' is malformed"),
    ({"baseline": math.nan}, "baseline must be None or a finite number"),
]


@pytest.mark.parametrize("options, fix", ABSURD, ids=[str(o) for o, _ in ABSURD])
@pytest.mark.parametrize("api", ["BestSaver", "TorchCheckpointer"])
def test_absurd_options_are_value_errors_naming_the_fix_before_anything_is_written(
    tmp_path, options, fix, api
):
    make = saver if api == "BestSaver" else TorchCheckpointer
    if api == "TorchCheckpointer":
        options = {"monitor": "val_loss", **options}
    with pytest.raises(ValueError, match=fix):
        make(tmp_path / "run", **options)
    assert not (tmp_path / "run").exists()


def test_the_torch_adapter_refuses_an_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="format must be 'torch' or 'safetensors', not 'onnx'"):
        TorchCheckpointer(tmp_path / "run", monitor="val_loss", format="onnx")  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


def test_async_write_must_be_a_bool(tmp_path):
    """``async_write="no"`` is truthy: taking it for True would do the opposite of what was
    asked."""
    with pytest.raises(ValueError, match="async_write"):
        saver(tmp_path / "run", async_write="no")
