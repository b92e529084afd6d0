"""Uncertainty scores from predicted class probabilities, each normalised to [0, 1] as Lightly defines them.

For an item with sorted probabilities ``p1 >= p2 >= ...`` over ``C`` classes:

- least confidence ``(1 - p1) * C / (C - 1)``
- margin ``1 - (p1 - p2)``
- entropy ``-sum(p * log2 p) / log2 C`` (with ``0 * log 0 = 0``)

1 is the most uncertain (a uniform prediction), 0 a certain one. Floating-point noise
can push a value a hair outside [0, 1], so results are clipped.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from classification.errors import DataError, UserError, did_you_mean

SUM_TOLERANCE = 1e-3  # rows may be float32 softmax output or rounded JSON values


def validate_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Return ``probabilities`` as float64 ``(n, C)``; a malformed array raises a one-line ``DataError``."""
    p = np.asarray(probabilities)
    if p.ndim != 2:
        raise DataError(f"probabilities: expected a 2-D array (items, classes), got shape {p.shape}")
    if p.shape[1] < 2:
        raise DataError(f"probabilities: need at least 2 classes, got {p.shape[1]}")
    if not np.issubdtype(p.dtype, np.number) or np.issubdtype(p.dtype, np.complexfloating):
        raise DataError(f"probabilities: expected real numbers, got dtype {p.dtype}")
    p = p.astype(np.float64, copy=False)
    bad = ~np.isfinite(p)
    if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        raise DataError(f"probabilities: {int(bad.sum())} NaN or infinite values (first in row {row})")
    if (p < 0).any():
        row = int(np.argwhere(p < 0)[0, 0])
        raise DataError(f"probabilities: negative values (first in row {row})")
    sums = p.sum(axis=1)
    off = np.abs(sums - 1.0) > SUM_TOLERANCE
    if off.any():
        row = int(np.argmax(off))
        raise DataError(
            f"probabilities: {int(off.sum())} rows do not sum to 1 (±{SUM_TOLERANCE:g}); row {row} sums to {sums[row]:.6g}"
        )
    return p


def _top_two(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest and second-largest probability of each row."""
    top = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return top[:, 1], top[:, 0]


def least_confidence(probabilities: np.ndarray) -> np.ndarray:
    """``(1 - p1) * C / (C - 1)``: how far the top class is from certainty."""
    p = validate_probabilities(probabilities)
    n_classes = p.shape[1]
    p1, _ = _top_two(p)
    return np.clip((1.0 - p1) * n_classes / (n_classes - 1), 0.0, 1.0)


def margin(probabilities: np.ndarray) -> np.ndarray:
    """``1 - (p1 - p2)``: high when the two best classes are close."""
    p = validate_probabilities(probabilities)
    p1, p2 = _top_two(p)
    return np.clip(1.0 - (p1 - p2), 0.0, 1.0)


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits divided by ``log2 C`` (``0 * log 0 = 0``)."""
    p = validate_probabilities(probabilities)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p), 0.0)
    return np.clip(-terms.sum(axis=1) / np.log2(p.shape[1]), 0.0, 1.0)


SCORE_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "least_confidence": least_confidence,
    "margin": margin,
    "entropy": entropy,
}


def check_score_name(name: str) -> str:
    """Return ``name`` if it is a known score; otherwise a one-line ``UserError`` with a suggestion."""
    if name in SCORE_FUNCTIONS:
        return name
    raise UserError(f"unknown uncertainty score {name!r} (known: {', '.join(SCORE_FUNCTIONS)})"
                    + did_you_mean(str(name), SCORE_FUNCTIONS, quote=True))


def uncertainty_scores(probabilities: np.ndarray, name: str) -> np.ndarray:
    """Score every row of ``probabilities`` (n, C) with the named score: float64 (n,), 1 = most uncertain."""
    return SCORE_FUNCTIONS[check_score_name(name)](probabilities)
