"""One writer per output folder (issue 25): a second `train`, `prepare`, `benchmark`, `report` or
`evaluate` (also of a run a live `train` writes) into a folder another live process is writing is refused up front with one line naming that process; a
lock whose process died (SIGKILL) is taken over and said so; a lock from another host is refused
with the file to remove. Two concurrent `train` calls into one folder: one refused, the other's run
intact."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, digest, run_cli

from clipseg_bench.provenance import lock_path, output_lock

HOLD = """
import sys, time
from clipseg_bench.provenance import output_lock
with output_lock(sys.argv[1], sys.argv[2], scope=sys.argv[3] or None):
    print("holding", flush=True)
    time.sleep(120)
"""


class Holder:
    """A live process that holds ``command``'s lock on ``folder`` until the test ends."""

    def __init__(self, folder: Path, command: str, scope: str = ""):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(folder), command, scope], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "holding"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def holder():
    started: list[Holder] = []

    def start(folder: Path, command: str, scope: str = "") -> Holder:
        started.append(Holder(folder, command, scope))
        return started[-1]

    yield start
    for h in started:
        h.stop()


def _train(data, out) -> list:
    """A short decoder run with the tiny run's settings: its feature cache is already built."""
    args = ["train", "--data", data, "--out", out, "--model", "tiny", "--strategy", "decoder"]
    return [*args, "--image-size", "64", "--set", "val_max_slices=4", "--max-steps", "1"]


def _bench_copy(tiny_run: Path, tmp: Path) -> Path:
    bench = tmp / "B"
    shutil.copytree(tiny_run, bench / "runs" / "decoder-s0")
    (bench / "bench-shard0.json").write_text(json.dumps({"cells": [["decoder", 0]]}))
    return bench


def _prepare_args(phantom_dir: Path, out: Path) -> list:
    return ["prepare", "--images", phantom_dir / "images", "--labels", phantom_dir / "labels", "--out", out]


def _run_copy(tiny_run: Path, tmp: Path) -> Path:
    shutil.copytree(tiny_run, tmp / "R")
    return tmp / "R"


CASES = {  # command line, the folder it writes, the lock's command and scope
    "train": lambda p, r, ph, t: (_train(p, t / "run"), t / "run", "train", ""),
    "prepare": lambda p, r, ph, t: (_prepare_args(ph, t / "P"), t / "P", "prepare", ""),
    "benchmark": lambda p, r, ph, t: (
        ["benchmark", "--data", p, "--out", t / "B", "--strategies", "zeroshot", "--seeds", "0"],
        t / "B",
        "benchmark",
        "shard0",
    ),
    "report": lambda p, r, ph, t: (["report", _bench_copy(r, t)], t / "B", "report", ""),
    # a second evaluation of one split, and one of a run whose `train` still writes its weights
    "evaluate": lambda p, r, ph, t: (["evaluate", "--run", _run_copy(r, t)], t / "R", "evaluate", "val"),
    "evaluate-during-train": lambda p, r, ph, t: (
        ["evaluate", "--run", _run_copy(r, t)],
        t / "R",
        "train",
        "",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_second_writer_is_refused_naming_the_first(
    case, prepared_dir, tiny_run, phantom_dir, tmp_path, holder, capsys
):
    args, folder, command, scope = case(prepared_dir, tiny_run, phantom_dir, tmp_path)
    first = holder(folder, command, scope)
    before = digest(tmp_path, prepared_dir)
    rc, _, err = run_cli(args, capsys)
    line = assert_one_line_error(rc, err, str(folder))
    assert f"process {first.proc.pid} on" in line and "started 20" in line and "writing into it" in line
    assert digest(tmp_path, prepared_dir) == before


def test_benchmark_shards_of_one_folder_run_side_by_side(prepared_dir, tmp_path, holder, capsys):
    """Shard 1 of a folder whose shard 0 is running is not refused by that lock (it is by nothing here:
    the call checks everything and trains its zero-shot cell)."""
    bench = tmp_path / "B"
    holder(bench, "benchmark", "shard0")
    args = ["benchmark", "--data", prepared_dir, "--out", bench, "--strategies", "zeroshot", "--seeds", "0,1"]
    settings = ["--max-steps", "1", "--no-evaluate", "--shard", "1/2", "--config", tmp_path / "c.yaml"]
    (tmp_path / "c.yaml").write_text("image_size: 64\nval_every: 0\nval_max_slices: 4\n")
    rc, out, err = run_cli([*args, *settings], capsys)
    assert rc == 0, err
    assert "zeroshot-s1" in out and not (bench / "runs" / "zeroshot-s0").exists()


def test_two_concurrent_trains_into_one_folder(prepared_dir, tmp_path, capsys):
    """Issue 25: both used to exit 0, the folder a mix of two strategies. Now the second is refused
    while the first runs, naming it, and the first's run is whole: its strategy, finished."""
    out = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clipseg_bench.cli",
            *map(str, _train(prepared_dir, out)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = lock_path(out, "train")
    deadline = time.monotonic() + 120
    while not lock.is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock.is_file(), first.communicate()
    rc, _, err = run_cli([*_train(prepared_dir, out), "--strategy", "lora"], capsys)
    line = assert_one_line_error(rc, err, str(out))
    assert f"`train` process {first.pid} on" in line
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err
    info = json.loads((out / "run.json").read_text())
    assert (
        info["status"] == "finished" and info["strategy"] == "decoder" and info["process"]["pid"] == first.pid
    )
    assert "strategy: decoder" in (out / "config.yaml").read_text()
    assert not lock.exists()  # released: the folder holds the run only


def test_a_lock_left_by_a_killed_process_is_taken_over(prepared_dir, tmp_path, capsys):
    """SIGKILL leaves the lock file; its process is gone, so the next `train` takes it over and says so."""
    out = tmp_path / "run"
    code = "import os, signal, sys\nfrom clipseg_bench.provenance import output_lock\n"
    code += "with output_lock(sys.argv[1], 'train'):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    killed = subprocess.run([sys.executable, "-c", code, str(out)])
    assert killed.returncode == -signal.SIGKILL and lock_path(out, "train").is_file()
    dead_pid = json.loads(lock_path(out, "train").read_text())["pid"]
    rc, _, err = run_cli(_train(prepared_dir, out), capsys)
    assert rc == 0, err
    assert f"taking over the lock of `train` process {dead_pid}" in err and "no longer runs" in err
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert not lock_path(out, "train").exists()


def test_a_lock_from_another_host_is_refused_with_the_file_to_remove(prepared_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    record = {"pid": 4242, "host": "node17.cluster", "started": "2025-01-31 14:02:05", "command": "train"}
    lock_path(out, "train").write_text(json.dumps(record))
    before = digest(tmp_path)
    rc, _, err = run_cli(_train(prepared_dir, out), capsys)
    line = assert_one_line_error(rc, err, str(out))
    assert "process 4242 on node17.cluster" in line and f"remove {lock_path(out, 'train')}" in line
    assert digest(tmp_path) == before


def test_a_refused_train_leaves_no_folder_and_a_lock_is_released(tmp_path, capsys):
    """The lock's folder goes again when nothing else was written into it (a refused run leaves no
    folder); an existing folder stays, without the lock file."""
    new = tmp_path / "a" / "run"
    rc, _, err = run_cli(_train(tmp_path / "no_data", new), capsys)
    assert_one_line_error(rc, err, str(tmp_path / "no_data"))
    assert not (tmp_path / "a").exists()
    with output_lock(tmp_path, "train") as lock:
        assert lock.is_file() and os.listdir(tmp_path) == [lock.name]
    assert os.listdir(tmp_path) == []
