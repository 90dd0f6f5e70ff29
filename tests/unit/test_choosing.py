"""Smoothed scores, tie-breaks, warm-up, several monitors and guard rails (against brute force)."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from runfiles import run_folder

from bestsave import BestSaver, BestSaveWarning, load_manifest
from bestsave.monitor import Monitor
from bestsave.policy import Policy, PolicyState

pytestmark = pytest.mark.core

modes = st.sampled_from(["min", "max"])
grid = st.integers(0, 6).map(lambda x: x / 2)
scores = st.lists(st.one_of(st.none(), grid), max_size=30)


def run(policy, seq, secondary=None):
    state, verdicts = PolicyState(), []
    for i, score in enumerate(seq):
        sec = None if secondary is None else secondary[i]
        verdict, state = policy.decide(state, i, i, score, sec)
        verdicts.append(verdict)
    return verdicts, state


def smoothed(seq, smooth):
    out, recent, ema = [], [], None
    for x in seq:
        if x is None:
            out.append(None)
            continue
        if isinstance(smooth, tuple):
            ema = x if ema is None else smooth[1] * x + (1 - smooth[1]) * ema
            out.append(ema)
        else:
            recent = ([*recent, x])[-smooth:]
            out.append(sum(recent) / len(recent))
    return out


@settings(max_examples=200, deadline=None)
@given(
    mode=modes,
    k=st.integers(1, 3),
    seq=scores,
    smooth=st.one_of(st.integers(1, 4), st.sampled_from([("ema", 0.5), ("ema", 0.3)])),
)
def test_smoothing_judges_the_smoothed_sequence(mode, k, seq, smooth):
    monitor = Monitor("m", mode)
    got, got_state = run(Policy(monitor, top_k=k, smooth=smooth), seq)
    want, want_state = run(Policy(monitor, top_k=k), smoothed(seq, smooth))
    assert [(v.is_best, v.keep, v.evict) for v in got] == [
        (v.is_best, v.keep, v.evict) for v in want
    ]
    assert [c.id for c in got_state.ranked] == [c.id for c in want_state.ranked]
    for v, s in zip(got, smoothed(seq, smooth)):
        assert v.score == pytest.approx(s) if s is not None else v.score is None


@settings(max_examples=200, deadline=None)
@given(mode=modes, sec_mode=modes, k=st.integers(1, 4), data=st.data())
def test_tie_break_equals_brute_force(mode, sec_mode, k, data):
    seq = data.draw(st.lists(st.integers(0, 3).map(float), max_size=25))
    sec = data.draw(st.lists(st.integers(0, 5).map(float), min_size=len(seq), max_size=len(seq)))
    monitor, tie = Monitor("m", mode), Monitor("t", sec_mode)
    verdicts, state = run(Policy(monitor, top_k=k, tie_break=tie), seq, sec)

    def key(i):
        return (monitor.rank_key(seq[i]), tie.rank_key(sec[i]), i)

    expected = sorted(range(len(seq)), key=key)[:k]
    assert sorted(c.id for c in state.ranked) == sorted(expected)
    best = None
    for i, verdict in enumerate(verdicts):
        improved = best is None or key(i)[:2] < key(best)[:2]
        assert verdict.is_best == improved
        best = i if improved else best


def test_tie_within_min_delta_goes_to_the_better_secondary():
    policy = Policy(
        Monitor("val_acc", "max", min_delta=0.01), top_k=1, tie_break=Monitor("val_loss", "min")
    )
    verdicts, state = run(policy, [0.90, 0.895, 0.899], [0.5, 0.4, 0.45])
    assert [v.is_best for v in verdicts] == [True, True, False]
    assert [c.id for c in state.ranked] == [1]


@settings(max_examples=200, deadline=None)
@given(mode=modes, k=st.integers(1, 3), warmup=st.integers(0, 6), seq=scores)
def test_warmup_ignores_early_epochs(mode, k, warmup, seq):
    monitor = Monitor("m", mode)
    verdicts, state = run(Policy(monitor, top_k=k, warmup=warmup, patience=2), seq)
    valid = [i for i in range(warmup, len(seq)) if seq[i] is not None]
    expected = sorted(valid, key=lambda i: (monitor.rank_key(seq[i]), i))[:k]
    assert sorted(c.id for c in state.ranked) == sorted(expected)
    assert not any(v.is_best or v.keep or v.should_stop for v in verdicts[:warmup])


@settings(max_examples=50, deadline=None)
@given(seq=st.lists(st.tuples(grid, grid), min_size=1, max_size=12))
def test_several_monitors_keep_what_separate_savers_keep(tmp_path_factory, seq):
    root = tmp_path_factory.mktemp("multi")
    both = BestSaver(root / "both", monitor=["val_acc", "val_loss"], top_k=2)
    alone = {
        name: BestSaver(root / name, monitor=name, top_k=2) for name in ("val_acc", "val_loss")
    }
    for epoch, (acc, loss) in enumerate(seq):
        metrics = {"val_acc": acc, "val_loss": loss}
        both.step(epoch, metrics, write=lambda p: open(p, "w").write("w"))
        for saver in alone.values():
            saver.step(epoch, metrics, write=lambda p: open(p, "w").write("w"))
    for name, saver in alone.items():
        mine = sorted(r.name for r in both.kept if r.monitor == name)
        assert mine == sorted(r.name for r in saver.kept)
        assert both.best_for(name).name == saver.best.name
    assert both.best.monitor == "val_acc"


def test_one_epoch_best_for_two_monitors_is_one_file_twice(tmp_path):
    saver = BestSaver(tmp_path, monitor=["val_auroc", "val_loss"])
    decision = saver.step(
        0, {"val_auroc": 0.9, "val_loss": 0.2}, write=lambda p: open(p, "w").write("w")
    )
    saver.close()
    a, b = decision.records
    assert decision.best_for == ("val_auroc", "val_loss")
    assert os.stat(a.path).st_ino == os.stat(b.path).st_ino
    assert {a.name, b.name} == {"epoch=000-val_auroc=0.9000", "epoch=000-val_loss=0.2000"}
    manifest = load_manifest(tmp_path)
    assert manifest.best.monitor == "val_auroc"
    assert manifest.best_for("val_loss").name == "epoch=000-val_loss=0.2000"
    assert manifest.monitors == {"val_auroc": "max", "val_loss": "min"}


def test_patience_with_several_monitors_waits_for_all(tmp_path):
    saver = BestSaver(tmp_path, monitor=["val_acc", "val_loss"], patience=2, top_k=0)
    rows = [(0.5, 1.0), (0.4, 0.9), (0.45, 0.8), (0.3, 0.8), (0.3, 0.8)]
    stops = [
        saver.step(e, {"val_acc": a, "val_loss": lo}).should_stop for e, (a, lo) in enumerate(rows)
    ]
    assert stops == [False, False, False, False, True]


def test_records_and_history_keep_raw_and_smoothed_scores(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc", smooth=2)
    for epoch, acc in enumerate([0.5, 0.9, 0.6]):
        saver.step(epoch, {"val_acc": acc}, write=lambda p: open(p, "w").write("w"))
    saver.close()
    best = saver.best  # smoothed: 0.5, 0.7, 0.75 -- the spike at 0.9 is not the best
    assert (best.epoch, best.raw_score) == (2, 0.6) and best.score == pytest.approx(0.75)
    assert load_manifest(tmp_path).policy["smooth"] == 2
    lines = (run_folder(tmp_path) / "history.jsonl").read_text().splitlines()
    assert '"raw_score": 0.6' in lines[2] and '"score": 0.75' in lines[2]


def test_smooth_and_tie_break_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="smooth"):
        BestSaver(tmp_path, monitor="val_acc", smooth=0)
    with pytest.raises(ValueError, match="smooth"):
        BestSaver(tmp_path, monitor="val_acc", smooth=("ema", 2.0))
    with pytest.raises(ValueError, match="tie_break"):
        BestSaver(tmp_path, monitor="val_acc", tie_break=("val_loss", "min", 3))
    with pytest.raises(ValueError, match="warmup"):
        BestSaver(tmp_path, monitor="val_acc", warmup=-1)


def step_warnings(saver, rows):
    with pytest.warns(BestSaveWarning) as caught:
        for epoch, metrics in enumerate(rows):
            saver.step(epoch, metrics)
    return [str(w.message) for w in caught]


def test_guard_training_metric(tmp_path):
    saver = BestSaver(tmp_path, monitor="train_loss", top_k=0)
    messages = step_warnings(
        saver, [{"train_loss": 1.0 - e / 10, "val_loss": 1.0} for e in range(3)]
    )
    assert len(messages) == 1 and "choose a validation metric such as 'val_loss'" in messages[0]


def test_guard_accuracy_beside_ranking_metrics(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_acc", top_k=0)
    messages = step_warnings(saver, [{"val_acc": 0.95 + e / 100, "val_f1": 0.1} for e in range(3)])
    assert any("imbalanced" in m and "'val_f1'" in m for m in messages)


def test_guard_constant_metric(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_auroc", top_k=0)
    messages = step_warnings(saver, [{"val_auroc": 0.5}] * 6)
    assert len(messages) == 1 and "not computed" in messages[0]


def test_fixed_file_name_holds_the_latest_best(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_loss", filename="best", extension=".keras")
    for epoch, loss in enumerate([0.5, 0.4, 0.3]):
        saver.step(epoch, {"val_loss": loss}, write=lambda p, e=epoch: open(p, "w").write(str(e)))
    saver.close()
    assert (tmp_path / "best.keras").read_text() == "2"
    assert load_manifest(tmp_path).best.name == "best.keras"
    assert (tmp_path / ".bestsave/best/best.json").exists()


def test_extra_template_fields(tmp_path):
    saver = BestSaver(tmp_path, monitor="val_loss", filename="{epoch:02d}-{batch}")
    saver.step(
        0,
        {"val_loss": 0.5},
        write=lambda p: open(p, "w").write("w"),
        fields={"epoch": 1, "batch": 7},
    )
    assert saver.best.name == "01-7" and saver.best.epoch == 0
    assert "batch" not in saver.best.metrics
