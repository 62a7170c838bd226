"""The strategy x seed matrix: artefacts, skipping, resuming after a kill, and sharding."""

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

from clipseg_bench.errors import InputError
from clipseg_bench.study.matrix import cells, run_matrix, run_status
from clipseg_bench.study.report import write_report

COMMON = {"image_size": 64, "val_max_slices": 8, "val_every": 0}


def _bench(prepared, out, strategies, seeds=(0,), shard=None, steps=3):
    return run_matrix(
        data=prepared,
        model="tiny",
        strategies=list(strategies),
        seeds=list(seeds),
        epochs=50,
        max_steps=steps,
        batch_size=8,
        out=out,
        shard=shard,
        extra=COMMON,
    )


@pytest.fixture(scope="module")
def small_bench(prepared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "B"
    _bench(prepared_dir, out, ["zeroshot", "decoder"])
    return out


def test_benchmark_produces_every_artefact(small_bench):
    for name in ("zeroshot-s0", "decoder-s0"):
        run = small_bench / "runs" / name
        for f in (
            "config.yaml",
            "run.json",
            "history.csv",
            "weights.safetensors",
            "metrics.json",
            "samples.npz",
        ):
            assert (run / f).is_file(), (name, f)
        assert run_status(run) == "evaluated"
    html = write_report([small_bench])
    assert html.is_file()
    for f in ("results.csv", "results.md"):
        assert (small_bench / f).is_file()
    assert len(list((small_bench / "plots").glob("*.png"))) >= 4
    table = pd.read_csv(small_bench / "results.csv")
    assert sorted(table["strategy"]) == ["decoder", "zeroshot"]
    dec = table[table["strategy"] == "decoder"].iloc[0]
    metrics = json.loads((small_bench / "runs" / "decoder-s0" / "metrics.json").read_text())
    info = json.loads((small_bench / "runs" / "decoder-s0" / "run.json").read_text())
    assert dec["val_dice"] == pytest.approx(metrics["dice2d"])
    assert dec["val_nsd3d"] == pytest.approx(metrics["summary"]["nsd"])
    assert dec["trainable_params"] == info["params"]["trainable"]
    assert table.loc[table["strategy"] == "zeroshot", "trainable_params"].item() == 0


def test_rerun_skips_finished_runs(small_bench, prepared_dir, capsys):
    weights = small_bench / "runs" / "decoder-s0" / "weights.safetensors"
    before = weights.stat().st_mtime_ns
    results = _bench(prepared_dir, small_bench, ["zeroshot", "decoder"])
    assert [r["status"] for r in results] == ["skipped", "skipped"]
    assert weights.stat().st_mtime_ns == before


def test_killed_run_is_resumed(prepared_dir, tmp_path):
    out = tmp_path / "B"
    cmd = [
        sys.executable,
        "-m",
        "clipseg_bench.cli",
        "benchmark",
        "--data",
        str(prepared_dir),
        "--model",
        "tiny",
        "--strategies",
        "adapter",
        "--seeds",
        "0",
        "--epochs",
        "4",
        "--batch-size",
        "8",
        "--out",
        str(out),
        "--no-evaluate",
    ]
    cfg = tmp_path / "common.yaml"
    cfg.write_text("image_size: 64\nval_max_slices: 4\nval_every: 0\n")
    proc = subprocess.Popen(
        [*cmd, "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state = out / "runs" / "adapter-s0" / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and not state.is_file():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the benchmark and its training subprocess, mid-run
    proc.wait()
    run = out / "runs" / "adapter-s0"
    assert run_status(run) == "running"
    assert json.loads(state.read_text())["epoch"] < 4
    r = subprocess.run([*cmd, "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout
    assert run_status(run) == "finished"
    assert len(pd.read_csv(run / "history.csv")) == 4


def test_shards_partition_the_matrix_and_merge_like_one_run(prepared_dir, tmp_path):
    strategies, seeds = ["zeroshot", "decoder", "bitfit"], [0, 1]
    every = cells(strategies, seeds)
    parts = [cells(strategies, seeds, f"{i}/3") for i in range(3)]
    assert sorted(c for p in parts for c in p) == sorted(every) and sum(map(len, parts)) == len(every)

    s0, s1 = tmp_path / "shard0", tmp_path / "shard1"
    _bench(prepared_dir, s0, ["zeroshot", "decoder"], shard="0/2", steps=2)
    _bench(prepared_dir, s1, ["zeroshot", "decoder"], shard="1/2", steps=2)
    assert {p.name for p in (s0 / "runs").iterdir()} == {"zeroshot-s0"}
    assert {p.name for p in (s1 / "runs").iterdir()} == {"decoder-s0"}
    whole = tmp_path / "whole"
    for shard in (s0, s1):
        shutil.copytree(shard / "runs", whole / "runs", dirs_exist_ok=True)
    write_report([s0, s1], out=tmp_path / "merged")
    write_report([whole])
    merged, single = pd.read_csv(tmp_path / "merged" / "results.csv"), pd.read_csv(whole / "results.csv")
    drop = ["bench_dir", "run_dir"]
    pd.testing.assert_frame_equal(
        merged.drop(columns=drop, errors="ignore"), single.drop(columns=drop, errors="ignore")
    )


def test_bad_shard_and_strategy_are_input_errors():
    with pytest.raises(InputError, match="shard"):
        cells(["full"], [0], "3/2")
    with pytest.raises(InputError, match="unknown strategies"):
        cells(["nope"], [0])
