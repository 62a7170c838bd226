"""Every bad input to `train`: exit 2, one stderr line naming the flag or file, nothing written.

New runs must leave no run folder behind; a refused ``--resume`` must leave the run folder byte for
byte as it was (issue 12: a contradicting resume used to rewrite config.yaml and run.json first).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_helpers import assert_one_line_error, digest, edit_json, run_cli, truncate_array

from clipseg_bench.config import load_config


@dataclass
class Ctx:
    """What a case may use: the shared prepared data, a copy to break, a scratch folder."""

    data: Path
    copy: Path
    tmp: Path

    @property
    def out(self) -> Path:
        return self.tmp / "new_run"

    def args(self, *extra, data=None) -> list:
        base = ["train", "--data", data or self.data, "--out", self.out, "--model", "tiny"]
        return base + ["--image-size", "64", "--max-steps", "1", *extra]

    def file(self, name: str, text: str) -> Path:
        path = self.tmp / "given" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return path


def _truncated_array(c: Ctx):
    return c.args(data=c.copy), truncate_array(c.copy)


def _no_cases(c: Ctx):
    edit_json(c.copy / "dataset.json", lambda d: d.pop("cases"))
    return c.args(data=c.copy), c.copy / "dataset.json"


def _future_format(c: Ctx):
    edit_json(c.copy / "dataset.json", lambda d: d.update(format="clipseg-bench-prepared/2"))
    return c.args(data=c.copy), c.copy


def _no_kept_train_slice(c: Ctx):
    manifest = pd.read_csv(c.copy / "manifest.csv")
    manifest.loc[manifest["split"] == "train", "kept"] = 0
    manifest.to_csv(c.copy / "manifest.csv", index=False)
    return c.args("--strategy", "decoder", data=c.copy), c.copy


def _no_manifest(c: Ctx):
    (c.copy / "manifest.csv").unlink()
    return c.args(data=c.copy), c.copy / "manifest.csv"


def _out_is_a_file(c: Ctx):
    target = c.file("notes.txt", "keep me")
    return ["train", "--data", c.data, "--out", target, "--max-steps", "1"], target


def _out_not_empty(c: Ctx):
    c.file("thesis.docx", "precious")
    return ["train", "--data", c.data, "--out", c.tmp / "given", "--max-steps", "1"], c.tmp / "given"


def _yaml_value_flag_wins(c: Ctx):
    cfg = c.file("c.yaml", "epochs: 5\n")
    return c.args("--config", cfg, "--epochs", "0"), "--epochs"


def _bad_yaml_value(c: Ctx):
    cfg = c.file("c.yaml", "epochs: 0\n")
    return c.args("--config", cfg), cfg


NEW_RUN = {
    "--epochs a": lambda c: (c.args("--epochs", "a"), "--epochs"),
    "--epochs 0": lambda c: (c.args("--epochs", "0"), "--epochs"),
    "--batch-size 0": lambda c: (c.args("--batch-size", "0"), "--batch-size"),
    "--max-steps -1": lambda c: (c.args("--max-steps", "-1"), "--max-steps"),
    "--lr -1": lambda c: (c.args("--lr", "-1"), "--lr"),
    "--fold -1": lambda c: (c.args("--fold", "-1"), "--fold"),
    "--fold on data without folds": lambda c: (c.args("--fold", "0"), "--fold"),
    "--lr abc": lambda c: (c.args("--lr", "abc"), "--lr"),
    "--lr inf": lambda c: (c.args("--lr", "inf"), "--lr"),
    "--lr nan": lambda c: (c.args("--lr", "nan"), "--lr"),
    "--set lr=yes (a YAML boolean)": lambda c: (c.args("--set", "lr=yes"), "--set lr"),
    "--set epochs=yes (a YAML boolean)": lambda c: (c.args("--set", "epochs=yes"), "--set epochs"),
    "--set fold=yes (a YAML boolean)": lambda c: (
        c.args("--set", "fold=yes"),
        "--set fold: Input should be a",
    ),
    "--set epochs=2.5": lambda c: (c.args("--set", "epochs=2.5"), "--set epochs"),
    "--set weight_decay=.inf": lambda c: (c.args("--set", "weight_decay=.inf"), "--set weight_decay"),
    "--seed x": lambda c: (c.args("--seed", "x"), "--seed"),
    "--seed -1": lambda c: (c.args("--seed", "-1"), "--seed"),
    "--mixed-precision fp8": lambda c: (c.args("--mixed-precision", "fp8"), "--mixed-precision"),
    "--strategy nope": lambda c: (c.args("--strategy", "nope"), "--strategy"),
    "--seeds (benchmark's flag)": lambda c: (c.args("--seeds", "a"), "--seeds"),
    "--set without =": lambda c: (c.args("--set", "epochs"), "--set"),
    "--set unknown field": lambda c: (c.args("--set", "epoch=3"), "--set epoch"),
    "--set organs=[',']": lambda c: (c.args("--set", "organs=[',']"), "--set organs"),
    "--set organs=[]": lambda c: (c.args("--set", "organs=[]"), "--set organs"),
    "--set bad template": lambda c: (c.args("--set", "prompt_template=organ"), "--set prompt_template"),
    "--set threshold=2": lambda c: (c.args("--set", "threshold=2"), "--set threshold"),
    "--set not YAML": lambda c: (c.args("--set", "organs=[liver"), "--set organs"),
    "--set bad lora rank": lambda c: (
        c.args("--strategy", "lora", "--set", "strategy_options={rank: -1}"),
        "--set strategy_options",
    ),
    "--image-size 17": lambda c: (c.args("--image-size", "17"), "--image-size"),
    "--set input_channels=rgb": lambda c: (c.args("--set", "input_channels=rgb"), "--set input_channels"),
    "--set train_cases=0": lambda c: (c.args("--set", "train_cases=0"), "--set train_cases"),
    "--set train_cases above the split": lambda c: (c.args("--set", "train_cases=99"), c.data),
    "--set feature_cache_dtype=int8": lambda c: (
        c.args("--set", "feature_cache_dtype=int8"),
        "--set feature_cache_dtype",
    ),
    "no --out": lambda c: (["train", "--data", c.data], "--out"),
    "no --data": lambda c: (["train", "--out", c.out], "--data"),
    "--data missing": lambda c: (c.args(data=c.tmp / "nope"), c.tmp / "nope"),
    "--data not prepared": lambda c: (c.args(data=c.tmp), c.tmp),
    "--data truncated array": _truncated_array,
    "--data without cases": _no_cases,
    "--data of a future format": _future_format,
    "--data without a kept train slice": _no_kept_train_slice,
    "--data without manifest": _no_manifest,
    "--model missing folder": lambda c: (c.args("--model", c.tmp / "nope"), c.tmp / "nope"),
    "--model not a model": lambda c: (c.args("--model", c.copy), c.copy),
    "--out is a file": _out_is_a_file,
    "--out not empty": _out_not_empty,
    "--config missing": lambda c: (c.args("--config", c.tmp / "nope.yaml"), c.tmp / "nope.yaml"),
    "--config not YAML": lambda c: (
        c.args("--config", c.file("c.yaml", "epochs: [")),
        c.tmp / "given/c.yaml",
    ),
    "--config a list": lambda c: (c.args("--config", c.file("c.yaml", "- a\n")), c.tmp / "given/c.yaml"),
    "--config bad value": _bad_yaml_value,
    "flag over YAML names the flag": _yaml_value_flag_wins,
}


@pytest.mark.parametrize("case", NEW_RUN.values(), ids=NEW_RUN.keys())
def test_train_refuses_before_writing(case, prepared_dir, prepared_copy, tmp_path, capsys):
    ctx = Ctx(prepared_dir, prepared_copy, tmp_path)
    args, names = case(ctx)
    before = digest(prepared_dir, prepared_copy, tmp_path / "given")
    rc, _, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, names)
    assert digest(prepared_dir, prepared_copy, tmp_path / "given") == before
    assert not ctx.out.exists()


# --- resume ------------------------------------------------------------------------------------


def _corrupt(rel: str, data: bytes):
    def make(run: Path, tmp: Path):
        (run / rel).write_bytes(data)
        return ["train", "--out", run, "--resume"], run / rel

    return make


def _finished(run: Path, tmp: Path):
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "finished"}))
    return ["train", "--out", run, "--resume"], run


def _finished_other_strategy(run: Path, tmp: Path):
    """The issue's case: a finished decoder run resumed as lora used to lose its config.yaml."""
    _finished(run, tmp)
    return ["train", "--out", run, "--resume", "--strategy", "lora"], "--strategy"


def _other_config_file(run: Path, tmp: Path):
    cfg = tmp / "other.yaml"
    cfg.write_text("lr: 0.5\n")
    return ["train", "--out", run, "--resume", "--config", cfg], cfg


def _never_ran(run: Path, tmp: Path):
    (run / "run.json").unlink()
    return ["train", "--out", run, "--resume"], run


RESUME = {
    "other --strategy": lambda r, t: (["train", "--out", r, "--resume", "--strategy", "lora"], "--strategy"),
    "other --epochs": lambda r, t: (["train", "--out", r, "--resume", "--epochs", "7"], "--epochs"),
    "other --max-steps": lambda r, t: (["train", "--out", r, "--resume", "--max-steps", "9"], "--max-steps"),
    "other --set": lambda r, t: (
        ["train", "--out", r, "--resume", "--set", "absent_fraction=0.5"],
        "--set absent_fraction",
    ),
    "other --data": lambda r, t: (["train", "--out", r, "--resume", "--data", t], "--data"),
    "other --config": _other_config_file,
    "no --out": lambda r, t: (["train", "--resume", "--strategy", "decoder"], "--out"),
    "finished run": _finished,
    "finished run, other --strategy": _finished_other_strategy,
    "no run.json": _never_ran,
    "not a run folder": lambda r, t: (["train", "--out", t, "--resume"], t),
    "corrupt run.json": _corrupt("run.json", b"{oops"),
    "corrupt config.yaml": _corrupt("config.yaml", b"strategy: ["),
    "corrupt checkpoint weights": _corrupt("checkpoints/last/trainable.safetensors", b"garbage"),
    "corrupt optimizer state": _corrupt("checkpoints/last/optim.pt", b"garbage"),
    "corrupt loop state": _corrupt("checkpoints/last/state.json", b"{"),
}


@pytest.mark.parametrize("case", RESUME.values(), ids=RESUME.keys())
def test_refused_resume_leaves_the_run_byte_for_byte(case, unfinished_run, prepared_dir, tmp_path, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args, names = case(unfinished_run, scratch)
    before = digest(unfinished_run, prepared_dir)
    rc, _, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, names)
    assert digest(unfinished_run, prepared_dir) == before


def test_readme_resume_reads_the_runs_own_config(unfinished_run, capsys):
    """`train --out R --resume` (the README's form) continues with R/config.yaml; repeating a saved
    value is no contradiction."""
    saved = load_config(unfinished_run / "config.yaml")
    rc, _, err = run_cli(["train", "--out", unfinished_run, "--resume", "--strategy", "decoder"], capsys)
    assert rc == 0, err
    info = json.loads((unfinished_run / "run.json").read_text())
    assert info["status"] == "finished" and (unfinished_run / "weights.safetensors").is_file()
    resumed = load_config(unfinished_run / "config.yaml")
    assert resumed.model_dump(exclude={"out"}) == saved.model_dump(exclude={"out"})


def test_resume_refusal_names_the_flag_not_the_config_file(unfinished_run, tmp_path, capsys):
    """A value from a flag is blamed on the flag even when --config is given too."""
    cfg = tmp_path / "same.yaml"
    cfg.write_text("strategy: decoder\n")
    rc, _, err = run_cli(
        ["train", "--out", unfinished_run, "--resume", "--config", cfg, "--epochs", "9"], capsys
    )
    line = assert_one_line_error(rc, err, "--epochs")
    assert str(cfg) not in line


def test_killed_before_the_first_write_leaves_no_folder(prepared_dir, tmp_path, capsys):
    """Bad data found while building (after the folder check) still writes nothing."""
    shutil.copytree(prepared_dir, tmp_path / "p", ignore=shutil.ignore_patterns("feature_cache"))
    np.save(tmp_path / "p" / "cache" / "extra.npy", np.zeros(3))  # harmless extra file
    labels = sorted((tmp_path / "p" / "cache").glob("*_label.npy"))[-1]
    np.save(labels, np.zeros((2, 2), np.uint8))  # wrong shape for its case
    out = tmp_path / "run"
    rc, _, err = run_cli(["train", "--data", tmp_path / "p", "--out", out, "--max-steps", "1"], capsys)
    assert_one_line_error(rc, err, labels)
    assert not out.exists()
