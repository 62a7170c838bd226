"""The data-efficiency axis (`benchmark --train-cases`): nested subsets, resume, shards."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from clipseg_bench.data.dataset import PreparedData
from clipseg_bench.data.sampling import train_case_subset
from clipseg_bench.errors import InputError
from clipseg_bench.study.matrix import cells, parse_train_cases, run_matrix, run_name, run_status
from clipseg_bench.study.report import write_report
from clipseg_bench.study.results import Cell

CASES = [f"case_{i:02d}" for i in range(10)]


def test_subsets_are_nested_and_fixed_by_seed_and_split():
    for seed in (0, 1, 2):
        sets = [train_case_subset(CASES, n, seed=seed) for n in (1, 3, 5, 10)]
        assert [len(s) for s in sets] == [1, 3, 5, 10]
        for small, large in zip(sets, sets[1:]):
            assert set(small) <= set(large)  # the 5-case set contains the 3-case set...
        assert sets == [train_case_subset(list(reversed(CASES)), n, seed=seed) for n in (1, 3, 5, 10)]
    # ...and another seed draws other cases (fixed here: seeds 0 and 1 start differently)
    firsts = {train_case_subset(CASES, 1, seed=s)[0] for s in range(5)}
    assert len(firsts) > 1
    with pytest.raises(InputError, match="train split has 10"):
        train_case_subset(CASES, 11, seed=0)


def test_parse_train_cases():
    assert parse_train_cases("1,5,all", 8) == [1, 5, None]
    assert parse_train_cases("all, 5,1,5", 8) == [1, 5, None]  # sorted, duplicates dropped
    assert parse_train_cases("0.25,0.5,1.0", 8) == [2, 4, None]  # fractions of the split
    assert parse_train_cases("8", 8) == [None]  # every case is "all": same run, same folder
    assert parse_train_cases(None, 8) == [None]
    assert parse_train_cases("8,all", 8, collapse=False) == [
        8,
        None,
    ]  # folds of other sizes: a count stays one
    for bad in ("0", "9", "1.5", "half", "-1"):
        with pytest.raises(InputError, match="train_cases"):
            parse_train_cases(bad, 8)


def test_cells_and_names_with_the_axis():
    every = cells(["zeroshot", "decoder"], [0, 1], train_cases=[1, None])
    assert every[:4] == [
        ("zeroshot", 0, 1, None, None),  # (strategy, seed, training cases, fold, model)
        ("zeroshot", 1, 1, None, None),
        ("zeroshot", 0, None, None, None),
        ("zeroshot", 1, None, None, None),
    ]
    no_axis = [("decoder", 0, None, None, None), ("decoder", 1, None, None, None)]
    assert cells(["decoder"], [0, 1]) == no_axis
    assert run_name("lora", 2, 5) == "lora-s2-n5" and run_name("lora", 2) == "lora-s2"
    # the fold axis: folds vary fastest, so shards split over folds too; names gain -f<fold>
    folded = cells(["lora"], [0], train_cases=[2, None], folds=[0, 1, 2])
    assert [c.name for c in folded] == [
        "lora-s0-f0-n2",
        "lora-s0-f1-n2",
        "lora-s0-f2-n2",
        "lora-s0-f0",
        "lora-s0-f1",
        "lora-s0-f2",
    ]
    assert [c.name for c in cells(["lora"], [0], "1/2", folds=[0, 1, 2])] == ["lora-s0-f1"]
    # cells recorded before the fold and model axes read with their defaults
    assert Cell.of(["lora", 0, 2, 1]).name == "lora-s0-f1-n2"
    assert Cell.of(["lora", 0]) == ("lora", 0, None, None, None)


def _wait_for(path, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and not path.is_file():
        time.sleep(0.05)


def test_matrix_with_train_cases_resumes_after_a_kill(prepared_dir, tmp_path):
    out = tmp_path / "B"
    common = tmp_path / "common.yaml"
    common.write_text("image_size: 64\nval_max_slices: 4\nval_every: 0\n")
    args = f"--data {shlex.quote(str(prepared_dir))} --out {shlex.quote(str(out))} --config {shlex.quote(str(common))}"
    args += " --strategies adapter --seeds 0 --train-cases 1,2 --epochs 4 --budget epochs --batch-size 8 --no-evaluate"
    cmd = [sys.executable, "-m", "clipseg_bench.cli", "benchmark", *shlex.split(args)]
    first = out / "runs" / "adapter-s0-n1"  # the first cell: fewest cases first
    state = first / "checkpoints" / "last" / "state.json"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for(state)
    os.killpg(proc.pid, signal.SIGKILL)  # the benchmark and its training subprocess, mid-run
    proc.wait()
    assert run_status(first) == "running" and json.loads(state.read_text())["epoch"] < 4

    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "adapter-s0-n1: resuming" in rerun.stdout and "adapter-s0-n2: training" in rerun.stdout
    train_cases = PreparedData(prepared_dir).cases("train")
    for n in (1, 2):
        run = out / "runs" / f"adapter-s0-n{n}"
        info = json.loads((run / "run.json").read_text())
        assert info["status"] == "finished" and len(pd.read_csv(run / "history.csv")) == 4
        assert info["train_case_ids"] == train_case_subset(train_cases, n, seed=0)
    assert json.loads((out / "bench-shard0.json").read_text())["train_cases"] == [1, 2]


def test_shards_with_train_cases_merge_in_the_report(prepared_dir, tmp_path):
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, shard in enumerate(shards):
        run_matrix(
            data=prepared_dir,
            model="tiny",
            strategies=["decoder"],
            seeds=[0],
            epochs=50,
            max_steps=2,
            batch_size=8,
            out=shard,
            shard=f"{i}/2",
            train_cases="1,all",
            extra={"image_size": 64, "val_max_slices": 8, "val_every": 0},
        )
    assert [sorted(p.name for p in (s / "runs").iterdir()) for s in shards] == [
        ["decoder-s0-n1"],
        ["decoder-s0"],
    ]

    def results(html):
        return pd.read_csv(html.with_name("results.csv"), dtype={"train_cases": str})

    each = [results(write_report([s])) for s in shards]  # one shard at a time
    merged_dir = tmp_path / "merged"
    merged = results(write_report(shards, out=merged_dir))
    pd.testing.assert_frame_equal(merged, pd.concat(each, ignore_index=True))  # the union, in report order
    assert list(merged["train_cases"]) == ["1", "all"]
    assert list(merged["n_train_cases"]) == [1, 3]  # prepared_dir has 3 training cases
    assert "all (3) cases" in (merged_dir / "results.md").read_text()  # the data-efficiency table
    assert (merged_dir / "plots" / "data_efficiency.png").is_file()
