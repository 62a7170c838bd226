"""Paired differences, bootstrap intervals and Wilcoxon p-values on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from clipseg_bench.study.results import paired_differences
from clipseg_bench.study.stats import bootstrap_ci, compare, paired, wilcoxon_p


def test_paired_keeps_common_keys_in_order_and_drops_nan():
    values = {("b", 0): 0.5, ("a", 0): 0.9, ("a", 1): float("nan"), ("c", 0): 0.1}
    reference = {("a", 0): 0.4, ("b", 0): 0.7, ("a", 1): 0.3}  # ("c", 0) has no partner
    np.testing.assert_allclose(paired(values, reference), [0.5, -0.2])


def test_bootstrap_of_two_values_by_hand():
    # Resampled means of [0, 1] are 0, 0.5, 1 with probability 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% percentiles of 10,000 of them are 0 and 1.
    assert bootstrap_ci(np.array([0.0, 1.0])) == (0.0, 1.0)


def test_bootstrap_degenerate_and_empty_samples():
    assert bootstrap_ci(np.array([0.3])) == pytest.approx((0.3, 0.3))
    assert bootstrap_ci(np.array([0.1, 0.1, 0.1])) == pytest.approx((0.1, 0.1))
    assert all(math.isnan(x) for x in bootstrap_ci(np.array([])))


def test_bootstrap_is_seeded_and_brackets_the_mean():
    diffs = np.array([0.05, 0.12, 0.08, 0.2, 0.02, 0.11])
    low, high = bootstrap_ci(diffs, seed=3)
    assert (low, high) == bootstrap_ci(diffs, seed=3)
    assert diffs.min() <= low < diffs.mean() < high <= diffs.max()


def test_wilcoxon_p_values_by_hand():
    # n = 4, every difference positive: W- = 0, the most extreme of 2**4 sign patterns: p = 2/16.
    assert wilcoxon_p(np.array([0.1, 0.2, 0.3, 0.4])) == pytest.approx(0.125)
    # n = 5: p = 2/32.
    assert wilcoxon_p(-np.array([0.1, 0.2, 0.3, 0.4, 0.5])) == pytest.approx(0.0625)
    # ranks 1..4, W+ = 1 + 3 = 4: 7 of the 16 sign patterns have W+ <= 4, two-sided p = 14/16.
    assert wilcoxon_p(np.array([1.0, -2.0, 3.0, -4.0])) == pytest.approx(0.875)
    assert wilcoxon_p(np.zeros(4)) == 1.0
    assert math.isnan(wilcoxon_p(np.array([])))


def test_compare_marks_an_interval_holding_zero_as_within_noise():
    shifted = compare(np.array([0.1, 0.12, 0.09, 0.11]))
    assert shifted["n"] == 4 and shifted["mean"] == pytest.approx(0.105)
    assert not shifted["within_noise"] and shifted["ci_low"] > 0
    noise = compare(np.array([0.02, -0.01, -0.02, 0.01]))
    assert noise["within_noise"] and noise["ci_low"] < 0 < noise["ci_high"]
    assert compare(np.array([]))["within_noise"]
    assert compare(np.array([0.5]))["within_noise"]  # one pair cannot tell a difference from noise


def _frames():
    """An untrained baseline and two strategies on 2 val cases x 2 seeds (DSC; NSD = DSC / 2)."""
    base = np.array([0.2, 0.3, 0.4, 0.5])
    dsc = {
        "zeroshot": base,
        "full": base + 0.1,
        "lora": base + 0.1 + np.array([0.02, -0.01, 0.01, -0.01]),  # best by 0.0025 on average
    }
    pairs = [("c1", 0), ("c2", 0), ("c1", 1), ("c2", 1)]
    scores = pd.DataFrame(
        [
            {"strategy": s, "train_cases": "all", "seed": seed, "case": case, "dsc": v, "nsd": v / 2}
            for s, values in dsc.items()
            for (case, seed), v in zip(pairs, values)
        ]
    )
    table = pd.DataFrame(
        [
            {
                "strategy": s,
                "train_cases": "all",
                "seed": seed,
                "status": "finished",
                "trainable_params": 0 if s == "zeroshot" else 1000,
                "val_dsc3d": float(np.mean(values[[i for i, p in enumerate(pairs) if p[1] == seed]])),
            }
            for s, values in dsc.items()
            for seed in (0, 1)
        ]
    )
    return table, scores


def test_paired_differences_against_the_untrained_and_the_best_strategy():
    table, scores = _frames()
    out = paired_differences(table, scores)
    dsc = out[out["metric"] == "dsc"].set_index(["strategy", "reference"])
    # references come from the numbers: the untrained one, and the best mean val 3D DSC
    assert set(dsc.index) == {("full", "zeroshot"), ("lora", "zeroshot"), ("full", "lora")}
    assert dsc.loc[("full", "zeroshot"), "reference_kind"] == "untrained"
    assert dsc.loc[("full", "lora"), "reference_kind"] == "best"
    row = dsc.loc[("full", "zeroshot")]
    assert row["n"] == 4 and row["mean"] == pytest.approx(0.1)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.1, 0.1))
    assert row["p_value"] == pytest.approx(0.125) and not row["within_noise"]
    close = dsc.loc[("full", "lora")]  # differences -0.02, +0.01, -0.01, +0.01
    assert close["mean"] == pytest.approx(-0.0025) and close["within_noise"]
    nsd = out[out["metric"] == "nsd"].set_index(["strategy", "reference"])
    assert nsd.loc[("full", "zeroshot"), "mean"] == pytest.approx(0.05)


def test_paired_differences_pair_only_the_same_case_and_seed_and_level():
    table, scores = _frames()
    scores.loc[(scores["strategy"] == "full") & (scores["seed"] == 1), "seed"] = 7  # no partner now
    other = scores[scores["strategy"] == "full"].assign(train_cases="1", dsc=0.0)  # another level
    out = paired_differences(table, pd.concat([scores, other]))
    row = out[(out["strategy"] == "full") & (out["reference"] == "zeroshot") & (out["metric"] == "dsc")]
    assert row["n"].item() == 2 and row["mean"].item() == pytest.approx(0.1)
