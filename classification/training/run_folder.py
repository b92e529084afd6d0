"""The run folder's rules: which checkpoint a run resumes from, archiving an earlier run to start again, and
the run files each start writes (``resolved_config.yml``, ``run_info.json``: versions, command line, start time).

``--resume`` (the default) continues from the newest readable checkpoint (a fresh start when
there is none); ``--no-resume`` refuses to start over a run that has checkpoints unless
``overwrite``, which moves ``checkpoints/``, ``metrics.csv`` and the run files to
``archive/<UTC time>/`` (nothing is deleted).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from classification.config import ExperimentConfig, config_hash
from classification.errors import DataError, UserError
from classification.io import write_json_atomic, write_text_atomic
from classification.redaction import find_env_files, known_secrets, redact_secrets, warn_about_secrets
from classification.runtime import DistributedContext, barrier
from classification.training.checkpoint import available_checkpoints, checkpoints_dir, remove_partial_writes
from classification.training.resume import find_newest_checkpoint

log = logging.getLogger(__name__)

METRICS_CSV = "metrics.csv"
ARCHIVE_DIR = "archive"
RUN_FILES = ("metrics.csv", "resolved_config.yml", "run_info.json")
VERSIONED_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "pydantic", "comet-ml")


def recorded_world_size(run_dir: Path) -> int | None:
    """The number of processes ``run_info.json`` says the run's last start had (None when it cannot tell):
    what a checkpoint saved before checkpoints held their world size was written by."""
    try:
        value = json.loads((run_dir / "run_info.json").read_text(encoding="utf-8")).get("world_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def archive_run(run_dir: Path) -> Path:
    """Move ``checkpoints/`` and the run's files to ``archive/<UTC time>/``; nothing is deleted."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = run_dir / ARCHIVE_DIR / stamp
    suffix = 1
    while target.exists():
        target, suffix = run_dir / ARCHIVE_DIR / f"{stamp}-{suffix}", suffix + 1
    target.mkdir(parents=True)
    for name in (checkpoints_dir(run_dir).name, *RUN_FILES):
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), str(target / name))
    log.info("moved the earlier run's checkpoints and metrics to %s", target)
    return target


def usable_resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest readable checkpoint (None when the run has none); refuses a run whose checkpoints are all
    unreadable rather than starting over it, and says when it falls back past unreadable files."""
    found = find_newest_checkpoint(checkpoints_dir(run_dir))
    if found.newest is None and found.unusable:
        raise DataError(f"{checkpoints_dir(run_dir)}: no checkpoint can be resumed from: {found.describe_unusable()}; "
                        f"nothing was changed: start again with --no-resume --overwrite (moves them to "
                        f"{run_dir / ARCHIVE_DIR}/<time>/)")
    if found.unusable:
        log.warning("%s: resuming from %s, passing over checkpoints that cannot be read: %s", checkpoints_dir(run_dir),
                    found.newest.name, found.describe_unusable())  # type: ignore[union-attr]
    return found.newest


def find_resume_checkpoint(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to continue from, or None for a fresh start; refuses to start over silently."""
    present = available_checkpoints(run_dir)
    if resume:
        if overwrite:
            raise UserError("--overwrite only applies with --no-resume (it archives the checkpoints to start again)")
        return usable_resume_checkpoint(run_dir)
    if (present or (run_dir / METRICS_CSV).is_file()) and not overwrite:
        shown = ", ".join(present) if present else METRICS_CSV
        raise UserError(f"{run_dir}: has an earlier run ({shown}); continue it with --resume, or start again "
                        f"with --no-resume --overwrite (moves it to {run_dir / ARCHIVE_DIR}/<time>/)")
    return None


def prepare_run_folder(run_dir: Path, resume: bool, overwrite: bool, context: DistributedContext) -> None:
    """Rank 0 clears half-written files and, with ``--no-resume --overwrite``, archives the earlier run.

    Call it after ``find_resume_checkpoint`` and once the run's inputs (dataset, config, model) are read and
    checked: a run that fails on its input then leaves the folder as it was, its earlier run not archived."""
    barrier(context)  # every rank has looked at the run folder before rank 0 changes it
    if context.is_main:
        remove_partial_writes(checkpoints_dir(run_dir))
        if not resume and overwrite and (checkpoints_dir(run_dir).exists() or (run_dir / METRICS_CSV).exists()):
            archive_run(run_dir)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the results (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_run_files(run_dir: Path, config: ExperimentConfig, argv: Sequence[str], overrides: Sequence[str] = (),
                    extra: Mapping[str, Any] | None = None) -> None:
    """Write ``resolved_config.yml`` and ``run_info.json`` (versions, command line, start time).

    Nothing from the environment is recorded, and a value holding a known secret (``--set experiment_name=<key>``)
    is written as ``***`` with a one-line warning naming the field.
    """
    secrets = known_secrets(*find_env_files(run_dir))
    warn_about_secrets(config.to_dict(), secrets, "the run files, checkpoints and Comet")
    header = "# written at the start of each run: the config as validated, defaults and --set overrides included\n"
    resolved = redact_secrets(config.to_dict(), secrets)
    write_text_atomic(run_dir / "resolved_config.yml", header + yaml.safe_dump(resolved, sort_keys=False))
    info = {
        "command": [sys.executable, *argv],
        "overrides": list(overrides),
        "started_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "config_hash": config_hash(config),
        **(extra or {}),
    }
    write_json_atomic(run_dir / "run_info.json", redact_secrets(info, secrets))
