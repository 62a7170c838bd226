"""RUN/ through its one owner (run_folder.py): typed records, old layouts, preprocessing, statuses."""

from __future__ import annotations

import json

import pytest

from clipseg_bench.errors import InputError
from clipseg_bench.run_folder import Preprocessing, RunFolder, RunRecord, RunStatus

WINDOW = {"mode": "hu", "level": 40.0, "width": 400.0}


def test_a_record_round_trips_and_keeps_unknown_keys(tmp_path):
    run = RunFolder(tmp_path / "r")
    run.create()
    record = RunRecord(
        strategy="lora",
        seed=3,
        lr=2e-4,
        preprocessing=Preprocessing(window=WINDOW, input_channels="windows", channel_windows=[WINDOW] * 3),
        extra={"from_a_newer_version": {"x": 1}},
    )
    run.write_record(record)
    doc = json.loads(run.record_path.read_text())
    assert (
        doc["status"] == "running" and doc["lr"] == 2e-4 and "timing" not in doc
    )  # not reached: not written
    assert doc["from_a_newer_version"] == {"x": 1}
    back = run.record()
    assert back == record and back.status is RunStatus.RUNNING
    run.write_record(back.with_status(RunStatus.FAILED, error="boom"))
    assert run.record().status is RunStatus.FAILED and run.record().error == "boom"


def test_a_run_from_before_the_preprocessing_block_reads_its_old_keys(tmp_path):
    """run.json written before this version kept the window and channels at its top level."""
    (tmp_path / "run.json").write_text(
        json.dumps({"status": "finished", "strategy": "decoder", "seed": 0, "window": {"mode": "minmax"}})
    )
    pre = RunFolder(tmp_path).preprocessing()
    assert pre.window == {"mode": "minmax"} and pre.input_channels == "gray"  # gray: before the field
    from clipseg_bench.data.channels import WINDOWS

    assert pre.windows == list(WINDOWS)  # no recorded windows: today's (equal for every run so far)
    (tmp_path / "run.json").write_text(
        json.dumps(
            {
                "status": "finished",
                "window": WINDOW,
                "input_channels": "windows",
                "channel_windows": [1, 2, 3],
            }
        )
    )
    pre = RunFolder(tmp_path).preprocessing()
    assert pre.input_channels == "windows" and pre.windows == [1, 2, 3]
    # and the record rewrites them in today's layout
    assert "window" not in RunFolder(tmp_path).record().to_dict()


def test_statuses(tmp_path):
    run = RunFolder(tmp_path / "r")
    assert run.status() == RunStatus.MISSING
    run.create()
    run.write_record(RunRecord(status=RunStatus.FINISHED))
    assert run.status() == RunStatus.FINISHED
    run.write_metrics({"dice2d": 0.5})
    assert run.status() == RunStatus.EVALUATED and run.metrics() == {"dice2d": 0.5}
    assert str(RunStatus.NOT_STARTED) == "not started"  # what tables and messages show


def test_unreadable_files_are_one_input_error(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(InputError, match="run.json"):
        RunFolder(tmp_path).record()
    with pytest.raises(InputError, match="not a run folder"):
        RunFolder(tmp_path).config()
    (tmp_path / "history.csv").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="history.csv"):
        RunFolder(tmp_path).history()
