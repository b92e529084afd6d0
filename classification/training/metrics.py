"""Classification metrics accumulated over an epoch, averaged per sample (never per batch).

``MetricAccumulator`` keeps every count it needs in one flat float64 tensor, so that a
distributed run can ``all_reduce(SUM)`` it and every rank computes the same figures:

    state = accumulator.state_tensor().cpu()     # every rank reduces on one device, whatever it saw
    torch.distributed.all_reduce(state)          # SUM is the default
    accumulator.load_state_tensor(state)

Conventions (documented because libraries differ):
- per-class precision, recall and F1 are 0 where undefined (no prediction, no sample, or
  precision + recall == 0), as sklearn's ``zero_division=0``;
- macro averages (precision, recall and F1 alike) are taken over the classes with
  support > 0, so a split that lacks a class is not scored as 0 on a class it cannot
  test; predictions of an absent class still count against the present classes' recall;
- weighted averages weight each class by its support (weighted recall == top-1);
- top-k uses k = min(k, num_classes);
- the expected calibration error uses 15 equal-width confidence bins ``(i/15, (i+1)/15]``
  of the top-1 softmax probability (Guo et al., 2017).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

CALIBRATION_BINS = 15
TOP_K = 3
_HEADER = 2  # loss_sum, top-k correct


class MetricAccumulator:
    """Sums of per-sample loss, top-k hits, the confusion matrix and calibration bins.

    State layout (float64): ``[loss_sum, top3_correct, confusion (C*C, row = true),
    bin_count (15), bin_confidence_sum (15), bin_correct (15)]``.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        with torch.inference_mode(False):  # never an inference tensor: written outside inference mode too
            self._state = torch.zeros(self.state_size(num_classes), dtype=torch.float64)

    @staticmethod
    def state_size(num_classes: int) -> int:
        """Length of the flat state tensor for ``num_classes`` classes."""
        return _HEADER + num_classes * num_classes + 3 * CALIBRATION_BINS

    def reset(self) -> None:
        """Forget everything accumulated (start of a new epoch)."""
        with torch.inference_mode(False):
            self._state = torch.zeros_like(self._state)

    @property
    def num_samples(self) -> int:
        """How many samples have been accumulated."""
        return int(round(float(self._confusion().sum())))

    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss_sum: float | torch.Tensor) -> None:
        """Add one batch: ``logits`` (B, C), ``targets`` (B,), and the SUM of its per-sample losses.

        The counts stay on the logits' device (its first batch moves them there; MPS, without
        float64, keeps them on the CPU): a training step copies nothing to the host and waits
        for nothing; ``compute`` reads them once per epoch. Sums use ``index_add_`` into
        fixed-size counts, so an out-of-range target fails loudly on any device.
        """
        device = logits.device if logits.device.type != "mps" else torch.device("cpu")
        if self._state.device != device:
            with torch.inference_mode(False):  # a normal tensor even when evaluating: reset and all_reduce write it later
                self._state = self._state.to(device)
        logits = logits.detach().to(device, torch.float64)
        targets = targets.detach().to(device, torch.int64)
        self._check_batch(logits, targets)
        if targets.numel() == 0:
            return
        c = self.num_classes
        probabilities = torch.softmax(logits, dim=1)
        top_values, top_indices = probabilities.topk(min(TOP_K, c), dim=1)
        predictions = top_indices[:, 0]
        confidences = top_values[:, 0]
        correct = (predictions == targets).to(torch.float64)
        ones = torch.ones_like(confidences)
        bins = torch.clamp(torch.ceil(confidences * CALIBRATION_BINS).to(torch.int64) - 1, 0, CALIBRATION_BINS - 1)

        self._state[0] += torch.as_tensor(loss_sum, dtype=torch.float64).to(device).detach()
        self._state[1] += (top_indices == targets[:, None]).any(dim=1).sum()
        self._state[_HEADER : _HEADER + c * c].index_add_(0, targets * c + predictions, ones)
        count, confidence_sum, correct_sum = self._bins()
        count.index_add_(0, bins, ones)
        confidence_sum.index_add_(0, bins, confidences)
        correct_sum.index_add_(0, bins, correct)

    def _check_batch(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Refuse shapes or labels that would silently corrupt the counts."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (B, {self.num_classes}), got {tuple(logits.shape)}")
        if targets.shape != (logits.shape[0],):
            raise ValueError(f"targets must have shape ({logits.shape[0]},), got {tuple(targets.shape)}")
        on_host = targets.device.type == "cpu"  # elsewhere the check would wait for the device; index_add_ fails instead
        if on_host and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.num_classes):
            raise ValueError(f"targets must lie in [0, {self.num_classes}), got {targets.min()}..{targets.max()}")

    def _confusion(self) -> torch.Tensor:
        """View of the confusion matrix inside the state (rows = true, columns = predicted)."""
        c = self.num_classes
        return self._state[_HEADER : _HEADER + c * c].view(c, c)

    def _bins(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the calibration bins: count, sum of confidence, number correct."""
        start = _HEADER + self.num_classes * self.num_classes
        count, confidence_sum, correct_sum = self._state[start : start + 3 * CALIBRATION_BINS].view(3, CALIBRATION_BINS)
        return count, confidence_sum, correct_sum

    def state_tensor(self) -> torch.Tensor:
        """A copy of the whole state as one flat float64 tensor on the counts' device (to all_reduce with SUM)."""
        return self._state.clone()

    def load_state_tensor(self, state: torch.Tensor) -> None:
        """Replace the state with a copy of ``state`` (e.g. after an all_reduce), on the counts' device."""
        if state.shape != self._state.shape:
            raise ValueError(f"state must have shape {tuple(self._state.shape)}, got {tuple(state.shape)}")
        with torch.inference_mode(False):  # a fresh normal tensor: the old one may be an inference tensor
            self._state = state.detach().to(self._state.device, torch.float64, copy=True)

    def merge(self, other: MetricAccumulator) -> None:
        """Add another accumulator's counts to this one (same as having seen its batches)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        with torch.inference_mode(False):
            self._state = self._state + other._state.to(self._state.device)

    def compute(self, label_names: Sequence[str] | Mapping[int, str] | None = None) -> dict[str, Any]:
        """All figures as plain Python values (JSON-able); aggregates are NaN when nothing was seen."""
        names = _label_names(label_names, self.num_classes)
        confusion = self._confusion()
        n = float(confusion.sum())
        true_positives = confusion.diag()
        support = confusion.sum(dim=1)
        predicted = confusion.sum(dim=0)
        precision = _safe_divide(true_positives, predicted)
        recall = _safe_divide(true_positives, support)
        f1 = _safe_divide(2 * precision * recall, precision + recall)
        present = support > 0

        def macro(values: torch.Tensor) -> float:
            return float(values[present].mean()) if bool(present.any()) else math.nan

        def weighted(values: torch.Tensor) -> float:
            return float((values * support).sum() / n) if n else math.nan

        return {
            "loss": float(self._state[0]) / n if n else math.nan,
            "top1": float(true_positives.sum()) / n if n else math.nan,
            "top3": float(self._state[1]) / n if n else math.nan,
            "macro_precision": macro(precision),
            "macro_recall": macro(recall),
            "macro_f1": macro(f1),
            "weighted_precision": weighted(precision),
            "weighted_recall": weighted(recall),
            "weighted_f1": weighted(f1),
            "ece": self._expected_calibration_error(),
            "per_class": {
                name: {
                    "precision": float(precision[i]),
                    "recall": float(recall[i]),
                    "f1": float(f1[i]),
                    "support": int(support[i]),
                }
                for i, name in enumerate(names)
            },
            "confusion": [[int(value) for value in row] for row in confusion.round().to(torch.int64).tolist()],
        }

    def _expected_calibration_error(self) -> float:
        """ECE = sum over bins of (bin share of samples) * |accuracy - mean confidence|."""
        count, confidence_sum, correct_sum = self._bins()
        n = float(count.sum())
        if not n:
            return math.nan
        return float((correct_sum - confidence_sum).abs().sum() / n)

    def calibration_bins(self) -> list[dict[str, float]]:
        """Per confidence bin: bounds, sample count, mean confidence and accuracy (0 when empty)."""
        count, confidence_sum, correct_sum = self._bins()
        mean_confidence = _safe_divide(confidence_sum, count)
        accuracy = _safe_divide(correct_sum, count)
        return [
            {
                "lower": i / CALIBRATION_BINS,
                "upper": (i + 1) / CALIBRATION_BINS,
                "count": int(count[i]),
                "confidence": float(mean_confidence[i]),
                "accuracy": float(accuracy[i]),
            }
            for i in range(CALIBRATION_BINS)
        ]


def accumulate_probabilities(probabilities: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray,
                             num_classes: int) -> MetricAccumulator:
    """A ``MetricAccumulator`` fed with class probabilities (loss = mean cross-entropy of the true class)."""
    probabilities = torch.as_tensor(probabilities, dtype=torch.float64)
    targets = torch.as_tensor(targets, dtype=torch.int64)
    accumulator = MetricAccumulator(num_classes)
    true_probabilities = probabilities[torch.arange(len(targets)), targets]
    loss_sum = float(-torch.log(true_probabilities.clamp(min=1e-12)).sum())
    accumulator.update(torch.log(probabilities.clamp(min=1e-300)), targets, loss_sum)
    return accumulator


def scalar_metrics(result: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten ``compute()``'s result into named scalars for ``metrics.csv`` and Comet.

    ``prefix="val_"`` gives ``val_loss, val_top1, ..., val_precision_<class>, val_recall_<class>``.
    """
    flat = {f"{prefix}{key}": float(value) for key, value in result.items() if isinstance(value, (int, float))}
    for name, figures in result.get("per_class", {}).items():
        flat[f"{prefix}precision_{name}"] = float(figures["precision"])
        flat[f"{prefix}recall_{name}"] = float(figures["recall"])
    return flat


def _label_names(label_names: Sequence[str] | Mapping[int, str] | None, num_classes: int) -> list[str]:
    """Class names in index order; the index itself when no names are given."""
    if label_names is None:
        return [str(i) for i in range(num_classes)]
    if isinstance(label_names, Mapping):
        names = [label_names[i] for i in range(num_classes)]
    else:
        names = list(label_names)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} label names for {num_classes} classes")
    return names


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Element-wise division that gives 0 where the denominator is 0."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), torch.zeros_like(numerator))
