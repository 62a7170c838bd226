"""`report`: every bad input is one line and exit 2 with nothing written; killed runs show as killed
and runs that never started are listed (issue 12)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from cli_helpers import assert_one_line_error, digest, edit_json, run_cli

from clipseg_bench.provenance import process_record


def _bench(tiny_run: Path, root: Path, cells=(("decoder", 0),), present=("decoder-s0",)) -> Path:
    """A BENCH folder whose record lists ``cells`` and which holds copies of the tiny run as ``present``."""
    bench = root / "B"
    for name in present:
        shutil.copytree(tiny_run, bench / "runs" / name)
    bench.mkdir(exist_ok=True)
    record = {"strategies": sorted({s for s, _ in cells}), "seeds": sorted({d for _, d in cells})}
    (bench / "bench-shard0.json").write_text(json.dumps({**record, "cells": [list(c) for c in cells]}))
    return bench


def _foreign_out(r, t):
    b = _bench(r, t)
    (t / "mine").mkdir()
    (t / "mine" / "notes.md").write_text("precious")
    return ["report", b, "--out", t / "mine"], t / "mine"


def _out_is_a_file(r, t):
    b = _bench(r, t)
    (t / "notes.txt").write_text("keep")
    return ["report", b, "--out", t / "notes.txt"], t / "notes.txt"


def _corrupt(rel: str, text: str):
    def make(r, t):
        b = _bench(r, t)
        (b / "runs" / "decoder-s0" / rel).write_text(text)
        return ["report", b], b / "runs" / "decoder-s0" / rel

    return make


def _bad_cell(r, t):
    b = _bench(r, t)
    edit_json(b / "bench-shard0.json", lambda d: d.update(cells=[["decoder"]]))
    return ["report", b], b / "bench-shard0.json"


def _corrupt_record(r, t):
    b = _bench(r, t)
    (b / "bench-shard0.json").write_text("[1, 2")
    return ["report", b], b / "bench-shard0.json"


def _no_runs(r, t):
    (t / "empty").mkdir()
    return ["report", t / "empty"], t / "empty"


def _prepared_folder(r, t):
    folder = t / "prepared_like"
    (folder / "cache").mkdir(parents=True)
    (folder / "dataset.json").write_text("{}")
    return ["report", folder], folder


CASES = {
    "folder missing": lambda r, t: (["report", t / "nope"], t / "nope"),
    "folder without runs": _no_runs,
    "a prepared folder": _prepared_folder,
    "no folder": lambda r, t: (["report"], "bench"),
    "--out is a file": _out_is_a_file,
    "--out someone else's folder": _foreign_out,
    "corrupt run.json": _corrupt("run.json", "{"),
    "run.json not an object": _corrupt("run.json", "[]"),
    "corrupt metrics.json": _corrupt("metrics.json", "nan nan"),
    "corrupt config.yaml": _corrupt("config.yaml", "a: [b"),
    "corrupt history.csv": _corrupt("history.csv", 'a,b\n1,2,3\n"unclosed\n'),
    "corrupt samples.npz": _corrupt("samples.npz", "not a zip"),
    "corrupt record": _corrupt_record,
    "record cell not [strategy, seed]": _bad_cell,
    "--equivalence-margin 0": lambda r, t: (
        ["report", _bench(r, t), "--equivalence-margin", "0"],
        "--equivalence-margin",
    ),
    "--equivalence-margin not a number": lambda r, t: (
        ["report", _bench(r, t), "--equivalence-margin", "tiny"],
        "--equivalence-margin",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_report_refuses_and_changes_nothing(case, tiny_run, tmp_path, capsys):
    args, names = case(tiny_run, tmp_path)
    before = digest(tmp_path)
    rc, _, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, names)
    assert digest(tmp_path) == before


def _dead_process_record() -> dict:
    """The process record of a Python that has exited (as a SIGKILLed training leaves it)."""
    code = "import json; from clipseg_bench.provenance import process_record; print(json.dumps(process_record()))"
    return json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )


def test_killed_and_never_started_runs_are_named_in_the_report(tiny_run, tmp_path, capsys):
    cells = [("decoder", 0), ("decoder", 1), ("decoder", 2), ("lora", 0)]
    bench = _bench(tiny_run, tmp_path, cells, present=("decoder-s0", "decoder-s1", "decoder-s2"))
    for seed, process in ((1, _dead_process_record()), (2, process_record())):
        edit_json(
            bench / "runs" / f"decoder-s{seed}" / "run.json",
            lambda d, p=process, s=seed: d.update(status="running", process=p, seed=s),
        )
    rc, _, err = run_cli(["report", bench], capsys)
    assert rc == 0, err
    table = pd.read_csv(bench / "results.csv").set_index(["strategy", "seed"])["status"]
    assert table.to_dict() == {
        ("decoder", 0): "finished",
        ("decoder", 1): "killed",  # its process is gone
        ("decoder", 2): "running",  # this test's own process: alive
        ("lora", 0): "not started",  # in the record, no folder
    }
    html = (bench / "report.html").read_text()
    assert "killed" in html and "not started" in html
    md = (bench / "results.md").read_text()
    assert "decoder seed 1 (killed)" in md and "lora seed 0 (not started)" in md


def test_a_record_without_any_run_folder_still_reports(tmp_path, capsys):
    bench = tmp_path / "B"
    bench.mkdir()
    (bench / "bench-shard0.json").write_text(json.dumps({"cells": [["full", 0]]}))
    rc, _, err = run_cli(["report", bench], capsys)
    assert rc == 0, err
    assert pd.read_csv(bench / "results.csv")["status"].tolist() == ["not started"]


def test_report_into_its_own_out_folder_again(tiny_run, tmp_path, capsys):
    """A folder the report wrote is ours: a second report may replace it without --overwrite."""
    bench = _bench(tiny_run, tmp_path)
    out = tmp_path / "merged"
    assert run_cli(["report", bench, "--out", out], capsys)[0] == 0
    assert run_cli(["report", bench, "--out", out], capsys)[0] == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("x")
    assert run_cli(["report", bench, "--out", mine, "--overwrite"], capsys)[0] == 0
    assert (mine / "report.html").is_file() and (mine / "notes.md").read_text() == "x"


def _two_shards(tiny_run: Path, tmp: Path) -> tuple[Path, Path]:
    """Two BENCH folders that both hold decoder seed 0: copies of one run, so their numbers are equal."""
    return _bench(tiny_run, tmp / "shard_a"), _bench(tiny_run, tmp / "shard_b")


def _set_epochs(run: Path, epochs: int) -> None:
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("epochs: 20", f"epochs: {epochs}"))


def test_a_cell_recorded_twice_with_other_settings_is_refused_whatever_its_numbers(
    tiny_run, tmp_path, capsys
):
    """Issue 25: a cell recorded as 20 epochs in one folder and 99 in the other, with equal numbers (a
    copied folder whose config was edited), used to become one row."""
    a, b = _two_shards(tiny_run, tmp_path)
    _set_epochs(b / "runs" / "decoder-s0", 99)
    before = digest(tmp_path)
    rc, _, err = run_cli(["report", a, b, "--out", tmp_path / "merged"], capsys)
    line = assert_one_line_error(rc, err, str(a / "runs" / "decoder-s0"))
    assert str(b / "runs" / "decoder-s0") in line and "epochs: 20 there, 99 here" in line
    assert digest(tmp_path) == before


def test_a_cell_trained_on_other_data_is_refused_and_a_moved_copy_of_the_data_is_not(
    tiny_run, tmp_path, capsys
):
    """Shards on other machines see one dataset at other paths: the data counts by its fingerprint."""
    a, b = _two_shards(tiny_run, tmp_path)
    run_b = b / "runs" / "decoder-s0"
    config = run_b / "config.yaml"
    data = json.loads((run_b / "run.json").read_text())["data"]
    config.write_text(config.read_text().replace(data["path"], "/elsewhere/prepared"))
    assert run_cli(["report", a, b, "--out", tmp_path / "merged"], capsys)[0] == 0  # same fingerprint
    edit_json(run_b / "run.json", lambda d: d["data"].update(fingerprint="0123456789abcdef"))
    rc, _, err = run_cli(["report", a, b, "--out", tmp_path / "merged2"], capsys)
    assert "data (dataset.json fingerprint)" in assert_one_line_error(rc, err, str(run_b))
