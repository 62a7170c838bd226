"""What a run records about itself."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from clipseg_bench.provenance import git_info, hardware_info, peak_rss_mb


def test_peak_rss_of_a_subprocess_is_its_own():
    """ru_maxrss survives fork+exec; a benchmark's training subprocess must not report its parent's peak."""
    ballast = np.ones(400 * 2**20 // 8)  # ~400 MiB resident in the parent
    parent = peak_rss_mb()
    code = "from clipseg_bench.provenance import peak_rss_mb; print(peak_rss_mb())"
    child = float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert ballast.sum() > 0
    assert parent > 400 and child < parent - 250


def test_git_and_hardware_info():
    g = git_info()
    assert set(g) == {"commit", "dirty"}
    assert g["commit"] == "unknown" or len(g["commit"]) == 40
    h = hardware_info(num_processes=3)
    assert h["num_processes"] == 3 and h["torch"] and h["cpu"]
