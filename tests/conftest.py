"""Fixtures shared by test modules (pytest finds them here without an import); plain helpers are in tests/helpers/."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers.demo import TrainedRun, train_demo_run
from tests.helpers.downloads import FaultServer, serve_faults
from tests.helpers.processes import REPO_ROOT, SHARED_DATA

pytest_plugins = ["tests.label_studio_server"]  # the session's one real Label Studio server (label_studio_server)


@pytest.fixture(scope="session", autouse=True)
def torch_threads() -> None:
    """Apply OMP_NUM_THREADS (set in tests/helpers/__init__.py) even where torch was imported before it was set."""
    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"].split(",")[0] or 1)))


@pytest.fixture
def shared_data() -> Path:
    """The real camera-trap data beside the repo; the test is skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (a fresh clone without ../shared)")
    return SHARED_DATA


@pytest.fixture
def example(shared_data: Path) -> Path:
    """The Camtrap DP example package (4 deployments, 423 media of which 10 are local files, 549 observations)."""
    path = shared_data / "camtrap_dp_example"
    if not (path / "datapackage.json").is_file():
        pytest.skip(f"{path}: the Camtrap DP example package is not there")
    return path


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``python3`` kernelspec that runs this interpreter, found first via JUPYTER_PATH; no user state touched."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (test)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # the library without an install, as the tests see it


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """A two-epoch tiny model on a demo dataset, trained once per test module that asks for it."""
    return train_demo_run(tmp_path_factory.mktemp("predict"))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FaultServer]:
    """A fault-injecting HTTP server on 127.0.0.1 serving small JPEGs from ``tmp_path/server``."""
    with serve_faults(tmp_path / "server") as state:
        yield state
