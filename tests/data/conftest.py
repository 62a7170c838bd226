"""Fixtures of the data-stage tests (helpers live in data_helpers.py)."""

from __future__ import annotations

import pytest
from data_helpers import Layout


@pytest.fixture
def layout(tmp_path) -> Layout:
    return Layout(tmp_path / "in")
