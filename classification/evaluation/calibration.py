"""Calibration and abstention: temperature scaling, per-class thresholds for a target precision, risk-coverage.

- **Temperature scaling** (Guo et al. 2017): one scalar ``T`` fitted on the val split by
  minimising the negative log-likelihood of ``softmax(log p / T)``; it changes confidences,
  never the top-1 class. ``log p`` differs from the logits by a per-row constant, so scaling
  the log-probabilities is exactly scaling the logits.
- **Thresholds**: for each class, the lowest confidence ``t`` such that the predictions of that
  class with confidence >= ``t`` reach the target precision on val (most answers for that
  precision). A class predicted fewer than ``MIN_SUPPORT`` times on val takes the threshold
  fitted on all classes pooled; a class that never reaches the target gets ``inf`` (never answered).
- **Risk-coverage**: answers sorted by confidence, the accuracy of the answered fraction
  against that fraction (the selective-prediction curve).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import minimize_scalar

from classification.errors import DataError
from classification.evaluation.report import accumulate_scores

MIN_SUPPORT = 20  # val predictions of a class below which it takes the pooled threshold (5 overfitted on MCT: see README)
LOG_T_BOUNDS = (-3.0, 3.0)  # T between e^-3 and e^3
EPSILON = 1e-12


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row by row."""
    logits = np.log(np.clip(probabilities, EPSILON, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy of the true classes."""
    return float(-np.log(np.clip(probabilities[np.arange(len(targets)), targets], EPSILON, None)).mean())


def fit_temperature(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """The temperature that minimises the NLL of ``targets`` (bounded search over log T)."""
    if len(targets) == 0:
        raise DataError("calibration: no labelled predictions to fit a temperature on")
    result = minimize_scalar(lambda log_t: negative_log_likelihood(apply_temperature(probabilities, float(np.exp(log_t))), targets),
                             bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def calibration_figures(probabilities: np.ndarray, targets: np.ndarray, label_names: Sequence[str]) -> dict[str, float]:
    """NLL and ECE (the training metrics' 15-bin definition) of one probability matrix."""
    result = accumulate_scores(probabilities, targets, len(label_names)).compute(list(label_names))
    return {"nll": float(result["loss"]), "ece": float(result["ece"])}


def lowest_threshold(confidence: np.ndarray, correct: np.ndarray, target_precision: float) -> float:
    """The lowest confidence cut whose answers (confidence >= cut) reach ``target_precision``; inf when none does."""
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order])
    precision = hits / np.arange(1, len(order) + 1)
    # a cut can only fall between distinct confidences: the last index of each run of ties
    sorted_conf = confidence[order]
    ends = np.r_[sorted_conf[1:] != sorted_conf[:-1], True]
    good = np.flatnonzero(ends & (precision >= target_precision))
    return float(sorted_conf[good[-1]]) if len(good) else float("inf")


def fit_thresholds(probabilities: np.ndarray, targets: np.ndarray, target_precision: float) -> tuple[np.ndarray, float]:
    """Per-class thresholds (and the pooled one) for ``target_precision`` on val; see the module docstring."""
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    correct = predicted == targets
    pooled = lowest_threshold(confidence, correct, target_precision)
    thresholds = np.full(probabilities.shape[1], pooled)
    for c in range(probabilities.shape[1]):
        mine = predicted == c
        if mine.sum() >= MIN_SUPPORT:
            thresholds[c] = lowest_threshold(confidence[mine], correct[mine], target_precision)
    return thresholds, pooled


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, accuracy of the answered) with answers taken most confident first."""
    if len(confidence) == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-confidence, kind="stable")
    answered = np.arange(1, len(order) + 1)
    return answered / len(order), np.cumsum(correct[order]) / answered


def plot_risk_coverage(curves: dict[str, tuple[np.ndarray, np.ndarray]], points: dict[str, tuple[float, float]]) -> Figure:
    """Accuracy of what is answered against the fraction answered, one line per stage, operating points marked."""
    figure = Figure(figsize=(6, 4.5))
    axes = figure.subplots()
    for name, (coverage, accuracy) in curves.items():
        axes.plot(coverage, accuracy, label=name)
    for name, (share, correct) in points.items():
        axes.scatter([share], [correct], zorder=3, label=f"{name} (coverage {share:.2f}, accuracy {correct:.2f})")
    axes.set_xlabel("coverage (fraction answered)")
    axes.set_ylabel("accuracy of the answered")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    axes.set_title("Risk-coverage")
    figure.tight_layout()
    return figure
