"""An active-learning experiment (config, pool, hidden labels) and running its entry points."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tests.helpers.processes import REPO_ROOT, run_in_process
from tests.helpers.training import train_env


@dataclass(frozen=True)
class LoopRun:
    """An experiment with an active-learning section, its pool and the pool's hidden labels."""

    config: Path
    pool: Path
    answers: Path
    dataset: Path

    @property
    def run_dir(self) -> Path:
        return self.config.parent

    @property
    def al(self) -> Path:
        return self.run_dir / "active_learning"

    def round(self, k: int) -> Path:
        return self.al / f"round_{k}"


def run_script(script: str, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """An entry point as a user runs it (one torch thread, no Comet key)."""
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env or train_env(), timeout=600)


def run_here(script: str, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The same as ``run_script``, in this process (see ``run_in_process``)."""
    return run_in_process(script, *args, env=env or train_env())


def al(command: str, run: LoopRun, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """classifier/active_learning.py COMMAND, in this process (a subprocess in the kill and no-model tests)."""
    return run_here("classifier/active_learning.py", command, "--config", run.config, *args, env=env)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def answer(run: LoopRun, k: int, labels: dict[str, str] | None = None, as_process: bool = False) -> Path:
    """The Timelapse export a person makes for round ``k`` (the hidden labels, or ``labels``)."""
    export = run.round(k) / "export.csv"
    ok((run_script if as_process else run_here)("utils/answer_requests.py", run.round(k) / "timelapse_request.csv",
                                                run.answers, "--output", export))
    if labels:
        frame = pd.read_csv(export, dtype=str, keep_default_na=False)
        paths = (frame["RelativePath"].str.replace("\\", "/") + "/" + frame["File"]).str.lstrip("/")
        frame["Species"] = [labels.get(p, s) for p, s in zip(paths, frame["Species"])]
        frame.to_csv(export, index=False)
    return export
