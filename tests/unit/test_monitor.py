"""Metric direction and comparisons."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bestsave.monitor import (
    _MAX_TOKENS,
    _MIN_TOKENS,
    _QUALIFIERS,
    Monitor,
    infer_mode,
    metric_tokens,
    resolve_mode,
)

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
        ("val_brier_score", "min"),
        ("val_binary_crossentropy", "min"),
        ("log_loss", "min"),
        ("neg_log_loss", "max"),  # scikit-learn's scorers: higher is better
        ("neg_mean_squared_error", "max"),
        ("neg_root_mean_squared_error", "max"),
    ],
)
def test_infer_mode(name, mode):
    assert infer_mode(name) == mode


def test_tokens_strip_digits_at_ends():
    assert metric_tokens("val_top5_acc") == ["val", "top", "acc"]
    assert metric_tokens("F1") == ["f"]  # infer_mode also matches the raw "f1"


@pytest.mark.parametrize(
    "name",
    [
        "val_thing",
        "momentum",
        "lr",
        "epoch_time",
        "score",  # a Brier score is better lower
        "val_score",
        "early_stop_on",
        "val_accuracy_drop",  # qualifiers may turn the direction around
        "generalization_gap",
        "loss_delta",
        "accuracy_loss",  # tokens of both directions
    ],
)
def test_a_name_it_cannot_place_asks_for_mode(name):
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


# Composed names: context words, one known token, separators of every kind.
_CONTEXT = ["val", "valid", "validation", "train", "test", "epoch", "step", "top5", "macro",
            "weighted", "mean", "avg", "ema", "batch", "per", "class", "score",
            "metric"]  # fmt: skip
_SEPARATORS = ["_", "/", ".", "-"]


def _compose(draw, known):
    before = draw(st.lists(st.sampled_from(_CONTEXT), max_size=3))
    after = draw(st.lists(st.sampled_from(_CONTEXT), max_size=2))
    parts = [*before, known, *after]
    seps = draw(st.lists(st.sampled_from(_SEPARATORS), min_size=len(parts), max_size=len(parts)))
    return "".join(p + s for p, s in zip(parts, seps, strict=True))[:-1]


@st.composite
def directed(draw):
    mode = draw(st.sampled_from(["min", "max"]))
    token = draw(st.sampled_from(sorted(_MIN_TOKENS if mode == "min" else _MAX_TOKENS)))
    return _compose(draw, token), mode


@given(directed())
def test_a_composed_name_takes_its_tokens_direction(case):
    name, mode = case
    assert infer_mode(name) == mode


@given(directed())
def test_a_leading_neg_turns_the_direction_around(case):
    name, mode = case
    assert infer_mode("neg_" + name) == ("max" if mode == "min" else "min")


@given(directed(), st.sampled_from(sorted(_QUALIFIERS)))
def test_a_qualifier_makes_any_name_an_error(case, qualifier):
    with pytest.raises(ValueError, match="mode='min' or mode='max'"):
        infer_mode(f"{case[0]}_{qualifier}")


@given(st.sampled_from(sorted(_MIN_TOKENS)), st.sampled_from(sorted(_MAX_TOKENS)))
def test_tokens_of_both_directions_are_an_error(low, high):
    with pytest.raises(ValueError, match="both directions"):
        infer_mode(f"val_{high}_{low}")
