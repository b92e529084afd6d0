"""The split searches: the GUIDE §3 score of many candidates at once, a seeded random search, a local
improvement that moves and swaps locations while the score drops, and MegaDetector's greedy split, fixed.

Vectorised, so 10,000 candidates over 10,000 locations take seconds where the references'
per-candidate pandas loops take hours: the machinery (score terms, candidate blocks, move and swap
scorers) is ``_split_scoring``'s. Every search keeps ``splits``' conventions: pinned locations stay
where they are, unpinned ones join only open splits, and the same inputs and seed give the same split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from classification.data._split_scoring import (
    CandidateScorer,
    ScoreTerms,
    SparseCounts,
    chunk_rows,
    move_round,
    swap_round,
)
from classification.data.splits import (
    TEST,
    TRAIN,
    UNPINNED,
    VAL,
    SplitProblem,
    SplitResult,
    check_fixed,
    check_fractions,
    open_splits,
)
from classification.errors import UserError

__all__ = ["JITTER", "improve_locally", "random_search", "score_assignments", "smallest_first"]

JITTER = 0.03  # candidate sizes vary by U(-JITTER, JITTER) around the target, as the references do


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
    target = check_fractions(fractions)
    candidates = np.asarray(assignments)
    if candidates.ndim != 2 or candidates.shape[1] != problem.n_locations:
        raise ValueError(f"assignments must have shape (B, {problem.n_locations}), got {candidates.shape}")
    if candidates.size and (candidates.min() < TRAIN or candidates.max() > TEST):
        raise ValueError("assignments must hold split numbers 0 (train), 1 (val) or 2 (test)")
    scorer = CandidateScorer(problem, target)
    scores = np.empty(candidates.shape[0], dtype=np.float64)
    step = chunk_rows(problem.n_locations, chunk_size)
    for start in range(0, candidates.shape[0], step):
        block = candidates[start : start + step]
        scores[start : start + len(block)] = scorer.score(block)
    return scores


def _candidate_sizes(n_unpinned: int, shares: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """Locations per open split for each candidate: ``int(M_free·(share + U))``, the last takes the rest."""
    sizes = np.zeros((jitter.shape[0], len(shares)), dtype=np.int64)
    remaining = np.full(jitter.shape[0], n_unpinned, dtype=np.int64)
    for j in range(len(shares) - 1):
        size = np.clip(np.trunc(n_unpinned * (shares[j] + jitter[:, j])).astype(np.int64), 0, remaining)
        sizes[:, j] = size
        remaining -= size
    sizes[:, -1] = remaining
    return sizes


def _single_result(problem: SplitProblem, assignment: np.ndarray, fractions: np.ndarray, method: str) -> SplitResult:
    """A result for an assignment that is the only possible one (nothing unpinned, or one open split)."""
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

    Each candidate shuffles the unpinned locations and cuts them at ``int(M_free·(f_s + U(-.03, .03)))``
    per open split in order (the last open split takes the rest). The result does not depend
    on ``chunk_size``: jitters are drawn first, then the shuffles block by block from one stream.
    """
    target = check_fractions(fractions)
    if n_candidates < 1:
        raise UserError(f"the number of split candidates must be at least 1, got {n_candidates}")
    pinned = check_fixed(problem, fixed)
    unpinned = np.flatnonzero(pinned == UNPINNED)
    joinable = open_splits(pinned, target) if unpinned.size else ()
    base = pinned.copy()
    if unpinned.size == 0 or len(joinable) == 1:
        base[unpinned] = joinable[0] if joinable else UNPINNED
        return _single_result(problem, base, target, "random")
    rng = np.random.default_rng(seed)
    shares = target[list(joinable)] / target[list(joinable)].sum()
    sizes = _candidate_sizes(unpinned.size, shares, rng.uniform(-JITTER, JITTER, size=(n_candidates, len(joinable) - 1)))
    target_codes = np.asarray(joinable, dtype=np.int8)
    ranks = np.arange(unpinned.size)
    best_score, best = np.inf, base
    scorer = CandidateScorer(problem, target)
    step = chunk_rows(problem.n_locations, chunk_size)
    for start in range(0, n_candidates, step):
        block_sizes = sizes[start : start + step]
        position = np.zeros((len(block_sizes), unpinned.size), dtype=np.int8)  # index into joinable, in rank order
        for bound in np.cumsum(block_sizes[:, :-1], axis=1).T:
            position += ranks[None, :] >= bound[:, None]
        block = np.repeat(base[None, :], len(block_sizes), axis=0)
        block[:, unpinned] = rng.permuted(target_codes[position], axis=1)  # one shuffle per candidate
        scores = scorer.score(block)
        winner = int(np.argmin(scores))
        if scores[winner] < best_score:
            best_score, best = float(scores[winner]), block[winner].copy()
    return SplitResult(best, best_score, "random", n_candidates, 0)


def improve_locally(
    problem: SplitProblem,
    result: SplitResult,
    fractions: Sequence[float] | np.ndarray,
    fixed: np.ndarray | None = None,
    max_rounds: int = 5_000,
) -> SplitResult:
    """Hill-climb from ``result``: move unpinned locations, and swap pairs, while the score drops.

    Each round scores every single move from per-split count deltas and applies the best
    improving ones together (as many as the exact score agrees with, down to the single
    best); when no move helps, the best location-disjoint swaps between each open split
    pair (every pair of its locations, or of each side's ``SWAP_CANDIDATES`` best movers on
    large problems), checked the same way. Deterministic; pinned
    locations never move; the returned score is never above the input's.
    """
    target = check_fractions(fractions)
    pinned = check_fixed(problem, fixed)
    assignment = np.asarray(result.assignment).astype(np.int8).copy()
    if assignment.shape != (problem.n_locations,):
        raise ValueError(f"result.assignment must have shape ({problem.n_locations},)")
    if (pinned != UNPINNED).any() and (assignment[pinned != UNPINNED] != pinned[pinned != UNPINNED]).any():
        raise ValueError("result.assignment moves a pinned location")
    unpinned = np.flatnonzero(pinned == UNPINNED)
    if unpinned.size == 0:
        return result
    joinable = open_splits(pinned, target)
    counts = SparseCounts(problem, ScoreTerms(problem, target))
    score = counts.score(*counts.sums(assignment))
    moves, batch = 0, unpinned.size
    for _ in range(max_rounds):
        score, moved, batch = move_round(counts, assignment, score, unpinned, joinable, batch)
        if not moved:
            score, moved = swap_round(problem, counts, assignment, score, unpinned, joinable)
        if not moved:
            break
        moves += moved
    return _improved_result(problem, result, assignment, target, moves)


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
    target = check_fractions(fractions)
    pinned = check_fixed(problem, fixed)
    assignment = pinned.copy()
    unpinned = pinned == UNPINNED
    if not unpinned.any():
        return _single_result(problem, assignment, target, "smallest_first")
    joinable = open_splits(pinned, target)
    fill_order = [s for s in (TEST, VAL, TRAIN) if s in joinable]
    held_out, last = fill_order[:-1], fill_order[-1]
    counts = problem.counts
    label_totals = counts.sum(axis=0)
    split_totals = np.stack([counts[assignment == s].sum(axis=0) for s in range(3)])
    for label in np.argsort(label_totals, kind="stable"):
        candidates = np.flatnonzero((counts[:, label] > 0) & (assignment == UNPINNED))
        for location in candidates[np.lexsort((candidates, -counts[candidates, label]))]:
            split = next((s for s in held_out if split_totals[s, label] < target[s] * label_totals[label]), last)
            assignment[location] = split
            split_totals[split] += counts[location]
    assignment[assignment == UNPINNED] = last  # locations without crops
    return _single_result(problem, assignment, target, "smallest_first")
