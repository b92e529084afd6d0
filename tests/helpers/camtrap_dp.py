"""A copy of the Camtrap DP example package's tables that a test may change."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_tables(example: Path, target: Path) -> Path:
    """The example's datapackage.json and CSV files (not its media) in a folder a test may change."""
    target.mkdir(parents=True)
    for name in ("datapackage.json", "deployments.csv", "media.csv", "observations.csv"):
        shutil.copy(example / name, target / name)
    return target
