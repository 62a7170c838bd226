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


def test_a_closed_pipe_ends_quietly_like_a_posix_tool(tmp_path):
    """`clipseg-bench strategies --json | head -1`: a traceback before; now no output on stderr and
    exit 141 (128 + SIGPIPE, what a shell reports for a POSIX tool that the closed pipe ended)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipseg_bench.cli", "strategies", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the first byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == ""


def test_an_unreachable_hub_is_one_line_without_retries(tmp_path):
    """Without network, loading a hub id retried for about 30 s over a dozen lines. The hub here is a
    closed local port: nothing leaves the machine."""
    import os
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "clipseg_bench.cli", "strategies", "--model", "nobody/no-such-model"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    line = assert_one_line_error(proc.returncode, proc.stderr, "nobody/no-such-model")
    assert "cannot be reached (127.0.0.1:9" in line and "not in the local cache" in line
    assert time.monotonic() - t0 < 25  # the retries alone took longer (import time included here)
