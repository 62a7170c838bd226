"""The statistics on hand-made numbers: intervals, p-values, Holm, the verdict rule, rank stability,
and the long-table functions that pair strategies by case id."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from clipseg_bench.study import stats


def test_bootstrap_of_two_values_by_hand():
    # Resampled means of [0, 1] are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: any interval wider
    # than the middle half of 10,000 of them runs from 0 to 1.
    low, high = stats.bootstrap_ci(np.array([0.0, 1.0]))
    assert (low, high) == (0.0, 1.0)


def test_bootstrap_degenerate_and_empty_samples():
    assert stats.bootstrap_ci(np.array([0.1, 0.1, 0.1])) == pytest.approx((0.1, 0.1))
    for x in (np.array([0.3]), np.array([])):  # one case shows no spread
        assert all(math.isnan(v) for v in stats.bootstrap_ci(x))


def test_bootstrap_is_seeded_batched_and_brackets_the_mean():
    diffs = np.array([0.05, 0.12, 0.08, 0.2, 0.02, 0.11])
    low, high = stats.bootstrap_ci(diffs, seed=3)
    assert (low, high) == stats.bootstrap_ci(diffs, seed=3)
    assert diffs.min() <= low < diffs.mean() < high <= diffs.max()
    batch = np.stack([diffs, -diffs, diffs + 1])
    lows, highs = stats.bootstrap_ci(batch, seed=3)  # one row = one comparison, same resamples
    np.testing.assert_allclose(lows, [low, -high, low + 1])
    np.testing.assert_allclose(highs, [high, -low, high + 1])


def test_the_expanded_interval_is_wider_for_few_cases():
    # Phi(-sqrt(6/5) * t_{5, 0.975}) = Phi(-2.817) = 0.00243; it tends to 0.025 with many cases.
    assert stats.expanded_tail(6) == pytest.approx(0.00243, abs=5e-5)
    assert stats.expanded_tail(10_000) == pytest.approx(0.025, abs=1e-4)
    x = np.array([0.05, 0.12, 0.08, 0.2, 0.02, 0.11])
    means = x @ stats.resample_counts(6, stats.N_RESAMPLES, 0).T / 6
    plain = np.percentile(means, [2.5, 97.5])
    low, high = stats.bootstrap_ci(x)
    assert low < plain[0] and high > plain[1]


def test_wilcoxon_p_values_by_hand():
    # n = 4, every difference positive: W- = 0, the most extreme of 2**4 sign patterns: p = 2/16.
    assert stats.wilcoxon_p(np.array([0.1, 0.2, 0.3, 0.4])) == pytest.approx(0.125)
    # n = 5: p = 2/32; n = 6: 2/64, the first below 0.05.
    assert stats.wilcoxon_p(-np.array([0.1, 0.2, 0.3, 0.4, 0.5])) == pytest.approx(0.0625)
    assert stats.wilcoxon_p(np.arange(1.0, 7.0)) == pytest.approx(0.03125)
    # ranks 1..4, W+ = 1 + 3 = 4: 7 of the 16 sign patterns have W+ <= 4, two-sided p = 14/16.
    assert stats.wilcoxon_p(np.array([1.0, -2.0, 3.0, -4.0])) == pytest.approx(0.875)
    assert stats.wilcoxon_p(np.zeros(4)) == 1.0
    assert math.isnan(stats.wilcoxon_p(np.array([])))
    # one-sided: all 5 positive, P(W+ >= 15) = 1/32
    assert stats.wilcoxon_p(np.arange(1.0, 6.0), "greater") == pytest.approx(1 / 32)


def test_wilcoxon_rows_are_separate_tests_and_zeros_are_dropped_per_row():
    rows = np.array([[0.1, 0.2, 0.3, 0.4], [1.0, -2.0, 3.0, -4.0], [0.0, 0.2, 0.3, 0.4]])
    # the third row is the 3 nonzero values alone: 2/8
    np.testing.assert_allclose(stats.wilcoxon_p(rows), [0.125, 0.875, 0.25])


def test_equivalence_p_by_hand():
    inside = np.array([0.001, -0.002, 0.003, -0.004, 0.005, 0.0])  # all within +-0.01
    # shifted by +-0.01 every value has the same sign: each one-sided p = 1/2**6
    assert stats.equivalence_p(inside, 0.01) == pytest.approx(1 / 64)
    astride = inside + np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.02])  # one value past the margin
    assert stats.equivalence_p(astride, 0.01) > 1 / 64


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 of m = 3: 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06; NaN is no test
    adjusted = stats.holm(np.array([0.01, 0.04, 0.03, np.nan]))
    np.testing.assert_allclose(adjusted[:3], [0.03, 0.06, 0.06])
    assert math.isnan(adjusted[3])
    np.testing.assert_allclose(stats.holm(np.array([[0.5, 0.9], [0.01, 0.02]])), [[1.0, 1.0], [0.02, 0.02]])


def _decide(**kw):
    args = {"n_cases": [10], "ci_low": [0.01], "ci_high": [0.05], "p_value": [0.001], "p_equivalence": [0.5]}
    args.update(kw)
    return stats.decide_family(**{k: np.asarray(v, dtype=float) for k, v in args.items()})


def test_the_verdict_rule():
    assert _decide()["verdict"][0] == stats.HIGHER
    assert _decide(ci_low=[-0.05], ci_high=[-0.01])["verdict"][0] == stats.LOWER
    # the test rejects but the interval holds 0: no verdict
    assert _decide(ci_low=[-0.001])["verdict"][0] == stats.INCONCLUSIVE
    # the interval excludes 0 but the test does not reject: the issue's [0.001, 0.002] case
    assert _decide(p_value=[0.5])["verdict"][0] == stats.INCONCLUSIVE
    # equivalence only by its own test
    assert _decide(p_value=[0.5], p_equivalence=[0.01])["verdict"][0] == stats.EQUIVALENT
    # fewer than 5 cases: never a verdict, whatever the numbers
    few = _decide(n_cases=[4], p_value=[1e-9])
    assert few["verdict"][0] == stats.TOO_FEW and math.isnan(few["p_adjusted"][0])


def test_holm_decides_within_the_family():
    # alone, p = 0.03 is a verdict; with a second test (p = 0.2) Holm makes it 0.06
    family = _decide(
        n_cases=[10, 10], ci_low=[0.01] * 2, ci_high=[0.05] * 2, p_value=[0.03, 0.2], p_equivalence=[0.5] * 2
    )
    assert list(family["verdict"]) == [stats.INCONCLUSIVE, stats.INCONCLUSIVE]
    assert family["p_adjusted"][0] == pytest.approx(0.06)
    # a comparison with too few cases is not part of the family's correction
    mixed = _decide(
        n_cases=[10, 3], ci_low=[0.01] * 2, ci_high=[0.05] * 2, p_value=[0.03, 0.2], p_equivalence=[0.5] * 2
    )
    assert list(mixed["verdict"]) == [stats.HIGHER, stats.TOO_FEW]


def test_rank_stability_by_hand():
    # Two strategies, the first better on every case: rank 1 in every resample.
    sure = stats.rank_stability(np.array([[0.9, 0.8, 0.7], [0.5, 0.4, 0.3]]))
    np.testing.assert_allclose(sure["p_first"], [1.0, 0.0])
    np.testing.assert_allclose(sure["mean_rank"], [1.0, 2.0])
    # Identical numbers: every resample a tie, P(rank 1) shared and the average rank for both.
    tied = stats.rank_stability(np.array([[0.5, 0.6, 0.7]] * 3))
    np.testing.assert_allclose(tied["p_first"], [1 / 3] * 3)
    np.testing.assert_allclose(tied["mean_rank"], [2.0] * 3)
    # Each better on one of two cases by the same amount: ties when both cases are drawn (1/2),
    # otherwise whoever owns the drawn case wins: P(rank 1) = 1/2 each, interval 1-2.
    split = stats.rank_stability(np.array([[1.0, 0.0], [0.0, 1.0]]))
    np.testing.assert_allclose(split["p_first"], [0.5, 0.5], atol=0.03)
    assert list(split["rank_low"]) == [1.0, 1.0] and list(split["rank_high"]) == [2.0, 2.0]


# --- long tables ------------------------------------------------------------------------------


def _long(values: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """{strategy: {case: [score per seed]}} as a long table."""
    return pd.DataFrame(
        [
            {"strategy": s, "seed": k, "case": c, "dsc": v}
            for s, cases in values.items()
            for c, seeds in cases.items()
            for k, v in enumerate(seeds)
        ]
    )


def test_case_means_average_seeds_within_each_case():
    long = _long({"a": {"c1": [0.2, 0.4], "c2": [0.6, np.nan]}, "b": {"c1": [0.1]}})
    means = stats.case_means(long, "dsc").set_index(["strategy", "case"])
    assert means.loc[("a", "c1"), "dsc"] == pytest.approx(0.3) and means.loc[("a", "c1"), "n_seeds"] == 2
    assert means.loc[("a", "c2"), "dsc"] == pytest.approx(0.6) and means.loc[("a", "c2"), "n_seeds"] == 1
    assert means.loc[("b", "c1"), "n_seeds"] == 1


def test_pairs_are_matched_by_case_id_not_by_position():
    values = {"a": {f"c{i}": [0.5 + i / 100, 0.5 + i / 100 + 0.002] for i in range(8)}}
    values["b"] = {f"c{i}": [0.4 + i / 100] for i in reversed(range(8))}  # other order, one seed
    values["b"].pop("c3")  # b lacks a case
    long = _long(values).sample(frac=1.0, random_state=0)  # row order carries nothing
    row = stats.paired_rows(stats.case_means(long, "dsc"), [("a", "b")], "dsc").iloc[0]
    assert row["n_cases"] == 7 and (row["n_seeds"], row["n_seeds_reference"]) == (2, 1)
    assert row["mean"] == pytest.approx(0.101)  # every case: 0.101 apart
    assert row["p_value"] == pytest.approx(2 / 2**7)


def test_summary_over_cases_by_hand():
    long = _long({"a": {"c1": [0.2, 0.4], "c2": [0.6, 0.8], "c3": [0.5, 0.5]}})
    row = stats.summary_over_cases(long, "dsc").iloc[0]
    assert (row["n_cases"], row["n_seeds"]) == (3, 2)
    assert row["mean"] == pytest.approx((0.3 + 0.7 + 0.5) / 3)
    # seed 0 means (0.2+0.6+0.5)/3, seed 1 (0.4+0.8+0.5)/3: their sample sd
    assert row["sd_seeds"] == pytest.approx(np.std([1.3 / 3, 1.7 / 3], ddof=1))
    low, high = stats.bootstrap_ci(np.array([0.3, 0.7, 0.5]))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))


def test_ranking_uses_the_cases_every_strategy_has():
    long = _long({"a": {"c1": [0.9], "c2": [0.9], "c3": [0.1]}, "b": {"c1": [0.5], "c2": [0.5]}})
    ranks = stats.ranking(stats.case_means(long, "dsc"), "dsc").set_index("strategy")
    assert list(ranks["n_cases"]) == [2, 2]  # c3: only a has it
    assert ranks.loc["a", "p_first"] == 1.0 and ranks.loc["a", "mean"] == pytest.approx(0.9)


def test_tied_differences_get_scipys_exact_permutation_p_values():
    """Ties (common per organ) take our exact path; scipy's own permutation test is the reference."""
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(0)
    for _ in range(8):  # scipy's reference is slow: 0.1 s per test
        d = rng.choice([-0.3, -0.2, -0.1, 0.1, 0.2, 0.3, 0.5], size=int(rng.integers(2, 10)))
        for alternative in ("two-sided", "greater", "less"):
            expect = wilcoxon(d, alternative=alternative).pvalue  # scipy: a permutation test with ties
            assert stats.wilcoxon_p(d, alternative) == pytest.approx(expect, rel=1e-12), (d, alternative)
    # by hand: [1, 1, -2] -> ranks 1.5, 1.5, 3; W+ = 3; the 8 patterns give W+ 0, 1.5, 1.5, 3, 3, 4.5, 4.5, 6
    assert stats.wilcoxon_p(np.array([1.0, 1.0, -2.0]), "greater") == pytest.approx(5 / 8)
