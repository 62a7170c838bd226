"""The data-efficiency axis (`benchmark --train-cases`): nested subsets, resume, shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from clipseg_bench.bench.matrix import cells, parse_train_cases, run_matrix, run_name, run_status
from clipseg_bench.bench.report import write_report
from clipseg_bench.data.dataset import PreparedData
from clipseg_bench.data.sampling import train_case_subset
from clipseg_bench.errors import InputError

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
    for bad in ("0", "9", "1.5", "half", "-1"):
        with pytest.raises(InputError, match="--train-cases"):
            parse_train_cases(bad, 8)


def test_cells_and_names_with_the_axis():
    every = cells(["zeroshot", "decoder"], [0, 1], train_cases=[1, None])
    assert every[:4] == [("zeroshot", 0, 1), ("zeroshot", 1, 1), ("zeroshot", 0, None), ("zeroshot", 1, None)]
    assert cells(["decoder"], [0, 1]) == [("decoder", 0, None), ("decoder", 1, None)]  # no axis: as before
    assert run_name("lora", 2, 5) == "lora-s2-n5" and run_name("lora", 2) == "lora-s2"


def _cmd(prepared, out):
    return [
        sys.executable,
        "-m",
        "clipseg_bench.cli",
        "benchmark",
        "--data",
        str(prepared),
        "--model",
        "tiny",
        "--strategies",
        "adapter",
        "--seeds",
        "0",
        "--train-cases",
        "1,2",
        "--epochs",
        "4",
        "--batch-size",
        "8",
        "--out",
        str(out),
        "--no-evaluate",
    ]


def test_matrix_with_train_cases_resumes_after_a_kill(prepared_dir, tmp_path):
    out = tmp_path / "B"
    cfg = tmp_path / "common.yaml"
    cfg.write_text("image_size: 64\nval_max_slices: 4\nval_every: 0\n")
    cmd = [*_cmd(prepared_dir, out), "--config", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "runs" / "adapter-s0-n1"  # the first cell: fewest cases first
    state = first / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and not state.is_file():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the benchmark and its training subprocess, mid-run
    proc.wait()
    assert run_status(first) == "running"
    assert json.loads(state.read_text())["epoch"] < 4
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "adapter-s0-n1: resuming" in r.stdout and "adapter-s0-n2: training" in r.stdout
    train_cases = PreparedData(prepared_dir).cases("train")
    for n in (1, 2):
        run = out / "runs" / f"adapter-s0-n{n}"
        assert run_status(run) == "finished"
        assert len(pd.read_csv(run / "history.csv")) == 4
        info = json.loads((run / "run.json").read_text())
        assert info["train_case_ids"] == train_case_subset(train_cases, n, seed=0)
    assert json.loads((out / "bench-shard0.json").read_text())["train_cases"] == [1, 2]


def test_shards_with_train_cases_merge_like_one_benchmark(prepared_dir, tmp_path):
    def bench(out, shard):
        return run_matrix(
            data=prepared_dir,
            model="tiny",
            strategies=["decoder"],
            seeds=[0],
            epochs=50,
            max_steps=2,
            batch_size=8,
            out=out,
            shard=shard,
            train_cases="1,all",
            extra={"image_size": 64, "val_max_slices": 8, "val_every": 0},
        )

    s0, s1 = tmp_path / "shard0", tmp_path / "shard1"
    bench(s0, "0/2")
    bench(s1, "1/2")
    assert {p.name for p in (s0 / "runs").iterdir()} == {"decoder-s0-n1"}
    assert {p.name for p in (s1 / "runs").iterdir()} == {"decoder-s0"}
    whole = tmp_path / "whole"
    for shard in (s0, s1):
        shutil.copytree(shard / "runs", whole / "runs", dirs_exist_ok=True)
    write_report([s0, s1], out=tmp_path / "merged")
    write_report([whole])
    merged, single = pd.read_csv(tmp_path / "merged" / "results.csv"), pd.read_csv(whole / "results.csv")
    drop = ["bench_dir", "run_dir"]
    pd.testing.assert_frame_equal(merged.drop(columns=drop), single.drop(columns=drop))
    assert list(merged["train_cases"].astype(str)) == ["1", "all"]
    assert list(merged["n_train_cases"]) == [1, 3]  # prepared_dir has 3 training cases
    md = (tmp_path / "merged" / "results.md").read_text()
    assert "## Data efficiency (val 3D DSC)" in md and "all (3) cases" in md
    assert (tmp_path / "merged" / "plots" / "data_efficiency.png").is_file()
