"""Every bad input to `benchmark`: exit 2, one line naming the flag or file, nothing written; a failed
run: exit 1 naming it; a re-run with other settings: refused (issue 12)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from cli_helpers import assert_one_line_error, data_copy, digest, edit_json, run_cli, truncate_array

from clipseg_bench.provenance import process_record
from clipseg_bench.study.matrix import plan, run_matrix
from clipseg_bench.study.results import Cell

SETTINGS = ["--model", "tiny", "--epochs", "1", "--max-steps", "1", "--batch-size", "8"]


@pytest.fixture(scope="module")
def bench(prepared_dir, tmp_path_factory) -> Path:
    """A finished one-cell benchmark (zeroshot, seed 0), never modified by a test."""
    out = tmp_path_factory.mktemp("cli_bench") / "B"
    results = run_matrix(
        data=prepared_dir,
        model="tiny",
        strategies=["zeroshot"],
        seeds=[0],
        epochs=1,
        max_steps=1,
        batch_size=8,
        out=out,
        evaluate=False,
        extra={"image_size": 64, "val_every": 0, "val_max_slices": 4},
    )
    assert [r["status"] for r in results] == ["done"]
    return out


def _args(data, out, *extra, settings=SETTINGS) -> list:
    return [
        "benchmark",
        "--data",
        data,
        "--out",
        out,
        "--strategies",
        "zeroshot",
        "--seeds",
        "0",
        *settings,
        *extra,
    ]


def _rerun(data, bench, tmp: Path, *extra) -> list:
    """The fixture's own call, with ``extra`` flags appended (the last value of a flag wins)."""
    config = tmp / "given.yaml"
    config.write_text("image_size: 64\nval_every: 0\nval_max_slices: 4\n")  # the fixture's `extra`
    return _args(data, bench, *extra, settings=[*SETTINGS, "--config", config])


def _truncated_data(d, b, t):
    copy = data_copy(d, t)
    return _args(copy, t / "B"), truncate_array(copy)


def _foreign_out(d, b, t):
    (t / "mine").mkdir()
    (t / "mine" / "thesis.docx").write_text("precious")
    return _args(d, t / "mine"), t / "mine"


def _out_is_a_file(d, b, t):
    (t / "notes.txt").write_text("keep")
    return _args(d, t / "notes.txt"), t / "notes.txt"


def _bad_config_value(d, b, t):
    cfg = t / "c.yaml"
    cfg.write_text("warmup_steps: -3\n")
    return _args(d, t / "B", "--config", cfg), cfg


def _unknown_config_field(d, b, t):
    cfg = t / "c.yaml"
    cfg.write_text("epoch: 3\n")
    return _args(d, t / "B", "--config", cfg), cfg


NEW = {
    "--data missing": lambda d, b, t: (_args(t / "nope", t / "B"), t / "nope"),
    "--folds on data without folds": lambda d, b, t: (_args(d, t / "B", "--folds", "all"), "--folds"),
    "--postprocess auto without --folds": lambda d, b, t: (
        _args(d, t / "B", "--postprocess", "auto"),
        "--postprocess",
    ),
    "--train-cases 0": lambda d, b, t: (_args(d, t / "B", "--train-cases", "0"), "--train-cases"),
    "--train-cases x": lambda d, b, t: (_args(d, t / "B", "--train-cases", "1,x"), "--train-cases"),
    "--train-cases 1.5": lambda d, b, t: (_args(d, t / "B", "--train-cases", "1.5"), "--train-cases"),
    "--train-cases above the split": lambda d, b, t: (
        _args(d, t / "B", "--train-cases", "99"),
        "--train-cases",
    ),
    "--data not prepared": lambda d, b, t: (_args(b, t / "B"), b),
    "--data truncated array": _truncated_data,
    "--seeds a": lambda d, b, t: (_args(d, t / "B", "--seeds", "a"), "--seeds"),
    "--seeds 0,0": lambda d, b, t: (_args(d, t / "B", "--seeds", "0,0"), "--seeds"),
    "--seeds empty": lambda d, b, t: (_args(d, t / "B", "--seeds", ""), "--seeds"),
    "--strategies ,": lambda d, b, t: (_args(d, t / "B", "--strategies", ","), "--strategies"),
    "--strategies twice": lambda d, b, t: (_args(d, t / "B", "--strategies", "full,full"), "--strategies"),
    "--strategies nope": lambda d, b, t: (_args(d, t / "B", "--strategies", "full,nope"), "--strategies"),
    "--shard 2/2": lambda d, b, t: (_args(d, t / "B", "--shard", "2/2"), "--shard"),
    "--shard x": lambda d, b, t: (_args(d, t / "B", "--shard", "x"), "--shard"),
    "--lrs full": lambda d, b, t: (_args(d, t / "B", "--lrs", "full"), "--lrs"),
    "--lrs nope=1e-3": lambda d, b, t: (_args(d, t / "B", "--lrs", "nope=1e-3"), "--lrs"),
    "--lrs zeroshot=-1": lambda d, b, t: (_args(d, t / "B", "--lrs", "zeroshot=-1"), "--lrs"),
    "--lrs zeroshot=inf": lambda d, b, t: (_args(d, t / "B", "--lrs", "zeroshot=inf"), "--lrs"),
    "--lrs given twice": lambda d, b, t: (_args(d, t / "B", "--lrs", "zeroshot=1e-3,zeroshot=1e-4"), "--lrs"),
    "--seeds -1": lambda d, b, t: (_args(d, t / "B", "--seeds", "0,-1"), "--seeds"),
    "--lr-grid full": lambda d, b, t: (_args(d, t / "B", "--lr-grid", "full"), "--lr-grid"),
    "--lr-grid full=-1": lambda d, b, t: (_args(d, t / "B", "--lr-grid", "full=-1e-3"), "--lr-grid"),
    "--lr-grid zeroshot": lambda d, b, t: (_args(d, t / "B", "--lr-grid", "zeroshot=1e-3"), "--lr-grid"),
    "--lr-grid not benchmarked": lambda d, b, t: (
        _args(d, t / "B", "--strategies", "decoder", "--lr-grid", "full=1e-3"),
        "--lr-grid",
    ),
    "--tune-fraction 1": lambda d, b, t: (
        _args(d, t / "B", "--lr-sweep", "3", "--tune-fraction", "1"),
        "--tune-fraction",
    ),
    "--epochs 0": lambda d, b, t: (_args(d, t / "B", "--epochs", "0"), "--epochs"),
    "--max-steps 0": lambda d, b, t: (_args(d, t / "B", "--max-steps", "0"), "--max-steps"),
    "--batch-size x": lambda d, b, t: (_args(d, t / "B", "--batch-size", "x"), "--batch-size"),
    "--model missing": lambda d, b, t: (_args(d, t / "B", "--model", t / "nope"), t / "nope"),
    "--lr-sweep with two models": lambda d, b, t: (
        _args(d, t / "B", "--model", "tiny,sam3-tiny", "--lr-sweep", "3"),
        "--lr-sweep",
    ),
    "--model twice": lambda d, b, t: (_args(d, t / "B", "--model", "tiny,sam3-tiny,tiny"), "--model"),
    "--model one of two missing": lambda d, b, t: (
        _args(d, t / "B", "--model", f"sam3-tiny,{t / 'nope'}"),
        t / "nope",
    ),
    "--config missing": lambda d, b, t: (_args(d, t / "B", "--config", t / "nope.yaml"), t / "nope.yaml"),
    "--config bad value": _bad_config_value,
    "--config unknown field": _unknown_config_field,
    "--out is --data": lambda d, b, t: (_args(d, d), d),
    "--out is a file": _out_is_a_file,
    "--out someone else's folder": _foreign_out,
    "unknown flag": lambda d, b, t: (_args(d, t / "B", "--set", "epochs=3"), "--set"),
    "--launcher not a command": lambda d, b, t: (
        _args(d, t / "B", "--launcher", "no-such-launcher -x"),
        "--launcher",
    ),
    "--launcher unbalanced quote": lambda d, b, t: (
        _args(d, t / "B", "--launcher", "accelerate 'launch"),
        "--launcher",
    ),
}


@pytest.mark.parametrize("case", NEW.values(), ids=NEW.keys())
def test_benchmark_refuses_before_writing(case, prepared_dir, bench, tmp_path, capsys):
    args, names = case(prepared_dir, bench, tmp_path)
    before = digest(prepared_dir, bench, tmp_path)
    rc, _, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, names)
    assert digest(prepared_dir, bench, tmp_path) == before
    assert not (tmp_path / "B").exists()


RERUN = {
    "other --epochs": ("--epochs", "2"),
    "other --max-steps": ("--max-steps", "5"),
    "other --batch-size": ("--batch-size", "4"),
    "other --model": ("--model", "MODEL"),
    "other --lrs": ("--lrs", "zeroshot=0.5"),
}


@pytest.mark.parametrize("extra", RERUN.values(), ids=RERUN.keys())
def test_rerun_with_other_settings_is_refused(extra, prepared_dir, bench, tmp_path, capsys):
    """Issue 12: the old runs used to count as done while the record said the new settings."""
    flag, value = extra
    if value == "MODEL":  # another model: a saved tiny CLIPSeg folder
        from clipseg_bench.model.load import load_model, save_model

        value = str(tmp_path / "model")
        save_model(load_model("tiny"), value)
        capsys.readouterr()  # its progress bar
    before = digest(bench)
    rc, _, err = run_cli(_rerun(prepared_dir, bench, tmp_path, flag, value), capsys)
    assert_one_line_error(rc, err, str(bench))
    assert digest(bench) == before


def test_unreadable_run_json_refuses_before_the_record_changes(prepared_dir, bench, tmp_path, capsys):
    copy = tmp_path / "B"
    shutil.copytree(bench, copy)
    (copy / "runs" / "zeroshot-s0" / "run.json").write_text("{")
    before = digest(copy)
    rc, _, err = run_cli(_rerun(prepared_dir, copy, tmp_path, "--no-evaluate"), capsys)
    assert_one_line_error(rc, err, copy / "runs" / "zeroshot-s0" / "run.json")
    assert digest(copy) == before


def test_a_run_being_trained_right_now_is_not_started_twice(prepared_dir, bench, tmp_path, capsys):
    """Two benchmark calls on one folder would train the same run twice at once: the second refuses."""
    copy = tmp_path / "B"
    shutil.copytree(bench, copy)
    run = copy / "runs" / "zeroshot-s0"
    edit_json(run / "run.json", lambda d: d.update(status="running", process=process_record()))
    before = digest(copy)
    rc, _, err = run_cli(_rerun(prepared_dir, copy, tmp_path, "--no-evaluate"), capsys)
    assert_one_line_error(rc, err, run)
    assert digest(copy) == before


def test_the_same_call_again_is_accepted(prepared_dir, bench, tmp_path, capsys):
    """The control for the refusals above: the fixture's own call skips its finished run."""
    copy = tmp_path / "B"
    shutil.copytree(bench, copy)
    rc, out, err = run_cli(_rerun(prepared_dir, copy, tmp_path, "--no-evaluate"), capsys)
    assert rc == 0, err
    assert "zeroshot-s0: done, skipped" in out


def test_same_settings_extend_the_folder(prepared_dir, bench):
    """More seeds, or fewer training cases, with the same settings are a bigger matrix, not other settings."""
    cfgs = plan(
        data=prepared_dir,
        model="tiny",
        todo=[Cell("zeroshot", 0), Cell("zeroshot", 1), Cell("zeroshot", 0, 1)],
        out=bench,
        config=None,
        overrides={
            "epochs": 1,
            "max_steps": 1,
            "batch_size": 8,
            "image_size": 64,
            "val_every": 0,
            "val_max_slices": 4,
        },
        strategy_lr={},
        overwrite=False,
    )
    assert list(cfgs) == [Cell("zeroshot", 0), Cell("zeroshot", 1), Cell("zeroshot", 0, 1)]
    assert cfgs[Cell("zeroshot", 0, 1)].train_cases == 1
    assert cfgs[Cell("zeroshot", 0, 1)].out.endswith("zeroshot-s0-n1")


def test_failed_run_fails_the_command_and_names_it(prepared_dir, tmp_path):
    """Issue 12: a failed run used to print its failure and exit 0. Real process: the exit code."""
    data = data_copy(prepared_dir, tmp_path)
    edit_json(data / "dataset.json", lambda d: [c.update(split="val") for c in d["cases"].values()])
    manifest = pd.read_csv(data / "manifest.csv")
    manifest["split"] = "val"
    manifest.to_csv(data / "manifest.csv", index=False)
    out = tmp_path / "B"
    cmd = [sys.executable, "-m", "clipseg_bench.cli", *map(str, _args(data, out, "--no-evaluate"))]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    line = assert_one_line_error(proc.returncode, proc.stderr, str(out), code=1)
    assert "zeroshot-s0" in line and "1 of 1 runs failed" in line
    info = json.loads((out / "runs" / "zeroshot-s0" / "run.json").read_text())
    assert info["status"] == "failed"
