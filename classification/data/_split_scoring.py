"""The split score's machinery: its terms, candidate blocks scored at once, and single moves and swaps.

Internal to ``split_search`` (the searches) and ``split_report`` (one assignment's score); the
score itself is GUIDE §3's, documented in ``split_search.score_assignments``. Candidates are
scored as whole matrices: the crops of label ``y`` in split ``s`` for ``B`` candidates are one
sparse ``(Y, M) @ (M, B)`` product (``CandidateScorer``; float32 while the count matrix's label
totals are exact in it). The local improvement scores every single move from per-split count
deltas (``MoveScorer``), in O(non-zero counts) for all locations at once (``SparseCounts``), and
applies the label-disjoint improving ones together (``move_round``), or swaps pairs when no single
move helps (``swap_round``). Split numbers, pins and open splits follow ``splits``' conventions.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from classification.data.splits import TEST, TRAIN, VAL, SplitProblem

__all__ = [
    "IMPROVEMENT_TOLERANCE",
    "SWAP_CANDIDATES",
    "CandidateScorer",
    "MoveScorer",
    "ScoreTerms",
    "SparseCounts",
    "chunk_rows",
    "move_round",
    "swap_changes",
    "swap_round",
]

IMPROVEMENT_TOLERANCE = 1e-12  # a move must lower the score by more than this (no float-noise cycling)
SWAP_CANDIDATES = 512  # per side of a split pair, the best movers whose swaps the local improvement scores
_SWAP_ALL_PAIRS = 1 << 18  # ... unless the two sides make at most this many pairs: then all of them
_CHUNK_ELEMENTS = 1 << 22  # candidates x locations scored at once: bounds memory to a few tens of MB
_FLOAT32_EXACT = 1 << 24  # integers below this are exact in float32: label totals under it are summed in float32


class ScoreTerms:
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
        target = self.fractions[split]
        value = 2.0 * np.square(crops / self.crops_per_label - target).sum(axis=-1)
        value += np.square(present / self.locations_per_label - target).sum(axis=-1)
        if self.has_held_out_term(split):
            total = crops.sum(axis=-1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                held_out = np.square(crops / total - self.prior).sum(axis=-1)
            value += 2.0 * np.where(total[..., 0] > 0, held_out, self.empty_penalty)
        return value


def chunk_rows(n_locations: int, chunk_size: int | None) -> int:
    """Candidates per block: ``chunk_size`` if given, else enough to fill ~4M cells."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        return chunk_size
    return max(1, _CHUNK_ELEMENTS // max(n_locations, 1))


class CandidateScorer:
    """Scores blocks of candidate assignments: one sparse product per held-out split, train is the remainder."""

    def __init__(self, problem: SplitProblem, fractions: np.ndarray) -> None:
        self.terms = ScoreTerms(problem, fractions)
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


class SparseCounts:
    """The non-zero counts of a problem, and a split's sums recomputed from them in O(non-zeros)."""

    def __init__(self, problem: SplitProblem, terms: ScoreTerms) -> None:
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


class MoveScorer:
    """Score changes of moving each location to another split, from per-split count deltas.

    A move touches only the labels its location holds: the first two terms change on those
    labels alone, and the held-out term is kept as ``N_s``, ``Σ_y N_sy²`` and ``Σ_y N_sy·p_y``
    (see ``ScoreTerms.held_out_term``), so all moves are scored in O(non-zero counts).
    """

    def __init__(self, counts: SparseCounts, assignment: np.ndarray) -> None:
        self.counts, self.terms = counts, counts.terms
        self.crops, self.present = counts.sums(assignment)
        self.totals = self.crops.sum(axis=1)
        self.square_sums = np.square(self.crops).sum(axis=1)
        self.prior_dots = self.crops @ self.terms.prior
        held_out = np.array([self.terms.has_held_out_term(s) for s in range(3)])
        self.held_out = held_out
        self.held_out_values = np.where(held_out, self.terms.held_out_term(self.totals, self.square_sums, self.prior_dots), 0.0)
        self.source = assignment.astype(np.int64)
        label_out, self.square_out = self._label_change(self.source[counts.rows], -1.0)
        self.leave = label_out + self._held_out_change(self.source, -1.0, self.square_out)  # (M,) change of leaving
        self.square_in: dict[int, np.ndarray] = {}  # per target: change of Σ_y N_ty² when each location joins it

    def _label_change(self, split: np.ndarray | int, sign: float) -> tuple[np.ndarray, np.ndarray]:
        """Per location: change of the label terms of ``split`` (one split, or one per entry) and of ``Σ_y N_sy²``,
        adding sign·row; ``(x + d)² − x² = d·(2x + d)`` with ``x = N_sy/N_y − f`` and ``d = ±c/N_y`` (likewise K)."""
        counts = self.counts
        target = self.terms.fractions[split]
        if np.ndim(split):
            index = split * counts.n_labels + counts.labels
            crops, present = self.crops.ravel()[index], self.present.ravel()[index]
        else:
            crops, present = self.crops[split][counts.labels], self.present[split][counts.labels]
        shares, inverse = counts.crop_shares, counts.inverse_locations
        change = 2.0 * shares * (2.0 * sign * (crops * counts.inverse_crops - target) + shares)
        change += inverse * (2.0 * sign * (present * inverse - target) + inverse)
        square = counts.crops * (counts.crops + sign * 2.0 * crops)
        size = counts.n_locations
        return np.bincount(counts.rows, change, minlength=size), np.bincount(counts.rows, square, minlength=size)

    def _held_out_change(self, split: np.ndarray, sign: float, square_change: np.ndarray) -> np.ndarray:
        """Per location: change of the held-out term of ``split`` (an (M,) array of splits) adding sign·row."""
        counts = self.counts
        new = self.terms.held_out_term(
            self.totals[split] + sign * counts.location_crops,
            self.square_sums[split] + square_change,
            self.prior_dots[split] + sign * counts.location_prior,
        )
        return np.where(self.held_out[split], new - self.held_out_values[split], 0.0)

    def move_deltas(self, target: int) -> np.ndarray:
        """(M,) score change of moving each location to ``target``; +inf for locations already there."""
        label_in, square_in = self._label_change(target, 1.0)
        self.square_in[target] = square_in
        delta = self.leave + label_in + self._held_out_change(np.full_like(self.source, target), 1.0, square_in)
        delta[self.source == target] = np.inf
        return delta


def _apply_moves(counts: SparseCounts, assignment: np.ndarray, score: float, moves: np.ndarray, to: np.ndarray) -> float | None:
    """Apply ``moves`` (locations) to splits ``to`` in place when the exact score drops; the new score or None."""
    before = assignment[moves].copy()
    assignment[moves] = to
    new_score = counts.score(*counts.sums(assignment))
    if new_score < score - IMPROVEMENT_TOLERANCE:
        return new_score
    assignment[moves] = before
    return None


def move_round(counts: SparseCounts, assignment: np.ndarray, score: float, unpinned: np.ndarray, joinable: tuple[int, ...],
               batch: int) -> tuple[float, int, int]:
    """One round of moves: the ``batch`` best improving moves at once, halved until the exact score drops.

    Moves that share labels interact, so a batch is checked against the exact score; a single
    move's delta is exact, so the round always moves when any move improves. Returns the new
    score, the moves made and the next round's batch (twice this one's).
    """
    scorer = MoveScorer(counts, assignment)
    deltas = np.stack([scorer.move_deltas(t) for t in joinable])
    choice = np.argmin(deltas, axis=0)
    best = deltas[choice, np.arange(counts.n_locations)]
    best_target = np.asarray(joinable, dtype=np.int8)[choice]
    improving = unpinned[best[unpinned] < -IMPROVEMENT_TOLERANCE]
    ordered = improving[np.lexsort((improving, best[improving]))]
    size = min(batch, ordered.size)
    while size >= 1:
        new_score = _apply_moves(counts, assignment, score, ordered[:size], best_target[ordered[:size]])
        if new_score is not None:
            return new_score, size, 2 * size
        size //= 2
    return score, 0, batch


def swap_round(problem: SplitProblem, counts: SparseCounts, assignment: np.ndarray, score: float, unpinned: np.ndarray,
               joinable: tuple[int, ...]) -> tuple[float, int]:
    """The best improving swaps of unpinned locations between open splits, among each side's best movers.

    Swaps that share no location are applied together, halved until the exact score drops
    (a single swap's change is exact). Returns the new score and the swaps made.
    """
    scorer = MoveScorer(counts, assignment)
    deltas = {t: scorer.move_deltas(t) for t in joinable}
    found: list[tuple[float, int, int]] = []
    for i, first in enumerate(joinable):
        for second in joinable[i + 1 :]:
            left, right = unpinned[assignment[unpinned] == first], unpinned[assignment[unpinned] == second]
            if left.size * right.size > _SWAP_ALL_PAIRS:  # else every pair: small problems get the full scan
                left, right = _best_movers(left, deltas[second]), _best_movers(right, deltas[first])
            if left.size and right.size:
                change = swap_changes(problem, scorer, (first, left, deltas[second]), (second, right, deltas[first]))
                found += _disjoint_swaps(change, left, right)
    found.sort()
    size = len(found)
    while size >= 1:
        pairs = np.array([(k, j) for _, k, j in found[:size]], dtype=np.int64).reshape(-1)
        new_score = _apply_moves(counts, assignment, score, pairs, assignment[pairs.reshape(-1, 2)[:, ::-1].reshape(-1)])
        if new_score is not None:
            return new_score, size
        size //= 2
    return score, 0


def _disjoint_swaps(change: np.ndarray, left: np.ndarray, right: np.ndarray) -> list[tuple[float, int, int]]:
    """Improving swaps (change, left location, right location), best first, no location in two of them."""
    flat = np.flatnonzero(change.reshape(-1) < -IMPROVEMENT_TOLERANCE)
    flat = flat[np.argsort(change.reshape(-1)[flat], kind="stable")][: SWAP_CANDIDATES]
    used_left, used_right, swaps = set(), set(), []
    for k, j in zip(*np.unravel_index(flat, change.shape)):
        if k not in used_left and j not in used_right:
            used_left.add(k)
            used_right.add(j)
            swaps.append((float(change[k, j]), int(left[k]), int(right[j])))
    return swaps


def _best_movers(locations: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """The ``SWAP_CANDIDATES`` locations with the lowest move deltas (ties by index)."""
    if locations.size <= SWAP_CANDIDATES:
        return locations
    return locations[np.lexsort((locations, deltas[locations]))[:SWAP_CANDIDATES]]


def swap_changes(problem: SplitProblem, scorer: MoveScorer, left_side: tuple[int, np.ndarray, np.ndarray],
                 right_side: tuple[int, np.ndarray, np.ndarray]) -> np.ndarray:
    """Exact score changes (L, R) of swapping each ``left`` location (in split ``first``) with each ``right`` one.

    A swap is the two single moves plus their interaction, which is bilinear in the two count
    rows: the label terms are quadratic (second differences ``−8·Σ c_k c_j / N_y²`` and
    ``−4·Σ [k∋y][j∋y] / K_y²``), and the held-out term is recomputed from ``N_s``, ``Σ N_sy²``
    (cross term ``−2·Σ c_k c_j``) and ``Σ N_sy·p_y``.
    """
    (first, left, left_deltas), (second, right, right_deltas) = left_side, right_side
    terms, counts = scorer.terms, scorer.counts
    rows, cols = problem.counts[left].astype(np.float64), problem.counts[right].astype(np.float64)
    shared = rows @ cols.T  # Σ_y c_ky·c_jy
    change = left_deltas[left][:, None] + right_deltas[right][None, :]
    change -= 8.0 * (rows / np.square(terms.crops_per_label)) @ cols.T
    change -= 4.0 * ((rows > 0) / np.square(terms.locations_per_label)) @ (cols > 0).T
    n, b = counts.location_crops, counts.location_prior
    if scorer.held_out[first]:  # left leaves ``first``, right joins it
        change += _held_out_interaction(scorer, first, (-n[left], scorer.square_out[left], -b[left]),
                                        (n[right], scorer.square_in[first][right], b[right]), shared)
    if scorer.held_out[second]:  # left joins ``second``, right leaves it
        change += _held_out_interaction(scorer, second, (n[left], scorer.square_in[second][left], b[left]),
                                        (-n[right], scorer.square_out[right], -b[right]), shared)
    return change


def _held_out_interaction(scorer: MoveScorer, split: int, rows: tuple[np.ndarray, ...], cols: tuple[np.ndarray, ...],
                          shared: np.ndarray) -> np.ndarray:
    """(L, R): held-out term of ``split`` after both changes, less each change alone (``(N, Σ N², Σ N·p)`` deltas)."""
    term = scorer.terms.held_out_term
    base = scorer.totals[split], scorer.square_sums[split], scorer.prior_dots[split]
    both = term(base[0] + rows[0][:, None] + cols[0][None, :], base[1] + rows[1][:, None] + cols[1][None, :] - 2.0 * shared,
                base[2] + rows[2][:, None] + cols[2][None, :])
    row_alone = term(base[0] + rows[0], base[1] + rows[1], base[2] + rows[2])[:, None]
    col_alone = term(base[0] + cols[0], base[1] + cols[1], base[2] + cols[2])[None, :]
    return both - row_alone - col_alone + term(*(np.asarray(v, dtype=np.float64) for v in base))
