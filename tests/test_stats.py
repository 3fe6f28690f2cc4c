"""Intervals and paired comparisons against hand-computed cases."""

import math

import numpy as np
import pytest

from benchmark.core.stats import (
    Evidence,
    bootstrap_ci,
    paired_difference,
    resample_weights,
    t_interval,
)


def correct(n: int, k: int, seed: int = 0) -> Evidence:
    """n examples, k of them right, in a seeded order."""
    bits = np.zeros(n, dtype=bool)
    bits[np.random.default_rng(seed).permutation(n)[:k]] = True
    return Evidence("correct", {"correct": bits}, "val-1")


def test_bootstrap_interval_of_a_known_binomial():
    # 700 right of 1000: standard error sqrt(0.7 * 0.3 / 1000) = 1.449 points, 95% half-width 2.84.
    e = correct(1000, 700)
    low, high = bootstrap_ci(e)
    assert e.metric() == 70.0
    assert low == pytest.approx(70 - 2.84, abs=0.4) and high == pytest.approx(70 + 2.84, abs=0.4)
    assert bootstrap_ci(e) == (low, high)  # a fixed generator: the same interval every time


def test_metrics_recomputed_from_weights_match_the_direct_ones():
    rr = Evidence("reciprocal_rank", {"reciprocal_rank": np.array([1.0, 0.5, 0.25, 1 / 3])}, "m")
    assert rr.metric() == pytest.approx((1 + 0.5 + 0.25 + 1 / 3) / 4)
    assert rr.metric(np.array([[2.0, 0, 0, 2.0]]))[0] == pytest.approx((1 + 1 / 3) / 2)
    # Two images, three classes: class 2 is nowhere (left out), class 1 is predicted but absent (IoU 0).
    seg = Evidence(
        "iou_counts", {"intersection": np.array([[4, 0, 0], [2, 0, 0]]), "union": np.array([[5, 1, 0], [3, 0, 0]])}, "s"
    )
    assert seg.metric() == pytest.approx(100 * (6 / 8 + 0) / 2)
    assert seg.metric(np.array([[0.0, 1.0]]))[0] == pytest.approx(100 * 2 / 3)  # image 2 alone: class 1 undefined
    w = resample_weights(4, 3, seed=1)
    assert w.shape == (3, 4) and (w.sum(1) == 4).all()


def test_two_identical_runs_differ_by_exactly_zero():
    e = correct(500, 300)
    d = paired_difference([(e, e)])
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0) and d.verdict() == "not distinguishable"


def test_a_swapped_pair_flips_the_verdict():
    a, b = correct(2000, 1500, seed=1), correct(2000, 1300, seed=2)
    ab, ba = paired_difference([(a, b)]), paired_difference([(b, a)])
    assert ab.mean == pytest.approx(10.0) and ab.low > 0 and ab.verdict() == "A better"
    assert ba.verdict() == "B better" and ba.low == pytest.approx(-ab.high) and ba.high == pytest.approx(-ab.low)
    # For a loss, lower is better: the same numbers say the opposite.
    assert ab.verdict(lower_is_better=True) == "B better"


def test_pairing_sees_what_unpaired_intervals_cannot():
    # B is A with 10 of 1000 wrong answers made right: a small but certain gain.
    a = correct(1000, 600)
    b_bits = a.arrays["correct"].copy()
    b_bits[np.flatnonzero(~b_bits)[:10]] = True
    b = Evidence("correct", {"correct": b_bits}, "val-1")
    d = paired_difference([(b, a)])
    assert d.mean == pytest.approx(1.0) and d.low > 0 and d.verdict() == "A better"
    low_a, high_a = bootstrap_ci(a)
    assert high_a - low_a > 4 * (d.high - d.low)  # the unpaired intervals overlap widely


def test_runs_on_different_val_examples_are_refused():
    a = correct(100, 50)
    b = Evidence("correct", {"correct": a.arrays["correct"]}, "val-2")
    with pytest.raises(ValueError, match="different val examples"):
        paired_difference([(a, b)])


def test_seed_pairs_add_the_spread_over_seeds():
    # Seed pairs disagreeing in sign: no verdict, however many examples.
    pairs = [(correct(4000, 2400, s), correct(4000, 2300, s + 10)) for s in range(2)]
    pairs += [(correct(4000, 2300, s), correct(4000, 2400, s + 10)) for s in range(2, 4)]
    d = paired_difference(pairs)
    assert d.pairs == 4 and d.mean == pytest.approx(0.0) and d.verdict() == "not distinguishable"
    assert d.low < -1.0 and d.high > 1.0


def test_student_t_interval_over_seeds():
    mean, low, high = t_interval([70.0, 72.0, 74.0])
    # sd 2, n 3: half-width t(0.975, 2) * 2 / sqrt(3) = 4.303 * 1.1547 = 4.969.
    assert mean == 72.0 and high - mean == pytest.approx(4.969, abs=1e-3) and mean - low == pytest.approx(high - mean)
    assert t_interval([5.0]) == (5.0, 5.0, 5.0)
    assert math.isclose(t_interval([1.0, 1.0])[2], 1.0)


def test_evidence_round_trips_compactly():
    e = correct(50_000, 37_000)
    data = e.to_bytes()
    again = Evidence.from_bytes(data)
    assert np.array_equal(again.arrays["correct"], e.arrays["correct"]) and again.fingerprint == "val-1"
    assert len(data) < 10_000  # ImageNet's 50,000 val images: one bit each, compressed
