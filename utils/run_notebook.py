"""Execute a notebook headless with parameters and save the executed copy (with its outputs and plots).

    python utils/run_notebook.py notebooks/evaluate_results.ipynb --output runs/efficientnet-lite0/demo/evaluate_results.ipynb \
        --set RUN_DIR=runs/efficientnet-lite0/demo --set PREDICTIONS_DIR=runs/efficientnet-lite0/demo/predictions/test_best

Parameters are the environment variables the notebook's first cell reads. Relative
paths given with --set are made absolute (the notebook runs from its own folder).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import ArgumentParser, run_main
from classification.errors import UserError
from classification.notebooks import execute_notebook


def parse_parameter(text: str) -> tuple[str, str]:
    """``NAME=VALUE``; a VALUE that names an existing file or folder becomes an absolute path."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise UserError(f"--set {text}: expected NAME=VALUE")
    return name.strip(), str(Path(value).resolve()) if value and Path(value).exists() else value


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path, help="the notebook to run, e.g. notebooks/evaluate_results.ipynb")
    parser.add_argument("--output", type=Path, required=True, help="where to write the executed notebook")
    parser.add_argument("--set", dest="parameters", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter (environment variable the notebook reads); repeatable")
    args = parser.parse_args(argv)
    parameters = dict(parse_parameter(text) for text in args.parameters)
    output = execute_notebook(args.notebook, args.output, parameters)
    print(f"executed {args.notebook} -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
