"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# ../shared/data relative to the project root: present on CI, usually absent on a user's machine.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared benchmark data; skips the test when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA
