"""Which differences between strategies are real, and how stable their ranking is: pure functions.

The unit of analysis is the val case (the patient). Seeds of one strategy on one case share that
case, so they are not independent: every test here first averages a strategy's seeds within each
case (:func:`case_means`) and then works on one number per case. A deterministic baseline that ran
one seed pairs by case with the seed average of a strategy that ran three, so no case is dropped.

For two strategies on the same cases, the per-case differences (strategy minus reference) give:

- a 95% **expanded percentile bootstrap interval over cases** of their mean (cases drawn with
  replacement, seeded; :func:`bootstrap_ci`). Percentile rather than BCa: with 5-20 cases BCa's
  acceleration, a jackknife over those few cases, is itself noisy and undefined when the
  differences are all equal, and BCa does not cure the percentile interval's real small-sample
  fault, its narrowness; the expanded percentile interval does (:func:`expanded_tail`). The
  verdict's error rate is held by the test below (the interval must also exclude 0, which can only
  make a verdict rarer); the interval is the effect size with its spread;
- the two-sided **Wilcoxon signed-rank p-value over cases** (scipy: exact below 51 cases without
  ties; zero differences dropped, Wilcoxon's rule). With n cases its smallest value is 2 / 2**n:
  0.0625 for 5 cases, so at least 6 cases are needed to reach p < 0.05;
- an **equivalence** p-value: two one-sided Wilcoxon tests (TOST) of the differences against
  ``-margin`` and ``+margin``; the larger of the two.

Comparisons are decided in pre-specified families (:func:`decide_family`): Holm's step-down
correction over the family's tests, then one rule:

- "higher" / "lower": the Holm-adjusted p < 0.05 **and** the interval excludes 0;
- otherwise "equivalent" when the Holm-adjusted equivalence p < 0.05 (within ±margin);
- otherwise "inconclusive" (no difference shown, none ruled out);
- fewer than :data:`MIN_CASES` cases: "too few cases to test", never a verdict (and the
  comparison does not count in its family's correction: that is decided by the number of cases,
  never by the outcome).

The array functions take a leading batch shape ``(...)`` so that simulations can decide thousands
of synthetic benchmarks in one call (tests/study/test_stats_simulation.py); the table functions at
the end apply them to a long table with one row per (strategy, seed, case).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

LEVEL = 0.95
ALPHA = 0.05
N_RESAMPLES = 10_000  # the interval of a mean difference
RANK_RESAMPLES = 1_000  # the ranking's stability
MIN_CASES = 5
EQUIVALENCE_MARGIN = 0.01  # DSC (and NSD), both on their 0-1 scale; `report --equivalence-margin`

HIGHER, LOWER, EQUIVALENT, INCONCLUSIVE = "higher", "lower", "equivalent", "inconclusive"
TOO_FEW = "too few cases to test"
VERDICTS = (HIGHER, LOWER, EQUIVALENT, INCONCLUSIVE, TOO_FEW)


# --- arrays: one comparison per row of the last axis --------------------------------------------


@functools.lru_cache(maxsize=16)  # a report asks for the same (n, resamples, seed) hundreds of times
def resample_counts(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """How often each of ``n`` cases is drawn in each bootstrap resample (drawn with replacement).

    A resample's mean of ``x`` is then ``counts @ x / n``, for any number of ``x`` at once.

    Returns:
        (n_resamples, n) float64 counts, read-only; each row sums to ``n``.
    """
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    flat = (idx + np.arange(n_resamples)[:, None] * n).ravel()
    counts = np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)
    counts.flags.writeable = False
    return counts


def expanded_tail(n: int, level: float = LEVEL) -> float:
    """The tail probability of the *expanded* percentile interval for n cases (Hesterberg 2015).

    The plain percentile interval of a mean is too narrow for few cases: it behaves like a z
    interval with the biased sd, and covered the true difference 86% of the time at 6 cases in
    this project's simulation (benchmarks/verdict_simulation.py). Taking the percentiles at
    Phi(-sqrt(n / (n - 1)) t_{n-1, 1 - (1 - level) / 2}) instead widens it as a t interval would.
    Written here: neither numpy nor scipy.stats.bootstrap offers it.

    Returns:
        The lower tail probability (e.g. 0.0024 for 6 cases, 0.025 as n grows); NaN for n < 2.
    """
    if n < 2:
        return math.nan
    from scipy.stats import norm, t

    return float(norm.cdf(-math.sqrt(n / (n - 1)) * t.ppf(1 - (1 - level) / 2, n - 1)))


def bootstrap_ci(
    x: np.ndarray, *, level: float = LEVEL, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Expanded percentile bootstrap interval of the mean of ``x`` over its last axis (resampling cases).

    Written with numpy rather than ``scipy.stats.bootstrap``: the interval of a mean is a few lines,
    it runs for a whole batch of samples with one set of resamples, scipy has no expanded
    percentile interval (:func:`expanded_tail`), and it renamed the seed argument
    (``random_state`` -> ``rng``) within the versions this project supports.

    Args:
        x: (..., n) per-case values (e.g. differences); no NaN.
        level: coverage of the interval.
        n_resamples: bootstrap resamples (each n cases drawn with replacement).
        seed: the generator's seed; the same inputs give the same interval.

    Returns:
        (low, high), each of shape (...); NaN for n < 2 (one case shows no spread). All values
        equal give (v, v).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    if n < 2:
        nan = np.full(x.shape[:-1], math.nan)
        return nan, nan.copy()
    means = x @ resample_counts(n, n_resamples, seed).T / n  # (..., R)
    tail = expanded_tail(n, level) * 100
    low, high = np.percentile(means, [tail, 100 - tail], axis=-1)
    return low, high


EXACT_WITH_TIES = 200  # up to this many nonzero differences with ties: the exact distribution


def wilcoxon_p(x: np.ndarray, alternative: str = "two-sided") -> np.ndarray:
    """Wilcoxon signed-rank p-value of ``x`` against 0 over its last axis.

    Zero values are dropped (Wilcoxon's own rule). Without ties: scipy's ``wilcoxon``, exact up to
    50 values (the normal approximation beyond). With ties (per-organ scores often tie: an organ
    missed in two cases differs by the same amount in both) the exact null distribution given the
    tied ranks (:func:`_tied_signed_rank_p`); scipy computes that one by evaluating the statistic
    once per sign pattern in Python (measured here: 0.11 s per test at 13 cases, 37 s for one
    report's per-organ map).

    Args:
        x: (..., n) per-case differences; no NaN.
        alternative: ``two-sided``, ``greater`` (values tend above 0) or ``less``.

    Returns:
        (...) p-values; 1.0 where every value is 0 (no evidence of any difference), NaN for n = 0.
    """
    from scipy.stats import wilcoxon  # here: scipy.stats costs ~1 s of every `benchmark` start-up

    x = np.asarray(x, dtype=np.float64)
    batch = x.shape[:-1]
    if x.shape[-1] == 0:
        return np.full(batch, math.nan)
    rows = x.reshape(-1, x.shape[-1])
    ordered = np.sort(np.abs(rows), axis=1)
    clean = (rows != 0).all(axis=1) & (np.diff(ordered, axis=1) != 0).all(axis=1)
    out = np.empty(len(rows))
    if clean.any():  # the common case, and every simulation: one vectorised call
        out[clean] = wilcoxon(rows[clean], alternative=alternative, axis=-1).pvalue
    for i in np.flatnonzero(~clean):  # zeros or ties: one row at a time
        out[i] = _tied_signed_rank_p(rows[i][rows[i] != 0], alternative)
    return out.reshape(batch)


def _tied_signed_rank_p(d: np.ndarray, alternative: str) -> float:
    """Exact signed-rank p-value of nonzero differences that may tie: the distribution of W+ (the
    sum of the ranks of |d| whose d > 0) over all 2**n sign patterns, the ranks held as they are
    (average ranks for ties), built by adding one rank at a time (each sign equally likely).

    Written here for speed (see :func:`wilcoxon_p`); tests check it against scipy's permutation
    result. Beyond :data:`EXACT_WITH_TIES` values: scipy's normal approximation with tie correction.
    """
    from scipy.stats import rankdata, wilcoxon

    if d.size == 0:
        return 1.0
    if d.size > EXACT_WITH_TIES:
        return float(wilcoxon(d, alternative=alternative, method="asymptotic").pvalue)
    doubled = np.rint(2 * rankdata(np.abs(d))).astype(np.int64)  # average ranks are multiples of 1/2
    prob = np.zeros(int(doubled.sum()) + 1)
    prob[0] = 1.0
    for r in doubled:  # W+ gains r or not, each with probability 1/2
        shifted = np.zeros_like(prob)
        shifted[r:] = prob[:-r]
        prob = 0.5 * (prob + shifted)
    observed = int(doubled[d > 0].sum())
    greater, less = prob[observed:].sum(), prob[: observed + 1].sum()
    p = {"greater": greater, "less": less, "two-sided": 2 * min(greater, less)}[alternative]
    return float(min(p, 1.0))


def equivalence_p(x: np.ndarray, margin: float) -> np.ndarray:
    """Two one-sided Wilcoxon tests (TOST): is the difference inside ``(-margin, +margin)``?

    Args:
        x: (..., n) per-case differences.
        margin: the equivalence margin (> 0), in the differences' unit.

    Returns:
        (...) the larger of the two one-sided p-values (H0: difference <= -margin; H0: difference
        >= +margin); small when both are rejected.
    """
    x = np.asarray(x, dtype=np.float64)
    return np.maximum(wilcoxon_p(x + margin, "greater"), wilcoxon_p(x - margin, "less"))


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values over the last axis (one family per row); NaN stays NaN
    and does not count in the family.

    Written here: scipy has Benjamini-Hochberg (``false_discovery_control``) but not Holm, and
    statsmodels, which has it, would be a large dependency for six lines.

    Args:
        p: (..., m) raw p-values of one family.

    Returns:
        (..., m) adjusted p-values: the k-th smallest of m becomes max over j <= k of
        min(1, (m - j + 1) p_(j)); reject where adjusted < alpha controls the family-wise error.
    """
    p = np.asarray(p, dtype=np.float64)
    finite = np.isfinite(p)
    m = finite.sum(axis=-1, keepdims=True)
    order = np.argsort(np.where(finite, p, np.inf), axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=-1)
    factor = m - np.arange(p.shape[-1])  # m, m-1, ... for the 1st, 2nd, ... smallest
    stepped = np.maximum.accumulate(np.minimum(1.0, ranked * factor), axis=-1)
    out = np.empty_like(p)
    np.put_along_axis(out, order, stepped, axis=-1)
    return np.where(finite, out, math.nan)


def difference_stats(
    x: np.ndarray,
    *,
    margin: float = EQUIVALENCE_MARGIN,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
) -> dict[str, np.ndarray]:
    """Everything one comparison needs from its per-case differences, for a batch of comparisons.

    Args:
        x: (..., n) per-case differences (strategy minus reference), one per case.
        margin: equivalence margin.
        seed, n_resamples: of the bootstrap interval.

    Returns:
        ``{"n_cases", "mean", "ci_low", "ci_high", "p_value", "p_equivalence"}``, arrays of shape (...).
    """
    x = np.asarray(x, dtype=np.float64)
    low, high = bootstrap_ci(x, seed=seed, n_resamples=n_resamples)
    n = x.shape[-1]
    return {
        "n_cases": np.full(x.shape[:-1], n),
        "mean": x.mean(axis=-1) if n else np.full(x.shape[:-1], math.nan),
        "ci_low": low,
        "ci_high": high,
        "p_value": wilcoxon_p(x),
        "p_equivalence": equivalence_p(x, margin),
    }


DECIDE_INPUTS = ("n_cases", "ci_low", "ci_high", "p_value", "p_equivalence")  # decide_family's arguments


def decide_family(
    n_cases: np.ndarray,
    ci_low: np.ndarray,
    ci_high: np.ndarray,
    p_value: np.ndarray,
    p_equivalence: np.ndarray,
    *,
    alpha: float = ALPHA,
    min_cases: int = MIN_CASES,
) -> dict[str, np.ndarray]:
    """Holm-correct one family of comparisons (the last axis) and give each its verdict.

    Args:
        n_cases, ci_low, ci_high, p_value, p_equivalence: (..., m) from :func:`difference_stats`
            of the family's m comparisons.
        alpha: the family-wise error rate.
        min_cases: fewer cases than this: "too few cases to test", left out of the correction.

    Returns:
        ``{"p_adjusted", "p_equivalence_adjusted", "verdict"}``, arrays of shape (..., m); verdicts
        are the strings of :data:`VERDICTS` (see the module docstring for the rule).
    """
    n_cases = np.asarray(n_cases)
    tested = n_cases >= min_cases
    p_adj = holm(np.where(tested, p_value, math.nan))
    p_eq_adj = holm(np.where(tested, p_equivalence, math.nan))
    low, high = np.asarray(ci_low), np.asarray(ci_high)
    shown = (p_adj < alpha) & ((low > 0) | (high < 0))
    verdict = np.where(
        ~tested,
        TOO_FEW,
        np.where(
            shown,
            np.where(low > 0, HIGHER, LOWER),
            np.where(p_eq_adj < alpha, EQUIVALENT, INCONCLUSIVE),
        ),
    )
    return {"p_adjusted": p_adj, "p_equivalence_adjusted": p_eq_adj, "verdict": verdict.astype(object)}


def rank_stability(
    scores: np.ndarray, *, n_resamples: int = RANK_RESAMPLES, seed: int = 0, level: float = LEVEL
) -> dict[str, np.ndarray]:
    """How stable the ranking of S strategies by their mean over cases is, by bootstrap over cases
    (challengeR's "bootstrap ranking stability").

    Each resample draws the n cases with replacement (the same draw for every strategy: they are
    paired), ranks the strategies by their mean over the drawn cases (rank 1 = highest; ties share
    the average rank, and a tie for first shares P(rank 1) equally).

    Args:
        scores: (..., S, n) per-case (seed-averaged) scores of S strategies on the same n cases.
        n_resamples, seed: of the bootstrap.
        level: coverage of the rank interval.

    Returns:
        ``{"mean_rank", "rank_low", "rank_high", "p_first"}``, arrays of shape (..., S).
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[-1]
    if n == 0:
        nan = np.full(scores.shape[:-1], math.nan)
        return {k: nan.copy() for k in ("mean_rank", "rank_low", "rank_high", "p_first")}
    means = scores @ resample_counts(n, n_resamples, seed).T / n  # (..., S, R)
    ranks = rankdata(-means, axis=-2, method="average")
    top = means == means.max(axis=-2, keepdims=True)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ranks, [tail, 100 - tail], axis=-1)
    return {
        "mean_rank": ranks.mean(axis=-1),
        "rank_low": low,
        "rank_high": high,
        "p_first": (top / top.sum(axis=-2, keepdims=True)).mean(axis=-1),
    }


# --- long tables: one row per (strategy, seed, case) ---------------------------------------------


def case_means(long: pd.DataFrame, value: str, keys: Sequence[str] = ()) -> pd.DataFrame:
    """Each strategy's seeds averaged within each case: the unit every test here works on.

    Args:
        long: one row per (keys..., strategy, seed, case) with a ``value`` column; NaN values are
            left out.
        value: the score column (e.g. ``dsc``).
        keys: further grouping columns (e.g. ``train_cases``, later ``model``).

    Returns:
        Columns ``*keys, strategy, case, <value>, n_seeds``, one row per (keys, strategy, case).
    """
    cols = [*keys, "strategy", "case"]
    kept = long.loc[long[value].notna(), [*cols, "seed", value]]
    out = kept.groupby(cols, sort=False).agg(**{value: (value, "mean"), "n_seeds": ("seed", "nunique")})
    return out.reset_index()


def _per_case(means: pd.DataFrame, strategy: str, value: str) -> pd.Series:
    g = means[means["strategy"] == strategy]
    return pd.Series(g[value].to_numpy(float), index=g["case"].astype(str))


PAIR_COLUMNS = [
    "strategy",
    "reference",
    "n_cases",
    "n_seeds",
    "n_seeds_reference",
    "mean",
    "ci_low",
    "ci_high",
    "p_value",
    "p_equivalence",
]


def paired_rows(
    means: pd.DataFrame,
    pairs: Sequence[tuple[str, str]],
    value: str,
    *,
    margin: float = EQUIVALENCE_MARGIN,
    seed: int = 0,
) -> pd.DataFrame:
    """Each (strategy, reference) pair compared over the cases both have (matched by case id).

    Args:
        means: :func:`case_means` of one group (one training-case level, one model, one organ).
        pairs: (strategy, reference) pairs; the difference is strategy minus reference.
        value: the score column.
        margin, seed: see :func:`difference_stats`.

    Returns:
        :data:`PAIR_COLUMNS`, one row per pair in the order given, not yet corrected (:func:`decide`).
    """
    per = {s: _per_case(means, s, value) for s in {s for pair in pairs for s in pair}}
    seeds = means.groupby("strategy")["n_seeds"].max()
    batches: dict[tuple[str, ...], list[int]] = {}  # pairs on the same cases: one batched call
    for i, (strategy, reference) in enumerate(pairs):
        common = tuple(sorted(set(per[strategy].index) & set(per[reference].index)))
        batches.setdefault(common, []).append(i)
    found: dict[int, dict] = {}
    for common, members in batches.items():
        diffs = np.array(
            [
                per[pairs[i][0]][list(common)].to_numpy() - per[pairs[i][1]][list(common)].to_numpy()
                for i in members
            ]
        ).reshape(len(members), len(common))
        stats = difference_stats(diffs, margin=margin, seed=seed)
        for j, i in enumerate(members):
            found[i] = {k: v[j].item() for k, v in stats.items()}
    rows = [
        {
            "strategy": strategy,
            "reference": reference,
            "n_seeds": int(seeds.get(strategy, 0)),
            "n_seeds_reference": int(seeds.get(reference, 0)),
            **found[i],
        }
        for i, (strategy, reference) in enumerate(pairs)
    ]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def decide(rows: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """:func:`decide_family` on a table of :func:`paired_rows` (all its rows one family).

    Returns:
        ``rows`` with ``p_adjusted``, ``p_equivalence_adjusted`` and ``verdict`` added.
    """
    if rows.empty:
        return rows.assign(p_adjusted=[], p_equivalence_adjusted=[], verdict=[])
    out = decide_family(**{k: rows[k].to_numpy(float) for k in DECIDE_INPUTS}, **kwargs)
    return rows.assign(**out)


RANK_COLUMNS = ["strategy", "n_cases", "mean", "mean_rank", "rank_low", "rank_high", "p_first"]


def ranking(
    means: pd.DataFrame, value: str, *, n_resamples: int = RANK_RESAMPLES, seed: int = 0
) -> pd.DataFrame:
    """:func:`rank_stability` of the strategies of one group, over the cases every one of them has.

    Args:
        means: :func:`case_means` of one group.
        value: the score column.

    Returns:
        :data:`RANK_COLUMNS`, one row per strategy in the order they appear in ``means``.
    """
    names = list(dict.fromkeys(means["strategy"]))
    per = {s: _per_case(means, s, value) for s in names}
    common = sorted(set.intersection(*(set(v.index) for v in per.values()))) if names else []
    matrix = np.array([[per[s][c] for c in common] for s in names], dtype=float).reshape(len(names), -1)
    ranks = rank_stability(matrix, n_resamples=n_resamples, seed=seed)
    return pd.DataFrame(
        {
            "strategy": names,
            "n_cases": len(common),
            "mean": matrix.mean(axis=1) if common else math.nan,
            **ranks,
        },
        columns=RANK_COLUMNS,
    )


def summary_over_cases(long: pd.DataFrame, value: str, keys: Sequence[str] = ()) -> pd.DataFrame:
    """Per strategy: the mean over cases with its 95% interval over cases, and the sd over seeds.

    Args:
        long: one row per (keys..., strategy, seed, case).
        value: the score column.
        keys: further grouping columns.

    Returns:
        Columns ``*keys, strategy, n_cases, n_seeds, mean, ci_low, ci_high, sd_seeds``: ``mean`` and
        the interval are over the seed-averaged case scores (bootstrap over cases; NaN for one
        case); ``sd_seeds`` is the sample sd (ddof=1) over seeds of each seed's mean over cases
        (NaN for one seed).
    """
    means = case_means(long, value, keys)
    per_seed = long[long[value].notna()].groupby([*keys, "strategy", "seed"], sort=False)[value].mean()
    sd = per_seed.groupby(level=[*keys, "strategy"], sort=False).std(ddof=1)
    rows = []
    for key, g in means.groupby([*keys, "strategy"], sort=False):
        key = key if isinstance(key, tuple) else (key,)
        x = g[value].to_numpy(float)
        low, high = bootstrap_ci(x)
        rows.append(
            {
                **dict(zip([*keys, "strategy"], key)),
                "n_cases": len(x),
                "n_seeds": int(g["n_seeds"].max()),
                "mean": x.mean(),
                "ci_low": float(low),
                "ci_high": float(high),
                "sd_seeds": float(sd.get(key if keys else key[0], math.nan)),
            }
        )
    return pd.DataFrame(
        rows, columns=[*keys, "strategy", "n_cases", "n_seeds", "mean", "ci_low", "ci_high", "sd_seeds"]
    )
