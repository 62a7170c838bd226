"""Every bad input to `evaluate`: exit 2, one stderr line naming the flag or file, and neither the run
nor the data changed (no metrics.json or samples.npz written)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, data_copy, digest, edit_json, run_cli, truncate_array


def _run_copy(run: Path, tmp: Path) -> Path:
    copy = tmp / "run"
    shutil.copytree(run, copy)
    return copy


def _corrupt_config(run, data, tmp):
    r = _run_copy(run, tmp)
    (r / "config.yaml").write_text("strategy: [")
    return ["evaluate", "--run", r], r / "config.yaml"


def _config_of_another_strategy(run, data, tmp):
    r = _run_copy(run, tmp)
    text = (r / "config.yaml").read_text().replace("strategy: decoder", "strategy: lora")
    (r / "config.yaml").write_text(text)
    return ["evaluate", "--run", r], r / "weights.safetensors"


def _corrupt_weights(run, data, tmp):
    r = _run_copy(run, tmp)
    (r / "weights.safetensors").write_bytes(b"\x80\x04 a pickle, not safetensors")
    return ["evaluate", "--run", r], r / "weights.safetensors"


def _unfinished(run, data, tmp):
    r = _run_copy(run, tmp)
    (r / "weights.safetensors").unlink()
    return ["evaluate", "--run", r], r


def _truncated_data(run, data, tmp):
    d = data_copy(data, tmp)
    return ["evaluate", "--run", run, "--data", d], truncate_array(d, "label")


def _future_data(run, data, tmp):
    d = data_copy(data, tmp)
    edit_json(d / "dataset.json", lambda doc: doc.update(format="clipseg-bench-prepared/9"))
    return ["evaluate", "--run", run, "--data", d], d


def _case_without_entry(run, data, tmp):
    d = data_copy(data, tmp)
    edit_json(d / "dataset.json", lambda doc: next(iter(doc["cases"].values())).pop("n_slices"))
    return ["evaluate", "--run", run, "--data", d], d / "dataset.json"


def _choice_without_organs(run, data, tmp):
    r = _run_copy(run, tmp)
    (r / "postprocess.json").write_text('{"organs": {"liver": "biggest"}}')
    return ["evaluate", "--run", r, "--postprocess", "auto"], r / "postprocess.json"


CASES = {
    "--run missing": lambda r, d, t: (["evaluate", "--run", t / "nope"], t / "nope"),
    "--run is the prepared folder": lambda r, d, t: (["evaluate", "--run", d], d),
    "--run is a file": lambda r, d, t: (["evaluate", "--run", r / "run.json"], r / "run.json"),
    "no --run": lambda r, d, t: (["evaluate"], "--run"),
    "--run corrupt config.yaml": _corrupt_config,
    "--run weights of another strategy": _config_of_another_strategy,
    "--run corrupt weights": _corrupt_weights,
    "--run unfinished": _unfinished,
    "--data missing": lambda r, d, t: (["evaluate", "--run", r, "--data", t / "nope"], t / "nope"),
    "--data not prepared": lambda r, d, t: (["evaluate", "--run", r, "--data", r], r),
    "--data truncated array": _truncated_data,
    "--data of a future format": _future_data,
    "--data case lacks n_slices": _case_without_entry,
    "--max-cases 0": lambda r, d, t: (["evaluate", "--run", r, "--max-cases", "0"], "--max-cases"),
    "--max-cases -1": lambda r, d, t: (["evaluate", "--run", r, "--max-cases", "-1"], "--max-cases"),
    "--max-cases x": lambda r, d, t: (["evaluate", "--run", r, "--max-cases", "x"], "--max-cases"),
    "--split test without test cases": lambda r, d, t: (
        ["evaluate", "--run", r, "--split", "test"],
        "--split",
    ),
    "--split holdout": lambda r, d, t: (["evaluate", "--run", r, "--split", "holdout"], "--split"),
    "--postprocess auto without a recorded choice": lambda r, d, t: (
        ["evaluate", "--run", r, "--postprocess", "auto"],
        str(r),
    ),
    "--postprocess auto with a malformed postprocess.json": _choice_without_organs,
    "--postprocess biggest": lambda r, d, t: (
        ["evaluate", "--run", r, "--postprocess", "biggest"],
        "--postprocess",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_evaluate_refuses_and_changes_nothing(case, tiny_run, prepared_dir, tmp_path, capsys):
    args, names = case(tiny_run, prepared_dir, tmp_path)
    before = digest(tiny_run, prepared_dir, tmp_path)
    rc, _, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, names)
    assert digest(tiny_run, prepared_dir, tmp_path) == before
