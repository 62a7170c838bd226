"""Resource failures are one line, exit 1, and leave nothing half-written (issue 25): a full disk
(``ulimit -f``: writes fail with EFBIG, SIGXFSZ being ignored), memory (an image size refused with its
estimate before anything is allocated), and read-only data (the feature cache goes elsewhere)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, digest, run_cli
from safetensors.torch import load_file

from clipseg_bench.errors import RunFailed
from clipseg_bench.provenance import replacing, write_error
from clipseg_bench.train.setup import step_memory


@contextmanager
def file_size_limit(n_bytes: int):
    """``ulimit -f`` for this process while the block runs (Python ignores SIGXFSZ: writes get EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _limited(n_bytes: int):
    """A subprocess' preexec_fn: ``ulimit -f n_bytes`` (SIGXFSZ ignored, so a write fails with EFBIG)."""
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


def _tmp_files(folder: Path) -> list[Path]:
    """Files a write left behind under a temporary name (replacing's, the checkpoint's, the cache's)."""
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def _cli(*args, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "clipseg_bench.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)


def _last_error_line(err: str) -> str:
    """The error line after a run's progress bars (tqdm writes them to stderr): the only error line."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


# --- a full disk ----------------------------------------------------------------------------------


def test_a_file_over_the_limit_is_one_line_and_the_old_file_stays(tmp_path):
    target = tmp_path / "history.csv"
    target.write_text("old")
    with pytest.raises(RunFailed, match=r"File too large .*ulimit -f") as info:
        with file_size_limit(1000), replacing(target) as tmp:
            tmp.write_bytes(b"x" * 5000)
    assert info.value.path == str(target) and info.value.exit_code == 1
    assert target.read_text() == "old" and _tmp_files(tmp_path) == []


def test_a_writer_that_hides_the_os_error_counts_as_out_of_room_when_the_size_does_not_fit(tmp_path):
    """torch.save reports a write past ``ulimit -f`` as ``unexpected pos``: no errno to go by."""
    hidden = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with file_size_limit(10_000):
        assert isinstance(write_error(tmp_path / "optim.pt", hidden, need=20_000), RunFailed)
        assert write_error(tmp_path / "optim.pt", hidden, need=5_000) is None  # fits: a bug, not the disk
    wrapped = RuntimeError("Error while serializing: I/O error: File too large (os error 27)")
    assert isinstance(write_error(tmp_path / "w.safetensors", wrapped), RunFailed)


def test_phantom_on_a_full_disk_writes_no_half_file(tmp_path, capsys):
    """Issue 25: `phantom` gave a traceback and left a partial NIfTI."""
    with file_size_limit(20_000):
        rc, _, err = run_cli(["phantom", "--out", tmp_path / "P", "--cases", "2", "--size", "64"], capsys)
    line = assert_one_line_error(
        rc, err, str(tmp_path / "P" / "images" / "phantomA_0000_0000.nii.gz"), code=1
    )
    assert "File too large" in line and "ulimit -f" in line
    assert [p for p in (tmp_path / "P").rglob("*") if p.is_file()] == []


def test_a_feature_cache_that_cannot_fit_is_refused_before_it_is_written(prepared_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", prepared_dir, "--out", out, "--strategy", "decoder", "--image-size", "64"]
    args += ["--max-steps", "1", "--cache-dir", tmp_path / "cache"]
    with file_size_limit(50_000):
        rc, _, err = run_cli(args, capsys)
    line = assert_one_line_error(rc, err, str(tmp_path / "cache"), code=1)
    assert "the feature cache" in line and "ulimit -f" in line
    assert _tmp_files(tmp_path) == [] and not out.exists()


def _history(run: Path):
    import pandas as pd

    return pd.read_csv(run / "history.csv")[["epoch", "step", "loss", "train_dice", "lr"]]


def test_a_run_stopped_by_a_full_disk_resumes_to_the_uninterrupted_result(
    prepared_dir, tmp_path, capsys, monkeypatch
):
    """Issue 25: a full disk left a half-written checkpoint and a traceback. The file size limit here
    lets the checkpoint's size check pass and stops torch.save midway through optim.pt (the largest
    file): one line, exit 1, run.json `failed`, no half-built checkpoint; `--resume` then ends
    exactly where an uninterrupted run ends (same process for both: bit for bit)."""
    # decoder with the tiny run's settings: the feature cache is built (by the reference run, or
    # already), so the checkpoint is the only large file the limited run writes.
    settings = [
        "--strategy",
        "decoder",
        "--image-size",
        "64",
        "--max-steps",
        "2",
        "--set",
        "val_max_slices=4",
    ]
    reference = tmp_path / "reference"
    monkeypatch.chdir(prepared_dir.parent)  # a relative --data: config.yaml must record where it is
    assert run_cli(["train", "--data", prepared_dir.name, "--out", reference, *settings], capsys)[0] == 0
    trainable = json.loads((reference / "run.json").read_text())["params"]["trainable"]
    assert f"data: {prepared_dir.resolve()}" in (reference / "config.yaml").read_text()

    run = tmp_path / "run"
    limit = 2 * 4 * trainable + 1  # above AdamW's two fp32 moments, the checkpoint's estimate of optim.pt
    proc = _cli("train", "--data", prepared_dir, "--out", run, *settings, preexec_fn=_limited(limit))
    line = _last_error_line(proc.stderr)
    assert proc.returncode == 1 and ("File too large" in line or "no room" in line), proc.stderr
    assert str(run / "checkpoints") in line and "ulimit -f" in line
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "ulimit -f" in info["error"]
    assert _tmp_files(run) == [] and not (run / "checkpoints" / "last").exists()

    assert run_cli(["train", "--out", run, "--resume"], capsys)[0] == 0
    got, want = load_file(run / "weights.safetensors"), load_file(reference / "weights.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert _history(run).equals(_history(reference))


# --- memory ---------------------------------------------------------------------------------------


def test_the_memory_estimate_counts_pixels_and_masks():
    side = 20_000
    # Live: 8 x (3 + 1) float32 maps; cached: the cache build's 8 x 3 pixel maps are the smaller bound.
    assert step_memory(side, 8) == min(8 * 16 * side**2, 8 * 12 * side**2) == 38_400_000_000
    # 64 slices: the cache builds 16 at a time, but a cached step still holds 64 masks.
    assert step_memory(side, 64) == min(64 * 16, max(16 * 12, 64 * 4)) * side**2 == 102_400_000_000


def test_an_image_size_beyond_memory_is_refused_before_anything_is_allocated(prepared_dir, tmp_path, capsys):
    """Issue 25: `--image-size 20000` died with a traceback (or ran for minutes) instead of an estimate."""
    out = tmp_path / "run"
    args = ["train", "--data", prepared_dir, "--out", out, "--image-size", "20000", "--max-steps", "1"]
    rc, _, err = run_cli(args, capsys)
    line = assert_one_line_error(rc, err, "needs at least 38.4 GB", code=1)
    assert "image_size 20000" in line and "batch_size 8" in line and "available memory" in line
    assert not out.exists()


# --- read-only data and run folders ------------------------------------------------------------------


@pytest.fixture
def read_only():
    """A command prefix under which a folder cannot be written, even by root: a read-only bind mount
    in a private mount namespace (unshare); for other users, its permission bits (restored after)."""
    restore: list[tuple[Path, int]] = []

    def make(folder: Path) -> list[str]:
        if os.geteuid() != 0:
            for p in [folder, *folder.rglob("*")]:
                restore.append((p, p.stat().st_mode))
                p.chmod(p.stat().st_mode & ~0o222)
            return []
        script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
        return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(folder)]

    yield make
    for p, mode in reversed(restore):
        p.chmod(mode)


def test_read_only_data_puts_the_feature_cache_beside_the_run(
    prepared_dir, tmp_path, read_only, capsys, monkeypatch
):
    """Issue 25: a PREPARED folder on a read-only mount made `train` crash writing its feature cache.
    The cache goes beside the run, where the next run of the same data and model finds it."""
    data = tmp_path / "shared" / "prepared"
    shutil.copytree(prepared_dir, data, ignore=shutil.ignore_patterns("feature_cache"))
    before = digest(data)
    out = tmp_path / "runs" / "r1"
    args = [
        "train",
        "--data",
        data,
        "--strategy",
        "decoder",
        "--image-size",
        "64",
        "--set",
        "val_max_slices=4",
    ]
    cmd = [*read_only(data), sys.executable, "-m", "clipseg_bench.cli", *map(str, args), "--out", str(out)]
    cmd += ["--max-steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert digest(data) == before
    cache = tmp_path / "runs" / "feature_cache"
    assert len(list(cache.glob("*/train_kept.npy"))) == 1
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    # Shared by runs of the same data and model: another seed, the cache named by $CLIPSEG_BENCH_CACHE.
    monkeypatch.setenv("CLIPSEG_BENCH_CACHE", str(cache))
    rc, _, err = run_cli(
        [*args, "--out", tmp_path / "runs" / "r2", "--seed", "1", "--max-steps", "1"], capsys
    )
    assert rc == 0, err
    assert json.loads((tmp_path / "runs" / "r2" / "run.json").read_text())["timing"]["cache_reused"] is True
    assert len(list(cache.iterdir())) == 1


def test_evaluate_into_a_read_only_run_folder_is_refused_before_its_work(tiny_run, tmp_path, read_only):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = digest(run)
    cmd = [*read_only(run), sys.executable, "-m", "clipseg_bench.cli", "evaluate", "--run", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    line = assert_one_line_error(proc.returncode, proc.stderr, str(run))  # no progress bar: no work began
    assert "not writable" in line and proc.stdout == ""
    assert digest(run) == before
