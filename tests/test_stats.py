"""Tests of kvbench.stats: bootstrap CIs cover the true mean at the nominal rate, the paired test is calibrated."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kvbench.errors import KvbenchError
from kvbench.stats import bootstrap_ci, bootstrap_means, confidence_intervals, paired_comparison


def test_bootstrap_ci_covers_the_true_mean_at_the_nominal_rate():
    rng = np.random.default_rng(123)
    true_mean = 2 / (2 + 5)                                   # Beta(2, 5): skewed scores in 0..1, like a metric
    samples = rng.beta(2, 5, size=(400, 100))
    covered = 0
    for trial, values in enumerate(samples):
        low, high = bootstrap_ci(values, n_resamples=1000, seed=trial)
        covered += low <= true_mean <= high
    assert 0.92 <= covered / 400 <= 0.98, covered / 400


def test_average_over_tasks_ci_covers_the_mean_of_task_means():
    rng = np.random.default_rng(7)
    probs = np.array([0.2, 0.5, 0.9])                         # three tasks of 0/1 scores, different sizes
    sizes = [60, 120, 200]
    covered = 0
    for trial in range(400):
        groups = [rng.random(n) < p for n, p in zip(sizes, probs)]
        low, high = confidence_intervals(groups, n_resamples=1000, seed=trial)["average_ci"]
        covered += low <= probs.mean() <= high
    assert 0.92 <= covered / 400 <= 0.98, covered / 400


def test_ci_of_equal_scores_has_zero_width_and_seed_makes_it_reproducible():
    low, high = bootstrap_ci([0.7] * 50)
    assert high - low == 0.0 and low == pytest.approx(0.7)
    result = confidence_intervals([[1.0] * 30, [0.0] * 10])
    assert result["cis"] == [(1.0, 1.0), (0.0, 0.0)] and result["average_ci"] == (0.5, 0.5)
    values = np.random.default_rng(0).random(80)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    assert all(math.isnan(x) for x in bootstrap_ci([0.5]))           # one sample: no interval


def test_per_task_and_average_cis_come_from_the_same_resamples():
    groups = [np.arange(10) / 10, np.linspace(0, 1, 40)]
    matrix = bootstrap_means(groups, n_resamples=500, seed=1)
    assert matrix.shape == (500, 2)
    result = confidence_intervals(groups, n_resamples=500, seed=1)
    tail = np.percentile(matrix.mean(axis=1), [2.5, 97.5])
    assert result["average_ci"] == pytest.approx(tuple(tail))
    assert result["cis"][0][0] < result["means"][0] < result["cis"][0][1]


def test_paired_p_value_is_uniform_under_the_null_and_small_under_a_shift():
    rng = np.random.default_rng(99)
    p_null = []
    for trial in range(300):
        a, b = rng.normal(size=40), rng.normal(size=40)
        p_null.append(paired_comparison([a], [b], n_resamples=200, n_permutations=1000, seed=trial)["average"]["p_value"])
    p_null = np.array(p_null)
    assert 0.02 <= np.mean(p_null < 0.05) <= 0.09
    assert 0.45 <= p_null.mean() <= 0.55
    counts, _ = np.histogram(p_null, bins=5, range=(0, 1))
    assert counts.min() >= 40 and counts.max() <= 80              # ~60 per fifth
    base = rng.normal(size=40)
    shifted = paired_comparison([base + 0.8 + 0.3 * rng.normal(size=40)], [base], seed=1)["average"]
    assert shifted["p_value"] < 0.001 and 0.6 < shifted["ci_low"] < shifted["mean_diff"] < shifted["ci_high"] < 1.0


def test_paired_comparison_per_group_and_average():
    a = [np.array([1.0, 1.0, 0.0, 1.0]), np.array([0.5, 0.5])]
    b = [np.array([1.0, 0.0, 0.0, 0.0]), np.array([0.5, 0.5])]
    result = paired_comparison(a, b, seed=0)
    # diffs 0, 1, 0, 1: P(all four resampled = 1) = 1/16 > 2.5 %, so the upper end is 1.0
    first, second, average = result["groups"][0], result["groups"][1], result["average"]
    assert first["mean_diff"] == 0.5 and first["n"] == 4 and first["ci_low"] == 0.0 and first["ci_high"] == 1.0
    assert second == {"mean_diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0, "n": 2}   # identical: p = 1
    assert average["mean_diff"] == 0.25 and average["n"] == 6
    assert first["p_value"] == pytest.approx(0.5, abs=0.02)       # exact: 2 of the 4 sign patterns reach |0.5|
    with pytest.raises(KvbenchError, match="same samples"):
        paired_comparison([[1.0, 0.0]], [[1.0]])
    with pytest.raises(KvbenchError, match="finite"):
        bootstrap_ci([0.1, float("nan")])
