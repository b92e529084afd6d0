"""Epoch policies as hooks: small objects the training loop calls at fixed points.

In the spirit of detectron2's ``HookBase``: the loop (``engine.run_epochs``) trains and
validates; everything it decides or records around that is a hook, called in list order:
``before_train`` and ``after_train`` around the run, ``after_step`` after each training
batch, ``after_epoch`` after validation, ``on_signal`` when SIGINT/SIGTERM stops an epoch
part-way. Hooks share what an epoch measured through the loop, not through each other:
``loop.metrics`` (a ``MetricsStore``, like detectron2's ``EventStorage``: the latest epoch's
row and the monitored best) and ``loop.should_stop`` (like Lightning's: any hook may set it;
the run ends after the epoch's hooks). A hook with state returns it from ``state_dict``
under its own checkpoint keys and reads them back with defaults in ``load_state_dict``, so a
checkpoint written before the hook existed still resumes. A new policy is a new hook; it
touches no loop code.

The built-in hooks, in the order they run after an epoch: ``EarlyStopping`` (sets
``should_stop`` after ``patience`` epochs without improvement), ``Tracking`` (metrics.csv and
Comet), ``SampleGrid`` (a picture of predictions at the run's last epoch), then the user's,
then ``Checkpointer`` (last, so the checkpoint holds what the others did).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from torch.utils.data import DataLoader

from classification.config import ExperimentConfig
from classification.runtime import barrier, gather_objects
from classification.training.checkpoint import LAST, Progress, checkpoint_names, prune_checkpoints, save_checkpoint
from classification.training.rng_state import capture_rng_state
from classification.training.sample_grid import sample_prediction_grid
from classification.training.tracking import ExperimentTracker, load_comet_settings
from classification.training.trainer import Trainer

__all__ = ["Checkpointer", "EarlyStopping", "EpochEnd", "Hook", "Loop", "LoopData", "MetricsStore", "SampleGrid", "Tracking",
           "is_improvement"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochEnd:
    """One finished epoch as the hooks see it (read-only: hooks share decisions through the loop)."""

    epoch: int
    metrics: dict[str, float]  # the metrics.csv row
    confusion: Any  # the validation confusion matrix (rows = true)
    label_names: list[str]
    last_scheduled: bool  # epoch == num_epochs; ``loop.ends_after(end)`` also counts a hook's should_stop


def is_improvement(value: float, best: float | None, monitor: str) -> bool:
    """True when ``value`` beats ``best`` (lower is better for val_loss; NaN never improves)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


@dataclass
class MetricsStore:
    """The run's metrics as every hook reads them: the latest epoch's row and the monitored metric's best.
    The loop records each epoch before any hook runs. State: ``best_metric, best_epoch``."""

    monitor: str
    epoch: int = 0
    latest: dict[str, float] = field(default_factory=dict)
    best_metric: float | None = None
    best_epoch: int | None = None

    def record(self, epoch: int, row: Mapping[str, float]) -> None:
        """``row`` is epoch ``epoch``'s: the latest, and the best when the monitored metric improved."""
        self.epoch, self.latest = epoch, dict(row)
        if is_improvement(row[self.monitor], self.best_metric, self.monitor):
            self.best_metric, self.best_epoch = row[self.monitor], epoch

    @property
    def latest_is_best(self) -> bool:
        """The latest epoch holds the monitored metric's best value so far."""
        return self.best_epoch is not None and self.best_epoch == self.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        self.best_metric, self.best_epoch = checkpoint.get("best_metric"), checkpoint.get("best_epoch")


class LoopData(Protocol):
    """What a hook reads of the run's data."""

    @property
    def label_index(self) -> dict[int, str]: ...

    @property
    def val_loader(self) -> DataLoader: ...


class Loop(Protocol):
    """What a hook sees of the training loop: it reads the rest and may set ``should_stop``. The library's loop
    (``engine.TrainingLoop``) is one; the hooks depend on this, not on the engine."""

    should_stop: bool

    @property
    def config(self) -> ExperimentConfig: ...

    @property
    def trainer(self) -> Trainer: ...

    @property
    def data(self) -> LoopData: ...

    @property
    def progress(self) -> Progress: ...

    @property
    def metrics(self) -> MetricsStore: ...

    def ends_after(self, end: EpochEnd) -> bool:
        """``end`` is the run's last epoch: the last scheduled, or a hook has asked to stop."""
        ...

    def checkpoint(self, rank_rng: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The checkpoint dict of the current state."""
        ...


class Hook:
    """An epoch policy; override the points that apply (each default does nothing)."""

    def before_train(self, loop: Loop) -> None:
        """Once, before the first epoch of this process (after any resume)."""

    def after_step(self, loop: Loop) -> None:
        """After each training batch (``loop.progress`` already counts it)."""

    def after_epoch(self, loop: Loop, end: EpochEnd) -> None:
        """After an epoch's training and validation (``loop.progress.epoch`` is ``end.epoch``)."""

    def on_signal(self, loop: Loop) -> None:
        """When a signal stopped an epoch part-way (``loop.progress`` says where)."""

    def after_train(self, loop: Loop) -> None:
        """Once, when the run ends for any reason (also after an error)."""

    def state_dict(self) -> dict[str, Any]:
        """This hook's state under its checkpoint keys (none by default)."""
        return {}

    def load_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Read this hook's state back from a checkpoint, with defaults for checkpoints without it."""


class EarlyStopping(Hook):
    """Ends the run (``loop.should_stop``) once the monitored metric has not improved for ``patience`` epochs
    (never when ``patience`` is None). State: ``early_stopping_counter``, the epochs since the best one."""

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.counter = 0

    def triggered(self) -> bool:
        """True once the monitored metric has not improved for ``patience`` epochs."""
        return self.patience is not None and self.counter >= self.patience

    def after_epoch(self, loop: Loop, end: EpochEnd) -> None:
        self.counter = 0 if loop.metrics.latest_is_best else self.counter + 1
        if self.triggered():
            loop.should_stop = True
            log.info("early stopping: %s has not improved for %d epochs (best %.4f at epoch %s)", loop.metrics.monitor,
                     self.counter, loop.metrics.best_metric or math.nan, loop.metrics.best_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"early_stopping_counter": self.counter}

    def load_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        self.counter = int(checkpoint.get("early_stopping_counter", 0))


class Tracking(Hook):
    """Logs each epoch's metrics row (``metrics.csv`` and Comet) and confusion matrix on rank 0.
    State: ``comet_key``, so a resumed run continues the same Comet experiment."""

    def __init__(self, run_dir: Path, mode: str, experiment_name: str) -> None:
        self.run_dir, self.mode, self.experiment_name = run_dir, mode, experiment_name
        if mode != "off":
            load_comet_settings(run_dir)  # a key that is not a plain token stops the run here, before anything is written
        self.key: str | None = None  # the experiment to continue
        self.tracker: ExperimentTracker | None = None

    def before_train(self, loop: Loop) -> None:
        self.tracker = ExperimentTracker.create(self.run_dir, loop.config.to_dict(), self.mode, self.experiment_name,
                                                self.key, enabled=loop.trainer.context.is_main)

    def after_epoch(self, loop: Loop, end: EpochEnd) -> None:
        if loop.trainer.context.is_main and self.tracker is not None:
            self.tracker.log_epoch(end.epoch, end.metrics)  # before the checkpoint: a resumed run rewrites this row, never loses it
            self.tracker.log_confusion_matrix(end.confusion, end.label_names, end.epoch)

    def after_train(self, loop: Loop) -> None:
        if self.tracker is not None:
            self.tracker.end()

    def state_dict(self) -> dict[str, Any]:
        return {"comet_key": self.tracker.key if self.tracker is not None else self.key}

    def load_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        self.key = checkpoint.get("comet_key")


class SampleGrid(Hook):
    """At the run's last epoch, logs ``count`` validation images with their predictions to the tracker (rank 0)."""

    def __init__(self, tracking: Tracking, count: int) -> None:
        self.tracking, self.count = tracking, count

    def after_epoch(self, loop: Loop, end: EpochEnd) -> None:
        tracker = self.tracking.tracker
        if not (loop.ends_after(end) and loop.trainer.context.is_main and tracker is not None):
            return
        grid = sample_prediction_grid(loop.trainer, loop.data.val_loader, self.count, loop.data.label_index)
        if grid is not None:
            tracker.log_image(grid, "sample_predictions", end.epoch)


class Checkpointer(Hook):
    """Saves after every epoch (``<epoch>.pt`` every ``every`` epochs and at the run's last, ``best.pt`` when
    ``loop.metrics`` says the epoch is the best, ``last.pt`` always) and ``last.pt`` when a signal stops an epoch. Rank 0 writes and prunes
    old numbered files (``keep_last``; 0 keeps all); every rank waits for it."""

    def __init__(self, directory: Path, every: int, keep_last: int) -> None:
        self.directory, self.every, self.keep_last = directory, every, keep_last

    def after_epoch(self, loop: Loop, end: EpochEnd) -> None:
        self.save(loop, checkpoint_names(end.epoch, self.every, loop.metrics.latest_is_best, loop.ends_after(end)))

    def on_signal(self, loop: Loop) -> None:
        self.save(loop, [LAST])

    def save(self, loop: Loop, names: list[str]) -> None:
        """Write the loop's checkpoint under ``names`` (rank 0, with every rank's random states), then wait on every rank."""
        rank_rng = gather_objects(capture_rng_state(), loop.trainer.context)
        if loop.trainer.context.is_main:
            save_checkpoint(loop.checkpoint(cast(list[Mapping[str, Any]], rank_rng)), self.directory, names)
            prune_checkpoints(self.directory, self.keep_last)
        barrier(loop.trainer.context)
