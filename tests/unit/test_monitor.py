"""Metric direction and comparisons."""

import pytest

from bestsave.monitor import Monitor, infer_mode, metric_tokens, resolve_mode

pytestmark = pytest.mark.core


@pytest.mark.parametrize(
    "name, mode",
    [
        ("val_loss", "min"),
        ("train_loss", "min"),
        ("val_loss_epoch", "min"),
        ("val/loss", "min"),
        ("valid_mse", "min"),
        ("test-rmse", "min"),
        ("val_wer", "min"),
        ("ppl", "min"),
        ("val_top5_error", "min"),
        ("val_acc", "max"),
        ("val/acc", "max"),
        ("val_top5_acc", "max"),
        ("matthews_corrcoef", "max"),
        ("val_auroc", "max"),
        ("f1", "max"),
        ("val_f1_macro", "max"),
        ("mAP50", "max"),
        ("bleu4", "max"),
        ("roc_auc_score", "max"),
        ("r2", "max"),
        ("val_accuracy", "max"),
        ("valid_loss", "min"),
        ("accuracy_loss", "min"),  # a loss of something is still a loss
    ],
)
def test_infer_mode(name, mode):
    assert infer_mode(name) == mode


def test_tokens_strip_digits_at_ends():
    assert metric_tokens("val_top5_acc") == ["val", "top", "acc"]
    assert metric_tokens("F1") == ["f"]  # infer_mode also matches the raw "f1"


@pytest.mark.parametrize("name", ["val_thing", "momentum", "lr", "epoch_time"])
def test_unknown_name_asks_for_mode(name):
    with pytest.raises(ValueError, match="mode='min' or mode='max'"):
        infer_mode(name)


def test_resolve_mode_checks_value():
    assert resolve_mode("whatever", "max") == "max"
    with pytest.raises(ValueError, match="'min', 'max' or 'auto'"):
        resolve_mode("val_loss", "minimum")


def test_improves_with_margin_and_ties():
    up = Monitor("acc", "max", min_delta=0.1)
    assert up.improves(0.5, None)
    assert not up.improves(0.6, 0.5)  # within min_delta
    assert up.improves(0.61, 0.5)
    assert not Monitor("acc", "max").improves(0.5, 0.5)  # a tie is not an improvement
    down = Monitor("loss", "min", min_delta=0.1)
    assert down.improves(0.39, 0.5) and not down.improves(0.4, 0.5)


def test_within_and_min_delta_validation():
    assert Monitor("acc", "max").within(0.9, 1.0, 0.1)
    assert not Monitor("acc", "max").within(0.89, 1.0, 0.1)
    assert Monitor("loss", "min").within(1.1, 1.0, 0.1)
    with pytest.raises(ValueError, match="min_delta"):
        Monitor("acc", "max", min_delta=-0.1)
