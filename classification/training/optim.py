"""The optimizer and the per-step learning-rate schedule of a training run."""

from __future__ import annotations

import math

import torch
from torch import nn

from classification.config import ExperimentConfig


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


def restore_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, steps_per_epoch: int,
                     config: ExperimentConfig) -> None:
    """Set each group's learning rate for the restored step under this config (``num_epochs`` may have changed)."""
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * lr_factor(scheduler.last_epoch, steps_per_epoch, config)
