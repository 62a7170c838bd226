"""Paired differences between two strategies and their uncertainty: pure functions on numbers.

Mean ± sd per strategy does not say whether two strategies differ: both are measured on the same
val cases with the same seeds, and the case-to-case spread (one patient is harder than another)
dwarfs the difference between strategies. Pairing each (case, seed) score of a strategy with the
reference's score on the same case and seed removes that spread. Two views of the paired
differences:

- a 95% percentile bootstrap interval of their mean, resampling the pairs with a seeded generator
  (the same numbers give the same interval); a difference is *within noise* when it holds 0;
- the two-sided Wilcoxon signed-rank p-value (scipy), which needs no normality. With n pairs its
  smallest possible value is 2 / 2**n (0.125 for 4 pairs): a small benchmark cannot reach p < 0.05
  however large the difference, which is itself worth knowing.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np

N_RESAMPLES = 10_000
LEVEL = 0.95


def paired(values: Mapping[Hashable, float], reference: Mapping[Hashable, float]) -> np.ndarray:
    """``values[k] - reference[k]`` for every key both have, in sorted key order; NaNs dropped.

    Args:
        values, reference: score per pairing key, e.g. ``(case, seed)`` -> val 3D DSC.

    Returns:
        (n,) float64 differences.
    """
    keys = sorted(set(values) & set(reference))
    diffs = np.array([float(values[k]) - float(reference[k]) for k in keys], dtype=np.float64)
    return diffs[np.isfinite(diffs)]


def bootstrap_ci(
    diffs: np.ndarray, *, level: float = LEVEL, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs``.

    Written with numpy rather than ``scipy.stats.bootstrap``: the percentile interval of a mean is
    a few lines, and scipy renamed that function's seed argument (``random_state`` -> ``rng``)
    within the versions this project supports.

    Args:
        diffs: (n,) paired differences.
        level: coverage of the interval.
        n_resamples: bootstrap samples (each n pairs drawn with replacement).
        seed: the generator's seed; the same inputs give the same interval.

    Returns:
        (low, high); (nan, nan) for no pairs. One pair, or all pairs equal, give (d, d).
    """
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, diffs.size, size=(n_resamples, diffs.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``diffs`` against 0 (scipy, zero differences dropped).

    Returns:
        The p-value; 1.0 when every difference is 0 (no evidence of any difference), NaN for no pairs.
    """
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.size == 0:
        return math.nan
    if not np.any(diffs):  # scipy answers this case with a division-by-zero warning
        return 1.0
    from scipy.stats import wilcoxon  # here: scipy.stats costs ~1 s of every `benchmark` start-up

    return float(wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue)


def compare(diffs: np.ndarray, *, level: float = LEVEL, seed: int = 0) -> dict:
    """Everything the report says about one set of paired differences.

    Returns:
        ``{"n", "mean", "ci_low", "ci_high", "p_value", "within_noise"}``; ``within_noise`` is True
        when the interval holds 0, and for fewer than two pairs (one pair cannot show noise).
    """
    diffs = np.asarray(diffs, dtype=np.float64)
    low, high = bootstrap_ci(diffs, level=level, seed=seed)
    return {
        "n": int(diffs.size),
        "mean": float(diffs.mean()) if diffs.size else math.nan,
        "ci_low": low,
        "ci_high": high,
        "p_value": wilcoxon_p(diffs),
        "within_noise": diffs.size < 2 or not (low > 0 or high < 0),
    }
