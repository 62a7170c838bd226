"""What the tests of benchmarks/throughput.py share: its measurement package on sys.path, and a clean
Accelerate state afterwards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def throughput_parts_path():
    """benchmarks/ on sys.path (it is not a package) while a module's tests run; afterwards Accelerate's
    process-wide state is reset and the CPU Accelerator the parts cache forgotten, so later tests start clean."""
    from accelerate.state import AcceleratorState

    path = list(sys.path)
    sys.path.insert(0, str(BENCHMARKS))
    yield BENCHMARKS
    sys.path[:] = path
    AcceleratorState._reset_state(reset_partial_state=True)
    engine = sys.modules.get("throughput_parts.engine")
    if engine is not None:
        engine.cpu_accelerator.cache_clear()
