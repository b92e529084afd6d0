"""The training loop: epochs, ``train_one_epoch``, ``evaluate``, checkpoints, exact resume, DDP.

Read it like torchvision's ``references/classification/train.py``: ``train`` sets
things up (device, seeds, data, model, optimizer, schedule, resume) and runs the epochs;
``train_one_epoch`` and ``evaluate`` do one pass each.

Exactness: the batch order is a function of ``(seed, epoch)`` and each image's
augmentation of ``(seed, epoch, index)`` (``training/data.py``); the learning rate is
set per optimizer step (``LambdaLR``); a checkpoint holds the model, optimizer,
scheduler, scaler and EMA states, the counters and every random state. So a run
resumed from ``last.pt`` (after ``kill -9``, or mid-epoch after SIGINT/SIGTERM) ends with
the same weights, bit for bit on the CPU with ``deterministic: true``, as a run that was
never stopped.

Run folder rules: ``--resume`` (the default) continues from ``checkpoints/last.pt``
(a fresh start when there is none) and refuses a config whose training fields changed
unless ``force``; ``--no-resume`` refuses to start over a run that has checkpoints unless
``overwrite``, which moves ``checkpoints/``, ``metrics.csv`` and the run files to
``archive/<UTC time>/`` (nothing is deleted).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from classification.config import (
    ExperimentConfig,
    check_num_classes,
    config_changes,
    config_hash,
    with_legacy_defaults,
    write_run_files,
)
from classification.errors import DataError, UserError
from classification.runtime import (
    DistributedContext,
    agree,
    all_reduce_sum,
    autocast,
    autocast_dtype,
    barrier,
    close_distributed,
    configure_determinism,
    distributed_context,
    init_distributed,
    progress_bar,
    seed_everything,
    select_device,
    share_rank0_weights,
    uses_channels_last,
)
from classification.training.checkpoint import (
    BEST,
    LAST,
    available_checkpoints,
    capture_rng_state,
    checkpoint_names,
    checkpoints_dir,
    find_newest_checkpoint,
    load_checkpoint,
    load_model_weights,
    prune_checkpoints,
    repair_best,
    remove_partial_writes,
    restore_rng_state,
    save_checkpoint,
)
from classification.training.data import (
    SkippedImages,
    build_loader,
    build_samples,
    class_weights_for_loss,
    load_image,
    load_label_index,
    set_loader_epoch,
)
from classification.training.metrics import MetricAccumulator, scalar_metrics
from classification.training.models import build_model, resolve_inputs, set_backbone_trainable
from classification.training.tracking import ExperimentTracker

log = logging.getLogger(__name__)

METRICS_CSV = "metrics.csv"
ARCHIVE_DIR = "archive"
RUN_FILES = ("metrics.csv", "resolved_config.yml", "run_info.json")
TILE = 128  # side of one sample-prediction tile, in pixels


# ---------------------------------------------------------------- model, optimizer, schedule


def lr_factor(step: int, steps_per_epoch: int, config: ExperimentConfig) -> float:
    """Learning-rate multiplier at optimizer ``step``: linear warm-up, then cosine, step or constant."""
    warmup = config.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if config.lr_schedule == "constant":
        return 1.0
    if config.lr_schedule == "step":
        return config.lr_gamma ** ((step // steps_per_epoch) // config.lr_step_size)
    total = max(1, config.num_epochs * steps_per_epoch - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / total)))


def build_optimizer(model: nn.Module, config: ExperimentConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over every parameter (frozen ones have no gradient and stay put)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, config: ExperimentConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule, so that resuming in the middle of an epoch continues it exactly."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, config))


@dataclass
class Trainer:
    """The modules and options one training step needs."""

    model: nn.Module  # the plain model (what checkpoints hold)
    network: nn.Module  # the model as trained: DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    criterion: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    context: DistributedContext

    def autocast(self) -> Any:
        """Mixed-precision context for the forward pass (a no-op in float32)."""
        return autocast(self.device, self.amp_dtype)

    def eval_model(self) -> nn.Module:
        """The weights to evaluate: the EMA model when enabled, else the trained model."""
        return self.ema.module if self.ema is not None else self.model

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Images on the training device, channels_last when asked for."""
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def set_frozen_backbone(trainer: Trainer, frozen: bool) -> None:
    """Freeze or unfreeze the backbone; under DDP, wrap again so the reducer sees the trainable set."""
    set_backbone_trainable(trainer.model, not frozen)
    if trainer.context.distributed:
        device_ids = [trainer.device.index] if trainer.device.type == "cuda" else None
        trainer.network = DistributedDataParallel(trainer.model, device_ids=device_ids)


def build_trainer(config: ExperimentConfig, num_classes: int, train_labels: Sequence[int], steps_per_epoch: int,
                  device: torch.device, context: DistributedContext) -> Trainer:
    """Model (head for ``num_classes``), optimizer, per-step schedule, AMP scaler, EMA and loss."""
    model = build_model(config.architecture, num_classes, config.pretrained, config.weights_file,
                        config.pretrained_source).to(device)
    channels_last = uses_channels_last(config, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    amp_dtype = autocast_dtype(config, device)
    ema = None
    if config.ema_decay is not None:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    weights = class_weights_for_loss(train_labels, num_classes).to(device) if config.balancing == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing, reduction="none")
    return Trainer(
        model=model, network=model, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, steps_per_epoch, config),
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        ema=ema, criterion=criterion, device=device, amp_dtype=amp_dtype, channels_last=channels_last,
        context=context,
    )


# ---------------------------------------------------------------- progress and checkpoints


@dataclass
class Progress:
    """Counters a checkpoint carries besides the module states."""

    epoch: int = 0  # last completed epoch
    step: int = 0  # optimizer steps so far
    batch_in_epoch: int = 0  # batches done in epoch + 1 (a mid-epoch state when > 0)
    best_metric: float | None = None
    best_epoch: int | None = None
    early_stopping_counter: int = 0
    partial_train_metrics: torch.Tensor | None = None


def build_checkpoint(trainer: Trainer, progress: Progress, config: ExperimentConfig, label_index: Mapping[int, str],
                     comet_key: str | None) -> dict[str, Any]:
    """The checkpoint dict (tensors and plain values only, for ``weights_only=True`` loading)."""
    return {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "ema": trainer.ema.module.state_dict() if trainer.ema is not None else None,
        "ema_num_updates": int(trainer.ema.n_averaged) if trainer.ema is not None else 0,
        "epoch": progress.epoch,
        "step": progress.step,
        "batch_in_epoch": progress.batch_in_epoch,
        "partial_train_metrics": progress.partial_train_metrics,
        "best_metric": progress.best_metric,
        "best_epoch": progress.best_epoch,
        "early_stopping_counter": progress.early_stopping_counter,
        "rng": capture_rng_state(),
        "label_index": {str(i): name for i, name in label_index.items()},
        "config_hash": config_hash(config),
        "comet_key": comet_key,
        "config": config.to_dict(),
    }


def load_state(target: Any, state: Any, path: Path, what: str) -> None:
    """``target.load_state_dict(state)``; a state made for other settings (forced resume) is one line."""
    try:
        target.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as error:
        reason = f"no {error} entry" if isinstance(error, KeyError) else (str(error).strip().splitlines() or [""])[0]
        raise DataError(f"{path}: its {what} state does not fit this config ({reason}); "
                        "start again with --no-resume --overwrite") from None


def restore_trainer(trainer: Trainer, checkpoint: Mapping[str, Any], config: ExperimentConfig, steps_per_epoch: int,
                    path: Path) -> Progress:
    """Load a checkpoint's states into ``trainer``; return its counters (RNG states are restored later)."""
    architecture = str((checkpoint.get("config") or {}).get("architecture", config.architecture))
    load_model_weights(trainer.model, checkpoint["model"], path, config.architecture
                       + (f" (the checkpoint's is {architecture})" if architecture != config.architecture else ""))
    load_state(trainer.optimizer, checkpoint["optimizer"], path, "optimizer")
    load_state(trainer.scheduler, checkpoint["scheduler"], path, "learning-rate schedule")
    for group, base_lr in zip(trainer.optimizer.param_groups, trainer.scheduler.base_lrs):
        group["lr"] = base_lr * lr_factor(trainer.scheduler.last_epoch, steps_per_epoch, config)  # num_epochs may have changed
    if checkpoint.get("scaler"):
        load_state(trainer.scaler, checkpoint["scaler"], path, "AMP scaler")
    if trainer.ema is not None and checkpoint.get("ema") is not None:
        load_model_weights(trainer.ema.module, checkpoint["ema"], path, config.architecture)
        trainer.ema.n_averaged.fill_(int(checkpoint.get("ema_num_updates", 1)))
    elif trainer.ema is not None:
        load_model_weights(trainer.ema.module, checkpoint["model"], path, config.architecture)  # EMA switched on (forced)
        trainer.ema.n_averaged.fill_(1)
    return Progress(
        epoch=int(checkpoint["epoch"]), step=int(checkpoint["step"]), batch_in_epoch=int(checkpoint["batch_in_epoch"]),
        best_metric=checkpoint.get("best_metric"), best_epoch=checkpoint.get("best_epoch"),
        early_stopping_counter=int(checkpoint.get("early_stopping_counter", 0)),
        partial_train_metrics=checkpoint.get("partial_train_metrics"),
    )


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
    if not force:
        raise UserError(f"{config_path}: changed since {path} ({summary}); resume anyway with --force, "
                        "or start again with --no-resume --overwrite")
    log.warning("resuming with a changed config (--force): %s", summary)


def archive_run(run_dir: Path) -> Path:
    """Move ``checkpoints/`` and the run's files to ``archive/<UTC time>/``; nothing is deleted."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
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


# ---------------------------------------------------------------- signals


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a resumable checkpoint at the next batch boundary.

    A second SIGINT while waiting raises KeyboardInterrupt (stop now; ``last.pt`` stays the
    previous complete checkpoint).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: saving a resumable checkpoint at the next batch", signal.Signals(signum).name)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle SIGINT and SIGTERM inside the block (main thread only), then restore the handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self.handle)
        try:
            yield self
        finally:
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)


def all_reduce_metrics(accumulator: MetricAccumulator, context: DistributedContext) -> None:
    """Sum the metric counts of every rank into every rank's accumulator."""
    if context.distributed:
        accumulator.load_state_tensor(all_reduce_sum(accumulator.state_tensor(), context))


# ---------------------------------------------------------------- one epoch


@dataclass
class EpochOutcome:
    """What ``train_one_epoch`` did: batches done in this epoch, and the signal that stopped it (if any)."""

    batches_done: int
    stopped_by: int | None = None
    seconds: float = 0.0
    images: int = 0  # trained on by this process in this run of the epoch


def train_one_epoch(trainer: Trainer, loader: DataLoader, metrics: MetricAccumulator, skipped: SkippedImages,
                    progress: Progress, stop: StopRequest, description: str = "") -> EpochOutcome:
    """One pass over ``loader`` (from ``progress.batch_in_epoch`` on); stops at a batch boundary on a signal."""
    trainer.network.train()
    done = progress.batch_in_epoch
    started, images_seen = time.perf_counter(), 0
    with progress_bar(done + len(loader), done, description, trainer.context) as bar:
        for batch in loader:
            skipped.record(batch.skipped)
            signum, empty = agree(trainer.context, stop.signum or 0, int(len(batch) == 0))
            if signum:
                return EpochOutcome(done, signum, time.perf_counter() - started, images_seen)
            if not empty:
                train_step(trainer, batch.images, batch.labels, metrics)
                images_seen += len(batch)
            progress.step += 1 if not empty else 0
            done += 1
            progress.batch_in_epoch = done
            bar.update(1)
            bar.set_postfix(img_per_s=f"{images_seen / max(time.perf_counter() - started, 1e-9):.1f}")
    signum = agree(trainer.context, stop.signum or 0)[0]
    return EpochOutcome(done, signum or None, time.perf_counter() - started, images_seen)


def train_step(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, metrics: MetricAccumulator) -> None:
    """Forward, loss (mean of per-sample losses), backward, optimizer and schedule step, EMA update."""
    images, labels = trainer.to_device(images), labels.to(trainer.device, non_blocking=True)
    with trainer.autocast():
        logits = trainer.network(images)
    losses = trainer.criterion(logits.float(), labels)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scaler.scale(losses.mean()).backward()
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    trainer.scheduler.step()
    if trainer.ema is not None:
        trainer.ema.update_parameters(trainer.model)
    metrics.update(logits.detach(), labels, losses.detach().sum())  # a tensor: no wait for the device


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
                labels = batch.labels.to(trainer.device)
                with trainer.autocast():
                    logits = model(trainer.to_device(batch.images)).float()
                metrics.update(logits, labels, F.cross_entropy(logits, labels, reduction="sum"))
            bar.update(1)
    all_reduce_metrics(metrics, trainer.context)
    return metrics


# ---------------------------------------------------------------- logging helpers


def is_improvement(value: float, best: float | None, monitor: str) -> bool:
    """True when ``value`` beats ``best`` (lower is better for val_loss; NaN never improves)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


def sample_prediction_grid(trainer: Trainer, loader: DataLoader, count: int, label_names: Mapping[int, str]) -> Image.Image | None:
    """A grid of ``count`` evenly spaced validation images captioned ``true -> predicted (confidence)``."""
    dataset = loader.dataset
    if count <= 0 or len(dataset) == 0:
        return None
    indices = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, min(count, len(dataset)))})
    items = [dataset[i] for i in indices]
    items = [(i, item) for i, item in zip(indices, items) if item[0] is not None]
    if not items:
        return None
    model = trainer.eval_model()
    model.eval()
    with torch.inference_mode(), trainer.autocast():
        logits = model(trainer.to_device(torch.stack([item[0] for _, item in items]))).float()
    confidence, predicted = torch.softmax(logits, dim=1).max(dim=1)
    columns = min(4, len(items))
    rows = math.ceil(len(items) / columns)
    grid = Image.new("RGB", (columns * TILE, rows * (TILE + 28)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (index, (_, label, _)) in enumerate(items):
        x, y = (k % columns) * TILE, (k // columns) * (TILE + 28)
        grid.paste(load_image(dataset.samples[index].path, TILE).resize((TILE, TILE)), (x, y))
        colour = (0, 120, 0) if int(predicted[k]) == label else (200, 0, 0)
        draw.text((x + 2, y + TILE + 1), f"{label_names[label]}", fill=(0, 0, 0))
        draw.text((x + 2, y + TILE + 14), f"-> {label_names[int(predicted[k])]} {float(confidence[k]):.2f}", fill=colour)
    return grid


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


# ---------------------------------------------------------------- the run


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
    """The labels and loaders of a run."""

    label_index: dict[int, str]
    train_loader: DataLoader
    val_loader: DataLoader
    train_labels: list[int]


def load_run_data(config: ExperimentConfig, context: DistributedContext, config_path: Path) -> RunData:
    """Label index (checked against ``num_classes``) and the train/val loaders, sharded by rank."""
    label_index = load_label_index(config.data_root, config.train_split)
    check_num_classes(config, label_index, config_path)
    train_samples = build_samples(config, config.train_split)
    val_samples = build_samples(config, config.val_split)
    if not train_samples:
        raise DataError(f"{config.data_root}: the {config.train_split!r} split has no images to train on")
    return RunData(
        label_index=label_index,
        train_loader=build_loader(config, train_samples, True, context.rank, context.world_size),
        val_loader=build_loader(config, val_samples, False, context.rank, context.world_size),
        train_labels=[sample.label for sample in train_samples],
    )


def is_finished(progress: Progress, config: ExperimentConfig) -> bool:
    """All epochs done, or early stopping already triggered (raise num_epochs/patience to go on)."""
    patience = config.early_stopping_patience
    done = progress.epoch >= config.num_epochs and progress.batch_in_epoch == 0
    return done or (patience is not None and progress.early_stopping_counter >= patience)


def train(config: ExperimentConfig, run_dir: Path, resume: bool = True, overwrite: bool = False, force: bool = False,
          argv: Sequence[str] = (), overrides: Sequence[str] = (), config_path: Path | None = None) -> TrainResult:
    """Train (or continue training) the experiment in ``run_dir``; see the module docstring for the rules."""
    run_dir = Path(run_dir).resolve()
    config_path = config_path or run_dir / "config.yml"
    context = distributed_context()
    device = select_device(config.device, context)
    init_distributed(context, device)
    try:
        return run_training(config, run_dir, resume, overwrite, force, argv, overrides, config_path, context, device)
    finally:
        close_distributed(context)


def run_training(config: ExperimentConfig, run_dir: Path, resume: bool, overwrite: bool, force: bool,
                 argv: Sequence[str], overrides: Sequence[str], config_path: Path,
                 context: DistributedContext, device: torch.device) -> TrainResult:
    """``train`` once the process group and the device are set up."""
    resume_from = find_resume_checkpoint(run_dir, resume, overwrite)
    barrier(context)  # every rank has looked at the run folder before rank 0 changes it
    if context.is_main:
        remove_partial_writes(checkpoints_dir(run_dir))
        if not resume and overwrite and (checkpoints_dir(run_dir).exists() or (run_dir / METRICS_CSV).exists()):
            archive_run(run_dir)
    checkpoint = load_checkpoint(resume_from) if resume_from is not None else None
    # input size and normalisation where the config leaves them unset: those the run was trained with
    # (checkpoints from before these keys: ImageNet's, bilinear), else the weights'; saved with the run
    config = resolve_inputs(config, with_legacy_defaults(checkpoint.get("config") or {}) if checkpoint else None)
    configure_determinism(config.deterministic)
    seed_everything(config.seed)
    data = load_run_data(config, context, config_path)
    steps_per_epoch = max(1, len(data.train_loader))
    trainer = build_trainer(config, len(data.label_index), data.train_labels, steps_per_epoch, device, context)

    progress = Progress()
    if checkpoint is not None:
        assert resume_from is not None
        check_resumable(checkpoint, resume_from, config, data.label_index, force, config_path)
        if context.is_main and repair_best(checkpoints_dir(run_dir), checkpoint, resume_from):
            log.info("%s: rewritten from %s (a crash had cut the save short)", BEST, resume_from.name)
        progress = restore_trainer(trainer, checkpoint, config, steps_per_epoch, resume_from)
    if is_finished(progress, config):
        log.info("%s: already trained %d epochs (num_epochs: %d%s); nothing to do", run_dir, progress.epoch,
                 config.num_epochs, ", stopped early" if progress.epoch < config.num_epochs else "")
        return TrainResult(run_dir, progress.epoch, progress.best_metric, progress.best_epoch,
                           stopped_early=progress.epoch < config.num_epochs)

    if context.is_main:
        start = f"epoch {progress.epoch + 1}" + (f", batch {progress.batch_in_epoch + 1}" if progress.batch_in_epoch else "")
        write_run_files(run_dir, config, argv, overrides, {
            "resumed_from": str(resume_from) if resume_from else None, "starts_at": start,
            "world_size": context.world_size, "device": str(device)})
        log.info("%s: %s, %d classes, %d train / %d val images, %s%s, starting at %s", run_dir.name,
                 config.architecture, len(data.label_index), len(data.train_loader.dataset),
                 len(data.val_loader.dataset), device, f" x {context.world_size}" if context.distributed else "",
                 start)
    tracker = ExperimentTracker.create(
        run_dir, config.to_dict(), config.comet, config.experiment_name or f"{run_dir.parent.name}/{run_dir.name}",
        checkpoint.get("comet_key") if checkpoint else None, enabled=context.is_main)
    rng_state = checkpoint["rng"] if checkpoint else None
    del checkpoint
    try:
        with StopRequest().installed() as stop:
            if rng_state is not None:
                restore_rng_state(rng_state)  # last: nothing between here and the first batch draws from them
            return run_epochs(config, run_dir, trainer, data, progress, tracker, stop)
    finally:
        tracker.end()


def run_epochs(config: ExperimentConfig, run_dir: Path, trainer: Trainer, data: RunData, progress: Progress,
               tracker: ExperimentTracker, stop: StopRequest) -> TrainResult:
    """The epoch loop: train, evaluate, log, checkpoint, early stopping; a signal saves a mid-epoch state."""
    context, directory = trainer.context, checkpoints_dir(run_dir)
    num_classes, skipped = len(data.label_index), SkippedImages(data.train_loader.dataset)
    val_skipped = SkippedImages(data.val_loader.dataset)
    frozen: bool | None = None
    row: dict[str, float] = {}
    for epoch in range(progress.epoch + 1, config.num_epochs + 1):
        epoch_started = time.perf_counter()
        if frozen != (epoch <= config.freeze_backbone_epochs):
            frozen = epoch <= config.freeze_backbone_epochs
            set_frozen_backbone(trainer, frozen)
        loader_start = min(progress.batch_in_epoch * config.batch_size, data.train_loader.sampler.rank_size())
        set_loader_epoch(data.train_loader, epoch, loader_start)
        train_metrics = MetricAccumulator(num_classes)
        if progress.partial_train_metrics is not None and context.is_main:
            train_metrics.load_state_tensor(progress.partial_train_metrics)
        progress.partial_train_metrics = None
        outcome = train_one_epoch(trainer, data.train_loader, train_metrics, skipped, progress, stop,
                                  f"epoch {epoch}/{config.num_epochs}")
        if outcome.stopped_by:
            all_reduce_metrics(train_metrics, context)
            progress.partial_train_metrics = train_metrics.state_tensor()
            save(trainer, progress, config, data, tracker, directory, [LAST])
            log.warning("stopped in epoch %d after batch %d; %s resumes from here", epoch, outcome.batches_done,
                        directory / LAST)
            return TrainResult(run_dir, progress.epoch, progress.best_metric, progress.best_epoch,
                               stopped_by_signal=outcome.stopped_by, metrics=row)
        all_reduce_metrics(train_metrics, context)
        val_metrics = evaluate(trainer, data.val_loader, num_classes, val_skipped, f"validate {epoch}")
        label_names = [data.label_index[i] for i in range(num_classes)]
        val = val_metrics.compute(label_names)
        row = epoch_metrics(train_metrics.compute(label_names), val, trainer, time.perf_counter() - epoch_started,
                            outcome.seconds, outcome.images * context.world_size, len(skipped) + len(val_skipped))
        improved = is_improvement(row[config.monitor], progress.best_metric, config.monitor)
        if improved:
            progress.best_metric, progress.best_epoch, progress.early_stopping_counter = row[config.monitor], epoch, 0
        else:
            progress.early_stopping_counter += 1
        progress.epoch, progress.batch_in_epoch = epoch, 0
        stop_early = config.early_stopping_patience is not None and progress.early_stopping_counter >= config.early_stopping_patience
        final = epoch == config.num_epochs or stop_early
        if context.is_main:
            log.info(format_epoch(epoch, config.num_epochs, row, config.monitor))
            if not math.isfinite(row["train_loss"]):
                log.warning("epoch %d: the training loss is %s: training diverged; lower learning_rate (now %g) "
                            "or add warmup_epochs", epoch, row["train_loss"], config.learning_rate)
            tracker.log_epoch(epoch, row)  # before the checkpoint: a resumed run rewrites this row, never loses it
            tracker.log_confusion_matrix(val["confusion"], label_names, epoch)
            if final:
                grid = sample_prediction_grid(trainer, data.val_loader, config.log_sample_predictions, data.label_index)
                if grid is not None:
                    tracker.log_image(grid, "sample_predictions", epoch)
        save(trainer, progress, config, data, tracker, directory, checkpoint_names(epoch, config.checkpoint_every, improved, final))
        if stop_early:
            log.info("early stopping: %s has not improved for %d epochs (best %.4f at epoch %s)", config.monitor,
                     progress.early_stopping_counter, progress.best_metric or math.nan, progress.best_epoch)
            return TrainResult(run_dir, epoch, progress.best_metric, progress.best_epoch, stopped_early=True, metrics=row)
        signum = agree(context, stop.signum or 0)[0]
        if signum:
            log.warning("stopped after epoch %d; %s resumes from here", epoch, directory / LAST)
            return TrainResult(run_dir, epoch, progress.best_metric, progress.best_epoch, stopped_by_signal=signum, metrics=row)
    return TrainResult(run_dir, progress.epoch, progress.best_metric, progress.best_epoch, metrics=row)


def save(trainer: Trainer, progress: Progress, config: ExperimentConfig, data: RunData, tracker: ExperimentTracker,
         directory: Path, names: list[str]) -> None:
    """Rank 0 writes the checkpoint under ``names`` and prunes old numbered ones; all ranks wait for it."""
    if trainer.context.is_main:
        checkpoint = build_checkpoint(trainer, progress, config, data.label_index, tracker.key)
        save_checkpoint(checkpoint, directory, names)
        prune_checkpoints(directory, config.checkpoint_keep_last)
    barrier(trainer.context)
