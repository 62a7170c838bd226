"""The real `clipseg-bench` process: a usage mistake argparse finds and a bad file both end as one
stderr line and exit code 2 (not argparse's usage block), while --help still exits 0."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cli_helpers import assert_one_line_error


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "clipseg_bench.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["benchmark", "--data", "D", "--out", "B", "--seeds", "a"], "--seeds"),  # an argparse type error
        (["score", "--pred", "P", "--labels", "L"], "L: not a folder"),  # an InputError
    ],
    ids=["usage", "input"],
)
def test_one_line_and_exit_2_from_the_real_process(args, names, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "clipseg_bench.cli", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    if args[0] == "score":
        assert proc.returncode == 2  # P does not exist: refused before --pred == --labels matters
    assert_one_line_error(proc.returncode, proc.stderr, names)
    assert "usage:" not in proc.stderr


def test_help_still_exits_0():
    proc = _cli("train", "--help")
    assert proc.returncode == 0 and "--resume" in proc.stdout
