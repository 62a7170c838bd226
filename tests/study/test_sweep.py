"""`benchmark --lr-sweep/--lr-grid`: chosen on tune cases carved from the training cases, never on a
scored case (whose arrays the sweep cannot even open), resumed point by point, split over shards."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from clipseg_bench.data.dataset import PreparedData
from clipseg_bench.errors import FieldError
from clipseg_bench.study import matrix
from clipseg_bench.study.sweep import (
    SWEEP_FILE,
    _choose,
    carve_tune_cases,
    grid_around,
    parse_lr_grid,
    sweep_display,
)

GRID = ["decoder=1e-3,3e-3"]


def test_grids():
    assert grid_around(1e-3, 3) == [0.000316, 0.001, 0.00316]
    assert grid_around(2e-4, 5) == [2e-5, 6.32e-5, 2e-4, 0.000632, 2e-3]
    assert parse_lr_grid(["full=1e-4,1e-5", "lora=2e-4"]) == {"full": [1e-5, 1e-4], "lora": [2e-4]}
    with pytest.raises(FieldError, match="lr_grid"):
        parse_lr_grid(["full=fast"])


def test_tune_cases_are_a_seeded_share_by_patient():
    cases = [f"c{i:02d}" for i in range(40)]
    tune = carve_tune_cases(cases, 0.2, seed=0)
    assert len(tune) == 8 and set(tune) <= set(cases)
    assert carve_tune_cases(cases, 0.2, seed=0) == tune != carve_tune_cases(cases, 0.2, seed=1)
    assert len(carve_tune_cases(cases[:2], 0.9, seed=0)) == 1  # one case always stays to train on


def test_the_choice_and_the_edge_flag():
    grid = [{"rate": r, "score": s, "run": "x"} for r, s in ((1e-4, 0.5), (1e-3, 0.7), (1e-2, 0.6))]
    inside = _choose("lr", 1e-3, grid)
    assert inside["chosen"] == 1e-3 and not inside["at_edge"]
    grid[2]["score"] = 0.9
    edge = _choose("lr", 1e-3, grid)
    assert edge["chosen"] == 1e-2 and edge["at_edge"]
    for g in grid:  # a model that predicts nothing scores alike at every rate: keep the default
        g["score"] = 0.0186
    tie = _choose("lr", 1e-3, grid)
    assert tie["chosen"] == 1e-3 and not tie["at_edge"] and tie["tied"] == 3


def test_sweep_display_flags_the_edge_and_ties():
    rows = [
        {
            "strategy": "full",
            "field": "lr",
            "rate": r,
            "score": sc,
            "chosen": r == 1e-2,
            "default": r == 1e-3,
            "at_edge": True,
            "tied": 1,
            "train_time_s": 10.0,
            "tune_cases": 2,
        }
        for r, sc in ((1e-4, 0.5), (1e-3, 0.6), (1e-2, 0.7))
    ]
    rows += [
        {
            "strategy": "lora",
            "field": "lr",
            "rate": r,
            "score": 0.2,
            "chosen": r == 1e-3,
            "default": r == 1e-3,
            "at_edge": False,
            "tied": 2,
            "train_time_s": 5.0,
            "tune_cases": 2,
        }
        for r in (1e-3, 1e-2)
    ]
    shown = sweep_display(pd.DataFrame(rows), {"full": 90.0}).set_index("strategy")
    assert "widen the grid" in shown.loc["full", "note"] and shown.loc["full", "chosen"] == "0.01"
    assert shown.loc["full", "share of the strategy's compute"] == "25%"  # 30 s of sweep, 90 s of runs
    assert (
        "tie" in shown.loc["lora", "note"] and shown.loc["lora", "share of the strategy's compute"] == "100%"
    )


@pytest.fixture(scope="module")
def swept(prepared_dir, tmp_path_factory):
    """decoder x seed 0 with a 2-point grid, run as shard 0/2, shard 1/2, then shard 0/2 again,
    with the scored (val) cases' arrays moved away whenever the sweep's points train."""
    out = tmp_path_factory.mktemp("sweep") / "B"
    cache = Path(prepared_dir) / "cache"
    scored = PreparedData(prepared_dir).cases("val")
    hidden = out.parent / "hidden"
    original = matrix._run_sweep
    trained: list[str] = []

    def sealed_sweep(*args, **kw):
        hidden.mkdir(exist_ok=True)
        moved = [p for c in scored for p in cache.glob(f"{c}_*.npy")]
        assert moved
        for p in moved:
            shutil.move(p, hidden / p.name)
        try:
            return original(*args, **kw)
        finally:
            for p in moved:
                shutil.move(hidden / p.name, p)

    def counting_call(cmd, log):
        trained.append(Path(cmd[cmd.index("--config") + 1]).stem if "--config" in cmd else "?")
        return call(cmd, log)

    call = matrix._call
    mp = pytest.MonkeyPatch()
    mp.setattr(matrix, "_run_sweep", sealed_sweep)
    mp.setattr(matrix, "_call", counting_call)
    calls = []
    try:
        for shard in ("0/2", "1/2", "0/2"):
            results = matrix.run_matrix(
                data=prepared_dir,
                model="tiny",
                strategies=["decoder"],
                seeds=[0],
                epochs=50,
                max_steps=2,
                batch_size=8,
                out=out,
                shard=shard,
                evaluate=False,
                lr_grid=GRID,
                extra={"image_size": 64, "val_max_slices": 4, "val_every": 0, "threads": 1},
            )
            calls.append(([r["status"] for r in results], list(trained)))
            trained.clear()
    finally:
        mp.undo()
    return out, calls


def test_sweep_never_reads_a_scored_case(swept, prepared_dir):
    out, _ = swept
    record = json.loads((out / SWEEP_FILE).read_text())
    scored = set(PreparedData(prepared_dir).cases("val"))
    tune = set(record["tune_cases"])
    assert tune and not tune & scored  # the tune cases are training cases, never scored ones
    for point in record["strategies"]["decoder"]["grid"]:
        info = json.loads((out / point["run"] / "run.json").read_text())
        assert set(info["val_case_ids"]) == tune and not set(info["train_case_ids"]) & (tune | scored)
        assert point["score"] is not None and point["steps"] == 2
    # the reported run: all training cases, the chosen rate, the scored cases
    info = json.loads((out / "runs" / "decoder-s0" / "run.json").read_text())
    assert tune <= set(info["train_case_ids"]) and set(info["val_case_ids"]) == scored
    chosen = record["strategies"]["decoder"]["chosen"]
    assert [g["lr"] for g in info["param_groups"]] == [chosen]


def test_sweep_resumes_point_by_point_and_shards_merge(swept):
    out, calls = swept
    (first, trained_a), (second, trained_b), (third, trained_c) = calls
    # shard 0 trains the grid's first point; its cell waits for the other shard's point
    assert first == ["pending"] and trained_a == ["decoder-dlr0.001"]
    # shard 1 trains the second point and completes the choice (it has no cell of its own)
    assert second == [] and trained_b == ["decoder-dlr0.003"]
    # shard 0 again: no point retrained, only its cell
    assert third == ["done"] and trained_c == ["decoder-s0"]
    record = json.loads((out / SWEEP_FILE).read_text())
    assert [g["rate"] for g in record["strategies"]["decoder"]["grid"]] == [1e-3, 3e-3]


def test_report_shows_the_sweep_and_counts_its_compute(swept, tmp_path):
    from clipseg_bench.study.report import write_report

    out, _ = swept
    html = write_report([out], out=tmp_path / "r")
    md = (tmp_path / "r" / "results.md").read_text()
    assert "## Learning-rate sweep" in md
    record = json.loads((out / SWEEP_FILE).read_text())["strategies"]["decoder"]
    sweep_s = sum(g["train_time_s"] for g in record["grid"])
    run_s = json.loads((out / "runs" / "decoder-s0" / "run.json").read_text())["timing"]["train_time_s"]
    share = f"{sweep_s / (sweep_s + run_s):.0%}"
    assert re.search(rf"\|\s*{share}\s*\|", md), share  # the sweep's share of decoder's compute
    assert (tmp_path / "r" / "plots" / "lr_sweep.png").is_file() and "Learning-rate sweep" in html.read_text()
