"""Uncertainty of benchmark scores: bootstrap confidence intervals and paired tests, vectorised with numpy.

- `bootstrap_means(groups)`: B resampled means of each group (a task's per-sample scores), resampling within each
  group; the same draws serve every per-group CI and the CI of the mean over groups (the task average is formed
  the same way: mean of the task means).
- `confidence_intervals(groups)`: percentile CIs of each group mean and of their average.
- `paired_comparison(a_groups, b_groups)`: the mean difference a - b of two runs on the same samples, a paired
  bootstrap percentile CI (resampling pairs within each group) and a two-sided paired sign-flip permutation
  p-value (under "no difference" each pair's difference is as likely + as -), per group and averaged.

Every function is seeded (`seed=0` by default), so a report is reproducible to the last digit. The percentile
bootstrap is written out here (a few lines) rather than taken from `scipy.stats.bootstrap`: it needs the same
resamples for per-task and averaged intervals, and scipy is not a dependency.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from kvbench.errors import KvbenchError

N_RESAMPLES = 2000
N_PERMUTATIONS = 10000
CONFIDENCE = 0.95
SEED = 0
_CHUNK = 4_000_000  # random draws per block, to keep memory flat for large tasks

__all__ = ["N_RESAMPLES", "N_PERMUTATIONS", "CONFIDENCE", "SEED", "bootstrap_means", "percentile_ci",
           "bootstrap_ci", "confidence_intervals", "paired_comparison"]


def _as_groups(groups: Sequence) -> list[np.ndarray]:
    arrays = [np.asarray(g, dtype=float).ravel() for g in groups]
    if not arrays:
        raise KvbenchError("no scores to resample; pass at least one task's per-sample scores")
    for array in arrays:
        if array.size == 0:
            raise KvbenchError("a task has no per-sample scores; a confidence interval needs at least one sample")
        if not np.isfinite(array).all():
            raise KvbenchError("per-sample scores must be finite numbers (found NaN or inf)")
    return arrays


def _resampled_mean(values: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """n_resamples means of `values` resampled with replacement, drawn in blocks of at most _CHUNK indices."""
    n = values.size
    per_block = max(1, _CHUNK // n)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, per_block):
        stop = min(n_resamples, start + per_block)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def bootstrap_means(groups: Sequence, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Matrix (n_resamples, n_groups): resampled means of each group, each group resampled on its own."""
    if n_resamples < 1:
        raise KvbenchError(f"n_resamples must be a positive integer, not {n_resamples}")
    rng = np.random.default_rng(seed)
    return np.column_stack([_resampled_mean(g, n_resamples, rng) for g in _as_groups(groups)])


def percentile_ci(resampled: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(low, high) percentile interval of resampled statistics."""
    if not 0 < confidence < 1:
        raise KvbenchError(f"confidence must be between 0 and 1 (e.g. 0.95), not {confidence}")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(values, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                 seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of one vector (NaN, NaN for fewer than 2 values)."""
    values = _as_groups([values])[0]
    if values.size < 2:
        return math.nan, math.nan
    return percentile_ci(bootstrap_means([values], n_resamples, seed)[:, 0], confidence)


def confidence_intervals(groups: Sequence, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                         seed: int = SEED) -> dict:
    """CIs of each group's mean and of the mean over groups (the unweighted task average).

    Returns {"means": [...], "cis": [(lo, hi), ...], "average": mean of means, "average_ci": (lo, hi)}.
    A group with a single sample has no CI of its own (NaN); the average's CI is NaN if every group has one sample.
    """
    arrays = _as_groups(groups)
    resampled = bootstrap_means(arrays, n_resamples, seed)
    cis = [percentile_ci(resampled[:, j], confidence) if a.size > 1 else (math.nan, math.nan)
           for j, a in enumerate(arrays)]
    average_ci = (percentile_ci(resampled.mean(axis=1), confidence) if any(a.size > 1 for a in arrays)
                  else (math.nan, math.nan))
    means = [float(a.mean()) for a in arrays]
    return {"means": means, "cis": cis, "average": float(np.mean(means)), "average_ci": average_ci}


def _sign_flip_stats(diffs: list[np.ndarray], n_permutations: int, rng: np.random.Generator) -> np.ndarray:
    """Matrix (n_permutations, n_groups) of group mean differences with each pair's sign flipped at random."""
    out = np.empty((n_permutations, len(diffs)))
    for j, d in enumerate(diffs):
        per_block = max(1, _CHUNK // d.size)
        for start in range(0, n_permutations, per_block):
            stop = min(n_permutations, start + per_block)
            signs = rng.integers(0, 2, size=(stop - start, d.size), dtype=np.int8) * 2 - 1
            out[start:stop, j] = (signs * d).mean(axis=1)
    return out


def _p_value(observed: float, null: np.ndarray) -> float:
    """Two-sided permutation p-value, (1 + #{|T*| >= |T|}) / (1 + B): never 0, valid at any B."""
    tolerance = 1e-12 * max(1.0, abs(observed))
    return float((1 + np.count_nonzero(np.abs(null) >= abs(observed) - tolerance)) / (1 + null.size))


def paired_comparison(a_groups: Sequence, b_groups: Sequence, confidence: float = CONFIDENCE,
                      n_resamples: int = N_RESAMPLES, n_permutations: int = N_PERMUTATIONS,
                      seed: int = SEED) -> dict:
    """Mean difference a - b per group and averaged over groups, for pairs (a[i], b[i]) scored on the same samples.

    Returns {"groups": [{"mean_diff", "ci_low", "ci_high", "p_value", "n"}, ...], "average": {...same keys,
    n = total pairs}}. CI: paired percentile bootstrap (pairs resampled within each group); p-value: two-sided
    paired sign-flip permutation test of "no difference", flipping within each group.
    """
    if n_resamples < 1 or n_permutations < 1:
        raise KvbenchError(f"n_resamples and n_permutations must be positive, not {n_resamples}, {n_permutations}")
    a_arrays, b_arrays = _as_groups(a_groups), _as_groups(b_groups)
    if len(a_arrays) != len(b_arrays) or any(a.size != b.size for a, b in zip(a_arrays, b_arrays)):
        raise KvbenchError("paired comparison needs the same samples in both runs (group sizes differ)")
    diffs = [a - b for a, b in zip(a_arrays, b_arrays)]
    rng = np.random.default_rng(seed)
    boot = np.column_stack([_resampled_mean(d, n_resamples, rng) for d in diffs])
    null = _sign_flip_stats(diffs, n_permutations, rng)
    observed = np.array([d.mean() for d in diffs])

    def entry(value, resampled, null_stats, n, enough):
        low, high = percentile_ci(resampled, confidence) if enough else (math.nan, math.nan)
        return {"mean_diff": float(value), "ci_low": low, "ci_high": high, "p_value": _p_value(value, null_stats),
                "n": int(n)}

    groups = [entry(observed[j], boot[:, j], null[:, j], d.size, d.size > 1) for j, d in enumerate(diffs)]
    average = entry(observed.mean(), boot.mean(axis=1), null.mean(axis=1), sum(d.size for d in diffs),
                    any(d.size > 1 for d in diffs))
    return {"groups": groups, "average": average}
