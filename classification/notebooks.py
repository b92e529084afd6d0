"""Run a notebook headless (as CI and ``demo.sh`` do) and keep the executed copy.

The notebooks read their parameters from environment variables (their first cell), so
running one is: set the variables, execute every cell with ``nbclient`` from the
notebook's own folder, write the executed notebook atomically. A failing cell is one
line naming the notebook and the cell, never a traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from classification.errors import UserError
from classification.io import write_text_atomic

CELL_TIMEOUT_S = 600
ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables inside the block (the kernel inherits them), then restore them."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def execute_notebook(notebook_path: Path, output_path: Path, parameters: Mapping[str, str] | None = None,
                     kernel_name: str = "python3") -> Path:
    """Execute ``notebook_path`` with ``parameters`` as environment variables; write it with outputs to ``output_path``."""
    try:
        import nbformat  # noqa: PLC0415 - the dev extra: only when a notebook is run
        from nbclient import NotebookClient  # noqa: PLC0415
        from nbclient.exceptions import CellExecutionError  # noqa: PLC0415
    except ImportError:
        raise UserError("running notebooks needs nbclient, nbformat and ipykernel: pip install -e '.[dev]'") from None
    notebook_path = Path(notebook_path)
    if not notebook_path.is_file():
        raise UserError(f"{notebook_path}: notebook not found")
    try:
        notebook = nbformat.read(notebook_path, as_version=4)
    except Exception as error:  # noqa: BLE001 - nbformat raises JSON, schema and decoding errors of many kinds
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserError(f"{notebook_path}: not a readable notebook ({reason})") from None
    client = NotebookClient(notebook, kernel_name=kernel_name, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(notebook_path.resolve().parent)}})
    with environment(dict(parameters or {})):
        try:
            client.execute()
        except CellExecutionError as error:
            lines = [line for line in ANSI_CODES.sub("", str(error)).splitlines() if line.strip()]
            raise UserError(f"{notebook_path}: a cell failed: {lines[-1] if lines else 'unknown error'}") from None
    write_text_atomic(output_path, nbformat.writes(notebook))
    return Path(output_path)
