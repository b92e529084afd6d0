"""The exponential moving average of the weights, updated without waiting for the GPU.

``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` copies its step counter to
the device on every update (``n_averaged.to(device)``, a copy from pageable memory that waits for
the GPU's queue), though the EMA never reads it. ``ExponentialMovingAverage`` is the same module
(its ``module`` and ``n_averaged`` are what checkpoints hold) with the same arithmetic, and its
counter stays on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class ExponentialMovingAverage(AveragedModel):
    """``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)``, sync-free."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        super().__init__(model, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """The first call copies ``model``; later ones move every weight and buffer ``1 - decay`` of the way to it."""
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [tensor.detach() for tensor in (*model.parameters(), *model.buffers())]
        if int(self.n_averaged) == 0:  # a CPU counter: no wait for the device
            for mine, theirs in zip(averaged, current, strict=True):
                mine.copy_(theirs)
        else:
            floats = [(mine, theirs) for mine, theirs in zip(averaged, current, strict=True) if mine.is_floating_point()]
            if floats:
                torch._foreach_lerp_([m for m, _ in floats], [t for _, t in floats], 1 - self.decay)
            for mine, theirs in zip(averaged, current, strict=True):
                if not mine.is_floating_point():  # BatchNorm's num_batches_tracked, as AveragedModel computes it
                    mine.copy_(mine * self.decay + theirs * (1 - self.decay))
        self.n_averaged += 1
