"""Fixtures of the bad-input tests: one tiny finished run, broken copies of it and of the prepared data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_helpers import data_copy, set_status

from clipseg_bench.config import load_config
from clipseg_bench.train.loop import train

RUN_SETTINGS = {"model": "tiny", "strategy": "decoder", "image_size": 64, "batch_size": 8, "max_steps": 2}


@pytest.fixture(scope="session")
def tiny_run(prepared_dir, tmp_path_factory) -> Path:
    """A finished decoder run (2 steps, 64 px) on the phantoms; never modified by a test (copy it)."""
    out = tmp_path_factory.mktemp("cli_run") / "run"
    cfg = load_config(None, {**RUN_SETTINGS, "data": str(prepared_dir), "out": str(out), "val_max_slices": 4})
    return train(cfg)


@pytest.fixture
def unfinished_run(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run as a kill would leave it: status running, checkpoint, no weights yet."""
    run = tmp_path / "unfinished"
    shutil.copytree(tiny_run, run)
    (run / "weights.safetensors").unlink()
    set_status(run, "running")
    return run


@pytest.fixture
def prepared_copy(prepared_dir, tmp_path) -> Path:
    """A copy of the prepared phantoms to break (without the feature cache, which is not needed)."""
    return data_copy(prepared_dir, tmp_path)


@pytest.fixture
def ct_file(phantom_dir) -> Path:
    return sorted((phantom_dir / "images").glob("*.nii.gz"))[0]
