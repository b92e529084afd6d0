"""Active-learning scores and selection strategies: exact values, invariants, references and errors."""

from __future__ import annotations

import numpy as np
import pytest

from classification.active_learning.registry import select, strategy_names
from classification.active_learning.scores import SCORE_FUNCTIONS, entropy, least_confidence, margin, uncertainty_scores
from classification.active_learning.strategies import (
    SelectionInputs,
    cluster_quotas,
    select_coral,
    select_informative_diverse,
    select_k_center,
    select_top_scores,
)
from classification.errors import DataError, UserError

STRATEGIES = strategy_names()  # the library's own: nothing else is registered when this module is collected


def make_pool(
    n: int = 300, dim: int = 8, classes: int = 5, n_labelled: int = 20, n_excluded: int = 15, seed: int = 0
) -> SelectionInputs:
    """A random pool with labelled and excluded items, Dirichlet probabilities and Gaussian embeddings."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    labelled = np.zeros(n, dtype=bool)
    labelled[order[:n_labelled]] = True
    excluded = np.zeros(n, dtype=bool)
    excluded[order[n_labelled : n_labelled + n_excluded]] = True
    return SelectionInputs(
        labelled=labelled,
        excluded=excluded,
        probabilities=rng.dirichlet(np.full(classes, 0.5), size=n),
        embeddings=rng.standard_normal((n, dim)).astype(np.float32),
    )


def available(inputs: SelectionInputs) -> np.ndarray:
    """Pool indices neither labelled nor excluded."""
    excluded = inputs.excluded if inputs.excluded is not None else np.zeros_like(inputs.labelled)
    return np.flatnonzero(~(inputs.labelled | excluded))


def min_distances(x: np.ndarray, rows: np.ndarray, centres: list[int]) -> np.ndarray:
    """float64 distance of each row to its nearest centre, by direct differences."""
    x = x.astype(np.float64)
    return np.sqrt(((x[rows, None, :] - x[None, centres, :]) ** 2).sum(axis=2)).min(axis=1)


def brute_force_coral(inputs: SelectionInputs, budget: int, seed: int, w: float, score: str = "margin") -> list[int]:
    """The greedy argmax of (1 − w)·u + w·d/d_max, recomputed from scratch at every step (w = 1: k-center)."""
    pool = available(inputs)
    scores = uncertainty_scores(inputs.probabilities[pool], score) if inputs.probabilities is not None else np.zeros(pool.size)
    u = dict(zip(pool.tolist(), scores))
    centres = np.flatnonzero(inputs.labelled).tolist()
    picks: list[int] = []
    if not centres:
        if w == 1:
            first = int(pool[np.random.default_rng(seed).integers(pool.size)])
        else:
            first = int(pool[np.argmax([u[i] for i in pool])])
        picks.append(first)
        centres.append(first)
    assert inputs.embeddings is not None
    while len(picks) < min(budget, pool.size):
        rest = np.array([i for i in pool if i not in picks])
        d = min_distances(inputs.embeddings, rest, centres)
        objective = (1 - w) * np.array([u[i] for i in rest]) + w * d / d.max()
        picks.append(int(rest[np.argmax(objective)]))
        centres.append(picks[-1])
    return picks


# ---------------------------------------------------------------- scores


def test_scores_match_lightly_definitions() -> None:
    p = np.array([[0.4, 0.3, 0.2, 0.1]])
    assert least_confidence(p)[0] == pytest.approx(0.800, abs=5e-4)
    assert margin(p)[0] == pytest.approx(0.900, abs=5e-4)
    assert entropy(p)[0] == pytest.approx(0.923, abs=5e-4)
    assert least_confidence(p)[0] == pytest.approx(0.6 * 4 / 3)
    assert entropy(p)[0] == pytest.approx(-(p * np.log2(p)).sum() / 2)


def test_scores_are_one_for_uniform_and_zero_for_certain_predictions() -> None:
    p = np.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    for name, function in SCORE_FUNCTIONS.items():
        np.testing.assert_allclose(function(p), [1.0, 0.0, 0.0], atol=1e-12, err_msg=name)
        np.testing.assert_array_equal(uncertainty_scores(p, name), function(p))


@pytest.mark.parametrize(
    ("probabilities", "message"),
    [
        (np.array([0.5, 0.5]), "2-D"),
        (np.array([[1.0], [1.0]]), "at least 2 classes"),
        (np.array([[0.5, np.nan], [0.5, 0.5]]), "NaN"),
        (np.array([[0.5, 0.4], [0.5, 0.5]]), "sum to 1"),
        (np.array([[1.2, -0.2]]), "negative"),
    ],
)
def test_bad_probabilities_are_a_one_line_data_error(probabilities: np.ndarray, message: str) -> None:
    with pytest.raises(DataError, match=message) as error:
        margin(probabilities)
    assert "\n" not in str(error.value)


def test_unknown_score_name_suggests_the_closest() -> None:
    with pytest.raises(UserError, match="did you mean 'entropy'"):
        uncertainty_scores(np.array([[0.5, 0.5]]), "entropi")


# ---------------------------------------------------------------- invariants of every strategy


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_respects_the_rules(strategy: str) -> None:
    inputs = make_pool()
    pool = set(available(inputs).tolist())
    selection = select(strategy, inputs, budget=25, seed=3)
    picks = selection.indices
    assert selection.strategy == strategy and picks.dtype == np.int64
    assert picks.size == 25 and np.unique(picks).size == 25
    assert set(picks.tolist()) <= pool  # never labelled, never excluded
    assert np.array_equal(select(strategy, inputs, budget=25, seed=3).indices, picks)  # deterministic
    assert all(pick.reason and "\n" not in pick.reason for pick in selection.picks)
    everything = select(strategy, inputs, budget=10_000, seed=3).indices
    assert sorted(everything.tolist()) == sorted(pool)  # fewer available than the budget: all of them
    assert select(strategy, inputs, budget=0, seed=3).picks == ()


def test_random_depends_on_the_seed_and_carries_no_scores() -> None:
    inputs = make_pool()
    first, second = select("random", inputs, 25, seed=0), select("random", inputs, 25, seed=1)
    assert not np.array_equal(first.indices, second.indices)
    assert all(pick.score is None and pick.distance is None and pick.cluster is None for pick in first.picks)


def test_nothing_available_gives_an_empty_selection() -> None:
    inputs = make_pool(n=30, n_labelled=20, n_excluded=10)
    for strategy in STRATEGIES:
        assert select(strategy, inputs, 5, seed=0).picks == ()


@pytest.mark.parametrize("score", ["least_confidence", "margin", "entropy"])
def test_top_scores_are_the_highest_scores_in_order(score: str) -> None:
    inputs = make_pool()
    assert inputs.probabilities is not None
    pool = available(inputs)
    u = uncertainty_scores(inputs.probabilities[pool], score)
    selection = select(score, inputs, 12, seed=0)
    assert np.array_equal(selection.indices, pool[np.argsort(-u, kind="stable")[:12]])
    scores = [pick.score for pick in selection.picks if pick.score is not None]
    assert len(scores) == len(selection.picks) and scores == sorted(scores, reverse=True)
    assert selection.picks[0].reason.startswith(f"{score} ") and "(rank 1 of 265)" in selection.picks[0].reason


def test_equal_scores_are_broken_by_pool_index() -> None:
    probabilities = np.tile([0.5, 0.5], (6, 1))
    inputs = SelectionInputs(labelled=np.array([False, True, False, False, False, False]), probabilities=probabilities)
    assert select_top_scores(inputs, 3, "margin").indices.tolist() == [0, 2, 3]


# ---------------------------------------------------------------- k-center


@pytest.mark.parametrize("n_labelled", [0, 1, 20])
def test_k_center_equals_the_brute_force_reference(n_labelled: int) -> None:
    inputs = make_pool(n=200, n_labelled=n_labelled, seed=n_labelled)
    expected = brute_force_coral(inputs, budget=40, seed=7, w=1.0)
    assert select_k_center(inputs, 40, seed=7).indices.tolist() == expected
    assert select_k_center(inputs, 40, seed=7, chunk_size=3).indices.tolist() == expected  # chunking changes nothing


def test_k_center_is_exact_where_float32_distances_are_not() -> None:
    # A large common offset makes |x|² + |c|² − 2x·c lose most digits in float32.
    rng = np.random.default_rng(5)
    x = (1000.0 + rng.standard_normal((150, 16))).astype(np.float32)
    labelled = np.zeros(150, dtype=bool)
    labelled[:10] = True
    inputs = SelectionInputs(labelled=labelled, embeddings=x)
    assert select_k_center(inputs, 30, seed=0).indices.tolist() == brute_force_coral(inputs, 30, seed=0, w=1.0)


def test_k_center_covering_radius_never_increases() -> None:
    inputs = make_pool(n=250, dim=4, n_labelled=5)
    assert inputs.embeddings is not None
    selection = select_k_center(inputs, 60, seed=0)
    pool, centres = available(inputs), np.flatnonzero(inputs.labelled).tolist()
    radii = []
    for pick in selection.picks:
        rest = np.setdiff1d(pool, centres)
        radii.append(min_distances(inputs.embeddings, rest, centres).max())  # before this pick
        centres.append(pick.index)
    distances = np.array([pick.distance for pick in selection.picks])
    np.testing.assert_allclose(distances, radii, rtol=1e-6)
    assert np.all(np.diff(radii) <= 0)
    assert np.all(np.diff(distances) <= 0)
    assert selection.picks[0].reason.startswith("farthest from the labelled set: distance ")


def test_k_center_without_labels_starts_from_a_seeded_random_item() -> None:
    inputs = make_pool(n_labelled=0)
    first = select_k_center(inputs, 5, seed=11).picks[0]
    assert first.index == available(inputs)[np.random.default_rng(11).integers(available(inputs).size)]
    assert first.distance is None and "random start" in first.reason
    assert select_k_center(inputs, 5, seed=12).picks[0].index != first.index


def test_k_center_never_picks_a_duplicate_of_a_labelled_item_first() -> None:
    x = np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [1.0, 0.0]], dtype=np.float32)
    inputs = SelectionInputs(labelled=np.array([True, False, False, False]), embeddings=x)
    picks = select_k_center(inputs, 3, seed=0).picks
    assert [p.index for p in picks] == [2, 3, 1]
    assert [p.distance for p in picks] == pytest.approx([5.0, 1.0, 0.0])


# ---------------------------------------------------------------- coral


@pytest.mark.parametrize("n_labelled", [0, 20])
def test_coral_reduces_to_top_k_and_to_k_center(n_labelled: int) -> None:
    inputs = make_pool(n_labelled=n_labelled)
    top = select_top_scores(inputs, 30, "margin").indices
    assert np.array_equal(select_coral(inputs, 30, seed=2, diversity_weight=0.0).indices, top)
    centre = select_k_center(inputs, 30, seed=2).indices
    assert np.array_equal(select_coral(inputs, 30, seed=2, diversity_weight=1.0).indices, centre)


@pytest.mark.parametrize(("w", "score"), [(0.3, "margin"), (0.5, "entropy"), (0.8, "least_confidence")])
def test_coral_equals_the_brute_force_formula(w: float, score: str) -> None:
    inputs = make_pool(n=200)
    selection = select("coral", inputs, 30, seed=0, diversity_weight=w, score=score)
    assert selection.indices.tolist() == brute_force_coral(inputs, 30, seed=0, w=w, score=score)
    assert all(pick.score is not None and pick.distance is not None for pick in selection.picks)
    assert f"(diversity weight {w:g})" in selection.picks[0].reason


# ---------------------------------------------------------------- informative & diverse


def test_cluster_quotas_are_proportional_and_sum_to_the_budget() -> None:
    assert cluster_quotas(np.array([50, 30, 20]), 10).tolist() == [5, 3, 2]
    assert cluster_quotas(np.array([1, 1, 98]), 10).tolist() == [0, 0, 10]
    assert cluster_quotas(np.array([5, 5]), 3).tolist() == [2, 1]  # equal remainders: lower cluster id first
    assert cluster_quotas(np.array([3, 0, 2]), 50).tolist() == [3, 0, 2]  # capped by size
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 40, size=rng.integers(1, 12))
        budget = int(rng.integers(0, 200))
        quotas = cluster_quotas(sizes, budget)
        assert quotas.sum() == min(budget, sizes.sum()) and np.all(quotas <= sizes) and np.all(quotas >= 0)
        if 0 < budget <= sizes.sum():
            assert np.all(np.abs(quotas - budget * sizes / sizes.sum()) < 1)


def test_informative_diverse_takes_the_highest_margins_of_each_cluster() -> None:
    rng = np.random.default_rng(1)
    sizes = [60, 30, 10]
    blob = np.repeat(np.arange(3), sizes)
    x = (np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])[blob] + rng.standard_normal((100, 2))).astype(np.float32)
    probabilities = rng.dirichlet([1.0, 1.0, 1.0], size=100)
    inputs = SelectionInputs(labelled=np.zeros(100, dtype=bool), probabilities=probabilities, embeddings=x)
    selection = select_informative_diverse(inputs, 10, seed=0, n_clusters=3)
    u = margin(probabilities)
    for b, quota in zip(range(3), [6, 3, 1]):
        chosen = [p for p in selection.picks if blob[p.index] == b]
        members = np.flatnonzero(blob == b)
        assert sorted(p.index for p in chosen) == sorted(members[np.argsort(-u[members], kind="stable")[:quota]].tolist())
        assert len({p.cluster for p in chosen}) == 1 and all(p.score == pytest.approx(u[p.index]) for p in chosen)
    assert [blob[p.index] for p in selection.picks[:3]] != [0, 0, 0]  # round-robin: each cluster's best first
    assert "quota" in selection.picks[0].reason


def test_informative_diverse_defaults_to_one_cluster_per_class() -> None:
    inputs = make_pool(classes=4)
    clusters = {pick.cluster for pick in select("informative_diverse", inputs, 40, seed=0).picks}
    assert clusters <= {0, 1, 2, 3} and len(clusters) > 1


def test_informative_diverse_is_deterministic_for_a_seed() -> None:
    """scikit-learn's KMeans is seeded by the strategy's seed: the same seed gives the same picks and clusters."""
    inputs = make_pool(n=400, classes=6)
    first = select("informative_diverse", inputs, 30, seed=3)
    again = select("informative_diverse", inputs, 30, seed=3)
    assert first == again
    assert {pick.cluster for pick in first.picks} <= set(range(6))


# ---------------------------------------------------------------- errors


def one_line_error(function, match: str) -> str:
    """Call ``function``, expecting a ``UserError`` matching ``match`` on one line."""
    with pytest.raises(UserError, match=match) as error:
        function()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_errors_are_one_line_user_errors() -> None:
    inputs = make_pool()
    assert inputs.embeddings is not None and inputs.probabilities is not None
    bare = SelectionInputs(labelled=inputs.labelled)
    one_line_error(lambda: select("kcenter", inputs, 5, 0), "did you mean 'k_center'")
    one_line_error(lambda: select("k_center", inputs, 5, 0, chunksize=10), "did you mean 'chunk_size'")
    one_line_error(lambda: select("margin", inputs, 5, 0, chunk_size=10), "unknown option")
    one_line_error(lambda: select("k_center", bare, 5, 0), "needs embeddings")
    no_probabilities = SelectionInputs(inputs.labelled, embeddings=inputs.embeddings)
    one_line_error(lambda: select("coral", no_probabilities, 5, 0), "needs predicted probabilities")
    one_line_error(lambda: select("margin", bare, 5, 0), "needs predicted probabilities")
    one_line_error(lambda: select("random", SelectionInputs(labelled=np.array([0, 3])), 5, 0), "boolean mask")
    one_line_error(lambda: select("random", SelectionInputs(inputs.labelled, excluded=np.zeros(3, bool)), 5, 0), "boolean mask")
    one_line_error(lambda: select("random", inputs, -1, 0), "budget")
    one_line_error(lambda: select("coral", inputs, 5, 0, diversity_weight=1.5), "diversity_weight")
    one_line_error(lambda: select("coral", inputs, 5, 0, score="margins"), "did you mean 'margin'")
    one_line_error(lambda: select("informative_diverse", inputs, 5, 0, n_clusters=0), "n_clusters")
    nan_embeddings = inputs.embeddings.copy()
    nan_embeddings[available(inputs)[0], 1] = np.nan
    one_line_error(lambda: select("k_center", SelectionInputs(inputs.labelled, embeddings=nan_embeddings), 5, 0), "NaN")
    with pytest.raises(DataError, match="sum to 1"):
        select("margin", SelectionInputs(inputs.labelled, probabilities=inputs.probabilities * 2), 5, 0)
