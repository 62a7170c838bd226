"""Synthetic benchmarks with a known truth, to measure what :mod:`clipseg_bench.study.stats` decides.

A benchmark's score of strategy s on val case c with seed k is

    y[s, c, k] = b[c] + effect[s] + u[s, c] + e[s, c, k]

with b the case's difficulty (shared by every strategy: pairing removes it), u ~ N(0, case_sd) how
much that case suits that strategy (the case-to-case spread of a difference) and e ~ N(0, seed_sd)
the seed's noise. A deterministic strategy (zero-shot) has one seed and no seed noise. Everything is
drawn for many benchmarks at once, and decided with the same functions the report uses, vectorised
over benchmarks (tests/study/test_stats_simulation.py, benchmarks/verdict_simulation.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from clipseg_bench.study import stats


def simulate_scores(
    rng: np.random.Generator,
    *,
    benchmarks: int,
    effects: Sequence[float],
    cases: int,
    seeds: int,
    case_sd: float = 0.02,
    seed_sd: float = 0.005,
    one_seed: Sequence[int] = (),
) -> np.ndarray:
    """Scores of ``len(effects)`` strategies in ``benchmarks`` synthetic benchmarks.

    Args:
        rng: the generator (seeded by the caller).
        effects: (S,) each strategy's true mean shift.
        cases, seeds: val cases and seeds per benchmark.
        case_sd, seed_sd: sd of the strategy-by-case and of the seed term.
        one_seed: indices of deterministic strategies: one seed, no seed noise; their other seeds NaN.

    Returns:
        (benchmarks, S, cases, seeds) float64.
    """
    s = len(effects)
    base = rng.normal(0.7, 0.1, size=(benchmarks, 1, cases, 1))
    inter = rng.normal(0.0, case_sd, size=(benchmarks, s, cases, 1))
    noise = rng.normal(0.0, seed_sd, size=(benchmarks, s, cases, seeds))
    y = base + np.asarray(effects, dtype=float).reshape(1, s, 1, 1) + inter + noise
    for i in one_seed:
        y[:, i, :, 0] -= noise[:, i, :, 0]
        y[:, i, :, 1:] = np.nan
    return y


def to_long(scores: np.ndarray, names: Sequence[str], value: str = "dsc") -> pd.DataFrame:
    """One benchmark's (S, cases, seeds) scores as the long table the report's statistics read."""
    rows = [
        {"strategy": name, "seed": k, "case": f"case{c:03d}", value: scores[i, c, k]}
        for i, name in enumerate(names)
        for c in range(scores.shape[1])
        for k in range(scores.shape[2])
        if np.isfinite(scores[i, c, k])
    ]
    return pd.DataFrame(rows)


def family_decisions(
    scores: np.ndarray,
    pairs: Sequence[tuple[int, int]],
    *,
    margin: float = stats.EQUIVALENCE_MARGIN,
    n_resamples: int = stats.N_RESAMPLES,
) -> dict[str, np.ndarray]:
    """One family of comparisons decided in every benchmark, as ``results.paired_differences`` does.

    Args:
        scores: (B, S, cases, seeds) from :func:`simulate_scores`.
        pairs: (strategy, reference) index pairs of the family.
        margin: the equivalence margin.
        n_resamples: of each bootstrap interval. Simulations of thousands of comparisons use fewer
            than the report's 10,000 (the percentiles dominate their time); that moves an interval's
            ends by Monte Carlo error only.

    Returns:
        :func:`~clipseg_bench.study.stats.difference_stats` and
        :func:`~clipseg_bench.study.stats.decide_family` outputs, arrays of shape (B, len(pairs)).
    """
    means = np.nanmean(scores, axis=-1)  # seeds averaged within each case: (B, S, cases)
    a, b = (np.array([p[i] for p in pairs]) for i in (0, 1))
    found = stats.difference_stats(means[:, a] - means[:, b], margin=margin, n_resamples=n_resamples)
    return {**found, **stats.decide_family(**{k: found[k] for k in stats.DECIDE_INPUTS})}
