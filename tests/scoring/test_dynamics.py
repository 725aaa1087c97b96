"""Training-dynamics statistics against trajectories computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from hardprobe.scoring import dynamics
from hardprobe.scoring.dynamics import AMBIGUOUS, EASY, HARD

# Three examples over four epochs. Hand-computed values below each.
PROB = np.array([[0.2, 0.6, 0.8, 1.0],    # mean 0.65; deviations -.45 -.05 .15 .35
                 [0.9, 0.9, 0.9, 0.9],    # mean 0.9, std 0
                 [0.1, 0.3, 0.1, 0.3]])   # mean 0.2, std 0.1
CORRECT = np.array([[0, 1, 1, 1],          # 3/4 correct, never forgotten
                    [1, 0, 1, 0],          # 1/2, forgotten twice (epochs 1 and 3)
                    [0, 0, 0, 0]], bool)   # never learned
MARGIN = np.array([[-1.0, 0.5, 1.0, 2.0],  # AUM 2.5 / 4 = 0.625
                   [1.0, -0.5, 1.0, -0.5],  # 0.25
                   [-2.0, -1.0, -2.0, -1.0]])  # -1.5


def test_cartography_by_hand():
    c = dynamics.cartography(PROB, CORRECT)
    np.testing.assert_allclose(c["confidence"], [0.65, 0.9, 0.2])
    # population std: sqrt((.2025 + .0025 + .0225 + .1225) / 4) = sqrt(.0875)
    np.testing.assert_allclose(c["variability"], [math.sqrt(0.0875), 0.0, 0.1], atol=1e-12)
    np.testing.assert_allclose(c["correctness"], [0.75, 0.5, 0.0])


def test_regions_rule():
    conf, var = np.array([0.65, 0.9, 0.2]), np.array([math.sqrt(0.0875), 0.0, 0.1])
    # the 2/3 quantile of (0, .1, .296) is .1 + (1/3)(.196) = .165: only example 0 is above it
    assert dynamics.regions(conf, var).tolist() == [AMBIGUOUS, EASY, HARD]
    # the thresholds are options: everything ambiguous at quantile 0; 0.95 makes 0.9 "hard"
    assert set(dynamics.regions(conf, var, variability_quantile=0.0)) == {AMBIGUOUS}
    assert dynamics.regions(conf, var, confidence_threshold=0.95).tolist() == [
        AMBIGUOUS, HARD, HARD]
    with pytest.raises(ValueError, match="quantile"):
        dynamics.regions(conf, var, variability_quantile=1.5)


def test_aum_and_forgetting_by_hand():
    np.testing.assert_allclose(dynamics.area_under_margin(MARGIN), [0.625, 0.25, -1.5])
    events, never = dynamics.forgetting_events(CORRECT)
    assert events.tolist() == [0, 2, 0] and never.tolist() == [False, False, True]
    more = np.array([[1, 0, 1, 0, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    events, never = dynamics.forgetting_events(more)
    assert events.tolist() == [2, 1, 0] and not never.any()
    one_epoch = dynamics.forgetting_events(np.array([[True], [False]]))
    assert one_epoch[0].tolist() == [0, 0] and one_epoch[1].tolist() == [False, True]


def test_example_stats_collects_everything():
    df = dynamics.example_stats(PROB, CORRECT, MARGIN)
    assert df["region"].tolist() == [AMBIGUOUS, EASY, HARD]
    np.testing.assert_allclose(df["aum"], [0.625, 0.25, -1.5])
    assert df["forgetting"].tolist() == [0, 2, 0]
    assert df["never_learned"].tolist() == [False, False, True]
    np.testing.assert_allclose(df["correctness"], [0.75, 0.5, 0.0])


def test_epoch_record_from_logits():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    rec = dynamics.epoch_record(logits, np.array([0, 2]))
    p0 = math.exp(2) / (math.exp(2) + math.exp(1) + 1)
    p1 = math.exp(1) / (1 + math.exp(3) + math.exp(1))
    np.testing.assert_allclose(rec["prob_given"], [p0, p1])
    assert rec["correct"].tolist() == [True, False]
    np.testing.assert_allclose(rec["margin"], [2 - 1, 1 - 3])  # given logit minus best other


def test_threshold_samples_size_and_disjointness():
    n, c = 230, 10
    t = dynamics.threshold_samples(n, c, runs=2, seed=3)
    assert t.shape == (2, n) and t.dtype == bool
    assert t.sum(axis=1).tolist() == [n // (c + 1)] * 2  # N / (C + 1) = 20 each
    assert not (t[0] & t[1]).any()  # disjoint: every example is ordinary in one run at least
    assert np.array_equal(t, dynamics.threshold_samples(n, c, runs=2, seed=3))  # seeded
    assert not np.array_equal(t, dynamics.threshold_samples(n, c, runs=2, seed=4))
    assert dynamics.threshold_samples(n, c, runs=0).shape == (0, n)
    with pytest.raises(ValueError, match="too few"):
        dynamics.threshold_samples(5, 10, runs=1)


def test_aum_threshold_is_the_99th_percentile():
    # 11 values 0..10: position 0.99 * 10 = 9.9 between 9 and 10 -> 9.9
    assert dynamics.aum_threshold(np.arange(11.0)) == pytest.approx(9.9)
    # (-3, -1, 2): position 0.99 * 2 = 1.98 -> -1 + 0.98 * 3 = 1.94
    assert dynamics.aum_threshold([2.0, -3.0, -1.0]) == pytest.approx(1.94)
    assert dynamics.aum_threshold([2.0, -3.0, -1.0], percentile=50) == pytest.approx(-1.0)


def test_aum_verdicts_use_each_example_s_home_run():
    aums = np.array([[-3.0, 1.0, 2.0, -2.5, 0.5, -2.0],
                     [0.2, -2.5, 1.0, 1.0, 1.0, 1.0]])
    thr = np.array([[1, 0, 0, 0, 0, 1],
                    [0, 1, 1, 0, 0, 0]], bool)
    v = dynamics.aum_verdicts(aums, thr)
    # run 0: percentile 99 of (-3, -2) = -3 + .99 = -2.01; run 1: of (-2.5, 1) = -2.5 + .99 * 3.5
    np.testing.assert_allclose(v["thresholds"], [-2.01, 0.965])
    assert v["home"].tolist() == [1, 0, 0, 0, 0, 1]  # threshold samples of run 0 -> run 1
    np.testing.assert_allclose(v["aum"], [0.2, 1.0, 2.0, -2.5, 0.5, 1.0])
    assert v["flag"].tolist() == [True, False, False, True, False, False]
    assert v["has_verdict"].all()
    # one run only: its threshold samples get no verdict
    one = dynamics.aum_verdicts(aums[:1], thr[:1])
    assert one["home"].tolist() == [-1, 0, 0, 0, 0, -1]
    assert one["has_verdict"].tolist() == [False, True, True, True, True, False]
    assert one["flag"].tolist() == [False, False, False, True, False, False]
    # no threshold samples at all: a home for everyone, no verdicts
    none = dynamics.aum_verdicts(aums[:1], np.zeros_like(thr[:1]))
    assert (none["home"] == 0).all() and not none["has_verdict"].any()


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="2-D"):
        dynamics.cartography(PROB[0], CORRECT[0])
    with pytest.raises(ValueError, match="shape"):
        dynamics.cartography(PROB, CORRECT[:, :3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dynamics.cartography(PROB * 2, CORRECT)
    with pytest.raises(ValueError, match="NaN"):
        dynamics.area_under_margin(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="boolean"):
        dynamics.forgetting_events(np.array([[0, 2]]))
    with pytest.raises(ValueError, match="labels"):
        dynamics.epoch_record(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="runs"):
        dynamics.aum_verdicts(np.zeros((2, 3)), np.zeros((1, 3), bool))
