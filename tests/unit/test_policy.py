"""The decision rules, checked on examples and against brute force for random sequences."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bestsave.monitor import Monitor
from bestsave.policy import Policy, PolicyState

pytestmark = pytest.mark.core


def run(policy, scores, epochs=None):
    """Feed scores through the policy; returns the verdicts, states and evicted ids."""
    state = PolicyState()
    verdicts, states = [], []
    for i, score in enumerate(scores):
        epoch = i if epochs is None else epochs[i]
        verdict, state = policy.decide(state, i, epoch, score)
        verdicts.append(verdict)
        states.append(state)
    return verdicts, states


def kept_ids(state):
    return sorted(c.id for c in state.ranked)


def order_key(monitor, scores):
    return lambda i: (monitor.rank_key(scores[i]), i)


# -- examples ------------------------------------------------------------------------------


def test_first_valid_score_is_best_and_ties_are_not():
    policy = Policy(Monitor("acc", "max"))
    verdicts, states = run(policy, [None, 0.5, 0.5, 0.6])
    assert [v.is_best for v in verdicts] == [False, True, False, True]
    assert [v.keep for v in verdicts] == [None, "best", None, "best"]
    assert verdicts[3].evict == (1,)
    assert kept_ids(states[-1]) == [3]


def test_min_delta_blocks_small_improvements():
    policy = Policy(Monitor("loss", "min", min_delta=0.1))
    verdicts, states = run(policy, [1.0, 0.95, 0.91, 0.89, 0.85])
    assert [v.is_best for v in verdicts] == [True, False, False, True, False]
    assert states[-1].best == 0.89


def test_top_k_tie_keeps_incumbent():
    policy = Policy(Monitor("acc", "max"), top_k=2)
    verdicts, states = run(policy, [0.5, 0.7, 0.5, 0.6])
    assert verdicts[2].keep is None  # ties the worst kept: the incumbent stays
    assert verdicts[3].keep == "top_k" and verdicts[3].evict == (0,)
    assert kept_ids(states[-1]) == [1, 3]


def test_top_k_zero_keeps_nothing_but_tracks_best():
    policy = Policy(Monitor("acc", "max"), top_k=0, patience=2)
    verdicts, states = run(policy, [0.5, 0.7, 0.6, 0.6])
    assert [v.keep for v in verdicts] == [None] * 4
    assert [v.is_best for v in verdicts] == [True, True, False, False]
    assert verdicts[-1].should_stop
    assert states[-1].ranked == ()


def test_top_k_minus_one_keeps_every_valid_score():
    policy = Policy(Monitor("loss", "min"), top_k=-1)
    _, states = run(policy, [1.0, None, 2.0, 0.5])
    assert kept_ids(states[-1]) == [0, 2, 3]


def test_delta_ensemble_evicts_when_a_new_best_leaves_members_behind():
    policy = Policy(Monitor("acc", "max"), delta=0.05)
    verdicts, states = run(policy, [0.80, 0.83, 0.79, 0.86, 0.90])
    assert [v.keep for v in verdicts] == ["best", "best", "ensemble", "best", "best"]
    assert verdicts[3].evict == (0, 2)  # 0.80 and 0.79 are now more than 0.05 behind 0.86
    assert verdicts[4].evict == (1,)
    assert kept_ids(states[-1]) == [3, 4]


def test_delta_ensemble_capped_by_top_k():
    policy = Policy(Monitor("acc", "max"), delta=0.1, top_k=2)
    verdicts, states = run(policy, [0.80, 0.85, 0.82, 0.84])
    assert verdicts[2].keep == "ensemble" and verdicts[2].evict == (0,)  # full: the worst leaves
    assert verdicts[3].evict == (2,)
    assert kept_ids(states[-1]) == [1, 3]


def test_delta_baseline_ignores_min_delta():
    # 0.905 is not an improvement (min_delta) but raises the ensemble's baseline.
    policy = Policy(Monitor("acc", "max", min_delta=0.01), delta=0.004)
    verdicts, _states = run(policy, [0.9, 0.905])
    assert [v.is_best for v in verdicts] == [True, False]
    assert verdicts[1].keep == "ensemble" and verdicts[1].evict == (0,)


def test_periodic_epochs():
    policy = Policy(Monitor("acc", "max"), keep_every_n_epochs=3)
    verdicts, _ = run(policy, [0.1] * 7)
    assert [v.periodic for v in verdicts] == [False, False, True, False, False, True, False]


def test_patience_counts_invalid_scores_and_resets_on_improvement():
    policy = Policy(Monitor("loss", "min"), patience=2)
    verdicts, _ = run(policy, [1.0, None, 0.9, 1.0, 1.0, 0.5])
    assert [v.should_stop for v in verdicts] == [False, False, False, False, True, False]


def test_baseline_must_be_beaten():
    policy = Policy(Monitor("acc", "max"), top_k=3, baseline=0.6)
    verdicts, states = run(policy, [0.5, 0.6, 0.65, 0.7])
    assert [v.keep for v in verdicts] == [None, None, "best", "best"]
    assert kept_ids(states[-1]) == [2, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"delta": -0.1}, "delta"),
        ({"keep_every_n_epochs": 0}, "keep_every_n_epochs"),
        ({"patience": 0}, "patience"),
        ({"baseline": math.inf}, "baseline"),
    ],
)
def test_bad_options_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Policy(Monitor("acc", "max"), **kwargs)


def test_state_round_trips_through_json_dict():
    policy = Policy(Monitor("acc", "max"), top_k=2, patience=3)
    _, states = run(policy, [0.5, 0.7, 0.6, 0.4])
    assert PolicyState.from_dict(states[-1].to_dict()) == states[-1]


# -- properties against brute force ----------------------------------------------------------

modes = st.sampled_from(["min", "max"])
scores = st.lists(st.one_of(st.none(), st.integers(0, 20).map(lambda x: x / 10)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(mode=modes, k=st.integers(-1, 5), seq=scores)
def test_top_k_equals_brute_force(mode, k, seq):
    monitor = Monitor("m", mode)
    _verdicts, states = run(Policy(monitor, top_k=k), seq)
    for t, state in enumerate(states):
        valid = [i for i in range(t + 1) if seq[i] is not None]
        ranked = sorted(valid, key=order_key(monitor, seq))
        expected = ranked if k == -1 else ranked[:k]
        assert kept_ids(state) == sorted(expected)
        assert state.best_id == (ranked[0] if ranked else None) or (
            state.best_id is not None and seq[state.best_id] == seq[ranked[0]]
        )


@settings(max_examples=300, deadline=None)
@given(
    mode=modes,
    d=st.integers(0, 5).map(lambda x: x / 10),
    cap=st.none() | st.integers(1, 4),
    seq=scores,
)
def test_delta_ensemble_equals_brute_force(mode, d, cap, seq):
    monitor = Monitor("m", mode)
    _, states = run(Policy(monitor, top_k=cap, delta=d), seq)
    for t, state in enumerate(states):
        valid = [i for i in range(t + 1) if seq[i] is not None]
        if not valid:
            assert state.ranked == ()
            continue
        peak = min(monitor.rank_key(seq[i]) for i in valid)
        peak = -peak if mode == "max" else peak

        def near(x, peak=peak):  # within d of the peak, up to rounding error
            return x >= peak - d - 1e-9 if mode == "max" else x <= peak + d + 1e-9

        within = sorted((i for i in valid if near(seq[i])), key=order_key(monitor, seq))
        expected = within if cap is None else within[:cap]
        assert kept_ids(state) == sorted(expected)


@settings(max_examples=300, deadline=None)
@given(
    mode=modes,
    k=st.integers(1, 4),
    d=st.none() | st.integers(0, 5).map(lambda x: x / 10),
    md=st.integers(0, 3).map(lambda x: x / 10),
    seq=scores,
)
def test_nothing_better_than_a_kept_checkpoint_is_ever_deleted(mode, k, d, md, seq):
    monitor = Monitor("m", mode, min_delta=md)
    verdicts, states = run(Policy(monitor, top_k=k, delta=d), seq)
    evicted: list[int] = []
    for verdict, state in zip(verdicts, states):
        evicted += verdict.evict
        for e in evicted:
            for c in state.ranked:
                assert monitor.rank_key(seq[e]) >= monitor.rank_key(c.score)
        assert all(seq[c.id] is not None for c in state.ranked)
        assert len(state.ranked) <= k


@settings(max_examples=200, deadline=None)
@given(mode=modes, md=st.integers(0, 3).map(lambda x: x / 10), p=st.integers(1, 4), seq=scores)
def test_improvement_and_patience_match_brute_force(mode, md, p, seq):
    monitor = Monitor("m", mode, min_delta=md)
    verdicts, _ = run(Policy(monitor, patience=p), seq)
    best, since = None, 0
    for score, verdict in zip(seq, verdicts):
        improved = score is not None and (
            # by more than md: a difference of exactly md (up to rounding) is a tie
            best is None
            or (score > best + md + 1e-9 if mode == "max" else score < best - md - 1e-9)
        )
        best = score if improved else best
        since = 0 if improved else since + 1
        assert verdict.is_best == improved
        assert verdict.should_stop == (since >= p)
