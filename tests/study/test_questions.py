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
from clipseg_bench.study.report import write_report
from clipseg_bench.study.stats import compare

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
        metrics_path.write_text(json.dumps(m))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "train_cases": train_cases}))
    info = json.loads((run / "run.json").read_text())
    info["train_case_ids"] = [f"t{i}" for i in range(train_cases or n_train)]
    (run / "run.json").write_text(json.dumps(info))


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
        assert_pm(table.loc[strategy, "Val Dice"], values, 4)
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
    table = md_table((study / "results.md").read_text(), "Prompt reliance (val 2D Dice)").set_index(
        "Strategy"
    )
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
    for strategy, column, pattern in (
        ("full", "1 case", "full-s?-n1"),
        ("decoder", "all (6) cases", "decoder-s?"),
    ):
        values = [m["summary"]["dsc"] for m in _metrics(study, pattern)]
        assert_pm(table.loc[strategy, column], values, 3)
    assert (study / "plots" / "data_efficiency.png").stat().st_size > 0
    assert "How much labelled data" in (study / "report.html").read_text()


def test_paired_differences_are_computed_from_the_per_case_scores(study):
    table = md_table((study / "results.md").read_text(), "Paired differences (over val case and seed)")
    row = table[
        (table["Training cases"] == "all")
        & (table["Strategy"] == "full")
        & (table["Reference"].str.startswith("zeroshot"))
        & (table["Metric"] == "val 3D DSC")
    ].iloc[0]
    diffs = []
    for seed in (0, 1):
        runs = {
            s: json.loads((study / "runs" / f"{s}-s{seed}" / "metrics.json").read_text())
            for s in ("full", "zeroshot")
        }
        for case in CASES:
            mean = {
                s: statistics.fmean(o["dsc"] for o in m["per_case"][case].values()) for s, m in runs.items()
            }
            diffs.append(mean["full"] - mean["zeroshot"])
    expect = compare(np.array(diffs))
    assert int(row["Pairs"]) == 6
    assert float(row["Mean difference"]) == pytest.approx(expect["mean"], abs=5e-5)
    low, high = (float(x) for x in row["95% CI"].strip("[]").split(","))
    assert (low, high) == pytest.approx((expect["ci_low"], expect["ci_high"]), abs=5e-5)
    assert float(row["Wilcoxon p"]) == pytest.approx(expect["p_value"], rel=5e-3)  # 3 digits
    assert row["Verdict"] == (
        "within noise" if expect["within_noise"] else "higher" if expect["mean"] > 0 else "lower"
    )
    assert row["Reference"].startswith("zeroshot (untrained")  # found by its 0 trainable parameters
    best = max(
        ("zeroshot", "full", "decoder"),
        key=lambda s: statistics.fmean(m["summary"]["dsc"] for m in _metrics(study, f"{s}-s?")),
    )
    at_all = table[table["Training cases"] == "all"]
    assert {r for r in at_all["Reference"] if "best" in r} == {
        f"{best} (" + ("untrained, " if best == "zeroshot" else "") + "best)"
    }


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
