"""Folds end to end (issue 22): prepare --folds 2 --test-fraction -> benchmark --folds all
--postprocess auto -> report (pooled out of fold) -> evaluate --split test -> report --split test ->
segment --postprocess auto. The test case's arrays are taken away until the test split is asked
for, so any read of them before fails the run."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from clipseg_bench.data.dataset import PreparedData
from clipseg_bench.data.prepare import prepare
from clipseg_bench.errors import InputError
from clipseg_bench.evaluation.evaluate import evaluate_run
from clipseg_bench.evaluation.postprocess import keep_largest_components
from clipseg_bench.evaluation.segment import segment
from clipseg_bench.provenance import output_lock
from clipseg_bench.study.matrix import run_matrix
from clipseg_bench.study.report import write_report
from clipseg_bench.study.results import Cell, case_scores, pool_folds, read_bench, runs_table
from clipseg_bench.study.results import read_run as read_one

STRATEGIES = ["zeroshot", "decoder"]
# The study's settings (a later call into its BENCH folder must repeat them): 2 steps on 64 px.
MATRIX = {
    "model": "tiny",
    "seeds": [0],
    "epochs": 50,
    "max_steps": 2,
    "batch_size": 8,
    "folds": "all",
    "extra": {"image_size": 64, "val_max_slices": 4, "val_every": 0, "threads": 1},
}


@pytest.fixture(scope="module")
def study(phantom_dir, tmp_path_factory):
    """The 4 session phantoms (1 test case, 3 in 2 folds) and a 2-strategy x 2-fold benchmark run
    while the test case's arrays are away; the arrays come back afterwards."""
    root = tmp_path_factory.mktemp("folds_study")
    data = prepare(
        images=phantom_dir / "images",
        labels=phantom_dir / "labels",
        out=root / "p",
        folds=2,
        test_fraction=0.25,
        png=False,
    )
    (test_case,) = PreparedData(data).cases("test")
    away = root / "away"
    away.mkdir()
    held = sorted((data / "cache").glob(f"{test_case}_*.npy"))
    for f in held:
        shutil.move(f, away / f.name)
    bench = root / "B"
    results = run_matrix(data=data, strategies=STRATEGIES, out=bench, postprocess="auto", **MATRIX)
    assert [r["status"] for r in results] == ["done"] * 4
    report = write_report([bench])
    with pytest.raises(InputError, match="missing from the prepared array cache"):
        PreparedData(data, test=True)  # still away: nothing above read them
    for f in held:
        shutil.move(away / f.name, f)
    return {"data": data, "bench": bench, "test": test_case, "report": report, "phantoms": phantom_dir}


def test_runs_train_and_validate_on_their_folds_and_never_see_a_test_case(study):
    data, bench = PreparedData(study["data"]), study["bench"]
    labelled = set(data.cases_meta) - {study["test"]}
    assert sorted(p.name for p in (bench / "runs").iterdir()) == [
        Cell(s, 0, None, f).name for s in ("decoder", "zeroshot") for f in (0, 1)
    ]
    for fold in (0, 1):
        for strategy in STRATEGIES:
            info = json.loads((bench / "runs" / f"{strategy}-s0-f{fold}" / "run.json").read_text())
            train, val = set(info["train_case_ids"]), set(info["val_case_ids"])
            assert val == set(data.cases("val", fold)) and not train & val and train | val == labelled
            assert info["fold"] == fold and info["folds"] == 2 and info["cases"]["test"] == 1
    record = json.loads((bench / "bench-shard0.json").read_text())
    assert record["folds"] == [0, 1] and [c[3] for c in record["cells"]] == [0, 1, 0, 1]


def test_the_clean_up_choice_records_the_out_of_fold_cases_it_was_made_on(study):
    data, bench = PreparedData(study["data"]), study["bench"]
    recorded = json.loads((bench / "postprocess-auto.json").read_text())
    assert [c["strategy"] for c in recorded["choices"]] == STRATEGIES and recorded["skipped"] == []
    for choice in recorded["choices"]:
        on = choice["chosen_on"]
        assert on["cases"] == sorted(set(data.cases_meta) - {study["test"]}) and on["folds"] == [0, 1]
        for name in on["runs"]:  # each run carries its strategy's choice (what segment applies)
            assert json.loads((bench / "runs" / name / "postprocess.json").read_text()) == choice
    assert (
        json.loads((study["report"].with_name("choices.json")).read_text())["postprocess"]["choices"]
        == (recorded["choices"])
    )


def test_the_report_pools_every_labelled_case_once_out_of_fold(study):
    bench = study["bench"]
    runs = read_bench([bench])
    scores = case_scores(runs)
    assert not scores.duplicated(["strategy", "seed", "case"]).any()
    labelled = sorted(set(PreparedData(study["data"]).cases_meta) - {study["test"]})
    for strategy in STRATEGIES:
        assert sorted(scores[scores["strategy"] == strategy]["case"]) == labelled
    # the strategy table's val 3D DSC is the mean over those pooled cases, not over fold runs
    summary = pd.read_csv(bench / "results_summary.csv").set_index("strategy")
    for strategy in STRATEGIES:
        mean = scores.loc[scores["strategy"] == strategy, "dsc"].mean()
        assert summary.at[strategy, "val_dsc3d_mean"] == pytest.approx(mean, rel=1e-12, abs=1e-15)
        assert summary.at[strategy, "n_seeds"] == 1  # two fold runs, one seed
    pooled = pool_folds(runs_table(runs))
    assert list(pooled["status"]) == ["finished"] * 2 and list(pooled["scored_cases"]) == [3, 3]
    md = (bench / "results.md").read_text()
    assert "pooled out of fold over 2 folds: each of the 3 labelled non-test cases" in md
    assert "fold 1 (out of fold)" in pd.read_csv(bench / "results.csv")["scored_on"].tolist()


def test_a_bench_folder_holds_runs_on_folds_or_on_the_split_not_both(study):
    before = sorted(p.name for p in (study["bench"] / "runs").iterdir())
    with pytest.raises(InputError, match="runs use folds, this call asks no --folds"):
        run_matrix(
            data=study["data"], model="tiny", strategies=["decoder"], seeds=[0], epochs=1, out=study["bench"]
        )
    assert sorted(p.name for p in (study["bench"] / "runs").iterdir()) == before


def test_a_partial_set_of_folds_is_not_a_finished_seed(study, tmp_path):
    copy = tmp_path / "B"
    shutil.copytree(study["bench"], copy)
    shutil.rmtree(copy / "runs" / "decoder-s0-f1")
    runs = read_bench([copy])
    pooled = pool_folds(runs_table(runs)).set_index("strategy")
    assert pooled.at["decoder", "status"] == "1 of 2 folds" and pooled.at["zeroshot", "status"] == "finished"


def test_a_case_scored_twice_for_one_strategy_and_seed_is_refused(study, tmp_path):
    runs = read_bench([study["bench"]])
    twice = runs + [read_one(runs[0].path, study["bench"])]
    twice[-1] = type(runs[0])(
        **{**twice[-1].__dict__, "fold": None, "path": runs[0].path.with_name("decoder-s0")}
    )
    with pytest.raises(InputError, match="scored once, out of fold"):
        case_scores(twice)


def _liver_only(run) -> None:
    """Give a run's recorded choice lcc for the liver alone (the choice on these 2-step models may
    pick no organ, which would make every check of `auto` below hold trivially)."""
    choice = json.loads((run / "postprocess.json").read_text())
    choice["organs"] = {k: ("lcc" if k == "liver" else "none") for k in choice["organs"]}
    (run / "postprocess.json").write_text(json.dumps(choice))


def test_test_split_evaluation_report_and_segment(study, tmp_path):
    bench, test_case = study["bench"], study["test"]
    run = bench / "runs" / "decoder-s0-f0"
    with pytest.raises(InputError, match="chosen on case"):  # auto never scores the cases it chose on
        evaluate_run(run=run, postprocess_mode="auto", show_progress=False)
    liver = []
    for name in ("decoder-s0-f0", "decoder-s0-f1"):  # zeroshot's runs stay unevaluated on test: listed
        _liver_only(bench / "runs" / name)
        metrics = evaluate_run(
            run=bench / "runs" / name, split="test", postprocess_mode="auto", show_progress=False
        )
        modes = metrics["postprocess_3d"]
        for organ, scores in metrics["per_case"][test_case].items():  # each organ's chosen mode's scores
            mode = "lcc" if organ == "liver" else "none"
            assert scores == modes[mode]["per_case"][test_case][organ]
        liver.append(
            modes["lcc"]["per_case"][test_case]["liver"] != modes["none"]["per_case"][test_case]["liver"]
        )
    assert any(liver)  # the clean-up changed the liver somewhere: the check above could fail
    assert (run / "metrics.json").is_file() and json.loads((run / "metrics-test.json").read_text())[
        "cases"
    ] == [test_case]
    html = write_report([bench], split="test")
    assert html == bench / "test_report" / "report.html"
    md = html.with_name("results.md").read_text()
    assert "held-out test split (1 cases)" in md and "auto (per organ" in md
    scores = case_scores(read_bench([bench], "test"))  # one row: the mean over the two fold models
    assert list(scores["case"]) == [test_case] and list(scores["folds"]) == ["0,1"]

    # segment --postprocess auto applies the run's recorded choice per organ (liver only here)
    ct = study["phantoms"] / "images" / f"{test_case}_0000.nii.gz"
    plain = segment(run=run, ct=ct, out=tmp_path / "none.nii.gz")
    auto = segment(run=run, ct=ct, out=tmp_path / "auto.nii.gz", postprocess_mode="auto")
    raw, got = (np.asarray(nib.load(p).dataobj) for p in (plain, auto))
    expected = np.where(raw == 1, keep_largest_components(raw, nib.load(plain).affine), raw)
    assert np.array_equal(got, expected) and not np.array_equal(got, raw)


def test_the_test_split_writers_hold_their_locks(study):
    """`benchmark --test` writes under its shard's lock and `report --split test` under test_report's:
    a second writer of either is refused before it writes anything."""
    bench = study["bench"]
    before = sorted(p.name for p in (bench / "runs" / "decoder-s0-f0").iterdir())
    with output_lock(bench, "benchmark", scope="shard0"):
        with pytest.raises(InputError, match="writing into it right now"):
            run_matrix(data=study["data"], strategies=["decoder"], out=bench, test=True, **MATRIX)
    assert sorted(p.name for p in (bench / "runs" / "decoder-s0-f0").iterdir()) == before
    with output_lock(bench / "test_report", "report"):
        with pytest.raises(InputError, match="writing into it right now"):
            write_report([bench], split="test")
