"""Running a notebook from notebooks/ headless (nbclient) and reading what its cells showed."""

from __future__ import annotations

import base64
import io
import sys

import nbformat
from nbclient import NotebookClient
from PIL import Image

from tests.helpers.processes import REPO_ROOT

NOTEBOOKS = REPO_ROOT / "notebooks"


def run_notebook(name: str) -> nbformat.NotebookNode:
    """Execute a notebook from notebooks/ as a user would (cwd notebooks/); check the kernel is this interpreter."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    NotebookClient(notebook, kernel_name="python3", timeout=120,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    assert outputs_text(notebook.cells[-1]).strip() == sys.prefix
    return notebook


def cell(notebook: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    """The code cell carrying ``tag``."""
    (found,) = [c for c in notebook.cells if tag in c.get("metadata", {}).get("tags", [])]
    return found


def outputs_text(code_cell: nbformat.NotebookNode) -> str:
    """Everything a cell printed or displayed as text or HTML."""
    parts = []
    for output in code_cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts += [output.data.get("text/plain", ""), output.data.get("text/html", "")]
    return "\n".join(parts)


def png_outputs(code_cell: nbformat.NotebookNode) -> list[Image.Image]:
    """The PNG images a cell displayed, decoded."""
    return [Image.open(io.BytesIO(base64.b64decode(output.data["image/png"])))
            for output in code_cell.get("outputs", []) if "image/png" in output.get("data", {})]
