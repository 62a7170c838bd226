"""A run finds its data wherever the two moved (issue 25): run.json records the PREPARED folder
resolved, relative to the run folder, and its fingerprint; `evaluate --data` takes only the same data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, data_copy, digest, edit_json, run_cli

from clipseg_bench.errors import InputError
from clipseg_bench.run_folder import RunFolder


def _moved(tiny_run: Path, prepared_dir: Path, tmp: Path) -> tuple[Path, Path]:
    """The run and its data copied side by side to another place, as onto another machine: the path
    run.json recorded no longer exists there, the relative one does."""
    run, data = tmp / "elsewhere" / "run", data_copy(prepared_dir, tmp / "elsewhere")
    shutil.copytree(tiny_run, run)
    edit_json(run / "run.json", lambda d: d["data"].update(path="/gone/prepared", relative="../prepared"))
    return run, data


def test_the_run_records_where_its_data_is(tiny_run, prepared_dir):
    data = json.loads((tiny_run / "run.json").read_text())["data"]
    assert data["path"] == str(prepared_dir.resolve())
    assert (tiny_run / data["relative"]).resolve() == prepared_dir.resolve()
    assert RunFolder(tiny_run).prepared().fingerprint == data["fingerprint"]


def test_a_moved_run_finds_its_data_beside_it_and_evaluates(tiny_run, prepared_dir, tmp_path, capsys):
    run, data = _moved(tiny_run, prepared_dir, tmp_path)
    assert RunFolder(run).prepared().root.resolve() == data.resolve()
    rc, out, err = run_cli(["evaluate", "--run", run], capsys)
    assert rc == 0, err
    assert json.loads((run / "metrics.json").read_text())["cases"]


def test_data_found_nowhere_is_one_line_naming_where_it_looked(tiny_run, prepared_dir, tmp_path, capsys):
    run, data = _moved(tiny_run, prepared_dir, tmp_path)
    shutil.rmtree(data)
    before = digest(run)
    rc, _, err = run_cli(["evaluate", "--run", run], capsys)
    line = assert_one_line_error(rc, err, str(run))
    assert "/gone/prepared" in line and "pass --data" in line
    assert digest(run) == before


def test_evaluate_data_must_be_the_runs_own(tiny_run, prepared_dir, tmp_path, capsys):
    """Another prepared folder (here: another split seed) is refused naming its dataset.json; a copy of
    the run's own data is the same data (the `--data truncated array` case gets past this check)."""
    other = data_copy(prepared_dir, tmp_path)
    edit_json(other / "dataset.json", lambda d: d["split"].update(seed=7))
    before = digest(tiny_run, other)
    rc, _, err = run_cli(["evaluate", "--run", tiny_run, "--data", other], capsys)
    line = assert_one_line_error(rc, err, str(other / "dataset.json"))
    assert "is not the prepared data" in line
    assert digest(tiny_run, other) == before
    same = data_copy(prepared_dir, tmp_path / "same")
    assert RunFolder(tiny_run).prepared(same).root == same
    with pytest.raises(InputError, match="is not the prepared data"):
        RunFolder(tiny_run).prepared(other)
