"""The modules one training step needs (model, optimizer, schedule, AMP scaler, EMA, loss), their
checkpoint states, and the step itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from classification.config import ExperimentConfig
from classification.runtime import DistributedContext, autocast, autocast_dtype, uses_channels_last
from classification.training.checkpoint import load_model_weights, load_state
from classification.training.data import class_weights_for_loss
from classification.training.ema import ExponentialMovingAverage
from classification.training.metrics import MetricAccumulator
from classification.training.models import build_model, set_backbone_trainable
from classification.training.optim import build_optimizer, build_scheduler, restore_schedule


@dataclass
class Trainer:
    """The modules and options one training step needs."""

    model: nn.Module  # the plain model (what checkpoints hold)
    network: nn.Module  # the model as trained: DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: ExponentialMovingAverage | None
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

    def state_dict(self) -> dict[str, Any]:
        """The module states under their checkpoint keys."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_num_updates": int(self.ema.n_averaged) if self.ema is not None else 0,
        }

    def restart_schedule_at(self, step: int, steps_per_epoch: int, config: ExperimentConfig) -> None:
        """Put the learning-rate schedule at ``step`` of this run's ``steps_per_epoch`` (a resume with another world size)."""
        self.scheduler.last_epoch = step
        restore_schedule(self.optimizer, self.scheduler, steps_per_epoch, config)

    def load_state_dict(self, checkpoint: Mapping[str, Any], path: Path, config: ExperimentConfig, steps_per_epoch: int) -> None:
        """Load a checkpoint's module states; a state that does not fit this config is one line."""
        architecture = str((checkpoint.get("config") or {}).get("architecture", config.architecture))
        load_model_weights(self.model, checkpoint["model"], path, config.architecture
                           + (f" (the checkpoint's is {architecture})" if architecture != config.architecture else ""))
        load_state(self.optimizer, checkpoint["optimizer"], path, "optimizer")
        load_state(self.scheduler, checkpoint["scheduler"], path, "learning-rate schedule")
        restore_schedule(self.optimizer, self.scheduler, steps_per_epoch, config)
        if checkpoint.get("scaler"):
            load_state(self.scaler, checkpoint["scaler"], path, "AMP scaler")
        if self.ema is not None and checkpoint.get("ema") is not None:
            load_model_weights(self.ema.module, checkpoint["ema"], path, config.architecture)
            self.ema.n_averaged.fill_(int(checkpoint.get("ema_num_updates", 1)))
        elif self.ema is not None:
            load_model_weights(self.ema.module, checkpoint["model"], path, config.architecture)  # EMA switched on (forced)
            self.ema.n_averaged.fill_(1)


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
        ema = ExponentialMovingAverage(model, config.ema_decay)
    weights = class_weights_for_loss(train_labels, num_classes).to(device) if config.balancing == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing, reduction="none")
    return Trainer(
        model=model, network=model, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, steps_per_epoch, config),
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        ema=ema, criterion=criterion, device=device, amp_dtype=amp_dtype, channels_last=channels_last,
        context=context,
    )


def set_frozen_backbone(trainer: Trainer, frozen: bool) -> None:
    """Freeze or unfreeze the backbone; under DDP, wrap again so the reducer sees the trainable set."""
    set_backbone_trainable(trainer.model, not frozen)
    if trainer.context.distributed:
        device_ids = [trainer.device.index] if trainer.device.type == "cuda" else None
        trainer.network = DistributedDataParallel(trainer.model, device_ids=device_ids)


def train_step(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, metrics: MetricAccumulator) -> None:
    """Forward, loss (mean of per-sample losses), backward, optimizer and schedule step, EMA update."""
    images, labels = trainer.to_device(images), labels.to(trainer.device, non_blocking=True)
    with trainer.autocast():
        logits = trainer.network(images)
    losses = trainer.criterion(logits.float(), labels)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scaler.scale(losses.mean()).backward()
    if optimizer_step(trainer):
        trainer.scheduler.step()
        if trainer.ema is not None:
            trainer.ema.update_parameters(trainer.model)
    metrics.update(logits.detach(), labels, losses.detach().sum())  # a tensor: no wait for the device


def optimizer_step(trainer: Trainer) -> bool:
    """The optimizer step through the AMP scaler; False when fp16's scaler skipped it (inf or NaN gradients),
    so that the schedule and the EMA do not step either. Reading the scale waits for the GPU: fp16 only."""
    if not trainer.scaler.is_enabled():
        trainer.optimizer.step()
        return True
    scale = trainer.scaler.get_scale()
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    return trainer.scaler.get_scale() >= scale  # lowered only when the step was skipped
