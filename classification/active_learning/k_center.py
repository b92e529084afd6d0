"""Lazy k-center greedy: the exact farthest-point search behind the k_center and coral strategies.

A greedy step needs the candidate whose key of its distance to the covered set (labelled ∪ picked)
is largest. ``Coverage`` keeps every candidate's float32 squared distance to its nearest centre as
an upper bound refreshed lazily; ``FarthestPoint`` refreshes only candidates that could still beat
the leader and settles near-ties within float32's rounding bound with float64 differences, so the
picks are those of exact arithmetic on the float32 embeddings. Internal to the strategies: see
``strategies.select_k_center`` and ``strategies.select_coral``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

__all__ = ["Coverage", "DistanceKey", "FarthestPoint"]

_SINGLE_REFRESHES = 4  # argmax: refresh only the leader's rivals this many times, then the top stale keys too
_FIRST_BATCH = 64
_ONE_CALL_PAIRS = 4096  # a refresh of at most this many (row, centre) pairs is one matrix product
_EXACT_BACKLOG = 32  # a cached float64 distance this many centres behind is recomputed instead of updated

DistanceKey = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (positions, squared distances) -> keys, non-decreasing in d²


class Coverage:
    """Squared distance (float32) from each candidate to its nearest centre (labelled ∪ picked), refreshed lazily.

    ``bound[i]`` is the minimum over centres ``[0, checked[i])``, reached at centre ``nearest[i]``;
    ``second[i]`` is the runner-up. Later centres can only lower ``bound``, so it is an upper bound
    that becomes exact once ``checked[i] == n_centres``: a greedy step only refreshes the candidates
    whose bound could still beat the leader (lazy evaluation).
    """

    def __init__(self, x: np.ndarray, candidates: np.ndarray, capacity: int, chunk_size: int) -> None:
        self.x = x
        self.candidates = candidates
        self.chunk_size = chunk_size
        self.sq_norms = np.full(candidates.size, np.nan, dtype=np.float32)  # computed on a row's first refresh
        self.bound = np.full(candidates.size, np.inf, dtype=np.float32)
        self.second = np.full(candidates.size, np.inf, dtype=np.float32)
        self.nearest = np.zeros(candidates.size, dtype=np.int64)
        self.checked = np.zeros(candidates.size, dtype=np.int64)
        self.exact = np.full(candidates.size, np.nan)  # float64 d² over centres [0, exact_checked), once needed
        self.exact_checked = np.zeros(candidates.size, dtype=np.int64)
        self.centres = np.empty((capacity, x.shape[1]), dtype=np.float32)
        self.centre_sq_norms = np.empty(capacity, dtype=np.float32)
        self.n_centres = 0

    def add_centres(self, rows: np.ndarray) -> None:
        """Append pool rows to the centres (copied, so refreshes read one compact block)."""
        for start in range(0, rows.size, self.chunk_size):
            block = self.x[rows[start : start + self.chunk_size]]
            end = self.n_centres + block.shape[0]
            self.centres[self.n_centres : end] = block
            self.centre_sq_norms[self.n_centres : end] = np.einsum("ij,ij->i", block, block)
            self.n_centres = end

    def remove(self, position: int) -> None:
        """Take a picked candidate out: its bound becomes −inf and it is never refreshed again."""
        self.bound[position] = -np.inf
        self.checked[position] = np.iinfo(np.int64).max

    def refresh(self, positions: np.ndarray) -> None:
        """Make the bounds of ``positions`` exact: one product when small, else grouped by similar backlogs."""
        positions = positions[self.checked[positions] < self.n_centres]
        if positions.size == 0:
            return
        backlog = self.n_centres - self.checked[positions]
        if positions.size * int(backlog.max()) <= _ONE_CALL_PAIRS:
            self._update(positions)
            return
        backlog_class = np.frexp(backlog.astype(np.float64))[1]
        for group in np.unique(backlog_class):
            self._update(positions[backlog_class == group])

    def refresh_all(self) -> None:
        """Make every remaining candidate's bound exact."""
        self.refresh(np.flatnonzero(self.checked < self.n_centres))

    def _update(self, positions: np.ndarray) -> None:
        """Count the centres each of ``positions`` has not counted yet, in chunk × chunk blocks."""
        first = int(self.checked[positions].min())
        mixed = bool((self.checked[positions] > first).any())
        step = self.chunk_size
        for r in range(0, positions.size, step):
            pos = positions[r : r + step]
            rows = self.x[self.candidates[pos]]
            new = np.isnan(self.sq_norms[pos])
            if new.any():
                self.sq_norms[pos[new]] = np.einsum("ij,ij->i", rows[new], rows[new])
            best, nearest, second = self.bound[pos], self.nearest[pos], self.second[pos]
            lines = np.arange(pos.size)
            for c in range(first, self.n_centres, step):
                end = min(c + step, self.n_centres)
                d2 = rows @ self.centres[c:end].T
                d2 *= -2.0
                d2 += self.sq_norms[pos, None]
                d2 += self.centre_sq_norms[None, c:end]
                if mixed:  # a centre a candidate has already counted is not counted twice
                    d2[np.arange(c, end)[None, :] < self.checked[pos, None]] = np.inf
                closest = np.argmin(d2, axis=1)
                block_best = d2[lines, closest]
                d2[lines, closest] = np.inf
                block_second = d2.min(axis=1)
                improved = block_best < best
                second = np.where(improved, np.minimum(best, block_second), np.minimum(second, block_best))
                nearest = np.where(improved, closest + c, nearest)
                best = np.where(improved, block_best, best)
            self.bound[pos], self.nearest[pos], self.second[pos] = np.maximum(best, 0.0), nearest, second
        self.checked[positions] = self.n_centres

    def exact_sq_distances(self, positions: np.ndarray, tolerance: float) -> np.ndarray:
        """float64 squared distances of fresh ``positions`` to their nearest centre, cached per candidate.

        A cached value only needs the few centres added since; a new one comes from the float32
        nearest centre when the runner-up trails by more than 2·tolerance (then it is the true
        nearest), else from every centre whose float32 d² is within 2·tolerance of the nearest.
        """
        backlog = self.n_centres - self.exact_checked[positions]
        cached = ~np.isnan(self.exact[positions]) & (backlog <= _EXACT_BACKLOG)
        behind = positions[cached & (backlog > 0)]
        for start in np.unique(self.exact_checked[behind]):
            pos = behind[self.exact_checked[behind] == start]
            added = np.arange(start, self.n_centres)
            d2 = self._exact_pairs(np.repeat(pos, added.size), np.tile(added, pos.size))
            self.exact[pos] = np.minimum(self.exact[pos], d2.reshape(pos.size, added.size).min(axis=1))
        new = positions[~cached]
        self.exact[new] = self._exact_pairs(new, self.nearest[new])
        unsure = new[self.second[new] - self.bound[new] <= 2 * tolerance]
        if unsure.size:
            self.exact[unsure] = self._exact_in_band(unsure, tolerance)
        self.exact_checked[positions] = self.n_centres
        return self.exact[positions]

    def _exact_pairs(self, positions: np.ndarray, centres: np.ndarray) -> np.ndarray:
        """float64 squared distance from candidate ``positions[i]`` to centre ``centres[i]``, by differences."""
        out = np.empty(positions.size)
        step = max(1, self.chunk_size**2 // self.x.shape[1])  # a batch of pairs is at most chunk² float64 values
        for start in range(0, positions.size, step):
            rows = self.x[self.candidates[positions[start : start + step]]].astype(np.float64)
            out[start : start + step] = ((rows - self.centres[centres[start : start + step]]) ** 2).sum(axis=1)
        return out

    def _exact_in_band(self, positions: np.ndarray, tolerance: float) -> np.ndarray:
        """float64 minimum over the centres whose float32 d² is within 2·tolerance of the (fresh) bound."""
        best = np.full(positions.size, np.inf)
        ceiling = self.bound[positions].astype(np.float64) + 2 * tolerance
        for r in range(0, positions.size, self.chunk_size):
            pos = positions[r : r + self.chunk_size]
            rows = self.x[self.candidates[pos]]
            for c in range(0, self.n_centres, self.chunk_size):
                end = min(c + self.chunk_size, self.n_centres)
                d2 = self.sq_norms[pos, None] - 2.0 * (rows @ self.centres[c:end].T)
                d2 += self.centre_sq_norms[None, c:end]
                line, column = np.nonzero(d2 <= ceiling[r : r + pos.size, None])
                np.minimum.at(best, r + line, self._exact_pairs(pos[line], c + column))
        return best


class FarthestPoint:
    """Exact greedy argmax over candidates of a key of their distance to labelled ∪ picked.

    Every candidate's distance is kept in float32 (``fast``). float32 d² is within ``tolerance``
    of the exact value (the rounding bound ``(dim + 8)·2⁻²⁴·(|x| + |c|)²``), so only candidates
    whose float32 key could reach the leader's are rivals; when there are several, their
    float64 distances decide. The picks are those of exact arithmetic on the float32 embeddings.
    """

    def __init__(self, x: np.ndarray, available: np.ndarray, labelled: np.ndarray, capacity: int, chunk_size: int) -> None:
        self.fast = Coverage(x, available, capacity, chunk_size)
        self.fast.add_centres(labelled)
        self.positions = np.arange(available.size)
        self.n_alive = available.size
        self.n_picked = 0
        self.n_labelled = labelled.size
        max_norm = float(np.sqrt(_max_sq_norm(x, np.concatenate([available, labelled]), chunk_size))) * (1 + 1e-3)
        self.tolerance = (x.shape[1] + 8) * 2.0**-24 * (2 * max_norm) ** 2

    def add(self, position: int) -> None:
        """Make a candidate a centre (it was picked)."""
        self.fast.add_centres(self.fast.candidates[[position]])
        self.fast.remove(position)
        self.n_alive -= 1
        self.n_picked += 1

    def start(self) -> None:
        """Compute every candidate's float32 distance to the centres so far (chunked matrix products)."""
        self.fast.refresh_all()

    def exact_sq_distance(self, position: int) -> float:
        """The float64 squared distance of one candidate to its nearest centre."""
        self.fast.refresh(np.array([position]))
        return float(self.fast.exact_sq_distances(np.array([position]), self.tolerance)[0])

    def argmax(self, key: DistanceKey) -> tuple[int, float]:
        """The candidate with the largest exact key and its squared distance (float64 when it was needed).

        Lazy evaluation: ``keys`` are upper bounds (a stale bound only counts older centres). The
        leader and its rivals, every candidate whose key could come within rounding of it, are
        refreshed until all of them are fresh: the others cannot beat the leader, so the exact
        winner is among the rivals. If leaders keep falling, the top stale keys are refreshed in
        growing batches.
        """
        fast, tolerance = self.fast, self.tolerance
        keys = key(self.positions, fast.bound)
        batch = _FIRST_BATCH
        for attempt in itertools.count():
            leader = int(np.argmax(keys))
            lowest = key(np.array([leader]), fast.bound[[leader]].astype(np.float64) - tolerance)[0]
            rivals = np.flatnonzero(key(self.positions, fast.bound.astype(np.float64) + tolerance) >= lowest)
            stale = rivals[fast.checked[rivals] < fast.n_centres]
            if stale.size == 0:  # the leader is a rival too, so it is fresh
                break
            if attempt >= _SINGLE_REFRESHES:
                if 2 * batch >= self.n_alive:
                    stale = np.flatnonzero(fast.checked < fast.n_centres)
                else:
                    stale, batch = np.union1d(stale, np.argpartition(keys, -batch)[-batch:]), 4 * batch
            fast.refresh(stale)
            keys[stale] = key(stale, fast.bound[stale])
        if rivals.size == 1:
            return leader, float(fast.bound[leader])
        exact = fast.exact_sq_distances(rivals, tolerance)
        best = int(np.argmax(key(rivals, exact)))
        return int(rivals[best]), float(exact[best])

    def covered_by(self) -> str:
        """'the labelled set', 'the labelled set and 3 earlier picks' or 'the 3 earlier picks'."""
        picked = f"{self.n_picked} earlier pick{'s' if self.n_picked != 1 else ''}"
        if self.n_labelled and self.n_picked:
            return f"the labelled set and {picked}"
        return "the labelled set" if self.n_labelled else f"the {picked}"


def _max_sq_norm(x: np.ndarray, rows: np.ndarray, chunk_size: int) -> float:
    """The largest squared norm among the given rows (float64)."""
    largest = 0.0
    for start in range(0, rows.size, chunk_size):
        block = x[rows[start : start + chunk_size]].astype(np.float64)
        largest = max(largest, float(np.einsum("ij,ij->i", block, block).max()))
    return largest
