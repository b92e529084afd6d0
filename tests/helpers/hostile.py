"""Entry points run in this process with pytest's capsys, for the one-line error messages; a tiny JPEG."""

from __future__ import annotations

import functools
import runpy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from classification.cli import run_main
from tests.helpers.processes import REPO_ROOT


@functools.cache
def entry_point(script: str) -> Callable[[Sequence[str] | None], int]:
    """``main`` of ``utils/<x>.py`` or ``classifier/<x>.py`` (the script runs as a module, not as __main__)."""
    return runpy.run_path(str(REPO_ROOT / script))["main"]


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def run(capsys: pytest.CaptureFixture[str], script: str, *args: object) -> Outcome:
    """Run an entry point as its ``__main__`` would, in this process; argparse errors exit from the parser."""
    capsys.readouterr()
    try:
        code = run_main(entry_point(script), [str(a) for a in args])
    except SystemExit as stop:
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return Outcome(code, out, err)


def assert_one_line(outcome: Outcome, *expected: str) -> str:
    """Exit code 2 and exactly one line on stderr, ``error: ...`` holding every ``expected`` piece."""
    lines = outcome.err.strip().splitlines()
    assert outcome.code == 2, (outcome.code, outcome.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.err[-2000:]
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])
    assert len(lines[0]) < 1000, lines[0]
    return lines[0]


def jpeg(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 90, 60)).save(path, quality=90)
    return path
