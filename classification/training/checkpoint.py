"""Checkpoints: one dict with everything needed to continue a run exactly, saved atomically.

``runs/<model>/<experiment>/checkpoints/`` holds ``<epoch>.pt`` (every
``checkpoint_every`` epochs, the newest ``checkpoint_keep_last`` kept; 0 keeps all),
``last.pt`` (always the newest state, also the mid-epoch state saved on SIGINT/SIGTERM)
and ``best.pt`` (the epoch with the best monitored metric). Each file is written to a
temporary file in the same folder, fsynced and moved into place with ``os.replace``: a
crash or ``kill -9`` leaves the previous complete file, never a half-written one. One save
writes its data once: ``last.pt`` and ``best.pt`` are hard links of the epoch's file.

Everything in a checkpoint is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs on load). Keys: ``model, optimizer,
scheduler, scaler, ema, ema_num_updates`` (the trainer's ``state_dict``), ``epoch, step,
batch_in_epoch, partial_train_metrics`` (``Progress``), ``best_metric, best_epoch,
early_stopping_counter`` (the early-stopping hook), ``comet_key`` (the tracking hook), ``rng,
label_index, config_hash, config, format``. ``epoch`` is the last *completed* epoch (1-based);
``batch_in_epoch`` > 0 marks a mid-epoch state: that many batches of epoch ``epoch + 1`` are done.
A hook's entries are read with defaults, so checkpoints written before a hook existed still load.
Choosing which checkpoint to resume from, and refusing one that does not fit, is ``resume.py``.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from classification.config import ExperimentConfig, config_hash
from classification.errors import DataError, UserError
from classification.io import link_atomic, remove_stale_temporaries, write_bytes_atomic
from classification.redaction import known_secrets, redact_secrets

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
CHECKPOINTS_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
NUMBERED = re.compile(r"^(\d+)\.pt$")


def checkpoints_dir(run_dir: Path) -> Path:
    """``<run_dir>/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS_DIR


# ---------------------------------------------------------------- the checkpoint dict


@dataclass
class Progress:
    """Where a run is: the counters a checkpoint carries besides the module and hook states."""

    epoch: int = 0  # last completed epoch
    step: int = 0  # optimizer steps so far
    batch_in_epoch: int = 0  # batches done in epoch + 1 (a mid-epoch state when > 0)
    partial_train_metrics: torch.Tensor | None = None  # the train metrics of those batches

    def state_dict(self) -> dict[str, Any]:
        """The counters under their checkpoint keys."""
        return {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                "partial_train_metrics": self.partial_train_metrics}

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> Progress:
        """The counters a checkpoint was saved at."""
        return cls(epoch=int(checkpoint["epoch"]), step=int(checkpoint["step"]),
                   batch_in_epoch=int(checkpoint["batch_in_epoch"]),
                   partial_train_metrics=checkpoint.get("partial_train_metrics"))


def build_checkpoint(states: Mapping[str, Any], config: ExperimentConfig, label_index: Mapping[int, str],
                     rank_rng: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The checkpoint dict: the trainer's, the counters' and the hooks' ``states``, every rank's random
    states (``rank_rng``, from ``capture_rng_state`` on each rank; ``rng`` is rank 0's), the number of
    processes, the labels and the config (tensors and plain values only, for ``weights_only=True`` loading); a config
    value holding a known secret is saved as ``***`` (``redact_secrets``)."""
    return {
        **states,
        "rng": rank_rng[0],
        "rank_rng": list(rank_rng),
        "world_size": len(rank_rng),
        "label_index": {str(i): name for i, name in label_index.items()},
        "config_hash": config_hash(config),
        "config": redact_secrets(config.to_dict(), known_secrets()),
    }


def load_state(target: Any, state: Any, path: Path, what: str) -> None:
    """``target.load_state_dict(state)``; a state made for other settings (forced resume) is one line."""
    try:
        target.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as error:
        reason = f"no {error} entry" if isinstance(error, KeyError) else (str(error).strip().splitlines() or [""])[0]
        raise DataError(f"{path}: its {what} state does not fit this config ({reason}); "
                        "start again with --no-resume --overwrite") from None


# ---------------------------------------------------------------- saving


def serialize(checkpoint: Mapping[str, Any]) -> bytes:
    """The checkpoint as ``torch.save`` bytes (serialised once, written to several names)."""
    buffer = io.BytesIO()
    torch.save(dict(checkpoint), buffer)
    return buffer.getvalue()


def save_checkpoint(checkpoint: Mapping[str, Any], directory: Path, names: list[str]) -> list[Path]:
    """Write ``checkpoint`` atomically under each of ``names`` (e.g. ``["3.pt", "best.pt", "last.pt"]``), in order:
    the first name is written and fsynced once, the others become hard links of it (an atomic copy
    where the filesystem has no hard links). Files are only ever replaced, never changed in place,
    so a later ``last.pt`` never alters the ``3.pt`` it was linked to."""
    data = serialize({"format": CHECKPOINT_FORMAT, **checkpoint})
    paths = [Path(directory) / name for name in names]
    write_bytes_atomic(paths[0], data)
    for path in paths[1:]:
        if not link_atomic(paths[0], path):
            write_bytes_atomic(path, data)
    return paths


def remove_partial_writes(directory: Path) -> list[Path]:
    """Delete temporary files that a killed process left half-written (``.<name>.<random>.tmp``)."""
    return remove_stale_temporaries(directory, "*.pt")


def numbered_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the ``<epoch>.pt`` files in ``directory``, oldest first."""
    if not Path(directory).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := NUMBERED.match(p.name))]
    return sorted(found)


def prune_checkpoints(directory: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` numbered checkpoints (0 keeps all); last/best stay."""
    numbered = numbered_checkpoints(directory)
    if keep_last <= 0 or len(numbered) <= keep_last:
        return []
    removed = [path for _, path in numbered[:-keep_last]]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def checkpoint_names(epoch: int, every: int, is_best: bool, is_final: bool) -> list[str]:
    """Which files an end-of-epoch checkpoint goes to: ``<epoch>.pt`` every ``every`` epochs and
    at the final epoch, ``best.pt`` when the monitored metric improved, ``last.pt`` always (last,
    so that ``last.pt`` never points past a numbered file a crash did not finish)."""
    names = [f"{epoch}.pt"] if epoch % every == 0 or is_final else []
    return names + ([BEST] if is_best else []) + [LAST]


# ---------------------------------------------------------------- loading


def unreadable_reason(error: BaseException) -> str:
    """Why ``torch.load`` refused a file, in a few words (its first line; pickled code named as such)."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if "weights only load failed" in first.lower() or "weights_only" in first.lower():
        return "it holds pickled objects that weights_only=True refuses to run"
    first = first.split(". ")[0].rstrip(".")
    return first if len(first) <= 120 else first[:117] + "..."


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint dict, loaded on the CPU with ``weights_only=True``; an unreadable file is one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - zip, pickle and torch errors all mean "not a checkpoint"
        raise DataError(f"{path}: not a readable checkpoint ({unreadable_reason(error)})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise DataError(f"{path}: not a training checkpoint of this framework (no 'model' entry)")
    return checkpoint


def load_model_weights(model: torch.nn.Module, state: Mapping[str, Any], path: Path, architecture: str) -> None:
    """Load a checkpoint's weights into ``model``; weights of another architecture are one line, not a page of keys."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    resized = [key for key in own if key in state and tuple(own[key].shape) != tuple(getattr(state[key], "shape", ()))]
    problems = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
                ((missing, "missing keys"), (unexpected, "unexpected keys"), (resized, "tensors of another shape")) if keys]
    if problems:
        raise DataError(f"{path}: weights do not fit {architecture} (made for another architecture?): {', '.join(problems)}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as error:
        raise DataError(f"{path}: weights do not fit {architecture} ({str(error).strip().splitlines()[0]})") from None


def available_checkpoints(run_dir: Path) -> list[str]:
    """Names of the checkpoints in ``<run_dir>/checkpoints``: numbered by epoch, then best and last."""
    directory = checkpoints_dir(run_dir)
    named = [name for name in (BEST, LAST) if (directory / name).is_file()]
    return [path.name for _, path in numbered_checkpoints(directory)] + named


def resolve_checkpoint(run_dir: Path, name: str | Path) -> Path:
    """``last``, ``best``, ``200``, ``200.pt`` (in ``<run_dir>/checkpoints``) or a path, to an existing file."""
    text = str(name).strip()
    directory = checkpoints_dir(run_dir)
    if text in ("last", "best"):
        candidate = directory / f"{text}.pt"
    elif text.isdigit():
        candidate = directory / f"{int(text)}.pt"
    elif NUMBERED.match(text) or text in (LAST, BEST):
        candidate = directory / text
    else:
        candidate = Path(text).expanduser()
    if candidate.is_file():
        return candidate
    present = available_checkpoints(run_dir)
    listing = ", ".join(present) if present else "none"
    raise UserError(f"{candidate}: checkpoint not found (checkpoints in {directory}: {listing})")
