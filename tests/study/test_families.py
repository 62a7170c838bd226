"""Several models in one benchmark (issue 23): the matrix names each cell's model, and one report shows
the models side by side, with paired tests within each model and across models on the same cases."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_questions import summarize
from test_report import make_run, md_table

from clipseg_bench.errors import FieldError
from clipseg_bench.organs import ORGANS
from clipseg_bench.study import stats
from clipseg_bench.study.matrix import cells, parse_models
from clipseg_bench.study.report import write_report
from clipseg_bench.study.results import Cell, run_name

CASES = [f"case_{i}" for i in range(8)]  # 8 cases: a Holm pair of 2 can be decided (2 x 2/2^8)
MODELS = {"tiny": "clipseg", "sam3-tiny": "sam3"}
SHIFT = 0.2  # the known truth: every SAM 3 run scores this much more on every (case, organ)


def family_run(bench: Path, strategy: str, seed: int, model: str) -> Path:
    """A make_run folder of ``model`` named as `benchmark --model tiny,sam3-tiny` names it, with 8 val
    cases whose scores depend on (strategy, seed) only, plus :data:`SHIFT` for SAM 3."""
    run = make_run(bench, strategy, seed)
    run = run.rename(run.with_name(run_name(strategy, seed, model=model)))
    rng = np.random.default_rng([zlib.crc32(strategy.encode()), seed])
    shift = SHIFT if MODELS[model] == "sam3" else 0.0
    per_case = {
        c: {o.key: {k: float(rng.uniform(0.2, 0.6)) + shift for k in ("dsc", "nsd")} for o in ORGANS}
        for c in CASES
    }
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(
        json.dumps({**metrics, "per_case": per_case, "summary": summarize(per_case)})
    )
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "model": model, "model_family": MODELS[model]}))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "model": model, "out": str(run)}))
    return run


@pytest.fixture(scope="module")
def two_families(tmp_path_factory) -> Path:
    bench = tmp_path_factory.mktemp("families") / "B"
    for model in MODELS:
        for strategy in ("zeroshot", "full"):
            for seed in (0, 1):
                family_run(bench, strategy, seed, model)
    write_report([bench])
    return bench


def test_the_matrix_names_each_cells_model():
    assert cells(["full"], [0], models=["tiny"]) == [Cell("full", 0)]  # one model: as before
    two = cells(["zeroshot", "full"], [0], models=["tiny", "facebook/sam3"])
    assert [c.model for c in two] == ["tiny", "facebook--sam3"] * 2
    assert [c.name for c in two[:2]] == ["zeroshot-s0@tiny", "zeroshot-s0@facebook--sam3"]
    assert (
        run_name("lora", 1, 5, 2, model="/data/models/sam3") == "lora-s1-f2-n5@sam3"
    )  # a folder by its name
    assert Cell.of(["lora", 1, None, None, "sam3-tiny"]) == Cell("lora", 1, model="sam3-tiny")
    assert parse_models("tiny, sam3-tiny") == ["tiny", "sam3-tiny"]
    with pytest.raises(FieldError, match="named twice"):
        parse_models("tiny,/elsewhere/tiny")


def test_one_report_shows_both_models_side_by_side(two_families):
    table = pd.read_csv(two_families / "results.csv")
    assert set(zip(table["model"], table["model_family"])) == set(MODELS.items())
    arms = {"zeroshot [tiny]", "zeroshot [sam3-tiny]", "full [tiny]", "full [sam3-tiny]"}
    assert set(table["strategy"]) == arms
    summary = md_table((two_families / "results.md").read_text(), "Strategies")
    assert set(summary["Strategy"]) == arms
    for arm in arms:  # each arm's mean is its own model's runs only
        runs = table[table["strategy"] == arm]
        assert len(runs) == 2 and runs["model"].nunique() == 1


def test_paired_tests_within_each_model_and_across_models_on_the_same_cases(two_families):
    paired = pd.read_csv(two_families / "paired.csv", keep_default_na=False)
    dsc = paired[paired["metric"] == "dsc"]
    pairs = {(r.family, r.strategy, r.reference) for r in dsc.itertuples()}
    assert pairs == {
        ("vs untrained", "full [tiny]", "zeroshot [tiny]"),  # within each model only
        ("vs untrained", "full [sam3-tiny]", "zeroshot [sam3-tiny]"),
        ("across models", "zeroshot [sam3-tiny]", "zeroshot [tiny]"),
        ("across models", "full [sam3-tiny]", "full [tiny]"),
    }
    across = dsc[dsc["family"] == "across models"]
    assert (across["n_cases"] == len(CASES)).all()
    assert across["mean"].to_numpy() == pytest.approx([SHIFT, SHIFT], abs=1e-9)
    assert (across["verdict"] == stats.HIGHER).all()  # the known truth, found over the 8 cases
    page = (two_families / "report.html").read_text()
    assert "full [sam3-tiny] − full [tiny]" in page
