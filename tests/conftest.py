"""Shared test fixtures: paths to the real data in ../shared/data and the repo root."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import runpy
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

pytest_plugins = ["tests.label_studio_server"]  # the session's one real Label Studio server (label_studio_server)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# One torch thread, in this process and in the entry points the tests start (a value set by whoever runs the
# tests is kept): the models here are tiny, and on a 2-core machine a second thread only spins against the
# first and against loader workers (one in-process resume test: 53 CPU-s with 2 threads, 18 with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def torch_threads() -> None:
    """Apply OMP_NUM_THREADS even where torch was imported before this file set it."""
    import torch

    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"].split(",")[0] or 1)))


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


@functools.cache
def entry_point_main(script: str) -> Callable[[Sequence[str] | None], int | None]:
    """``main`` of ``utils/<x>.py`` or ``classifier/<x>.py`` (the script runs as a module, not as __main__)."""
    return runpy.run_path(str(REPO_ROOT / script))["main"]


@contextlib.contextmanager
def _as_a_process(script: str, args: Sequence[str], env: Mapping[str, str] | None, cwd: Path | None,
                  stdout: io.StringIO, stderr: io.StringIO) -> Iterator[None]:
    """This process made to look like the subprocess: environment, folder, argv, one torch thread, INFO logs on stderr."""
    import torch

    saved_env, saved_cwd, saved_argv, saved_threads = dict(os.environ), os.getcwd(), sys.argv, torch.get_num_threads()
    root = logging.getLogger()
    saved_level, saved_handlers, handler = root.level, list(root.handlers), logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.chdir(cwd or REPO_ROOT)
        sys.argv = [str(REPO_ROOT / script), *args]
        if os.environ.get("OMP_NUM_THREADS") == "1":
            torch.set_num_threads(1)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            yield
    finally:
        for added in [h for h in root.handlers if h not in saved_handlers]:  # ours, and basicConfig's if it added one
            root.removeHandler(added)
        root.setLevel(saved_level)
        torch.set_num_threads(saved_threads)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def run_in_process(script: str, *args: object, env: Mapping[str, str] | None = None,
                   cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run an entry point's ``main`` as its ``__main__`` does (``run_main``: one-line errors, exit codes), in this process.

    For tests of what the library does behind an entry point, not of the process itself: it saves
    the 3-5 s of imports a new interpreter costs. ``env`` replaces the environment during the call,
    as ``subprocess.run(env=...)`` would; stdout, stderr and INFO logs are captured as a subprocess's.
    Each entry point keeps at least one test that runs it as a real subprocess (``run_entry_point``).
    """
    from classification.cli import run_main

    argv = [str(a) for a in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    with _as_a_process(script, argv, env, cwd, stdout, stderr):
        try:
            code = run_main(entry_point_main(script), argv)
        except SystemExit as stop:  # argparse errors exit from the parser
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
    return subprocess.CompletedProcess([sys.executable, str(REPO_ROOT / script), *argv], code,
                                       stdout.getvalue(), stderr.getvalue())
