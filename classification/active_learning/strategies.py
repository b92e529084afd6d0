"""Active-learning selection strategies: which unlabelled pool items to send for labelling next.

Every strategy is a pure, deterministic function of ``(inputs, budget, seed, options)``. It never
picks a labelled or excluded item, never picks an item twice, returns every available item when
fewer than ``budget`` are left, and breaks ties by pool index (the smaller index first). A missing
or malformed input is a one-line ``UserError``. ``registry.py`` names each strategy, calls it by name
(``registry.select``) and refuses unknown names and options.

Distances are Euclidean. k_center and coral compute them in float32 as ``|x|² + |c|² − 2 x·c``
in chunk × chunk blocks (never an n×n matrix): float32 keeps a 100,000 × 512 pool at 200 MB and the
matrix products twice as fast as float64. Near-ties closer than float32's proven rounding bound
are settled with float64 differences, so the picks are those of exact arithmetic (embeddings are
first rounded to float32). See docs/active_learning_strategies.md for formulas and figures.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from classification.active_learning.k_center import DistanceKey, FarthestPoint
from classification.active_learning.scores import check_score_name, uncertainty_scores
from classification.errors import UserError

__all__ = [
    "Pick", "Selection", "SelectionInputs", "available_items", "cluster_quotas", "kmeans", "select_coral",
    "select_informative_diverse", "select_k_center", "select_random", "select_top_scores",
]

DEFAULT_CHUNK_SIZE = 2048  # rows (and centres) per distance block: a block is at most 2048² float32 = 16 MB
DEFAULT_MAX_ITERATIONS = 20  # Lloyd iterations for informative_diverse's k-means (stops early once stable)


@dataclass(frozen=True)
class SelectionInputs:
    """What a strategy may look at; index i is the same pool item in every array."""

    labelled: np.ndarray  # bool (n,): already labelled: never picked; k-center/coral start from them
    excluded: np.ndarray | None = None  # bool (n,): requested earlier but not labelled yet, or unusable: never picked
    probabilities: np.ndarray | None = None  # float (n, C) predicted class probabilities
    embeddings: np.ndarray | None = None  # float (n, d)


@dataclass(frozen=True)
class Pick:
    """One chosen pool item and why it was chosen."""

    index: int  # pool index
    score: float | None  # the uncertainty score that counted (None for random / k_center)
    distance: float | None  # distance to the nearest labelled-or-already-picked item when chosen (k_center, coral)
    cluster: int | None  # cluster id (informative_diverse), else None
    reason: str  # one human-readable line


@dataclass(frozen=True)
class Selection:
    """The picks of one strategy, in the order chosen."""

    strategy: str
    picks: tuple[Pick, ...]

    @property
    def indices(self) -> np.ndarray:
        """The picks' pool indices, in order (int64)."""
        return np.array([pick.index for pick in self.picks], dtype=np.int64)


# ---------------------------------------------------------------- checks of inputs and options


def _check_int(name: str, value: object, minimum: int) -> int:
    """An integer option or argument that must be at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise UserError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_weight(value: object) -> float:
    """The coral diversity weight: a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise UserError(f"diversity_weight: expected a number in [0, 1], got {value!r}")
    return float(value)


def _mask(value: object, name: str, n: int | None) -> np.ndarray:
    """A boolean mask of shape (n,); index arrays and wrong lengths are refused."""
    mask = np.asarray(value)
    if mask.dtype != np.bool_ or mask.ndim != 1 or (n is not None and mask.size != n):
        expected = f"({n},)" if n is not None else "(n,)"
        raise UserError(f"{name}: expected a boolean mask of shape {expected}, got {mask.dtype} array of shape {mask.shape}")
    return mask


def available_items(inputs: SelectionInputs) -> np.ndarray:
    """Pool indices that may be picked (neither labelled nor excluded), ascending (int64)."""
    labelled = _mask(inputs.labelled, "labelled", None)
    if inputs.excluded is None:
        return np.flatnonzero(~labelled).astype(np.int64)
    excluded = _mask(inputs.excluded, "excluded", labelled.size)
    return np.flatnonzero(~(labelled | excluded)).astype(np.int64)


def _scores(inputs: SelectionInputs, strategy: str, name: str, rows: np.ndarray) -> np.ndarray:
    """The named uncertainty score of the given pool rows (only these rows are validated)."""
    if inputs.probabilities is None:
        raise UserError(f"strategy {strategy!r} needs predicted probabilities (SelectionInputs.probabilities)")
    probabilities = np.asarray(inputs.probabilities)
    n = np.asarray(inputs.labelled).size
    if probabilities.ndim != 2 or probabilities.shape[0] != n:
        raise UserError(f"probabilities: expected shape ({n}, classes), got {probabilities.shape}")
    return uncertainty_scores(probabilities[rows], name)


def _embeddings(inputs: SelectionInputs, strategy: str, rows: np.ndarray) -> np.ndarray:
    """The embeddings as float32 (n, d); the given rows must be finite."""
    if inputs.embeddings is None:
        raise UserError(f"strategy {strategy!r} needs embeddings (SelectionInputs.embeddings)")
    raw = np.asarray(inputs.embeddings)
    n = np.asarray(inputs.labelled).size
    if raw.ndim != 2 or raw.shape[0] != n or raw.shape[1] < 1 or not np.issubdtype(raw.dtype, np.number):
        raise UserError(f"embeddings: expected a numeric array of shape ({n}, dim), got {raw.dtype} {raw.shape}")
    x = np.asarray(raw, dtype=np.float32)
    row_sums = x.sum(axis=1)  # NaN or inf anywhere in a row makes its sum non-finite
    bad = rows[~np.isfinite(row_sums[rows])]
    if bad.size:
        raise UserError(f"embeddings: {bad.size} rows contain NaN or infinite values (first: pool index {bad[0]})")
    return x


def _selection(strategy: str, picks: list[Pick]) -> Selection:
    """Freeze the picks (and check the no-duplicate rule the strategies guarantee)."""
    assert len({pick.index for pick in picks}) == len(picks), "a strategy picked an item twice"
    return Selection(strategy=strategy, picks=tuple(picks))


# ---------------------------------------------------------------- random and top-k by score


def select_random(inputs: SelectionInputs, budget: int, seed: int) -> Selection:
    """Uniformly random available items, drawn with ``np.random.default_rng(seed)``."""
    budget = _check_int("budget", budget, 0)
    seed = _check_int("seed", seed, 0)
    available = available_items(inputs)
    k = min(budget, available.size)
    order = np.random.default_rng(seed).permutation(available.size)[:k]
    picks = [
        Pick(int(available[p]), None, None, None, f"random draw {rank + 1} of {k} from {available.size} available (seed {seed})")
        for rank, p in enumerate(order)
    ]
    return _selection("random", picks)


def select_top_scores(inputs: SelectionInputs, budget: int, score: str = "margin") -> Selection:
    """The ``budget`` available items with the highest uncertainty ``score``, highest first."""
    budget = _check_int("budget", budget, 0)
    check_score_name(score)
    available = available_items(inputs)
    u = _scores(inputs, score, score, available)
    order = np.argsort(-u, kind="stable")[:budget]  # stable: equal scores keep pool-index order
    picks = [
        Pick(int(available[p]), float(u[p]), None, None, f"{score} {u[p]:.3f} (rank {rank + 1} of {available.size})")
        for rank, p in enumerate(order)
    ]
    return _selection(score, picks)


def _distance_key(positions: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """k_center's key: the squared distance itself."""
    return d2


def _random_start(greedy: FarthestPoint, available: np.ndarray, seed: int) -> int:
    """With nothing labelled, k-center starts from ``available[default_rng(seed).integers(len(available))]``."""
    first = int(np.random.default_rng(seed).integers(available.size))
    greedy.add(first)
    return first


# ---------------------------------------------------------------- k-center greedy


def select_k_center(inputs: SelectionInputs, budget: int, seed: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Selection:
    """k-center greedy (coreset, Sener & Savarese 2018): repeatedly pick the item farthest from labelled ∪ picked.

    With nothing labelled the first pick is ``available[default_rng(seed).integers(len(available))]``.
    Exactly the picks of the plain algorithm in exact arithmetic, but a step only refreshes the
    distances that could still beat the leader (see ``k_center.Coverage`` and ``k_center.FarthestPoint``).
    """
    budget = _check_int("budget", budget, 0)
    seed = _check_int("seed", seed, 0)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    available = available_items(inputs)
    labelled = np.flatnonzero(np.asarray(inputs.labelled)).astype(np.int64)
    x = _embeddings(inputs, "k_center", np.concatenate([available, labelled]))
    k = min(budget, available.size)
    picks: list[Pick] = []
    if k == 0:
        return _selection("k_center", picks)
    greedy = FarthestPoint(x, available, labelled, labelled.size + k, chunk_size)
    if labelled.size == 0:
        first = _random_start(greedy, available, seed)
        picks.append(Pick(int(available[first]), None, None, None, f"random start (nothing labelled; seed {seed})"))
    if len(picks) < k:
        greedy.start()
    while len(picks) < k:
        position, d2 = greedy.argmax(_distance_key)
        distance = float(np.sqrt(d2))
        reason = f"farthest from {greedy.covered_by()}: distance {distance:.2f}"
        picks.append(Pick(int(available[position]), None, distance, None, reason))
        greedy.add(position)
    return _selection("k_center", picks)


# ---------------------------------------------------------------- coral: uncertainty + diversity


def select_coral(
    inputs: SelectionInputs,
    budget: int,
    seed: int,
    score: str = "margin",
    diversity_weight: float = 0.5,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Selection:
    """Greedy uncertainty + diversity: each step picks the argmax of ``(1 − w)·u(x) + w·d(x)/d_max``.

    ``u`` is the normalised uncertainty ``score`` (in [0, 1]), ``d(x)`` the current distance to the
    nearest labelled-or-picked item and ``d_max`` its current maximum over available items, so both
    terms lie in [0, 1]; ``w = diversity_weight``. w = 0 is top-k by ``score``, w = 1 is k_center.
    With nothing labelled there is no distance yet: the first pick is the most uncertain item
    (w < 1) or, at w = 1 where every item ties, k_center's seeded random start.
    """
    budget = _check_int("budget", budget, 0)
    seed = _check_int("seed", seed, 0)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    w = _check_weight(diversity_weight)
    check_score_name(score)
    available = available_items(inputs)
    labelled = np.flatnonzero(np.asarray(inputs.labelled)).astype(np.int64)
    u = _scores(inputs, "coral", score, available)
    x = _embeddings(inputs, "coral", np.concatenate([available, labelled]))
    k = min(budget, available.size)
    picks: list[Pick] = []
    if k == 0:
        return _selection("coral", picks)
    greedy = FarthestPoint(x, available, labelled, labelled.size + k, chunk_size)
    if labelled.size == 0:
        if w == 1.0:
            first, why = _random_start(greedy, available, seed), f"random start (nothing labelled; seed {seed})"
        else:
            first, why = int(np.argmax(u)), "the most uncertain (nothing labelled yet)"
            greedy.add(first)
        picks.append(Pick(int(available[first]), float(u[first]), None, None, f"coral: {score} {u[first]:.3f}, {why}"))
    if len(picks) < k:
        greedy.start()
    while len(picks) < k:
        farthest, _ = greedy.argmax(_distance_key)
        d_max = float(np.sqrt(greedy.exact_sq_distance(farthest)))
        position, d2 = greedy.argmax(_coral_key(u, w, d_max))
        distance = float(np.sqrt(d2))
        share = distance / d_max if d_max > 0 else 0.0
        reason = (
            f"coral: {score} {u[position]:.3f}, distance {distance:.2f} ({share:.2f} of the largest), "
            f"combined {(1 - w) * u[position] + w * share:.3f} (diversity weight {w:g})"
        )
        picks.append(Pick(int(available[position]), float(u[position]), distance, None, reason))
        greedy.add(position)
    return _selection("coral", picks)


def _coral_key(u: np.ndarray, w: float, d_max: float) -> DistanceKey:
    """``(1 − w)·u + w·d/d_max`` (float64) of given positions from squared distances; −inf stays −inf."""

    def key(positions: np.ndarray, d2: np.ndarray) -> np.ndarray:
        d2 = np.asarray(d2, dtype=np.float64)
        gone = d2 == -np.inf
        diversity = np.sqrt(np.maximum(d2, 0.0)) / d_max if d_max > 0 else np.zeros(d2.shape)
        return np.where(gone, -np.inf, (1.0 - w) * u[positions] + w * diversity)

    return key


# ---------------------------------------------------------------- informative & diverse (clustered margin)


def kmeans(x: np.ndarray, n_clusters: int, seed: int, max_iterations: int) -> np.ndarray:
    """Cluster the rows of ``x`` with scikit-learn's ``KMeans``; returns labels (int64).

    One seeded k-means++ initialisation, then up to ``max_iterations`` Lloyd iterations, stopping
    once no assignment changes (``tol=0``). Fewer distinct rows than clusters is allowed: some
    clusters then stay empty (scikit-learn's warning about it is silenced).
    """
    model = KMeans(n_clusters=n_clusters, init="k-means++", n_init=1, max_iter=max_iterations, tol=0.0,
                   random_state=seed % 2**32, algorithm="lloyd")  # random_state takes 32-bit seeds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit_predict(x).astype(np.int64)


def cluster_quotas(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Split ``budget`` over clusters in proportion to their sizes (largest remainder), capped by size.

    A capped cluster's leftover goes to the others by the same rule, so the quotas sum to
    ``min(budget, sizes.sum())``. Equal remainders go to the lower cluster id.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    quotas = np.zeros_like(sizes)
    remaining = min(int(budget), int(sizes.sum()))
    while remaining > 0:
        open_ = np.flatnonzero(quotas < sizes)
        weights = sizes[open_]
        base, remainder = np.divmod(remaining * weights, weights.sum())  # exact integer proportions
        extra = remaining - int(base.sum())
        order = np.lexsort((open_, -remainder))[:extra]
        base[order] += 1
        quotas[open_] += np.minimum(base, sizes[open_] - quotas[open_])
        remaining = min(int(budget), int(sizes.sum())) - int(quotas.sum())
    return quotas


def select_informative_diverse(
    inputs: SelectionInputs,
    budget: int,
    seed: int,
    n_clusters: int | None = None,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> Selection:
    """Norouzzadeh et al. (2021)'s informative & diverse: the highest-margin items of each k-means cluster.

    The available items are clustered (``kmeans``: scikit-learn, seeded); each cluster gets a quota in
    proportion to its size (``cluster_quotas``) and fills it with its highest-margin items. The
    default ``n_clusters`` is the number of classes, as in the sampler they used (Google's
    active-learning ``informative_diverse.py``), at most the number of available items. Picks are
    ordered round-robin: every cluster's best, then every cluster's second best, ...
    """
    budget = _check_int("budget", budget, 0)
    seed = _check_int("seed", seed, 0)
    max_iterations = _check_int("max_iterations", max_iterations, 1)
    if n_clusters is not None:
        n_clusters = _check_int("n_clusters", n_clusters, 1)
    available = available_items(inputs)
    u = _scores(inputs, "informative_diverse", "margin", available)
    x = _embeddings(inputs, "informative_diverse", available)
    if min(budget, available.size) == 0:
        return _selection("informative_diverse", [])
    k = min(n_clusters or np.asarray(inputs.probabilities).shape[1], available.size)
    labels = kmeans(x[available], k, seed, max_iterations)
    sizes = np.bincount(labels, minlength=k)
    quotas = cluster_quotas(sizes, budget)
    chosen: list[tuple[int, int, int]] = []  # (rank in cluster, cluster, position)
    for cluster in np.flatnonzero(quotas):
        members = np.flatnonzero(labels == cluster)
        best = members[np.argsort(-u[members], kind="stable")[: quotas[cluster]]]
        chosen += [(rank, int(cluster), int(p)) for rank, p in enumerate(best)]
    picks = [
        Pick(
            int(available[p]),
            float(u[p]),
            None,
            cluster,
            f"margin {u[p]:.3f} (rank {rank + 1} of {sizes[cluster]} in cluster {cluster}, quota {quotas[cluster]})",
        )
        for rank, cluster, p in sorted(chosen)
    ]
    return _selection("informative_diverse", picks)
