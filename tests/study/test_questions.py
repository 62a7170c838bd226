"""The report's answers to the study's questions, on synthetic BENCH folders: prompt reliance, data
efficiency and paired differences, every number traced back to the run files."""

from __future__ import annotations

import json
import shutil
import statistics
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_report import assert_pm, make_run, md_table

from clipseg_bench.organs import ORGANS
from clipseg_bench.study import stats
from clipseg_bench.study.report import write_report

VARIANTS = ("name", "photo", "ct", "synonym")
CASES = ("case_a", "case_b", "case_c")


def add_study_numbers(run: Path, *, train_cases: int | None, n_train: int = 6) -> None:
    """Give a make_run folder what evaluate and train now write: reliance, variants, three val
    cases, the training-case count (config) and the cases trained on (run.json)."""
    rng = np.random.default_rng([zlib.crc32(run.name.encode())])
    metrics_path = run / "metrics.json"
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        wrong = round(float(rng.uniform(0.0, 0.3)), 5)
        m["dice2d_wrong_prompt"] = wrong
        m["prompt_reliance"] = m["dice2d"] - wrong
        m["prompt_variants"] = {v: round(float(rng.uniform(0.2, 0.8)), 5) for v in VARIANTS}
        m["per_case"] = {
            c: {o.key: {k: round(float(rng.uniform(0.2, 0.9)), 5) for k in ("dsc", "nsd")} for o in ORGANS}
            for c in CASES
        }
        m["summary"] = summarize(m["per_case"])
        metrics_path.write_text(json.dumps(m))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "train_cases": train_cases}))
    info = json.loads((run / "run.json").read_text())
    info["train_case_ids"] = [f"t{i}" for i in range(train_cases or n_train)]
    (run / "run.json").write_text(json.dumps(info))


def summarize(per_case: dict) -> dict:
    """metrics.json summary as evaluation.metrics.summarize makes it (not imported: MONAI start-up)."""
    organs = [o.key for o in ORGANS]
    return {
        **{k: statistics.fmean(s[k] for c in per_case.values() for s in c.values()) for k in ("dsc", "nsd")},
        "per_organ": {
            o: {k: statistics.fmean(c[o][k] for c in per_case.values()) for k in ("dsc", "nsd")}
            for o in organs
        },
    }


def case_means(bench: Path, strategy: str, suffix: str = "", metric: str = "dsc") -> dict[str, float]:
    """Each val case's organ-mean score, averaged over the strategy's seeds, from the metrics.json files."""
    runs = _metrics(bench, f"{strategy}-s?{suffix}")
    return {
        c: statistics.fmean(statistics.fmean(o[metric] for o in m["per_case"][c].values()) for m in runs)
        for c in runs[0]["per_case"]
    }


def make_study(bench: Path, strategies=("zeroshot", "full", "decoder"), seeds=(0, 1), counts=(1, None)):
    for s in strategies:
        for n in counts:
            for seed in seeds:
                run = make_run(bench, s, seed)
                if n is not None:
                    run = run.rename(run.with_name(f"{run.name}-n{n}"))
                add_study_numbers(run, train_cases=n)
    return bench


def _metrics(bench: Path, pattern: str) -> list[dict]:
    return [json.loads((r / "metrics.json").read_text()) for r in sorted((bench / "runs").glob(pattern))]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    b = make_study(tmp_path_factory.mktemp("study") / "B")
    write_report([b])
    return b


def test_strategy_tables_use_the_full_training_set_only(study):
    md = (study / "results.md").read_text()
    table = md_table(md, "Strategies").set_index("Strategy")
    for strategy in ("full", "decoder"):
        values = [m["dice2d"] for m in _metrics(study, f"{strategy}-s?")]  # not the -n1 runs
        assert len(values) == 2
        assert_pm(table.loc[strategy, "Val Dice ± sd(seeds)"], values, 4)
    summary = pd.read_csv(study / "results_summary.csv")
    assert list(summary["n_seeds"]) == [2, 2, 2]


def test_results_csv_has_the_training_cases_of_every_run(study):
    table = pd.read_csv(study / "results.csv", dtype={"train_cases": str})
    assert len(table) == 12
    assert list(table["train_cases"][:4]) == ["1", "1", "all", "all"]  # fewest cases first, then seeds
    assert list(table["n_train_cases"][:4]) == [1, 1, 6, 6]
    row = table[(table["strategy"] == "full") & (table["train_cases"] == "1")].iloc[0]
    m = json.loads((study / row["run_dir"] / "metrics.json").read_text())
    assert row["prompt_reliance"] == m["prompt_reliance"]
    assert row["prompt_variant_synonym"] == m["prompt_variants"]["synonym"]


def test_reliance_table_equals_the_metrics_json(study):
    table = md_table((study / "results.md").read_text(), "Prompt reliance").set_index("Strategy")
    assert list(table.index) == ["zeroshot", "full", "decoder"]
    for strategy in table.index:
        runs = _metrics(study, f"{strategy}-s?")
        assert_pm(table.loc[strategy, "Prompt reliance"], [m["prompt_reliance"] for m in runs], 3)
        assert_pm(table.loc[strategy, "Wrong organ's name"], [m["dice2d_wrong_prompt"] for m in runs], 3)
        assert_pm(table.loc[strategy, "Wording: synonym"], [m["prompt_variants"]["synonym"] for m in runs], 3)
    assert (study / "plots" / "reliance.png").stat().st_size > 0
    page = (study / "report.html").read_text()
    assert "Does the model read its prompt?" in page and "reliance.png" in page


def test_data_efficiency_table_and_plot(study):
    table = md_table((study / "results.md").read_text(), "Data efficiency (val 3D DSC)").set_index("Strategy")
    assert list(table.columns) == ["1 case", "all (6) cases"]
    for strategy, column, suffix in (("full", "1 case", "-n1"), ("decoder", "all (6) cases", "")):
        # the mean over val cases of each case's seed average [its interval over cases]; sd over seeds
        per_case = list(case_means(study, strategy, suffix).values())
        low, high = stats.bootstrap_ci(np.array(per_case))
        mean_cell, sd_cell = table.loc[strategy, column].split("; sd(seeds) ")
        assert mean_cell == f"{statistics.fmean(per_case):.3f} [{low:.3f}, {high:.3f}]"
        run_means = [m["summary"]["dsc"] for m in _metrics(study, f"{strategy}-s?{suffix}")]
        assert sd_cell == f"{statistics.stdev(run_means):.3f}"
    assert (study / "plots" / "data_efficiency.png").stat().st_size > 0
    assert "How much labelled data" in (study / "report.html").read_text()


def test_paired_differences_are_computed_over_seed_averaged_cases(study):
    paired = pd.read_csv(study / "paired.csv", dtype={"train_cases": str}, keep_default_na=False)
    row = paired[
        (paired["train_cases"] == "all")
        & (paired["strategy"] == "full")
        & (paired["reference"] == "zeroshot")
        & (paired["metric"] == "dsc")
    ].iloc[0]
    full, zero = case_means(study, "full"), case_means(study, "zeroshot")
    diffs = np.array([full[c] - zero[c] for c in sorted(CASES)])
    assert row["n_cases"] == 3 and (row["n_seeds"], row["n_seeds_reference"]) == (
        2,
        2,
    )  # 3 cases, not 6 pairs
    assert row["mean"] == pytest.approx(diffs.mean(), abs=1e-12)
    low, high = stats.bootstrap_ci(diffs)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((float(low), float(high)), abs=1e-12)
    assert row["p_value"] == pytest.approx(float(stats.wilcoxon_p(diffs)))
    assert row["p_value"] >= 0.25  # 3 cases: 2/2**3 at best
    assert row["verdict"] == "too few cases to test" and row["p_adjusted"] == ""  # not in the family
    assert row["family"] == "vs untrained" and row["equivalence_margin"] == 0.01
    # both families, both metrics, both levels: 2 vs zeroshot + 1 trained pair
    assert len(paired) == 2 * 2 * 3
    assert set(paired["family"]) == {"vs untrained", "trained pairs"}
    md = md_table((study / "results.md").read_text(), "Paired differences (over val cases, Holm-corrected)")
    shown = md[(md["Training cases"] == "all") & (md["Comparison"] == "full − zeroshot")].iloc[0]
    assert shown["Mean difference [95% CI over cases]"] == f"{diffs.mean():+.4f} [{low:+.4f}, {high:+.4f}]"
    assert shown["Verdict"] == "too few cases to test" and shown["Cases"] == "3"
    page = (study / "report.html").read_text()
    assert "No comparison can be tested: 3 val cases" in page  # the findings say so first
    assert page.index("Findings") < page.index("<h2>Strategies</h2>")


def test_a_benchmark_from_before_the_new_axis_loads_as_all(tmp_path):
    b = tmp_path / "old"
    for seed in (0, 1):
        make_run(b, "full", seed)  # config.yaml without train_cases, run.json without case ids
    write_report([b])
    table = pd.read_csv(b / "results.csv", dtype={"train_cases": str})
    assert list(table["train_cases"]) == ["all", "all"] and table["n_train_cases"].isna().all()
    md = (b / "results.md").read_text()
    assert "## Prompt reliance" not in md and "## Data efficiency" not in md  # nothing to show
    assert not (b / "plots" / "data_efficiency.png").exists()


def test_shards_of_a_study_merge(tmp_path):
    whole = make_study(tmp_path / "whole")
    a, b = tmp_path / "a", tmp_path / "b"
    for run in sorted((whole / "runs").iterdir()):
        shutil.copytree(run, (a if run.name.endswith("-n1") else b) / "runs" / run.name)
    write_report([whole])
    write_report([a, b], out=tmp_path / "merged")
    x = pd.read_csv(whole / "results.csv").drop(columns=["bench_dir"])
    y = pd.read_csv(tmp_path / "merged" / "results.csv").drop(columns=["bench_dir"])
    pd.testing.assert_frame_equal(x, y)
    before_runs = (whole / "results.md").read_text().split("## Runs")[0]
    assert (tmp_path / "merged" / "results.md").read_text().split("## Runs")[0] == before_runs
