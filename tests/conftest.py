"""Fixtures shared by the CLI tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def unwritable_out(tmp_path: Path) -> Iterator[Path]:
    """An output path this process cannot create: under a read-only folder, or, for root
    (whom permissions do not stop), under ``/proc``, where no one can make a folder."""
    if os.geteuid() == 0:
        yield Path("/proc/metaopt-out")
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        yield locked / "out"
    finally:
        locked.chmod(0o755)
