"""The repo's paths, and running an entry point as a user would (a subprocess) or in this process."""

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

import torch

from classification.cli import run_main

REPO_ROOT = Path(__file__).resolve().parents[2]


SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def run_entry_point(script: str, *args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
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
