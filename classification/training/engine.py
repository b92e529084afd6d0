"""The training loop: ``train`` sets a run up, ``run_epochs`` trains and validates epoch by epoch.

Read it like torchvision's ``references/classification/train.py``: ``train`` sets things up
(device, seeds, data, model, optimizer, schedule, resume) and runs the epochs;
``train_one_epoch`` and ``evaluate`` do one pass each. Every policy around an epoch (early
stopping, tracking, sample grids, checkpoints) is a hook (``training/hooks.py``) the loop
calls at fixed points. Under it: ``classification/runtime.py`` (devices, DDP, AMP,
progress), ``trainer.py`` (the modules and one step), ``optim.py`` (optimizer and
schedule), ``checkpoint.py`` (the checkpoint dict, counters, resume checks),
``run_folder.py`` (which checkpoint to resume from, archiving) and ``signals.py``.

Exactness: the batch order is a function of ``(seed, epoch)`` and each image's
augmentation of ``(seed, epoch, index)`` (``training/data.py``); the learning rate is
set per optimizer step (``LambdaLR``); a checkpoint holds the model, optimizer,
scheduler, scaler and EMA states, the counters, every hook's state and every random
state. So a run resumed from ``last.pt`` (after ``kill -9``, or mid-epoch after
SIGINT/SIGTERM) ends with the same weights, bit for bit on the CPU with
``deterministic: true``, as a run that was never stopped.

Run folder rules (``run_folder.py``): ``--resume`` (the default) continues from
``checkpoints/last.pt`` (a fresh start when there is none) and refuses a config whose
training fields changed unless ``force``; ``--no-resume`` refuses to start over a run that
has checkpoints unless ``overwrite``, which moves ``checkpoints/``, ``metrics.csv`` and the
run files to ``archive/<UTC time>/`` (nothing is deleted), once the dataset, the config and
the model are read: a run that fails on its input moves nothing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from classification.config import ExperimentConfig, check_num_classes, with_legacy_defaults
from classification.data.samples import build_samples, load_label_index
from classification.errors import DataError
from classification.runtime import (
    DistributedContext,
    all_reduce_sum,
    close_distributed,
    configure_determinism,
    distributed_context,
    init_distributed,
    max_over_ranks,
    progress_bar,
    seed_everything,
    select_device,
    share_rank0_weights,
)
from classification.training.checkpoint import BEST, LAST, Progress, build_checkpoint, checkpoints_dir, load_checkpoint
from classification.training.data import (
    CropDataset,
    EpochSampler,
    SkippedImages,
    build_loader,
    check_images_exist,
    set_loader_epoch,
)
from classification.training.hooks import Checkpointer, EarlyStopping, EpochEnd, Hook, MetricsStore, SampleGrid, Tracking
from classification.training.metrics import MetricAccumulator, scalar_metrics
from classification.training.models import resolve_inputs
from classification.training.resume import check_resumable, check_world_size, repair_best
from classification.training.rng_state import rank_rng_state, restore_rng_state
from classification.training.run_folder import find_resume_checkpoint, prepare_run_folder, recorded_world_size, write_run_files
from classification.training.signals import StopRequest
from classification.training.trainer import Trainer, build_trainer, set_frozen_backbone, train_step

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- what a run is made of


@dataclass
class TrainOptions:
    """How ``train`` treats the run folder, and what ``run_info.json`` records."""

    resume: bool
    overwrite: bool
    force: bool
    argv: Sequence[str]
    overrides: Sequence[str]
    config_path: Path
    hooks: Sequence[Hook] = ()  # the user's, run after the built-in ones and before the checkpoint


@dataclass
class TrainResult:
    """How a run ended: epochs done, the best epoch, early stop or signal, and the last row of metrics."""

    run_dir: Path
    epochs_completed: int
    best_metric: float | None
    best_epoch: int | None
    stopped_early: bool = False
    stopped_by_signal: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal number after SIGINT (130) or SIGTERM (143)."""
        return 128 + self.stopped_by_signal if self.stopped_by_signal else 0


@dataclass
class RunData:
    """The labels and loaders of a run, and the unreadable images met in each split so far."""

    label_index: dict[int, str]
    train_loader: DataLoader
    val_loader: DataLoader
    train_labels: list[int]
    train_skipped: SkippedImages
    val_skipped: SkippedImages

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (at least 1, for the schedule)."""
        return max(1, len(self.train_loader))


def load_run_data(config: ExperimentConfig, context: DistributedContext, config_path: Path) -> RunData:
    """Label index (checked against ``num_classes``) and the train/val loaders, sharded by rank."""
    label_index = load_label_index(config.data_root, config.train_split)
    check_num_classes(config, label_index, config_path)
    train_samples = build_samples(config, config.train_split)
    val_samples = build_samples(config, config.val_split)
    if not train_samples:
        raise DataError(f"{config.data_root}: the {config.train_split!r} split has no images to train on")
    folder = config.resolved_crops_dir()
    for split, samples in ((config.train_split, train_samples), (config.val_split, val_samples)):
        check_images_exist(samples, config.max_skipped_fraction, f"{folder}: split {split!r}")
    train_loader = build_loader(config, train_samples, True, context.rank, context.world_size)
    val_loader = build_loader(config, val_samples, False, context.rank, context.world_size)
    return RunData(
        label_index=label_index, train_loader=train_loader, val_loader=val_loader,
        train_labels=[sample.label for sample in train_samples],
        train_skipped=SkippedImages(cast(CropDataset, train_loader.dataset), config.max_skipped_fraction,
                                    f"{folder}: split {config.train_split!r}"),
        val_skipped=SkippedImages(cast(CropDataset, val_loader.dataset), config.max_skipped_fraction,
                                  f"{folder}: split {config.val_split!r}"),
    )


@dataclass
class TrainingLoop:
    """What the epochs run on: config, run folder, trainer, data, counters, the metrics the hooks share and
    the hooks, in calling order; a hook sets ``should_stop`` to end the run after the epoch's hooks."""

    config: ExperimentConfig
    run_dir: Path
    trainer: Trainer
    data: RunData
    progress: Progress
    metrics: MetricsStore
    hooks: list[Hook]
    should_stop: bool = False
    stop: StopRequest = field(default_factory=StopRequest)  # SIGINT/SIGTERM, caught
    backbone_frozen: bool | None = None  # None until the first epoch of this process sets it
    resumed_from: Path | None = None  # the checkpoint this process continued from

    def ends_after(self, end: EpochEnd) -> bool:
        """``end`` is the run's last epoch: the last scheduled, or a hook has asked to stop."""
        return end.last_scheduled or self.should_stop

    def checkpoint(self, rank_rng: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The checkpoint dict of the current state: trainer, counters, every hook, every rank's random states."""
        states = {**self.trainer.state_dict(), **self.progress.state_dict(), **self.metrics.state_dict()}
        for hook in self.hooks:
            states.update(hook.state_dict())
        return build_checkpoint(states, self.config, self.data.label_index, rank_rng)

    def result(self, metrics: dict[str, float], stopped_early: bool = False, stopped_by_signal: int | None = None) -> TrainResult:
        """A ``TrainResult`` for the state the loop is in."""
        return TrainResult(self.run_dir, self.progress.epoch, self.metrics.best_metric, self.metrics.best_epoch,
                           stopped_early=stopped_early, stopped_by_signal=stopped_by_signal, metrics=metrics)


def build_loop(config: ExperimentConfig, run_dir: Path, data: RunData, device: torch.device,
               context: DistributedContext, user_hooks: Sequence[Hook] = ()) -> TrainingLoop:
    """The trainer and the hooks the config asks for, then ``user_hooks``, in the order they run after an epoch;
    the checkpoint comes last, so that it holds every other hook's state."""
    trainer = build_trainer(config, len(data.label_index), data.train_labels, data.steps_per_epoch, device, context)
    tracking = Tracking(run_dir, config.comet, config.experiment_name or f"{run_dir.parent.name}/{run_dir.name}")
    hooks: list[Hook] = [
        EarlyStopping(config.early_stopping_patience), tracking, SampleGrid(tracking, config.log_sample_predictions),
        *user_hooks, Checkpointer(checkpoints_dir(run_dir), config.checkpoint_every, config.checkpoint_keep_last),
    ]
    return TrainingLoop(config, run_dir, trainer, data, Progress(), MetricsStore(config.monitor), hooks)


def restore_loop(loop: TrainingLoop, checkpoint: Mapping[str, Any], path: Path, options: TrainOptions) -> None:
    """Continue from ``checkpoint``: refuse one made for other labels or settings, repair ``best.pt``, load the
    trainer, the counters and every hook (the random states are put back last, just before the first batch)."""
    check_resumable(checkpoint, path, loop.config, loop.data.label_index, options.force, options.config_path)
    other_world_size = check_world_size(checkpoint, path, loop.trainer.context.world_size, options.force,
                                        recorded_world_size(loop.run_dir))
    if loop.trainer.context.is_main and repair_best(checkpoints_dir(loop.run_dir), checkpoint, path):
        log.info("%s: rewritten from %s (a crash had cut the save short)", BEST, path.name)
    loop.trainer.load_state_dict(checkpoint, path, loop.config, loop.data.steps_per_epoch)
    loop.progress = Progress.from_checkpoint(checkpoint)
    if other_world_size:  # another sharding: the unfinished epoch starts again, the schedule counts this run's steps
        loop.progress = Progress(epoch=loop.progress.epoch, step=loop.progress.epoch * loop.data.steps_per_epoch)
        loop.trainer.restart_schedule_at(loop.progress.step, loop.data.steps_per_epoch, loop.config)
    loop.metrics.load_state_dict(checkpoint)
    for hook in loop.hooks:
        hook.load_state_dict(checkpoint)
    # a run early stopping ended stays ended, unless a raised patience lets it go on
    loop.should_stop = any(isinstance(hook, EarlyStopping) and hook.triggered() for hook in loop.hooks)


def is_finished(loop: TrainingLoop) -> bool:
    """All epochs done, or a hook has ended the run (raise num_epochs/patience to go on)."""
    progress = loop.progress
    done = progress.epoch >= loop.config.num_epochs and progress.batch_in_epoch == 0
    return done or loop.should_stop


# ---------------------------------------------------------------- the run


def train(config: ExperimentConfig, run_dir: Path, resume: bool = True, overwrite: bool = False, force: bool = False,
          argv: Sequence[str] = (), overrides: Sequence[str] = (), config_path: Path | None = None,
          hooks: Sequence[Hook] = ()) -> TrainResult:
    """Train (or continue training) the experiment in ``run_dir``; see the module docstring for the rules.

    ``hooks``: your own ``training.hooks.Hook`` objects (log something each epoch, stop on a condition);
    their ``state_dict`` goes into every checkpoint, and ``load_state_dict`` reads it back on resume.
    """
    run_dir = Path(run_dir).resolve()
    options = TrainOptions(resume, overwrite, force, argv, overrides, config_path or run_dir / "config.yml", tuple(hooks))
    context = distributed_context()
    device = select_device(config.device, context)
    init_distributed(context, device)
    try:
        loop, rng_state = set_up_run(config, run_dir, options, context, device)
        if is_finished(loop):
            log.info("%s: already trained %d epochs (num_epochs: %d%s); nothing to do", run_dir, loop.progress.epoch,
                     loop.config.num_epochs, ", stopped early" if loop.progress.epoch < loop.config.num_epochs else "")
            return loop.result({}, stopped_early=loop.progress.epoch < loop.config.num_epochs)
        if context.is_main:
            record_start(loop, options, device)
        return run_epochs(loop, rng_state)
    finally:
        close_distributed(context)


def set_up_run(config: ExperimentConfig, run_dir: Path, options: TrainOptions, context: DistributedContext,
               device: torch.device) -> tuple[TrainingLoop, Mapping[str, Any] | None]:
    """The loop, restored from the checkpoint to resume from, and this rank's random states to restore (None: a fresh run)."""
    resume_from = find_resume_checkpoint(run_dir, options.resume, options.overwrite)  # looks only: nothing moves yet
    checkpoint = load_checkpoint(resume_from) if resume_from is not None else None
    # input size and normalisation where the config leaves them unset: those the run was trained with
    # (checkpoints from before these keys: ImageNet's, bilinear), else the weights'; saved with the run
    config = resolve_inputs(config, with_legacy_defaults(checkpoint.get("config") or {}) if checkpoint else None)
    configure_determinism(config.deterministic, device)
    seed_everything(config.seed)
    loop = build_loop(config, run_dir, load_run_data(config, context, options.config_path), device, context, options.hooks)
    # the dataset, the config and the model are checked: only now is the run folder changed (an earlier run archived)
    prepare_run_folder(run_dir, options.resume, options.overwrite, context)
    loop.resumed_from = resume_from
    if checkpoint is None or resume_from is None:
        return loop, None
    restore_loop(loop, checkpoint, resume_from, options)
    return loop, rank_rng_state(checkpoint, context.rank, context.world_size)


def record_start(loop: TrainingLoop, options: TrainOptions, device: torch.device) -> None:
    """Write the run files (resolved config, run_info.json) and log where the run starts."""
    progress, context, data = loop.progress, loop.trainer.context, loop.data
    start = f"epoch {progress.epoch + 1}" + (f", batch {progress.batch_in_epoch + 1}" if progress.batch_in_epoch else "")
    write_run_files(loop.run_dir, loop.config, options.argv, options.overrides, {
        "resumed_from": str(loop.resumed_from) if loop.resumed_from else None, "starts_at": start,
        "world_size": context.world_size, "device": str(device)})
    log.info("%s: %s, %d classes, %d train / %d val images, %s%s, starting at %s", loop.run_dir.name,
             loop.config.architecture, len(data.label_index), len(cast(CropDataset, data.train_loader.dataset)),
             len(cast(CropDataset, data.val_loader.dataset)), device, f" x {context.world_size}" if context.distributed else "", start)


def run_epochs(loop: TrainingLoop, rng_state: Mapping[str, Any] | None = None) -> TrainResult:
    """The recipe: the hooks' ``before_train``; each epoch trains (a signal saves a mid-epoch state), validates,
    records its metrics and calls the hooks; the run ends after the last epoch, when a hook sets ``should_stop``,
    or after a signal; ``after_train`` however it ends."""
    config, context = loop.config, loop.trainer.context
    row: dict[str, float] = {}
    try:
        for hook in loop.hooks:
            hook.before_train(loop)
        with loop.stop.installed():
            if rng_state is not None:
                restore_rng_state(rng_state)  # last: nothing between here and the first batch draws from them
            for epoch in range(loop.progress.epoch + 1, config.num_epochs + 1):
                started = time.perf_counter()
                train_metrics = start_epoch(loop, epoch)
                outcome = train_one_epoch(loop, train_metrics, f"epoch {epoch}/{config.num_epochs}")
                all_reduce_metrics(train_metrics, context)
                if outcome.stopped_by:
                    return stop_mid_epoch(loop, train_metrics, outcome, epoch, row)
                end = finish_epoch(loop, epoch, train_metrics, outcome, started)
                row = end.metrics
                loop.metrics.record(epoch, row)
                for hook in loop.hooks:
                    hook.after_epoch(loop, end)
                if loop.should_stop:
                    return loop.result(row, stopped_early=True)
                signum = max_over_ranks(context, loop.stop.signum or 0)[0]
                if signum:
                    log.warning("stopped after epoch %d; %s resumes from here", epoch, checkpoints_dir(loop.run_dir) / LAST)
                    return loop.result(row, stopped_by_signal=signum)
            return loop.result(row)
    finally:
        for hook in loop.hooks:
            hook.after_train(loop)


# ---------------------------------------------------------------- one epoch


@dataclass
class EpochOutcome:
    """What ``train_one_epoch`` did: batches done in this epoch, and the signal that stopped it (if any)."""

    batches_done: int
    stopped_by: int | None = None
    seconds: float = 0.0
    images: int = 0  # trained on by this process in this run of the epoch


def start_epoch(loop: TrainingLoop, epoch: int) -> MetricAccumulator:
    """Freeze or unfreeze the backbone, point the sampler at ``epoch`` past the batches a mid-epoch checkpoint
    did, and return the train metrics (on rank 0 holding those batches')."""
    config, progress = loop.config, loop.progress
    frozen = epoch <= config.freeze_backbone_epochs
    if loop.backbone_frozen != frozen:
        loop.backbone_frozen = frozen
        set_frozen_backbone(loop.trainer, frozen)
    loader = loop.data.train_loader
    rank_size = cast(EpochSampler, loader.sampler).rank_size()
    set_loader_epoch(loader, epoch, min(progress.batch_in_epoch * config.batch_size, rank_size))
    metrics = MetricAccumulator(len(loop.data.label_index))
    if progress.partial_train_metrics is not None and loop.trainer.context.is_main:
        metrics.load_state_tensor(progress.partial_train_metrics)
    progress.partial_train_metrics = None
    return metrics


def train_one_epoch(loop: TrainingLoop, metrics: MetricAccumulator, description: str = "") -> EpochOutcome:
    """One pass over the train loader (from ``progress.batch_in_epoch`` on); stops at a batch boundary on a signal."""
    trainer, loader, progress = loop.trainer, loop.data.train_loader, loop.progress
    trainer.network.train()
    done = progress.batch_in_epoch
    started, images_seen = time.perf_counter(), 0
    with progress_bar(done + len(loader), done, description, trainer.context) as bar:
        for batch in loader:
            loop.data.train_skipped.record(batch.skipped)
            signum, empty = max_over_ranks(trainer.context, loop.stop.signum or 0, int(len(batch) == 0))
            if signum:
                return EpochOutcome(done, signum, time.perf_counter() - started, images_seen)
            if not empty:
                train_step(trainer, batch.images, batch.labels, metrics)
                images_seen += len(batch)
            progress.step += 1 if not empty else 0
            done += 1
            progress.batch_in_epoch = done
            for hook in loop.hooks:
                hook.after_step(loop)
            bar.update(1)
            bar.set_postfix(img_per_s=f"{images_seen / max(time.perf_counter() - started, 1e-9):.1f}")
    signum = max_over_ranks(trainer.context, loop.stop.signum or 0)[0]
    return EpochOutcome(done, signum or None, time.perf_counter() - started, images_seen)


def stop_mid_epoch(loop: TrainingLoop, train_metrics: MetricAccumulator, outcome: EpochOutcome, epoch: int,
                   row: dict[str, float]) -> TrainResult:
    """A signal stopped the epoch: keep its train metrics so far, let the hooks save, and say how to resume."""
    loop.progress.partial_train_metrics = train_metrics.state_tensor()
    for hook in loop.hooks:
        hook.on_signal(loop)
    log.warning("stopped in epoch %d after batch %d; %s resumes from here", epoch, outcome.batches_done,
                checkpoints_dir(loop.run_dir) / LAST)
    return loop.result(row, stopped_by_signal=outcome.stopped_by)


def finish_epoch(loop: TrainingLoop, epoch: int, train_metrics: MetricAccumulator, outcome: EpochOutcome,
                 started: float) -> EpochEnd:
    """Validate, count the epoch as done, log its line; what the hooks are handed."""
    data, trainer = loop.data, loop.trainer
    num_classes = len(data.label_index)
    val_metrics = evaluate(trainer, data.val_loader, num_classes, data.val_skipped, f"validate {epoch}")
    label_names = [data.label_index[i] for i in range(num_classes)]
    val = val_metrics.compute(label_names)
    row = epoch_metrics(train_metrics.compute(label_names), val, trainer, time.perf_counter() - started,
                        outcome.seconds, outcome.images * trainer.context.world_size,
                        len(data.train_skipped) + len(data.val_skipped))
    loop.progress.epoch, loop.progress.batch_in_epoch = epoch, 0
    if trainer.context.is_main:
        log_epoch(epoch, row, loop.config)
    check_finite_loss(epoch, row, loop.config)
    return EpochEnd(epoch, row, val["confusion"], label_names, last_scheduled=epoch == loop.config.num_epochs)


def evaluate(trainer: Trainer, loader: DataLoader, num_classes: int, skipped: SkippedImages,
             description: str = "") -> MetricAccumulator:
    """Plain cross-entropy and predictions over ``loader`` (all ranks' shards summed)."""
    model = trainer.eval_model()
    share_rank0_weights(model, trainer.context)
    model.eval()
    metrics = MetricAccumulator(num_classes)
    with progress_bar(len(loader), 0, description, trainer.context) as bar, torch.inference_mode():
        for batch in loader:
            skipped.record(batch.skipped)
            if len(batch):
                labels = batch.labels.to(trainer.device, non_blocking=True)
                with trainer.autocast():
                    logits = model(trainer.to_device(batch.images)).float()
                metrics.update(logits, labels, F.cross_entropy(logits, labels, reduction="sum"))
            bar.update(1)
    all_reduce_metrics(metrics, trainer.context)
    return metrics


def all_reduce_metrics(accumulator: MetricAccumulator, context: DistributedContext) -> None:
    """Sum the metric counts of every rank into every rank's accumulator, always on the CPU (gloo): a rank
    that saw no batch keeps its counts there, and all ranks must reduce on one backend or the job hangs."""
    if context.distributed:
        accumulator.load_state_tensor(all_reduce_sum(accumulator.state_tensor().cpu(), context))


# ---------------------------------------------------------------- an epoch's figures


def epoch_metrics(train: Mapping[str, Any], val: Mapping[str, Any], trainer: Trainer, seconds: float,
                  train_seconds: float, images: int, skipped: int) -> dict[str, float]:
    """One row of metrics.csv: train loss/top-k, every validation figure, lr and throughput."""
    row = {f"train_{key}": float(train[key]) for key in ("loss", "top1", "top3")}
    row.update(scalar_metrics(val, prefix="val_"))
    row["lr"] = float(trainer.optimizer.param_groups[0]["lr"])
    row["epoch_seconds"] = seconds
    row["images_per_second"] = images / train_seconds if train_seconds > 0 else math.nan
    row["skipped_images"] = float(skipped)
    return row


def format_epoch(epoch: int, num_epochs: int, row: Mapping[str, float], monitor: str) -> str:
    """One log line per epoch."""
    return (f"epoch {epoch}/{num_epochs}: train loss {row['train_loss']:.4f} top1 {row['train_top1']:.3f} | "
            f"val loss {row['val_loss']:.4f} top1 {row['val_top1']:.3f} top3 {row['val_top3']:.3f} "
            f"macro-F1 {row['val_macro_f1']:.3f} | {monitor} {row[monitor]:.4f} | "
            f"{row['epoch_seconds']:.1f} s, {row['images_per_second']:.1f} img/s")


def log_epoch(epoch: int, row: Mapping[str, float], config: ExperimentConfig) -> None:
    """The epoch's log line."""
    log.info(format_epoch(epoch, config.num_epochs, row, config.monitor))


def check_finite_loss(epoch: int, row: Mapping[str, float], config: ExperimentConfig) -> None:
    """A NaN or inf training loss ends the run with an error before the hooks see the epoch, so it is written
    neither as best.pt nor as last.pt or ``<epoch>.pt`` (``--resume`` continues from the last finite epoch)."""
    if not math.isfinite(row["train_loss"]):
        raise DataError(f"epoch {epoch}: the training loss is {row['train_loss']}: training diverged; lower "
                        f"learning_rate (now {config.learning_rate:g}) or add warmup_epochs (this epoch was not saved)")
