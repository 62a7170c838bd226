"""The shared output guards and atomic writes of provenance.py, and the process record that tells a
killed run from a running one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clipseg_bench.errors import InputError
from clipseg_bench.provenance import (
    check_output_file,
    check_output_folder,
    process_alive,
    process_record,
    replacing,
)


def _never(_):
    return False


def test_replacing_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "scores.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]  # no temporary file left


def test_replacing_keeps_the_extension_for_writers_that_read_it(tmp_path):
    with replacing(tmp_path / "mask.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.name.startswith(".")
        tmp.write_text("x")
    assert (tmp_path / "mask.nii.gz").read_text() == "x"


def test_replacing_turns_a_refused_write_into_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot write"), replacing(tmp_path / "no" / "x.csv") as tmp:
        tmp.write_text("x")


def test_output_file_may_not_be_an_input_however_spelled(tmp_path):
    ct = tmp_path / "ct.nii.gz"
    ct.write_text("ct")
    os.symlink(ct, tmp_path / "link.nii.gz")
    (tmp_path / "sub").mkdir()
    for spelling in (ct, tmp_path / "sub" / ".." / "ct.nii.gz", tmp_path / "link.nii.gz"):
        with pytest.raises(InputError, match="is an input"):
            check_output_file(spelling, command="x", ours=lambda _: True, inputs=[ct], overwrite=True)


def test_output_file_that_is_not_ours_needs_overwrite(tmp_path):
    mine = tmp_path / "mine.csv"
    mine.write_text("x")
    with pytest.raises(InputError, match="--overwrite"):
        check_output_file(mine, command="x", ours=_never)
    assert check_output_file(mine, command="x", ours=_never, overwrite=True) == mine
    assert check_output_file(mine, command="x", ours=lambda _: True) == mine
    with pytest.raises(InputError, match="is a folder"):
        check_output_file(tmp_path, command="x", ours=_never, overwrite=True)


def test_output_folder_rules(tmp_path):
    assert check_output_folder(tmp_path / "new" / "deeper", command="x", ours=_never)
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        check_output_folder(tmp_path / "f", command="x", ours=_never, overwrite=True)
    with pytest.raises(InputError, match="is not a folder"):
        check_output_folder(tmp_path / "f" / "sub", command="x", ours=_never)
    with pytest.raises(InputError, match="--overwrite"):
        check_output_folder(tmp_path, command="x", ours=_never)
    assert check_output_folder(tmp_path, command="x", ours=lambda p: (p / "f").is_file())


def test_process_alive_tells_a_gone_process_from_a_running_one():
    code = "import json; from clipseg_bench.provenance import process_record; print(json.dumps(process_record()))"
    gone = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    here = process_record()
    assert process_alive(here) is True
    assert process_alive(gone) is False
    assert process_alive({**here, "start_ticks": (here["start_ticks"] or 0) + 1}) is False  # pid reused
    assert process_alive({**here, "host": "another-node"}) is None  # cannot tell from here
    assert process_alive(None) is None
