"""Which checkpoint a run resumes from, and refusing one that does not fit the run.

``find_newest_checkpoint`` picks the most advanced readable file (a ``kill -9`` between the
files of one save can leave ``last.pt`` older than ``<epoch>.pt`` or ``best.pt``);
``check_resumable`` and ``check_world_size`` refuse a checkpoint made for other labels, other
training settings or another number of processes (unless forced); ``repair_best`` rewrites a
``best.pt`` a crash kept from being written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from classification.config import ExperimentConfig, config_changes, config_hash
from classification.errors import DataError, UserError
from classification.io import link_atomic, write_bytes_atomic
from classification.redaction import known_secrets, redact
from classification.training.checkpoint import BEST, LAST, numbered_checkpoints, unreadable_reason

__all__ = ["ResumeCandidates", "check_resumable", "check_world_size", "checkpoint_position", "find_newest_checkpoint",
           "newest_checkpoint", "read_position", "repair_best"]

log = logging.getLogger(__name__)


def check_world_size(checkpoint: Mapping[str, Any], path: Path, world_size: int, force: bool,
                     recorded: int | None = None) -> bool:
    """True when the checkpoint was saved by another number of processes (``recorded``, from the run folder,
    for a checkpoint that does not say): refused unless ``force``, as the steps per epoch, the sharding and
    the schedule all change with it."""
    saved = checkpoint.get("world_size", recorded)
    if saved is None or int(saved) == world_size:
        return False
    if not force:
        raise UserError(f"{path}: saved by a run of {saved} process(es), this one has {world_size}; resume anyway "
                        "with --force (the schedule is rebuilt from the completed epochs and an unfinished epoch "
                        "starts again), or start again with --no-resume --overwrite")
    log.warning("resuming a run of %s process(es) with %d (--force): the schedule is rebuilt from the completed epochs",
                saved, world_size)
    return True


def check_resumable(checkpoint: Mapping[str, Any], path: Path, config: ExperimentConfig,
                    label_index: Mapping[int, str], force: bool, config_path: Path) -> None:
    """Refuse a checkpoint made for other labels, or (unless forced) with other training settings."""
    saved = {int(k): v for k, v in checkpoint.get("label_index", {}).items()}
    if saved != dict(label_index):
        raise DataError(f"{path}: made for other labels ({len(saved)} classes) than {config.data_root} "
                        f"({len(label_index)}); start again with --no-resume --overwrite")
    if checkpoint.get("config_hash") == config_hash(config):
        return
    changes = config_changes(checkpoint.get("config", {}), config)
    if not changes:  # saved by an older version: only keys added since, at the values it used
        return
    summary = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
    summary = redact(summary, known_secrets())  # a changed value may be a key given by --set
    if not force:
        raise UserError(f"{config_path}: changed since {path} ({summary}); resume anyway with --force, "
                        "or start again with --no-resume --overwrite")
    log.warning("resuming with a changed config (--force): %s", summary)


def read_position(path: Path) -> tuple[int, int]:
    """``(epoch, batch_in_epoch)`` of a checkpoint (memory-mapped: tensors are not read); why not, as a ``DataError``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - zip, pickle and torch errors all mean "not a checkpoint"
        raise DataError(f"not a readable checkpoint ({unreadable_reason(error)})") from None
    try:
        return int(checkpoint["epoch"]), int(checkpoint.get("batch_in_epoch", 0))
    except (TypeError, KeyError, ValueError, AttributeError):
        raise DataError("not a training checkpoint of this framework (no epoch)") from None


def checkpoint_position(path: Path) -> tuple[int, int] | None:
    """``(epoch, batch_in_epoch)`` of a checkpoint, None if unreadable."""
    try:
        return read_position(path)
    except DataError:
        return None


@dataclass
class ResumeCandidates:
    """The checkpoint to resume from (None when none is readable) and the newer files that could not be read."""

    newest: Path | None
    unusable: dict[Path, str] = field(default_factory=dict)  # path -> why it cannot be read

    def describe_unusable(self) -> str:
        """``last.pt, 3.pt: why; best.pt: why`` for a one-line message (files with the same problem together)."""
        by_reason: dict[str, list[str]] = {}
        for path, why in self.unusable.items():
            by_reason.setdefault(why, []).append(path.name)
        return "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items())


def find_newest_checkpoint(directory: Path) -> ResumeCandidates:
    """The most advanced readable one of ``last.pt``, ``best.pt`` and the highest readable ``<epoch>.pt``
    (``last.pt`` on a tie), and every unreadable file passed over on the way.

    One save writes several files one after the other, so a ``kill -9`` between two of them
    leaves the newest state in ``<epoch>.pt`` or ``best.pt`` and an older ``last.pt``. A file
    that cannot be read (truncated, refused by ``weights_only``) is passed over and reported.
    """
    directory = Path(directory)
    named = [path for path in (directory / LAST, directory / BEST) if path.is_file()]
    numbered = [path for _, path in reversed(numbered_checkpoints(directory))]
    readable: list[tuple[tuple[int, int], int, Path]] = []
    unusable: dict[Path, str] = {}
    for path in named + numbered:
        try:
            position = read_position(path)
        except DataError as error:
            unusable[path] = str(error)
            continue
        readable.append((position, -len(readable), path))
        if path in numbered:
            break  # older numbered checkpoints are never newer than this one
    return ResumeCandidates(max(readable)[2] if readable else None, unusable)


def newest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint ``find_newest_checkpoint`` would resume from (None when no file is readable)."""
    return find_newest_checkpoint(directory).newest


def repair_best(directory: Path, checkpoint: Mapping[str, Any], source: Path) -> bool:
    """Rewrite ``best.pt`` from ``source`` when a crash kept it from being written (the epoch resumed
    from is its own best epoch, and ``best.pt`` holds another); True when it did."""
    epoch, best_epoch = checkpoint["epoch"], checkpoint.get("best_epoch")
    if best_epoch != epoch or checkpoint.get("batch_in_epoch", 0) or source.name == BEST:
        return False
    best = Path(directory) / BEST
    if checkpoint_position(best) == (epoch, 0):
        return False
    if not link_atomic(source, best):
        write_bytes_atomic(best, source.read_bytes())
    return True
