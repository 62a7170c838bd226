"""The report's verdicts end to end, on a BENCH folder whose per-case scores are built so that every
verdict is known: paired.csv, ranking.csv, organ_map.csv, the tables and the findings."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_report import make_run

from clipseg_bench.organs import ORGANS
from clipseg_bench.study import stats
from clipseg_bench.study.report import write_report

CASES = [f"case{c}" for c in range(8)]
ALTERNATE = np.array([1, -1] * 4, dtype=float)


def case_score(strategy: str, c: int) -> float:
    """Each case's seed-averaged score: full +0.1 over zeroshot on every case, decoder within
    +-0.002 of it (equivalent at 0.01), lora full's +-0.03 (inconclusive against full)."""
    base = 0.4 + 0.05 * c
    return (
        base
        + {
            "zeroshot": 0.0,
            "full": 0.1,
            "decoder": 0.002 * ALTERNATE[c],
            "lora": 0.1 + 0.03 * ALTERNATE[c],
        }[strategy]
    )


def _write_scores(run: Path, strategy: str, seed: int, cases: list[str]) -> None:
    noise = 0.0 if strategy == "zeroshot" else (0.001 if seed == 0 else -0.001)  # cancels in the average
    per_case = {
        case: {
            o.key: {
                "dsc": case_score(strategy, int(case[4:])) + noise,
                "nsd": case_score(strategy, int(case[4:])) - 0.05,
            }
            for o in ORGANS
        }
        for case in cases
    }
    m = json.loads((run / "metrics.json").read_text())
    m["per_case"] = per_case
    m["organs_present"] = {case: [o.key for o in ORGANS[:10]] for case in cases}
    m["summary"] = {
        "dsc": float(np.mean([s["dsc"] for c in per_case.values() for s in c.values()])),
        "nsd": 0.5,
    }
    (run / "metrics.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    b = tmp_path_factory.mktemp("verdicts") / "B"
    for strategy, seeds in (("zeroshot", (0,)), ("full", (0, 1)), ("decoder", (0, 1)), ("lora", (0, 1))):
        for seed in seeds:
            cases = CASES[:7] if strategy == "decoder" else CASES  # decoder lost a case
            _write_scores(make_run(b, strategy, seed), strategy, seed, cases)
    write_report([b])
    return b


def _paired(bench: Path) -> pd.DataFrame:
    p = pd.read_csv(bench / "paired.csv", dtype={"train_cases": str}, keep_default_na=False)
    return p[p["metric"] == "dsc"].set_index(["strategy", "reference"])


def test_every_verdict_is_the_designed_one(bench):
    p = _paired(bench)
    assert p.loc[("full", "zeroshot"), "verdict"] == "higher"
    assert p.loc[("lora", "zeroshot"), "verdict"] == "higher"
    assert p.loc[("decoder", "zeroshot"), "verdict"] == "equivalent"
    assert p.loc[("full", "lora"), "verdict"] == "inconclusive"  # +-0.03: no difference, none ruled out
    assert p.loc[("full", "decoder"), "verdict"] == "higher"
    assert p.loc[("decoder", "lora"), "verdict"] == "lower"
    # the families, fixed in advance: every strategy against the one that trains nothing, and all
    # pairs of trained strategies; no reference picked from the numbers
    vs = p[p["family"] == "vs untrained"].index
    assert set(vs) == {("full", "zeroshot"), ("decoder", "zeroshot"), ("lora", "zeroshot")}
    trained = p[p["family"] == "trained pairs"].index
    assert set(trained) == {("full", "decoder"), ("full", "lora"), ("decoder", "lora")}
    assert (p.loc[("full", "zeroshot"), "mean"]) == pytest.approx(0.1, abs=1e-12)


def test_the_one_seed_baseline_pairs_every_case_and_a_shorter_row_says_so(bench):
    p = _paired(bench)
    row = p.loc[("full", "zeroshot")]
    assert (row["n_cases"], row["n_seeds"], row["n_seeds_reference"]) == (8, 2, 1)
    assert row["note"] == ""
    assert p.loc[("decoder", "zeroshot"), "n_cases"] == 7
    assert p.loc[("decoder", "zeroshot"), "note"] == "paired on 7 of the 8 val cases"


def test_p_values_are_holm_adjusted_within_each_family(bench):
    p = _paired(bench).reset_index()
    for _, family in p.groupby("family"):
        np.testing.assert_allclose(
            family["p_adjusted"].astype(float), stats.holm(family["p_value"].astype(float))
        )
        np.testing.assert_allclose(
            family["p_equivalence_adjusted"].astype(float), stats.holm(family["p_equivalence"].astype(float))
        )
    # 8 cases all one way: 2/2**8; Holm over the family of three
    row = p[(p["strategy"] == "full") & (p["reference"] == "zeroshot")].iloc[0]
    assert row["p_value"] == pytest.approx(2 / 256)
    assert float(row["p_adjusted"]) == pytest.approx(3 * 2 / 256)


def test_the_findings_state_only_the_verdicts_that_hold(bench):
    md = (bench / "results.md").read_text()
    findings = md.split("## Findings\n", 1)[1].split("\n## ", 1)[0]
    p = _paired(bench)
    full = p.loc[("full", "zeroshot")]
    assert (
        f"full is higher than zeroshot by +0.100 [{full['ci_low']:+.3f}, {full['ci_high']:+.3f}] "
        f"(8 cases, Holm p = {float(full['p_adjusted']):.2g})" in findings
    )
    assert "Equivalent within ±0.01 (two one-sided tests, Holm): decoder and zeroshot (7 cases)" in findings
    assert "Inconclusive (neither a difference nor equivalence within ±0.01 shown): full vs lora." in findings
    assert not re.search(r"full is \w+ than lora|lora is \w+ than full", findings)  # never a difference
    assert "Ranking by val 3D DSC over 1,000 bootstrap resamples of the 7 cases" in findings
    page = (bench / "report.html").read_text()
    assert page.index("full is higher than zeroshot") < page.index("<h2>Strategies</h2>")


def test_ranking_csv_is_the_bootstrap_of_the_case_means(bench):
    ranking = pd.read_csv(bench / "ranking.csv", dtype={"train_cases": str})
    dsc = ranking[ranking["metric"] == "dsc"].set_index("strategy")
    assert list(dsc.index) == ["zeroshot", "full", "decoder", "lora"]
    assert set(dsc["n_cases"]) == {7}  # the cases every strategy has
    matrix = np.array([[case_score(s, c) for c in range(7)] for s in dsc.index])
    expect = stats.rank_stability(matrix)
    np.testing.assert_allclose(dsc["p_first"], expect["p_first"], atol=1e-12)
    np.testing.assert_allclose(dsc["mean_rank"], expect["mean_rank"], atol=1e-12)
    assert dsc.loc["zeroshot", "p_first"] == 0 and dsc.loc["zeroshot", "rank_low"] >= 3
    assert (bench / "plots" / "ranking.png").stat().st_size > 0


def test_the_organ_map_is_holm_corrected_over_the_whole_map(bench):
    organ_map = pd.read_csv(bench / "organ_map.csv", dtype={"train_cases": str}, keep_default_na=False)
    dsc = organ_map[organ_map["metric"] == "dsc"]
    assert len(dsc) == 13 * 6  # every organ, both families
    np.testing.assert_allclose(dsc["p_adjusted"].astype(float), stats.holm(dsc["p_value"].astype(float)))
    # the same 2/256 per organ, corrected over 78 tests: no longer a verdict
    liver = dsc[
        (dsc["organ"] == "liver") & (dsc["strategy"] == "full") & (dsc["reference"] == "zeroshot")
    ].iloc[0]
    assert liver["p_value"] == pytest.approx(2 / 256) and liver["verdict"] == "inconclusive"
    assert (bench / "plots" / "organ_map.png").stat().st_size > 0
    assert "No per-organ comparison holds a verdict after correction" in (bench / "report.html").read_text()


def test_the_summary_shows_the_mean_over_cases_its_interval_and_the_sd_over_seeds(bench):
    over = pd.read_csv(bench / "over_cases.csv", dtype={"train_cases": str})
    full = over[(over["strategy"] == "full") & (over["metric"] == "dsc")].iloc[0]
    values = np.array([case_score("full", c) for c in range(8)])
    low, high = stats.bootstrap_ci(values)
    assert full["mean"] == pytest.approx(values.mean())
    assert (full["ci_low"], full["ci_high"]) == pytest.approx((low, high))
    assert full["sd_seeds"] == pytest.approx(np.std([values.mean() + 0.001, values.mean() - 0.001], ddof=1))
    present = over[(over["strategy"] == "full") & (over["metric"] == "dsc_present")].iloc[0]
    assert present["mean"] == pytest.approx(values.mean())  # every organ scores the case's value
    assert math.isnan(over[(over["strategy"] == "zeroshot") & (over["metric"] == "dsc")]["sd_seeds"].iloc[0])


def test_every_shown_table_has_its_csv(bench):
    for name in (
        "paired",
        "ranking",
        "organ_map",
        "over_cases",
        "per_organ",
        "efficiency",
        "reliance",
        "cleanup",
        "audit",
        "provenance_code",
        "provenance_hardware",
        "settings_shared",
        "results",
    ):
        assert (bench / f"{name}.csv").stat().st_size > 0, name


def test_a_narrower_margin_changes_the_equivalence_and_is_recorded(bench, tmp_path):
    write_report([bench], out=tmp_path / "narrow", equivalence_margin=0.001)
    p = _paired(tmp_path / "narrow")
    assert p.loc[("decoder", "zeroshot"), "verdict"] == "inconclusive"  # +-0.002 is outside +-0.001
    assert set(p["equivalence_margin"]) == {0.001}
    assert p.loc[("full", "zeroshot"), "verdict"] == "higher"  # the margin changes nothing else


def test_the_findings_say_when_a_family_cannot_reach_a_verdict():
    from clipseg_bench.study import evidence

    # Holm's smallest p is m * 2/2**n: 3 comparisons need 7 cases, 5 need 8, 10 need 9, 1 needs 6
    assert [evidence.cases_needed(m) for m in (1, 3, 5, 10)] == [6, 7, 8, 9]
    rows = pd.DataFrame(
        {
            "train_cases": "all",
            "family": "vs untrained",
            "metric": "dsc",
            "strategy": ["a", "b", "c"],
            "reference": "zeroshot",
            "n_cases": 6,
            "mean": 0.08,
            "ci_low": 0.06,
            "ci_high": 0.1,
            "p_adjusted": 3 * 2 / 64,
            "verdict": "inconclusive",
        }
    )
    found = evidence.findings(rows, pd.DataFrame(columns=["train_cases", "metric"]), 0.01)[0]["sentences"]
    assert found[0] == (
        "Against the untrained baseline: no difference can be shown with 6 cases and 3 comparisons "
        "(the smallest Holm-adjusted p is 3 × 2/2^6 = 0.0938); 7 cases are needed."
    )
    rows["n_cases"] = 7  # 3 x 2/128 = 0.047: reachable, nothing to say
    assert not any(
        "can be shown" in s
        for s in evidence.findings(rows, pd.DataFrame(columns=["train_cases", "metric"]), 0.01)[0][
            "sentences"
        ]
    )
