"""Location-disjoint train/val/test splits: the GUIDE §3 score, vectorised, and its searches.

Every ``(dataset, location)`` goes to exactly one split, so a classifier is never tested on
backgrounds it was trained on. Candidates are scored as whole matrices: the crops of label
``y`` in split ``s`` for ``B`` candidates are one sparse ``(Y, M) @ (M, B)`` product (float32,
the count matrix holding a few species per location), so 10,000 candidates over 10,000
locations take seconds where the references' per-candidate pandas loops take hours. The
local improvement scores every single move from per-split count deltas, in O(non-zero
counts) for all locations at once, and applies the label-disjoint improving ones together.

Conventions (documented once here, relied on everywhere):

- Splits are numbered ``0 = train, 1 = val, 2 = test`` (:data:`SPLIT_NAMES`).
- ``fixed`` is an ``(M,)`` int8 array: ``-1`` marks a free location, ``0..2`` pins a
  location to that split. A split that holds a pinned location is *closed*: free locations
  never go to it. This is ``--match-test``: the old test locations are pinned to test and no
  other location may join them, so free locations are shared between train and val only, by
  the targets renormalised over the open splits (``f_train / (f_train + f_val)``, ...).
  A split whose target fraction is 0 is closed too.
- Empty splits: the held-out term ``Σ_y (N_sy/N_s − p_y)²`` is undefined when ``N_s = 0``
  (the references divide by zero). An empty held-out split scores the largest value the
  term can take for any non-empty split, ``1 + Σ_y p_y² − 2·min_y p_y``, so emptiness is
  never preferred. A held-out split with target 0 is meant to be empty: its term is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from classification.errors import DataError, UserError
from classification.io import JSON_KINDS, read_json_object, shown_json, shown_value

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2
FREE = -1
JITTER = 0.03  # candidate sizes vary by U(-JITTER, JITTER) around the target, as the references do
FRACTION_TOLERANCE = 0.05  # a split whose crop fraction is further than this from its target is reported
IMPROVEMENT_TOLERANCE = 1e-12  # a move must lower the score by more than this (no float-noise cycling)
_CHUNK_ELEMENTS = 1 << 22  # candidates x locations scored at once: bounds memory to a few tens of MB
_FLOAT32_EXACT = 1 << 24  # integers below this are exact in float32: label totals under it are summed in float32
_SWAP_CANDIDATES = 512  # per side of a split pair, the best movers whose swaps the local improvement scores
_SWAP_ALL_PAIRS = 1 << 18  # ... unless the two sides make at most this many pairs: then all of them


@dataclass(frozen=True, eq=False)
class SplitProblem:
    """Crops per (location, label): everything the split search needs, and nothing else."""

    locations: list[tuple[str, str]]  # (dataset, location) keys, sorted; always strings
    labels: list[str]  # sorted
    counts: np.ndarray  # int64 (M, Y): crops of label y at location k

    def __post_init__(self) -> None:
        counts = np.array(self.counts, copy=True)
        if counts.shape != (len(self.locations), len(self.labels)):
            raise ValueError(f"counts has shape {counts.shape}, expected {(len(self.locations), len(self.labels))}")
        if counts.size and not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"counts must be integers, got {counts.dtype}")
        counts = counts.astype(np.int64)
        if (counts < 0).any():
            raise ValueError("counts must not be negative")
        if list(self.locations) != sorted(set(self.locations)):
            raise ValueError("locations must be sorted and unique")
        if list(self.labels) != sorted(set(self.labels)):
            raise ValueError("labels must be sorted and unique")
        if counts.size and (counts.sum(axis=0) == 0).any():
            raise ValueError(f"label {shown_value(repr(self.labels[int(np.argmin(counts.sum(axis=0)))]))} has no crops")
        counts.setflags(write=False)
        object.__setattr__(self, "counts", counts)

    @property
    def n_locations(self) -> int:
        """Number of (dataset, location) keys, ``M``."""
        return len(self.locations)

    @property
    def n_labels(self) -> int:
        """Number of labels, ``Y``."""
        return len(self.labels)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> SplitProblem:
        """Count crops per (dataset, location) and label; one row of ``frame`` is one crop.

        A null or empty dataset, location or label raises ``DataError``: the references drop
        such rows silently, here the caller resolves missing locations first (issue 2 §1).
        """
        missing = [column for column in ("dataset", "location", "label") if column not in frame.columns]
        if missing:
            raise DataError(f"the crop table has no column {', '.join(missing)} (needs dataset, location, label)")
        if len(frame) == 0:
            raise DataError("the crop table is empty: no crops to split")
        dataset_codes, dataset_names = _text_codes(frame, "dataset")
        location_codes, location_names = _text_codes(frame, "location")
        columns, label_names = _text_codes(frame, "label")
        # Codes are ranks in sorted order, so sorted pair codes are the (dataset, location) keys in sorted order.
        pairs, rows = np.unique(dataset_codes * len(location_names) + location_codes, return_inverse=True)
        location_keys = [(dataset_names[p // len(location_names)], location_names[p % len(location_names)]) for p in pairs]
        flat = np.bincount(rows * len(label_names) + columns, minlength=len(location_keys) * len(label_names))
        return cls(location_keys, label_names, flat.reshape(len(location_keys), len(label_names)))


def _text_codes(frame: pd.DataFrame, column: str) -> tuple[np.ndarray, list[str]]:
    """Each row's code into the column's sorted distinct texts; nulls, blanks and non-text values raise ``DataError``.

    Integers become their decimal text; floats are refused, because a location read as a
    float (``1.0``) has already lost its spelling (``"001"``): read CSVs with ``dtype=str``.
    Values are checked once per distinct value, so a million crops cost a hash each.
    """
    series = frame[column]
    null = series.isna().to_numpy()
    if null.any():
        first = frame.index[np.flatnonzero(null)[0]]
        raise DataError(
            f"{int(null.sum())} crop(s) have no {column} (first at row {first!r}); "
            f"resolve missing {column}s before building splits"
        )
    codes, distinct = pd.factorize(series.to_numpy(dtype=object), sort=False)
    texts = [_as_text(value, column) for value in distinct]
    if any(not text.strip() for text in texts):
        raise DataError(f"a crop has an empty {column}; resolve missing {column}s before building splits")
    names = sorted(set(texts))  # 1 and "1" are one text
    rank = {text: i for i, text in enumerate(names)}
    return np.array([rank[text] for text in texts], dtype=np.int64)[codes], names


def _as_text(value: object, column: str) -> str:
    """A str (subclass) or an integer as text; anything else is a ``DataError``."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(value)
    raise DataError(
        f"{column} {shown_value(repr(value))} is a {type(value).__name__}, expected text "
        "(read CSV files with dtype=str so that '001' stays '001')"
    )


@dataclass(frozen=True, eq=False)
class SplitResult:
    """One assignment of every location to a split, with its score and how it was found."""

    assignment: np.ndarray  # (M,) int8 in {0, 1, 2}
    score: float
    method: str
    candidates: int
    improved_moves: int


def target_fractions(val_frac: float, test_frac: float) -> np.ndarray:
    """The targets ``[1 − v − t, v, t]``; a bad ``--val-frac``/``--test-frac`` is a ``UserError``."""
    for flag, value in (("--val-frac", val_frac), ("--test-frac", test_frac)):
        if not np.isfinite(value) or value < 0 or value >= 1:
            raise UserError(f"{flag} must be at least 0 and below 1, got {value}")
    if val_frac + test_frac >= 1:
        raise UserError(f"--val-frac + --test-frac must be below 1 (train needs a share), got {val_frac} + {test_frac}")
    return np.array([1.0 - val_frac - test_frac, val_frac, test_frac], dtype=np.float64)


def _check_fractions(fractions: Sequence[float] | np.ndarray) -> np.ndarray:
    """Fractions as a float array of three non-negative values summing to 1."""
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or not np.isfinite(f).all() or (f < 0).any() or abs(f.sum() - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    return f


def _check_fixed(problem: SplitProblem, fixed: np.ndarray | None) -> np.ndarray:
    """``fixed`` as an (M,) int8 array in {-1, 0, 1, 2}; ``None`` means every location is free."""
    if fixed is None:
        return np.full(problem.n_locations, FREE, dtype=np.int8)
    array = np.asarray(fixed)
    if array.shape != (problem.n_locations,) or (array.size and (array.min() < FREE or array.max() > TEST)):
        raise ValueError(f"fixed must be an ({problem.n_locations},) array of -1 (free) or a split 0..2")
    return array.astype(np.int8)


def open_splits(fixed: np.ndarray, fractions: Sequence[float] | np.ndarray) -> tuple[int, ...]:
    """Splits that free locations may join: target above 0 and no pinned location (see module doc)."""
    f = _check_fractions(fractions)
    pinned = {int(s) for s in np.unique(np.asarray(fixed)) if s != FREE}
    result = tuple(s for s in (TRAIN, VAL, TEST) if f[s] > 0 and s not in pinned)
    if not result and (np.asarray(fixed) == FREE).any():
        raise UserError("every split is pinned or has a target of 0: the free locations have nowhere to go")
    return result


def pin_test_locations(problem: SplitProblem, test_locations: Iterable[Sequence[str]]) -> np.ndarray:
    """The ``fixed`` array for ``--match-test``: the given locations pinned to test, all others free.

    Test locations that are not in the data are logged and ignored.
    """
    index = {key: i for i, key in enumerate(problem.locations)}
    fixed = np.full(problem.n_locations, FREE, dtype=np.int8)
    absent = []
    for entry in test_locations:
        key = (str(entry[0]), str(entry[1]))
        if key in index:
            fixed[index[key]] = TEST
        else:
            absent.append(key)
    if absent:
        log.warning("%d test location(s) to match are not in the data, e.g. %s", len(absent), absent[:5])
    return fixed


class _ScoreTerms:
    """The per-split terms of the GUIDE §3 score, for any stack of count rows (..., Y)."""

    def __init__(self, problem: SplitProblem, fractions: np.ndarray) -> None:
        counts = problem.counts.astype(np.float64)
        self.fractions = fractions
        self.crops_per_label = counts.sum(axis=0)  # N_y
        self.locations_per_label = (counts > 0).sum(axis=0).astype(np.float64)  # K_y
        self.prior = self.crops_per_label / self.crops_per_label.sum()  # p_y
        self.prior_square = float(np.square(self.prior).sum())  # Σ_y p_y²
        # Largest Σ_y (q_y − p_y)² over distributions q: q all on the rarest label.
        self.empty_penalty = 1.0 + self.prior_square - 2.0 * float(self.prior.min())

    def has_held_out_term(self, split: int) -> bool:
        """Whether ``split`` pays the held-out term (val or test with a target above 0)."""
        return split != TRAIN and self.fractions[split] > 0

    def held_out_term(self, total: np.ndarray, square_sum: np.ndarray, prior_dot: np.ndarray) -> np.ndarray:
        """``2·Σ_y (N_sy/N_s − p_y)²`` from ``N_s``, ``Σ_y N_sy²`` and ``Σ_y N_sy·p_y`` (the expanded square).

        The expansion lets a move be scored from the labels it touches; an empty split scores the penalty.
        """
        safe = np.where(total > 0, total, 1.0)
        value = square_sum / np.square(safe) - 2.0 * prior_dot / safe + self.prior_square
        return 2.0 * np.where(total > 0, np.maximum(value, 0.0), self.empty_penalty)

    def split_term(self, split: int, crops: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Score contribution of split ``split`` holding ``crops`` (N_sy) at ``present`` (K_sy) locations."""
        f = self.fractions[split]
        value = 2.0 * np.square(crops / self.crops_per_label - f).sum(axis=-1)
        value += np.square(present / self.locations_per_label - f).sum(axis=-1)
        if self.has_held_out_term(split):
            total = crops.sum(axis=-1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                held_out = np.square(crops / total - self.prior).sum(axis=-1)
            value += 2.0 * np.where(total[..., 0] > 0, held_out, self.empty_penalty)
        return value


def _chunk_rows(n_locations: int, chunk_size: int | None) -> int:
    """Candidates per block: ``chunk_size`` if given, else enough to fill ~4M cells."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        return chunk_size
    return max(1, _CHUNK_ELEMENTS // max(n_locations, 1))


class _Scorer:
    """Scores blocks of candidate assignments: one sparse product per held-out split, train is the remainder."""

    def __init__(self, problem: SplitProblem, fractions: np.ndarray) -> None:
        self.terms = _ScoreTerms(problem, fractions)
        self.n_labels = problem.n_labels
        self.totals = np.concatenate([self.terms.crops_per_label, self.terms.locations_per_label])
        # Crops and presence as a sparse (2Y, M) matrix; float32 while every label total is exact in it.
        dtype = np.float32 if self.terms.crops_per_label.max(initial=0) < _FLOAT32_EXACT else np.float64
        counts = sparse.csr_matrix(problem.counts.T.astype(dtype))
        present = counts.copy()
        present.data[:] = 1
        self.weights = sparse.vstack([counts, present], format="csr")

    def split_sums(self, block: np.ndarray, split: int) -> np.ndarray:
        """``(B, 2Y)`` crops and present-location counts of ``split`` for each candidate row of ``block``."""
        members = np.ascontiguousarray(block.T == split, dtype=self.weights.dtype)  # (M, B) one-hot, C order
        return np.asarray(self.weights @ members, dtype=np.float64).T

    def score(self, block: np.ndarray) -> np.ndarray:
        """Scores (B,) of the candidate rows of ``block`` (B, M)."""
        held = [self.split_sums(block, split) for split in (VAL, TEST)]
        train = self.totals - held[0] - held[1]  # exact: integer-valued float64
        n, terms = self.n_labels, self.terms
        score = terms.split_term(TRAIN, train[:, :n], train[:, n:])
        for split, sums in zip((VAL, TEST), held):
            score += terms.split_term(split, sums[:, :n], sums[:, n:])
        return score


def score_assignments(
    problem: SplitProblem,
    assignments: np.ndarray,
    fractions: Sequence[float] | np.ndarray,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Scores (B,) of candidate assignments (B, M) by GUIDE §3's formula; lower is better.

    ``S = Σ_s [2·Σ_y (N_sy/N_y − f_s)² + Σ_y (K_sy/K_y − f_s)²] + Σ_{val,test} 2·Σ_y (N_sy/N_s − p_y)²``,
    with N_sy and K_sy for all candidates from one sparse product per held-out split (train is the remainder).
    """
    f = _check_fractions(fractions)
    candidates = np.asarray(assignments)
    if candidates.ndim != 2 or candidates.shape[1] != problem.n_locations:
        raise ValueError(f"assignments must have shape (B, {problem.n_locations}), got {candidates.shape}")
    if candidates.size and (candidates.min() < TRAIN or candidates.max() > TEST):
        raise ValueError("assignments must hold split numbers 0 (train), 1 (val) or 2 (test)")
    scorer = _Scorer(problem, f)
    scores = np.empty(candidates.shape[0], dtype=np.float64)
    step = _chunk_rows(problem.n_locations, chunk_size)
    for start in range(0, candidates.shape[0], step):
        block = candidates[start : start + step]
        scores[start : start + len(block)] = scorer.score(block)
    return scores


def _candidate_sizes(n_free: int, shares: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """Locations per open split for each candidate: ``int(M_free·(share + U))``, the last takes the rest."""
    sizes = np.zeros((jitter.shape[0], len(shares)), dtype=np.int64)
    remaining = np.full(jitter.shape[0], n_free, dtype=np.int64)
    for j in range(len(shares) - 1):
        size = np.clip(np.trunc(n_free * (shares[j] + jitter[:, j])).astype(np.int64), 0, remaining)
        sizes[:, j] = size
        remaining -= size
    sizes[:, -1] = remaining
    return sizes


def _single_result(problem: SplitProblem, assignment: np.ndarray, fractions: np.ndarray, method: str) -> SplitResult:
    """A result for an assignment that is the only possible one (nothing free, or one open split)."""
    score = float(score_assignments(problem, assignment[None, :], fractions)[0])
    return SplitResult(assignment.astype(np.int8), score, method, 1, 0)


def random_search(
    problem: SplitProblem,
    fractions: Sequence[float] | np.ndarray,
    n_candidates: int = 10_000,
    seed: int = 0,
    fixed: np.ndarray | None = None,
    chunk_size: int | None = None,
) -> SplitResult:
    """Best of ``n_candidates`` random location splits (GUIDE §3), seeded: same seed, same split.

    Each candidate shuffles the free locations and cuts them at ``int(M_free·(f_s + U(-.03, .03)))``
    per open split in order (the last open split takes the rest). The result does not depend
    on ``chunk_size``: jitters are drawn first, then the shuffles block by block from one stream.
    """
    f = _check_fractions(fractions)
    if n_candidates < 1:
        raise UserError(f"the number of split candidates must be at least 1, got {n_candidates}")
    pinned = _check_fixed(problem, fixed)
    free = np.flatnonzero(pinned == FREE)
    targets = open_splits(pinned, f) if free.size else ()
    base = pinned.copy()
    if free.size == 0 or len(targets) == 1:
        base[free] = targets[0] if targets else FREE
        return _single_result(problem, base, f, "random")
    rng = np.random.default_rng(seed)
    shares = f[list(targets)] / f[list(targets)].sum()
    sizes = _candidate_sizes(free.size, shares, rng.uniform(-JITTER, JITTER, size=(n_candidates, len(targets) - 1)))
    target_codes = np.asarray(targets, dtype=np.int8)
    ranks = np.arange(free.size)
    best_score, best = np.inf, base
    scorer = _Scorer(problem, f)
    step = _chunk_rows(problem.n_locations, chunk_size)
    for start in range(0, n_candidates, step):
        block_sizes = sizes[start : start + step]
        position = np.zeros((len(block_sizes), free.size), dtype=np.int8)  # index into targets, in rank order
        for bound in np.cumsum(block_sizes[:, :-1], axis=1).T:
            position += ranks[None, :] >= bound[:, None]
        block = np.repeat(base[None, :], len(block_sizes), axis=0)
        block[:, free] = rng.permuted(target_codes[position], axis=1)  # one shuffle per candidate
        scores = scorer.score(block)
        winner = int(np.argmin(scores))
        if scores[winner] < best_score:
            best_score, best = float(scores[winner]), block[winner].copy()
    return SplitResult(best, best_score, "random", n_candidates, 0)


class _Stats:
    """The non-zero counts of a problem, and a split's sums recomputed from them in O(non-zeros)."""

    def __init__(self, problem: SplitProblem, terms: _ScoreTerms) -> None:
        self.n_locations, self.n_labels = problem.n_locations, problem.n_labels
        self.rows, self.labels = np.nonzero(problem.counts)  # one entry per (location, label) with crops
        self.crops = problem.counts[self.rows, self.labels].astype(np.float64)
        self.location_crops = np.bincount(self.rows, self.crops, minlength=self.n_locations)  # n_k
        self.location_prior = np.bincount(self.rows, self.crops * terms.prior[self.labels], minlength=self.n_locations)
        self.entries = np.bincount(self.rows, minlength=self.n_locations)  # labels per location
        self.inverse_crops = 1.0 / terms.crops_per_label[self.labels]  # 1/N_y per entry
        self.crop_shares = self.crops * self.inverse_crops  # c_ky/N_y
        self.inverse_locations = 1.0 / terms.locations_per_label[self.labels]  # 1/K_y per entry
        self.terms = terms

    def sums(self, assignment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(3, Y)`` crops and present-location counts per split."""
        flat = assignment[self.rows].astype(np.int64) * self.n_labels + self.labels
        size = 3 * self.n_labels
        crops = np.bincount(flat, self.crops, minlength=size).reshape(3, self.n_labels)
        present = np.bincount(flat, minlength=size).astype(np.float64).reshape(3, self.n_labels)
        return crops, present

    def score(self, crops: np.ndarray, present: np.ndarray) -> float:
        """The score of one assignment from its per-split sums."""
        return float(sum(self.terms.split_term(s, crops[s], present[s]) for s in range(3)))


class _MoveScorer:
    """Score changes of moving each location to another split, from per-split count deltas.

    A move touches only the labels its location holds: the first two terms change on those
    labels alone, and the held-out term is kept as ``N_s``, ``Σ_y N_sy²`` and ``Σ_y N_sy·p_y``
    (see ``_ScoreTerms.held_out_term``), so all moves are scored in O(non-zero counts).
    """

    def __init__(self, stats: _Stats, assignment: np.ndarray) -> None:
        self.stats, self.terms = stats, stats.terms
        self.crops, self.present = stats.sums(assignment)
        self.totals = self.crops.sum(axis=1)
        self.square_sums = np.square(self.crops).sum(axis=1)
        self.prior_dots = self.crops @ self.terms.prior
        held_out = np.array([self.terms.has_held_out_term(s) for s in range(3)])
        self.held_out = held_out
        self.held_out_values = np.where(held_out, self.terms.held_out_term(self.totals, self.square_sums, self.prior_dots), 0.0)
        self.source = assignment.astype(np.int64)
        label_out, self.square_out = self._label_change(self.source[stats.rows], -1.0)
        self.leave = label_out + self._held_out_change(self.source, -1.0, self.square_out)  # (M,) change of leaving
        self.square_in: dict[int, np.ndarray] = {}  # per target: change of Σ_y N_ty² when each location joins it

    def _label_change(self, split: np.ndarray | int, sign: float) -> tuple[np.ndarray, np.ndarray]:
        """Per location: change of the label terms of ``split`` (one split, or one per entry) and of ``Σ_y N_sy²``,
        adding sign·row; ``(x + d)² − x² = d·(2x + d)`` with ``x = N_sy/N_y − f`` and ``d = ±c/N_y`` (likewise K)."""
        stats = self.stats
        f = self.terms.fractions[split]
        if np.ndim(split):
            index = split * stats.n_labels + stats.labels
            crops, present = self.crops.ravel()[index], self.present.ravel()[index]
        else:
            crops, present = self.crops[split][stats.labels], self.present[split][stats.labels]
        shares, inverse = stats.crop_shares, stats.inverse_locations
        change = 2.0 * shares * (2.0 * sign * (crops * stats.inverse_crops - f) + shares)
        change += inverse * (2.0 * sign * (present * inverse - f) + inverse)
        square = stats.crops * (stats.crops + sign * 2.0 * crops)
        size = stats.n_locations
        return np.bincount(stats.rows, change, minlength=size), np.bincount(stats.rows, square, minlength=size)

    def _held_out_change(self, split: np.ndarray, sign: float, square_change: np.ndarray) -> np.ndarray:
        """Per location: change of the held-out term of ``split`` (an (M,) array of splits) adding sign·row."""
        stats = self.stats
        new = self.terms.held_out_term(
            self.totals[split] + sign * stats.location_crops,
            self.square_sums[split] + square_change,
            self.prior_dots[split] + sign * stats.location_prior,
        )
        return np.where(self.held_out[split], new - self.held_out_values[split], 0.0)

    def move_deltas(self, target: int) -> np.ndarray:
        """(M,) score change of moving each location to ``target``; +inf for locations already there."""
        label_in, square_in = self._label_change(target, 1.0)
        self.square_in[target] = square_in
        delta = self.leave + label_in + self._held_out_change(np.full_like(self.source, target), 1.0, square_in)
        delta[self.source == target] = np.inf
        return delta


def _apply_moves(stats: _Stats, assignment: np.ndarray, score: float, moves: np.ndarray, to: np.ndarray) -> float | None:
    """Apply ``moves`` (locations) to splits ``to`` in place when the exact score drops; the new score or None."""
    before = assignment[moves].copy()
    assignment[moves] = to
    new_score = stats.score(*stats.sums(assignment))
    if new_score < score - IMPROVEMENT_TOLERANCE:
        return new_score
    assignment[moves] = before
    return None


def _move_round(stats: _Stats, assignment: np.ndarray, score: float, free: np.ndarray, targets: tuple[int, ...],
                batch: int) -> tuple[float, int, int]:
    """One round of moves: the ``batch`` best improving moves at once, halved until the exact score drops.

    Moves that share labels interact, so a batch is checked against the exact score; a single
    move's delta is exact, so the round always moves when any move improves. Returns the new
    score, the moves made and the next round's batch (twice this one's).
    """
    scorer = _MoveScorer(stats, assignment)
    deltas = np.stack([scorer.move_deltas(t) for t in targets])
    choice = np.argmin(deltas, axis=0)
    best = deltas[choice, np.arange(stats.n_locations)]
    best_target = np.asarray(targets, dtype=np.int8)[choice]
    improving = free[best[free] < -IMPROVEMENT_TOLERANCE]
    ordered = improving[np.lexsort((improving, best[improving]))]
    size = min(batch, ordered.size)
    while size >= 1:
        new_score = _apply_moves(stats, assignment, score, ordered[:size], best_target[ordered[:size]])
        if new_score is not None:
            return new_score, size, 2 * size
        size //= 2
    return score, 0, batch


def _swap_round(problem: SplitProblem, stats: _Stats, assignment: np.ndarray, score: float, free: np.ndarray,
                targets: tuple[int, ...]) -> tuple[float, int]:
    """The best improving swaps of free locations between open splits, among each side's best movers.

    Swaps that share no location are applied together, halved until the exact score drops
    (a single swap's change is exact). Returns the new score and the swaps made.
    """
    scorer = _MoveScorer(stats, assignment)
    deltas = {t: scorer.move_deltas(t) for t in targets}
    found: list[tuple[float, int, int]] = []
    for i, first in enumerate(targets):
        for second in targets[i + 1 :]:
            left, right = free[assignment[free] == first], free[assignment[free] == second]
            if left.size * right.size > _SWAP_ALL_PAIRS:  # else every pair: small problems get the full scan
                left, right = _best_movers(left, deltas[second]), _best_movers(right, deltas[first])
            if left.size and right.size:
                change = _swap_changes(problem, scorer, (first, left, deltas[second]), (second, right, deltas[first]))
                found += _disjoint_swaps(change, left, right)
    found.sort()
    size = len(found)
    while size >= 1:
        pairs = np.array([(k, j) for _, k, j in found[:size]], dtype=np.int64).reshape(-1)
        new_score = _apply_moves(stats, assignment, score, pairs, assignment[pairs.reshape(-1, 2)[:, ::-1].reshape(-1)])
        if new_score is not None:
            return new_score, size
        size //= 2
    return score, 0


def _disjoint_swaps(change: np.ndarray, left: np.ndarray, right: np.ndarray) -> list[tuple[float, int, int]]:
    """Improving swaps (change, left location, right location), best first, no location in two of them."""
    flat = np.flatnonzero(change.reshape(-1) < -IMPROVEMENT_TOLERANCE)
    flat = flat[np.argsort(change.reshape(-1)[flat], kind="stable")][: _SWAP_CANDIDATES]
    used_left, used_right, swaps = set(), set(), []
    for k, j in zip(*np.unravel_index(flat, change.shape)):
        if k not in used_left and j not in used_right:
            used_left.add(k)
            used_right.add(j)
            swaps.append((float(change[k, j]), int(left[k]), int(right[j])))
    return swaps


def _best_movers(locations: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """The ``_SWAP_CANDIDATES`` locations with the lowest move deltas (ties by index)."""
    if locations.size <= _SWAP_CANDIDATES:
        return locations
    return locations[np.lexsort((locations, deltas[locations]))[:_SWAP_CANDIDATES]]


def _swap_changes(problem: SplitProblem, scorer: _MoveScorer, left_side: tuple[int, np.ndarray, np.ndarray],
                  right_side: tuple[int, np.ndarray, np.ndarray]) -> np.ndarray:
    """Exact score changes (L, R) of swapping each ``left`` location (in split ``first``) with each ``right`` one.

    A swap is the two single moves plus their interaction, which is bilinear in the two count
    rows: the label terms are quadratic (second differences ``−8·Σ c_k c_j / N_y²`` and
    ``−4·Σ [k∋y][j∋y] / K_y²``), and the held-out term is recomputed from ``N_s``, ``Σ N_sy²``
    (cross term ``−2·Σ c_k c_j``) and ``Σ N_sy·p_y``.
    """
    (first, left, left_deltas), (second, right, right_deltas) = left_side, right_side
    terms, stats = scorer.terms, scorer.stats
    rows, cols = problem.counts[left].astype(np.float64), problem.counts[right].astype(np.float64)
    shared = rows @ cols.T  # Σ_y c_ky·c_jy
    change = left_deltas[left][:, None] + right_deltas[right][None, :]
    change -= 8.0 * (rows / np.square(terms.crops_per_label)) @ cols.T
    change -= 4.0 * ((rows > 0) / np.square(terms.locations_per_label)) @ (cols > 0).T
    n, b = stats.location_crops, stats.location_prior
    if scorer.held_out[first]:  # left leaves ``first``, right joins it
        change += _held_out_interaction(scorer, first, (-n[left], scorer.square_out[left], -b[left]),
                                        (n[right], scorer.square_in[first][right], b[right]), shared)
    if scorer.held_out[second]:  # left joins ``second``, right leaves it
        change += _held_out_interaction(scorer, second, (n[left], scorer.square_in[second][left], b[left]),
                                        (-n[right], scorer.square_out[right], -b[right]), shared)
    return change


def _held_out_interaction(scorer: _MoveScorer, split: int, rows: tuple[np.ndarray, ...], cols: tuple[np.ndarray, ...],
                          shared: np.ndarray) -> np.ndarray:
    """(L, R): held-out term of ``split`` after both changes, less each change alone (``(N, Σ N², Σ N·p)`` deltas)."""
    term = scorer.terms.held_out_term
    base = scorer.totals[split], scorer.square_sums[split], scorer.prior_dots[split]
    both = term(base[0] + rows[0][:, None] + cols[0][None, :], base[1] + rows[1][:, None] + cols[1][None, :] - 2.0 * shared,
                base[2] + rows[2][:, None] + cols[2][None, :])
    row_alone = term(base[0] + rows[0], base[1] + rows[1], base[2] + rows[2])[:, None]
    col_alone = term(base[0] + cols[0], base[1] + cols[1], base[2] + cols[2])[None, :]
    return both - row_alone - col_alone + term(*(np.asarray(v, dtype=np.float64) for v in base))


def improve_locally(
    problem: SplitProblem,
    result: SplitResult,
    fractions: Sequence[float] | np.ndarray,
    fixed: np.ndarray | None = None,
    max_rounds: int = 5_000,
) -> SplitResult:
    """Hill-climb from ``result``: move free locations, and swap pairs, while the score drops.

    Each round scores every single move from per-split count deltas and applies the best
    improving ones together (as many as the exact score agrees with, down to the single
    best); when no move helps, the best location-disjoint swaps between each open split
    pair (every pair of its locations, or of each side's ``_SWAP_CANDIDATES`` best movers on
    large problems), checked the same way. Deterministic; pinned
    locations never move; the returned score is never above the input's.
    """
    f = _check_fractions(fractions)
    pinned = _check_fixed(problem, fixed)
    assignment = np.asarray(result.assignment).astype(np.int8).copy()
    if assignment.shape != (problem.n_locations,):
        raise ValueError(f"result.assignment must have shape ({problem.n_locations},)")
    if (pinned != FREE).any() and (assignment[pinned != FREE] != pinned[pinned != FREE]).any():
        raise ValueError("result.assignment moves a pinned location")
    free = np.flatnonzero(pinned == FREE)
    if free.size == 0:
        return result
    targets = open_splits(pinned, f)
    stats = _Stats(problem, _ScoreTerms(problem, f))
    score = stats.score(*stats.sums(assignment))
    moves, batch = 0, free.size
    for _ in range(max_rounds):
        score, moved, batch = _move_round(stats, assignment, score, free, targets, batch)
        if not moved:
            score, moved = _swap_round(problem, stats, assignment, score, free, targets)
        if not moved:
            break
        moves += moved
    return _improved_result(problem, result, assignment, f, moves)


def _improved_result(problem: SplitProblem, result: SplitResult, assignment: np.ndarray, fractions: np.ndarray,
                     moves: int) -> SplitResult:
    """The improved result, or ``result`` itself when nothing moved or float noise made it no better."""
    if moves == 0:
        return result
    original = float(score_assignments(problem, np.asarray(result.assignment)[None, :], fractions)[0])
    score = float(score_assignments(problem, assignment[None, :], fractions)[0])
    if score > original:
        return result
    return SplitResult(assignment, score, f"{result.method}+local", result.candidates, result.improved_moves + moves)


def smallest_first(
    problem: SplitProblem,
    fractions: Sequence[float] | np.ndarray,
    fixed: np.ndarray | None = None,
) -> SplitResult:
    """MegaDetector's greedy split, fixed: rarest labels first, their biggest locations to test, then val.

    For each label in increasing crop count, its unassigned locations (most crops of that
    label first, ties by key) go to test, then val, while that split holds less than its
    target fraction of the label; the rest go to train. Closed splits are skipped.
    """
    f = _check_fractions(fractions)
    pinned = _check_fixed(problem, fixed)
    assignment = pinned.copy()
    free = pinned == FREE
    if not free.any():
        return _single_result(problem, assignment, f, "smallest_first")
    targets = open_splits(pinned, f)
    fill_order = [s for s in (TEST, VAL, TRAIN) if s in targets]
    held_out, last = fill_order[:-1], fill_order[-1]
    counts = problem.counts
    label_totals = counts.sum(axis=0)
    split_totals = np.stack([counts[assignment == s].sum(axis=0) for s in range(3)])
    for label in np.argsort(label_totals, kind="stable"):
        candidates = np.flatnonzero((counts[:, label] > 0) & (assignment == FREE))
        for location in candidates[np.lexsort((candidates, -counts[candidates, label]))]:
            split = next((s for s in held_out if split_totals[s, label] < f[s] * label_totals[label]), last)
            assignment[location] = split
            split_totals[split] += counts[location]
    assignment[assignment == FREE] = last  # locations without crops
    return _single_result(problem, assignment, f, "smallest_first")


def splits_to_json(problem: SplitProblem, assignment: np.ndarray) -> dict[str, list[list[str]]]:
    """``{"train": [[dataset, location], ...], "val": [...], "test": [...]}``, each list sorted."""
    assignment = np.asarray(assignment)
    return {
        name: [[dataset, location] for (dataset, location), s in zip(problem.locations, assignment) if s == split]
        for split, name in enumerate(SPLIT_NAMES)
    }


def location_entry(entry: object, where: str, numbers: bool = False) -> tuple[str, str]:
    """One ``[dataset, location]`` entry of a splits file, checked. ``numbers``: a whole number is read as its text
    (MegaDetector's CCT files may hold number locations, and its splits.json then lists them as numbers)."""
    allowed = (str, int) if numbers else (str,)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not all(
            isinstance(v, allowed) and not isinstance(v, bool) for v in entry):
        raise DataError(f"{where}: expected a [dataset, location] pair of strings, got {shown_json(entry)}")
    return str(entry[0]), str(entry[1])


def read_splits(path: Path) -> dict[str, list[tuple[str, str]]]:
    """``splits.json`` (``{"train": [[dataset, location], ...], "val": [...], ...}``) with every entry checked: a split
    that is not a list, or an entry that is not a pair (``"ab"`` would unpack as ``("a", "b")``), is one line naming
    the file, the split and the entry, as is a location in two splits. Split names are not checked here: a config may
    name its own. Number locations of older files are read as their text, as this reader always did."""
    splits = read_json_object(path)
    checked = {}
    split_of: dict[tuple[str, str], str] = {}
    for name, entries in splits.items():
        if not isinstance(entries, list):
            kind = JSON_KINDS.get(type(entries), type(entries).__name__)
            raise DataError(f"{path}: {name}: expected a list of [dataset, location] pairs, found {kind}")
        checked[name] = [location_entry(entry, f"{path}: {name}[{i}]", numbers=True) for i, entry in enumerate(entries)]
        for key in checked[name]:
            if split_of.setdefault(key, name) != name:
                raise DataError(f"{path}: location {shown_json(list(key))} is in both {split_of[key]} and {name}: a camera location "
                                "must be in one split only, or its images leak from training into evaluation")
    return checked


def assignment_from_splits(problem: SplitProblem, splits: Mapping[str, object], source: str) -> np.ndarray:
    """Check a user's ``splits.json`` (``--splits-file``) against the data and return its (M,) assignment.

    Every location of the data must be in exactly one split; locations of the file that are
    not in the data are allowed (the data may have been filtered) and logged as a warning.
    """
    if not isinstance(splits, Mapping):
        raise DataError(f"{source}: expected an object with keys train, val, test")
    unknown = sorted(set(splits) - set(SPLIT_NAMES))
    absent_keys = [name for name in SPLIT_NAMES if name not in splits]
    if unknown or absent_keys:
        problems = [f"unknown split(s) {unknown}"] * bool(unknown) + [f"missing split(s) {absent_keys}"] * bool(absent_keys)
        raise DataError(f"{source}: {'; '.join(problems)} (keys must be train, val, test)")
    index = {key: i for i, key in enumerate(problem.locations)}
    assignment = np.full(problem.n_locations, FREE, dtype=np.int8)
    seen: dict[tuple[str, str], str] = {}
    extra: list[tuple[str, str]] = []
    for split, name in enumerate(SPLIT_NAMES):
        entries = splits[name]
        if not isinstance(entries, list):
            raise DataError(f"{source}: {name}: expected a list of [dataset, location] pairs")
        for i, entry in enumerate(entries):
            key = location_entry(entry, f"{source}: {name}[{i}]")
            if key in seen and seen[key] != name:
                raise DataError(f"{source}: location {shown_value(repr(list(key)))} is in both {seen[key]} and {name}")
            seen[key] = name
            if key in index:
                assignment[index[key]] = split
            elif key not in extra:
                extra.append(key)
    uncovered = [problem.locations[i] for i in np.flatnonzero(assignment == FREE)]
    if uncovered:
        shown = ", ".join(str(list(key)) for key in uncovered[:5])
        more = f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else ""
        raise DataError(f"{source}: {len(uncovered)} location(s) of the data are in no split: {shown_value(shown, 400)}{more}")
    if extra:
        log.warning("%s: %d location(s) are not in the data and are ignored, e.g. %s", source, len(extra),
                    shown_value(repr(extra[:5]), 400))
    return assignment


def _fraction(part: float, whole: float) -> float:
    """``part / whole``, 0 for an empty whole."""
    return float(part) / float(whole) if whole else 0.0


def _split_sizes(in_split: list[np.ndarray], split_crops: np.ndarray, f: np.ndarray) -> tuple[dict, list[str]]:
    """The report's ``splits`` rows (locations, crops, fraction against target) and their warnings."""
    total = split_crops.sum()
    rows, warnings = {}, []
    for s, name in enumerate(SPLIT_NAMES):
        fraction = _fraction(split_crops[s].sum(), total)
        rows[name] = {
            "n_locations": int(in_split[s].sum()),
            "n_crops": int(split_crops[s].sum()),
            "fraction": round(fraction, 4),
            "target": round(float(f[s]), 4),
        }
        if f[s] > 0 and not in_split[s].any():
            warnings.append(f"{name} is empty (target {f[s]:.2f})")
        elif abs(fraction - f[s]) > FRACTION_TOLERANCE:
            warnings.append(f"{name} holds {fraction:.1%} of the crops, target {f[s]:.0%}")
    return rows, warnings


def _class_rows(problem: SplitProblem, split_crops: np.ndarray, split_locations: np.ndarray,
                f: np.ndarray) -> tuple[dict, list[str]]:
    """The report's ``classes`` rows (crops and locations per split) and a warning per class absent from a split."""
    label_totals = problem.counts.sum(axis=0)
    label_locations = (problem.counts > 0).sum(axis=0)
    rows, warnings = {}, []
    for y, label in enumerate(problem.labels):
        rows[label] = {
            "n_crops": int(label_totals[y]),
            "n_locations": int(label_locations[y]),
            **{
                name: {
                    "n_crops": int(split_crops[s, y]),
                    "n_locations": int(split_locations[s, y]),
                    "fraction": round(_fraction(split_crops[s, y], label_totals[y]), 4),
                }
                for s, name in enumerate(SPLIT_NAMES)
            },
        }
        absent = [name for s, name in enumerate(SPLIT_NAMES) if f[s] > 0 and split_crops[s, y] == 0]
        if absent:
            warnings.append(f"class {shown_value(repr(label))} is absent from {' and '.join(absent)}")
    return rows, warnings


def build_split_report(
    problem: SplitProblem,
    assignment: np.ndarray,
    fractions: Sequence[float] | np.ndarray,
    dropped_labels: dict[str, int] | None = None,
) -> dict:
    """A JSON-able ``split_report.json``: sizes and class fractions per split against targets, score, warnings.

    ``dropped_labels`` maps each label removed by ``--min-locs`` to the number of locations it was seen at.
    """
    f = _check_fractions(fractions)
    assignment = np.asarray(assignment)
    in_split = [assignment == s for s in range(3)]
    split_crops = np.stack([problem.counts[mask].sum(axis=0) for mask in in_split])
    split_locations = np.stack([(problem.counts[mask] > 0).sum(axis=0) for mask in in_split])
    splits, split_warnings = _split_sizes(in_split, split_crops, f)
    classes, class_warnings = _class_rows(problem, split_crops, split_locations, f)
    dropped = dict(sorted((dropped_labels or {}).items()))
    dropped_warnings = [f"class {shown_value(repr(label))} dropped: seen at {n} location(s), below --min-locs" for label, n in dropped.items()]
    score = float(score_assignments(problem, assignment[None, :], f)[0])
    return {
        "score": round(score, 6),
        "targets": {name: round(float(f[s]), 4) for s, name in enumerate(SPLIT_NAMES)},
        "splits": splits,
        "classes": classes,
        "dropped_labels": dropped,
        "warnings": split_warnings + class_warnings + dropped_warnings,
    }


def format_split_report(report: dict) -> str:
    """The report as an aligned text table for the terminal: splits, then classes, then warnings."""
    names = list(SPLIT_NAMES)
    lines = [f"{'split':<8}{'locations':>10}{'crops':>10}{'fraction':>10}{'target':>8}"]
    for name in names:
        row = report["splits"][name]
        lines.append(f"{name:<8}{row['n_locations']:>10}{row['n_crops']:>10}{row['fraction']:>10.3f}{row['target']:>8.2f}")
    width = max([5, *(len(label) for label in report["classes"])])
    header = f"{'class':<{width}}{'crops':>8}{'locs':>6}" + "".join(f"{name:>15}" for name in names)
    lines += ["", header]
    for label, row in report["classes"].items():
        cells = "".join(f"{row[name]['n_crops']:>8} {row[name]['fraction']:>5.2f} " for name in names)
        lines.append(f"{label:<{width}}{row['n_crops']:>8}{row['n_locations']:>6}{cells}".rstrip())
    targets = " / ".join(f"{report['targets'][name]:.2f}" for name in names)
    lines += ["", f"score {report['score']:.4f} (lower is better; targets train/val/test {targets})"]
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    return "\n".join(lines)
