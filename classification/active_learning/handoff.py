"""The label tools' side of a round: hand the selected images to Timelapse or Label Studio, and read the
labels back into the append-only ``labels.csv``.

Timelapse gets a request CSV and returns an export CSV; Label Studio gets a tasks file (and a
project on the server when ``LABEL_STUDIO_API_KEY`` is set) and returns a ``JSON_MIN`` export,
read from a file or from the project itself. Every export is kept in the round's ``imports/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from classification.active_learning import store
from classification.active_learning.label_studio import (
    LabelStudioClient,
    build_tasks,
    load_label_studio_settings,
    read_json_min,
    write_tasks_json,
)
from classification.active_learning.labels import LabelImport
from classification.active_learning.rounds import Experiment, latest_selected_round
from classification.active_learning.timelapse import read_timelapse_export, write_request_csv
from classification.errors import UserError
from classification.io import json_count, read_json_object, write_bytes_atomic, write_json_atomic

__all__ = [
    "ImportResult",
    "create_label_studio_project",
    "document_root_prefix",
    "handoff_to_label_tool",
    "import_labels",
    "read_export",
    "read_label_studio_project",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- label tools


def document_root_prefix(experiment: Experiment) -> str:
    """The pool's path under Label Studio's local-files document root (default: the pool's parent folder;
    Label Studio refuses a storage that is the document root itself)."""
    pool = experiment.pool_dir().resolve()
    root = Path(experiment.active_learning.label_studio_document_root or pool.parent).resolve()
    try:
        relative = pool.relative_to(root)
    except ValueError:
        raise UserError(f"{experiment.config_path}: active_learning.label_studio_document_root: {root} does not "
                        f"contain the pool {pool}") from None
    return "" if relative == Path(".") else relative.as_posix()


def handoff_to_label_tool(experiment: Experiment, files: store.RoundFiles, paths: list[str]) -> list[Path]:
    """Timelapse: the request CSV. Label Studio: a tasks file, and a project on the server when one is configured."""
    if experiment.active_learning.label_tool == "timelapse":
        request = files.root / "timelapse_request.csv"
        write_request_csv(request, paths)
        return [request]
    tasks = files.root / "label_studio_tasks.json"
    write_tasks_json(tasks, paths, document_root_prefix(experiment))
    if load_label_studio_settings().api_key is None:
        log.info("no LABEL_STUDIO_API_KEY: import %s into a Label Studio project by hand (local files under %s)",
                 tasks, experiment.active_learning.label_studio_document_root or experiment.pool_dir().resolve().parent)
        return [tasks]
    return [tasks, create_label_studio_project(experiment, files, paths)]


def create_label_studio_project(experiment: Experiment, files: store.RoundFiles, paths: list[str]) -> Path:
    """A Label Studio project for the round with its images as tasks, once (its id kept in ``label_studio.json``)."""
    state = read_json_object(files.label_studio, optional=True)
    if state.get("tasks_imported"):
        return files.label_studio
    client = LabelStudioClient()
    if "project_id" not in state:
        title = experiment.active_learning.label_studio_project or f"{experiment.run_dir.parent.name}/{experiment.run_dir.name} round {files.number}"
        state = {"url": client.url, "project_id": client.create_project(title, experiment.label_names,
                                                                          experiment.pool_dir().resolve()),
                 "title": title, "tasks_imported": False}
        write_json_atomic(files.label_studio, state)  # before the import: a re-run never makes a second project
    client.import_tasks(int(state["project_id"]), build_tasks(paths, document_root_prefix(experiment)))
    write_json_atomic(files.label_studio, {**state, "tasks_imported": True, "tasks": len(paths)})
    log.info("Label Studio project %s at %s: %d tasks", state["project_id"], client.url, len(paths))
    return files.label_studio


# ---------------------------------------------------------------- import


@dataclass
class ImportResult:
    """What one import read and stored."""

    round: int
    received: LabelImport
    added: int
    pending: int  # requested images still without a label
    saved_copy: Path | None


def read_export(experiment: Experiment, files: store.RoundFiles, export: Path | None, requested: list[str]) -> tuple[LabelImport, Path]:
    """The labels of an export file, or of the round's Label Studio project; a copy is kept in ``imports/``."""
    stamp = store.utc_now().replace(":", "").replace("-", "")
    if export is not None:
        export = Path(export)
        if not export.is_file():
            raise UserError(f"{export}: export file not found")
        copy = files.imports / f"{stamp}_{export.name}"
        write_bytes_atomic(copy, export.read_bytes())  # kept before anything is stored
        if experiment.active_learning.label_tool == "timelapse":
            return read_timelapse_export(copy, experiment.label_names, requested, experiment.active_learning.timelapse_label_column), copy
        return read_json_min(copy, experiment.label_names, requested, document_root_prefix(experiment)), copy
    if experiment.active_learning.label_tool == "timelapse":
        raise UserError("import: give --file, the CSV exported from Timelapse (File, RelativePath and the label column)")
    return read_label_studio_project(experiment, files, requested, stamp)


def read_label_studio_project(experiment: Experiment, files: store.RoundFiles, requested: list[str], stamp: str) -> tuple[LabelImport, Path]:
    """Export the round's Label Studio project (``JSON_MIN``), keep the export, read its labels."""
    if not files.label_studio.exists():
        raise UserError(f"{files.label_studio}: no Label Studio project for round {files.number}; give --file with an "
                        "export (JSON_MIN) or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY and run select again")
    project = json_count(read_json_object(files.label_studio), "project_id", files.label_studio)
    copy = files.imports / f"{stamp}_label_studio_project_{project}.json"
    received = LabelStudioClient().read_project_labels(project, experiment.label_names, requested,
                                                       document_root_prefix(experiment), keep_copy=copy)
    return received, copy


def import_labels(experiment: Experiment, export: Path | None = None, number: int | None = None) -> ImportResult:
    """Read a round's labels and add the new ones to ``labels.csv`` (importing twice changes nothing)."""
    number = latest_selected_round(experiment) if number is None else number
    files = experiment.round(number)
    if not files.is_selected():
        raise UserError(f"round {number}: nothing was selected in this round")
    requested = store.requested_paths(experiment.root, up_to=number)
    received, copy = read_export(experiment, files, export, requested)
    added = store.append_labels(experiment.labels_file, received.labels, number)
    labels = store.effective_labels(store.read_labels(experiment.labels_file))
    pending = sum(path not in labels for path in requested)
    return ImportResult(number, received, added, pending, copy)
