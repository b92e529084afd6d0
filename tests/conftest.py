"""Shared test fixtures: paths to the real data in ../shared/data and the repo root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.label_studio_server"]  # the session's one real Label Studio server (label_studio_server)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real camera-trap data beside the repo; the test is skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (a fresh clone without ../shared)")
    return SHARED_DATA


def run_entry_point(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``utils/<script>`` or ``classifier/<script>`` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO_ROOT,
        timeout=600,
    )
