"""Shared fixtures: phantom CT volumes, a prepared dataset, and the real CT in ../shared/data/ct.

Nothing here downloads anything: HF_HUB_OFFLINE is forced on for the whole test session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_CT = REPO.parent / "shared" / "data" / "ct"


@pytest.fixture(scope="session")
def shared_ct() -> Path:
    """The real abdominal CT (TotalSegmentator sample, FLARE22 ids); read its README."""
    assert (SHARED_CT / "images" / "TS_0001_0000.nii.gz").is_file(), f"missing {SHARED_CT}"
    return SHARED_CT


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Four small phantom cases (style A) in FLARE22 layout: images/, labels/."""
    from clipseg_bench.data.phantom import write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, cases=4, seed=0, style="A", size=64)
    return out


@pytest.fixture(scope="session")
def prepared_dir(phantom_dir, tmp_path_factory) -> Path:
    """The phantoms prepared (3 train cases, 1 val case)."""
    from clipseg_bench.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "p"
    prepare(images=phantom_dir / "images", labels=phantom_dir / "labels", out=out, val_fraction=0.25, seed=0)
    return out
