"""Location-disjoint split search: the score against a naive loop, the searches' invariants,
--match-test, user-supplied splits files, the report, a run on the real MCT data, and
splits held out in time (unit rules, then the entry point on MCT's real datetimes)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from classification.data import _split_scoring as scoring
from classification.data.crop_manifest import crop_file_name
from classification.data.split_report import build_split_report, format_split_report
from classification.data.split_search import improve_locally, random_search, score_assignments, smallest_first
from classification.data.splits import (
    SPLIT_NAMES,
    TEST,
    TRAIN,
    UNPINNED,
    VAL,
    SplitProblem,
    SplitResult,
    assignment_from_splits,
    open_splits,
    pin_test_locations,
    splits_to_json,
    target_fractions,
)
from classification.data.time_splits import (
    TimeRule,
    parse_datetimes,
    parse_duration,
    parse_period,
    read_datetimes,
    time_split_of_crops,
)
from classification.errors import DataError, UserError
from tests.helpers.processes import run_in_process

FRACTIONS = np.array([0.7, 0.2, 0.1])


def make_problem(n_locations: int, n_labels: int, seed: int) -> SplitProblem:
    """A random skewed problem: few labels per location, every label present somewhere."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(0.4, 15.0, size=(n_locations, n_labels)))
    counts[rng.integers(0, n_locations, size=n_labels), np.arange(n_labels)] += 1
    locations = [(f"ds{i % 2}", f"loc{i:04d}") for i in range(n_locations)]
    return SplitProblem(sorted(locations), [f"label{j:03d}" for j in range(n_labels)], counts)


def naive_score(problem: SplitProblem, assignment: np.ndarray, fractions: np.ndarray) -> float:
    """GUIDE §3's score for one candidate, written the slow and obvious way."""
    counts = problem.counts
    n_y = counts.sum(axis=0)
    k_y = (counts > 0).sum(axis=0)
    prior = n_y / n_y.sum()
    empty_penalty = 1 + sum(p * p for p in prior) - 2 * min(prior)
    score = 0.0
    for s in range(3):
        f_s = fractions[s]
        rows = [k for k in range(problem.n_locations) if assignment[k] == s]
        n_sy = [sum(counts[k, y] for k in rows) for y in range(problem.n_labels)]
        k_sy = [sum(1 for k in rows if counts[k, y] > 0) for y in range(problem.n_labels)]
        score += 2 * sum((n_sy[y] / n_y[y] - f_s) ** 2 for y in range(problem.n_labels))
        score += sum((k_sy[y] / k_y[y] - f_s) ** 2 for y in range(problem.n_labels))
        if s in (VAL, TEST) and f_s > 0:
            n_s = sum(n_sy)
            if n_s == 0:
                score += 2 * empty_penalty
            else:
                score += 2 * sum((n_sy[y] / n_s - prior[y]) ** 2 for y in range(problem.n_labels))
    return score


def assert_partition(problem: SplitProblem, assignment: np.ndarray) -> None:
    """Every location in exactly one split, as splits.json shows it."""
    assert assignment.shape == (problem.n_locations,)
    assert set(np.unique(assignment)) <= {TRAIN, VAL, TEST}
    splits = splits_to_json(problem, assignment)
    keys = [tuple(entry) for name in SPLIT_NAMES for entry in splits[name]]
    assert len(keys) == len(set(keys)) == problem.n_locations
    assert set(keys) == set(problem.locations)


@pytest.mark.parametrize(("n_locations", "n_labels", "seed"), [(12, 3, 0), (30, 7, 1), (25, 1, 2), (8, 5, 3)])
def test_score_matches_a_naive_loop(n_locations: int, n_labels: int, seed: int) -> None:
    problem = make_problem(n_locations, n_labels, seed)
    rng = np.random.default_rng(seed)
    candidates = rng.integers(0, 3, size=(40, n_locations))
    candidates[0] = TRAIN  # val and test empty
    candidates[1, :] = VAL  # train and test empty
    for fractions in (FRACTIONS, np.array([0.8, 0.2, 0.0])):
        fast = score_assignments(problem, candidates, fractions, chunk_size=7)
        slow = [naive_score(problem, c, fractions) for c in candidates]
        assert np.isfinite(fast).all()
        np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12)


def test_an_empty_held_out_split_scores_worse_than_any_non_empty_one() -> None:
    problem = make_problem(10, 4, 5)
    all_train = np.zeros((1, 10), dtype=np.int8)
    one_in_val = all_train.copy()
    one_in_val[0, int(np.argmax(problem.counts.sum(axis=1)))] = VAL
    scores = score_assignments(problem, np.vstack([all_train, one_in_val]), FRACTIONS)
    assert np.isfinite(scores).all() and scores[0] > scores[1]


def test_the_ideal_split_scores_zero_and_the_search_finds_it() -> None:
    counts = np.tile([[5, 3, 1]], (10, 1))  # ten identical locations: 6/2/2 locations is perfect
    problem = SplitProblem([("d", f"{i}") for i in range(10)], ["a", "b", "c"], counts)
    fractions = np.array([0.6, 0.2, 0.2])
    ideal = np.array([[0] * 6 + [1] * 2 + [2] * 2])
    skewed = np.array([[0] * 8 + [1] + [2]])
    ideal_score, skewed_score = score_assignments(problem, np.vstack([ideal, skewed]), fractions)
    assert ideal_score < 1e-20 < skewed_score
    assert random_search(problem, fractions, n_candidates=500).score < 1e-20


def test_same_seed_same_split_and_chunking_does_not_matter() -> None:
    problem = make_problem(60, 8, 7)
    first = random_search(problem, FRACTIONS, n_candidates=3000, seed=11)
    again = random_search(problem, FRACTIONS, n_candidates=3000, seed=11, chunk_size=257)
    assert np.array_equal(first.assignment, again.assignment) and first.score == again.score
    others = [random_search(problem, FRACTIONS, n_candidates=3000, seed=s).assignment for s in (1, 2, 3)]
    assert any(not np.array_equal(first.assignment, other) for other in others)


def test_random_search_partitions_and_beats_its_own_candidates() -> None:
    problem = make_problem(80, 10, 8)
    result = random_search(problem, FRACTIONS, n_candidates=2000, seed=0)
    assert_partition(problem, result.assignment)
    assert result.assignment.dtype == np.int8
    assert result.candidates == 2000 and result.method == "random"
    assert result.score == pytest.approx(naive_score(problem, result.assignment, FRACTIONS), rel=1e-12)
    assert result.score < random_search(problem, FRACTIONS, n_candidates=1, seed=0).score
    sizes = np.bincount(result.assignment, minlength=3) / problem.n_locations
    assert np.all(np.abs(sizes - FRACTIONS) < 0.1)


def test_improve_locally_never_raises_the_score_and_is_deterministic() -> None:
    problem = make_problem(50, 6, 9)
    rng = np.random.default_rng(0)
    for _ in range(5):
        start_assignment = rng.integers(0, 3, size=problem.n_locations).astype(np.int8)
        start_score = float(score_assignments(problem, start_assignment[None], FRACTIONS)[0])
        start = SplitResult(start_assignment, start_score, "given", 1, 0)
        better = improve_locally(problem, start, FRACTIONS)
        assert better.score <= start.score and better.improved_moves > 0
        assert better.score == pytest.approx(naive_score(problem, better.assignment, FRACTIONS), rel=1e-12)
        assert np.array_equal(better.assignment, improve_locally(problem, start, FRACTIONS).assignment)
        assert_partition(problem, better.assignment)
    searched = random_search(problem, FRACTIONS, n_candidates=1000)
    assert improve_locally(problem, searched, FRACTIONS).score <= searched.score
    local = improve_locally(problem, searched, FRACTIONS)
    assert improve_locally(problem, local, FRACTIONS).score == pytest.approx(local.score, abs=1e-12)


def test_improve_locally_leaves_pinned_locations_alone() -> None:
    problem = make_problem(40, 5, 10)
    fixed = np.full(problem.n_locations, UNPINNED, dtype=np.int8)
    fixed[:4] = TEST
    result = random_search(problem, FRACTIONS, n_candidates=500, fixed=fixed)
    better = improve_locally(problem, result, FRACTIONS, fixed=fixed)
    assert better.score <= result.score
    assert np.array_equal(np.flatnonzero(better.assignment == TEST), np.arange(4))
    with pytest.raises(ValueError, match="pinned"):
        moved = result.assignment.copy()
        moved[0] = TRAIN
        improve_locally(problem, SplitResult(moved, 0.0, "given", 1, 0), FRACTIONS, fixed=fixed)


def test_match_test_reuses_the_test_set_without_leaking_or_growing_it() -> None:
    problem = make_problem(60, 8, 12)
    old_test = [list(problem.locations[i]) for i in (3, 17, 29, 41)] + [["elsewhere", "gone"]]
    fixed = pin_test_locations(problem, old_test)
    pinned = np.flatnonzero(fixed == TEST)
    assert list(pinned) == [3, 17, 29, 41]
    assert open_splits(fixed, FRACTIONS) == (TRAIN, VAL)
    searched = random_search(problem, FRACTIONS, n_candidates=2000, seed=3, fixed=fixed)
    for result in (searched, improve_locally(problem, searched, FRACTIONS, fixed=fixed), smallest_first(problem, FRACTIONS, fixed=fixed)):
        assert_partition(problem, result.assignment)
        assert np.array_equal(np.flatnonzero(result.assignment == TEST), pinned)
    free_share = np.bincount(searched.assignment[fixed == UNPINNED], minlength=3) / (fixed == UNPINNED).sum()
    assert free_share[VAL] == pytest.approx(0.2 / 0.9, abs=0.06)  # train/val renormalised over the free locations


def test_smallest_first_fills_test_then_val_from_the_rarest_label() -> None:
    #            rare  common
    counts = [[4, 10], [3, 10], [2, 10], [1, 10], [0, 10], [0, 10], [0, 10], [0, 10], [0, 10], [0, 10]]
    problem = SplitProblem([("d", f"{i}") for i in range(10)], ["common", "rare"], np.array(counts)[:, ::-1])
    result = smallest_first(problem, FRACTIONS)
    # rare (10 crops): its biggest location (4) goes to test (target 1), the next (3) to val (target 2),
    # the rest to train; then common (100 crops): test already holds 10 = 10%, val 10 < 20 so one more.
    assert list(result.assignment[:4]) == [TEST, VAL, TRAIN, TRAIN]
    assert list(result.assignment[4:]) == [VAL] + [TRAIN] * 5
    assert result.method == "smallest_first" and result.candidates == 1
    assert result.score == pytest.approx(naive_score(problem, result.assignment, FRACTIONS), rel=1e-12)


def test_smallest_first_covers_every_location_and_every_held_out_split() -> None:
    problem = make_problem(120, 15, 13)
    result = smallest_first(problem, FRACTIONS)
    assert_partition(problem, result.assignment)
    report = build_split_report(problem, result.assignment, FRACTIONS)
    for label, row in report["classes"].items():
        if row["n_locations"] >= 3:
            assert row["val"]["n_crops"] > 0 and row["test"]["n_crops"] > 0, label


def test_from_frame_keeps_numeric_looking_locations_as_distinct_strings() -> None:
    frame = pd.DataFrame(
        {
            "dataset": ["ds", "ds", "ds", "ds", "other"],
            "location": ["001", "1", "1", 1, "1"],
            "label": ["fox", "fox", "deer", "deer", "fox"],
        },
        dtype=object,
    )
    problem = SplitProblem.from_frame(frame)
    assert problem.locations == [("ds", "001"), ("ds", "1"), ("other", "1")]
    assert problem.labels == ["deer", "fox"]
    assert problem.counts.tolist() == [[0, 1], [2, 1], [0, 1]]
    assert problem.counts.dtype == np.int64
    result = random_search(problem, target_fractions(0.3, 0.3), n_candidates=50)
    assert ["ds", "001"] in sum(splits_to_json(problem, result.assignment).values(), [])


@pytest.mark.parametrize("missing", [None, float("nan"), pd.NA, "", "  "])
def test_from_frame_rejects_a_missing_location(missing: object) -> None:
    frame = pd.DataFrame({"dataset": ["ds", "ds"], "location": ["a", missing], "label": ["fox", "fox"]})
    with pytest.raises(DataError, match="location"):
        SplitProblem.from_frame(frame)


def test_from_frame_rejects_float_locations_and_missing_columns() -> None:
    with pytest.raises(DataError, match="dtype=str"):
        SplitProblem.from_frame(pd.DataFrame({"dataset": ["ds"], "location": [1.0], "label": ["fox"]}))
    with pytest.raises(DataError, match="label"):
        SplitProblem.from_frame(pd.DataFrame({"dataset": ["ds"], "location": ["a"]}))


def test_target_fractions_name_the_bad_flag() -> None:
    assert target_fractions(0.2, 0.1).tolist() == pytest.approx([0.7, 0.2, 0.1])
    with pytest.raises(UserError, match="--val-frac"):
        target_fractions(-0.1, 0.1)
    with pytest.raises(UserError, match="--test-frac"):
        target_fractions(0.1, float("nan"))
    with pytest.raises(UserError, match="--val-frac \\+ --test-frac"):
        target_fractions(0.6, 0.4)


def test_assignment_from_splits_round_trips_and_rejects_bad_files(caplog: pytest.LogCaptureFixture) -> None:
    problem = make_problem(20, 4, 14)
    assignment = random_search(problem, FRACTIONS, n_candidates=100).assignment
    splits = json.loads(json.dumps(splits_to_json(problem, assignment)))
    assert np.array_equal(assignment_from_splits(problem, splits, "splits.json"), assignment)

    with caplog.at_level(logging.WARNING):
        extra = {**splits, "test": splits["test"] + [["elsewhere", "x"]]}
        assert np.array_equal(assignment_from_splits(problem, extra, "splits.json"), assignment)
    assert "not in the data" in caplog.text

    moved = splits["train"][0]
    twice = {**splits, "val": splits["val"] + [moved]}
    with pytest.raises(DataError, match=rf"splits.json: location \['{moved[0]}', '{moved[1]}'\] is in both train and val"):
        assignment_from_splits(problem, twice, "splits.json")

    missing = {**splits, "train": splits["train"][7:]}
    with pytest.raises(DataError, match=r"splits.json: 7 location\(s\) .* in no split: .* and 2 more"):
        assignment_from_splits(problem, missing, "splits.json")

    with pytest.raises(DataError, match="keys must be train, val, test"):
        assignment_from_splits(problem, {"train": [], "validation": []}, "splits.json")
    with pytest.raises(DataError, match=r"splits.json: test\[0\]: expected a \[dataset, location\] pair"):
        assignment_from_splits(problem, {**splits, "test": [["ds0", 12]]}, "splits.json")


def test_report_warns_about_a_class_missing_from_val() -> None:
    counts = np.array([[5, 1], [5, 0], [5, 0], [5, 0], [5, 0]])
    problem = SplitProblem([("d", str(i)) for i in range(5)], ["common", "rare"], counts)
    assignment = np.array([TRAIN, VAL, TEST, TRAIN, TRAIN])
    report = build_split_report(problem, assignment, target_fractions(0.2, 0.2), dropped_labels={"unicorn": 1})
    assert "class 'rare' is absent from val and test" in report["warnings"]
    assert any("unicorn" in warning for warning in report["warnings"])
    assert report["splits"]["val"] == {"n_locations": 1, "n_crops": 5, "fraction": pytest.approx(5 / 26, abs=1e-4), "target": 0.2}
    assert report["classes"]["rare"]["train"]["fraction"] == 1.0
    assert report["score"] == pytest.approx(naive_score(problem, assignment, target_fractions(0.2, 0.2)), abs=1e-6)
    json.dumps(report)
    table = format_split_report(report)
    assert "rare" in table and "warning: class 'rare' is absent from val and test" in table

    lopsided = build_split_report(problem, np.array([TRAIN, TRAIN, TRAIN, TRAIN, VAL]), target_fractions(0.2, 0.2))
    assert "test is empty (target 0.20)" in lopsided["warnings"]
    assert any(w.startswith("train holds") for w in lopsided["warnings"])


def mct_frame(cct_path) -> pd.DataFrame:
    """One row per box of the MCT CCT: a sequence without a location becomes its own group."""
    cct = json.loads(cct_path.read_text())
    images = {image["id"]: image for image in cct["images"]}
    names = {category["id"]: category["name"] for category in cct["categories"]}
    rows = []
    for annotation in cct["annotations"]:
        image = images[annotation["image_id"]]
        location = image.get("location")
        rows.append(("mct", location if location is not None else f"seq_{image['seq_id']}", names[annotation["category_id"]], image["seq_id"]))
    return pd.DataFrame(rows, columns=["dataset", "location", "label", "seq_id"])


def test_real_mct_splits_are_location_disjoint_and_reproducible(shared_data) -> None:
    frame = mct_frame(shared_data / "mct" / "mct_cct.json")
    problem = SplitProblem.from_frame(frame)
    assert problem.counts.sum() == len(frame)  # no crop lost, the 150 location-less images included
    fractions = target_fractions(0.2, 0.1)
    runs = [improve_locally(problem, random_search(problem, fractions, seed=0), fractions) for _ in range(2)]
    assert np.array_equal(runs[0].assignment, runs[1].assignment) and runs[0].score == runs[1].score
    assert runs[0].score <= random_search(problem, fractions, seed=0).score
    assert_partition(problem, runs[0].assignment)
    split_of = dict(zip(problem.locations, runs[0].assignment))
    frame["split"] = [split_of[key] for key in zip(frame["dataset"], frame["location"])]
    assert (frame.groupby("location")["split"].nunique() == 1).all()
    assert (frame.groupby("seq_id")["split"].nunique() == 1).all()


def test_pinning_every_split_leaves_free_locations_nowhere_to_go() -> None:
    problem = make_problem(6, 2, 15)
    fixed = np.array([TRAIN, VAL, TEST, UNPINNED, UNPINNED, UNPINNED], dtype=np.int8)
    with pytest.raises(UserError, match="nowhere to go"):
        random_search(problem, FRACTIONS, n_candidates=10, fixed=fixed)
    everything = np.array([TRAIN, VAL, TEST, TRAIN, TRAIN, VAL], dtype=np.int8)
    result = random_search(problem, FRACTIONS, n_candidates=10, fixed=everything)
    assert np.array_equal(result.assignment, everything) and result.candidates == 1


@pytest.mark.parametrize(("n_locations", "n_labels", "seed"), [(30, 7, 1), (25, 1, 2), (40, 12, 3)])
def test_move_deltas_equal_a_rescore(n_locations: int, n_labels: int, seed: int) -> None:
    problem = make_problem(n_locations, n_labels, seed)
    rng = np.random.default_rng(seed)
    for fractions in (FRACTIONS, np.array([0.8, 0.2, 0.0])):
        assignment = rng.integers(0, 3 if fractions[TEST] else 2, size=n_locations).astype(np.int8)
        assignment[: n_locations // 3] = VAL  # one big val, and a location alone in its split below
        assignment[-1] = TEST if fractions[TEST] else TRAIN
        terms = scoring.ScoreTerms(problem, fractions)
        scorer = scoring.MoveScorer(scoring.SparseCounts(problem, terms), assignment)
        before = naive_score(problem, assignment, fractions)
        for target in (TRAIN, VAL, TEST):
            deltas = scorer.move_deltas(target)
            for k in range(n_locations):
                if assignment[k] == target:
                    assert deltas[k] == np.inf
                    continue
                moved = assignment.copy()
                moved[k] = target
                assert deltas[k] == pytest.approx(naive_score(problem, moved, fractions) - before, abs=1e-9)


@pytest.mark.parametrize("fractions", [FRACTIONS, np.array([0.8, 0.2, 0.0])])
def test_swap_changes_equal_a_rescore(fractions: np.ndarray) -> None:
    problem = make_problem(30, 6, 4)
    assignment = np.random.default_rng(4).integers(0, 2, size=30).astype(np.int8)
    assignment[:3] = TEST if fractions[TEST] else VAL
    terms = scoring.ScoreTerms(problem, fractions)
    scorer = scoring.MoveScorer(scoring.SparseCounts(problem, terms), assignment)
    deltas = {t: scorer.move_deltas(t) for t in (TRAIN, VAL, TEST)}
    before = naive_score(problem, assignment, fractions)
    for first, second in ((TRAIN, VAL), (TRAIN, TEST), (VAL, TEST)):
        left, right = np.flatnonzero(assignment == first), np.flatnonzero(assignment == second)
        change = scoring.swap_changes(problem, scorer, (first, left, deltas[second]), (second, right, deltas[first]))
        for a, k in enumerate(left):
            for b, j in enumerate(right):
                swapped = assignment.copy()
                swapped[k], swapped[j] = second, first
                assert change[a, b] == pytest.approx(naive_score(problem, swapped, fractions) - before, abs=1e-9)


def test_improve_locally_at_a_few_thousand_locations_beats_the_search() -> None:
    problem = make_problem(3000, 60, 21)
    searched = random_search(problem, FRACTIONS, n_candidates=500, seed=0)
    improved = improve_locally(problem, searched, FRACTIONS)
    assert improved.score < searched.score and improved.improved_moves > 0
    assert improved.score == pytest.approx(score_assignments(problem, improved.assignment[None], FRACTIONS)[0], rel=1e-12)
    assert_partition(problem, improved.assignment)


def test_durations_and_periods_parse_or_name_the_flag() -> None:
    assert parse_duration("3M", "--test-last") == pd.DateOffset(months=3)
    assert parse_duration("90d", "--test-last") == pd.DateOffset(days=90)
    assert parse_period("2011", "--test-period") == (pd.Timestamp("2011-01-01"), pd.Timestamp("2012-01-01"))
    assert parse_period("2011-06..2011-08", "--test-period") == (pd.Timestamp("2011-06-01"), pd.Timestamp("2011-09-01"))
    assert parse_period("2011-06-01..2011-06-30", "--p")[1] == pd.Timestamp("2011-07-01")
    for bad in ("3", "0M", "3 months", "M3"):
        with pytest.raises(UserError, match="--test-last"):
            parse_duration(bad, "--test-last")
    for bad in ("June", "2011-13", "2011-08..2011-06", "11-06"):
        with pytest.raises(UserError, match="--val-period"):
            parse_period(bad, "--val-period")


def timed_frame() -> pd.DataFrame:
    """Two locations: a 3-second sequence, then one image a day for ten days; one crop without a datetime."""
    rows = []
    for location in ("a", "b"):
        for frame in range(3):
            rows.append((location, "seq0", f"2011-01-01 00:00:0{frame}"))
        for day in range(1, 11):
            rows.append((location, "", f"2011-01-{day + 1:02d} 12:00:00"))
    rows.append(("a", "seq0", ""))  # takes its sequence's time
    rows.append(("b", "", ""))  # no time at all
    frame = pd.DataFrame(rows, columns=["location", "seq_id", "datetime"])
    return frame.assign(dataset="ds", label="fox")


def test_time_rules_cut_each_location_between_moments() -> None:
    frame = timed_frame()
    split, times, counts = time_split_of_crops(frame, TimeRule(test_frac=0.2, val_frac=0.2))
    assert counts == {"with_datetime": 26, "filled_from_sequence": 1, "without_datetime": 1, "without_datetime_dropped": 1}
    assert split[-1] == -1 and split[-2] == TRAIN  # dropped; the sequence's frame follows its sequence
    for location in ("a", "b"):
        rows = (frame["location"] == location).to_numpy() & (split >= 0)
        by_split = {s: times[rows & (split == s)] for s in (TRAIN, VAL, TEST)}
        assert by_split[TRAIN].max() < by_split[VAL].min() and by_split[VAL].max() < by_split[TEST].min()
        assert len(by_split[TEST]) == 3  # the last 3 of 13 or 14 crops (middle crop rule)
    last = time_split_of_crops(frame, TimeRule(test_last="3D", val_last="2D", missing="train"))[0]
    assert list(last[3:13]) == [TRAIN] * 5 + [VAL] * 2 + [TEST] * 3 and last[-1] == TRAIN
    period = time_split_of_crops(frame, TimeRule(test_period="2011-01-05..2011-01-06", val_period="2011-01-01"))[0]
    assert list(period[:13]) == [VAL] * 3 + [TRAIN] * 3 + [TEST] * 2 + [TRAIN] * 5
    with pytest.raises(UserError, match="--test-last and --test-period"):
        time_split_of_crops(frame, TimeRule(test_last="1M", test_period="2011"))


def mct_crops(root: Path, shared: Path) -> Path:
    """Placeholder files for every boxed annotation of the real MCT CCT (splits never read pixels)."""
    cct = json.loads((shared / "mct" / "mct_cct.json").read_text())
    images = {image["id"]: image for image in cct["images"]}
    for annotation in cct["annotations"]:
        if annotation.get("bbox") is not None:
            path = root / "crops" / crop_file_name(images[annotation["image_id"]]["file_name"], str(annotation["id"]))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    return root / "crops"


def split_crops_of(out: Path) -> pd.DataFrame:
    """classification_cct.json's crops with their split (from splits.json), location and parsed time."""
    cct = json.loads((out / "classification_cct.json").read_text())
    splits = json.loads((out / "splits.json").read_text())
    split_of = {tuple(key): name for name, keys in splits.items() for key in keys}
    frame = pd.DataFrame([(image["location"], image.get("datetime"), split_of[(image["dataset"], image["location"])])
                          for image in cct["images"]], columns=["unit", "datetime", "split"])
    frame["location"] = frame["unit"].str.rsplit("@", n=1).str[0]
    frame["time"] = pd.to_datetime(frame["datetime"])
    return frame


@pytest.mark.parametrize("flags", [(), ("--test-last", "1D", "--val-last", "1D")])
def test_mct_time_held_out_splits_never_overlap_in_time(shared_data: Path, tmp_path: Path, flags: tuple) -> None:
    crops = mct_crops(tmp_path, shared_data)
    out = tmp_path / "ds"
    result = run_in_process("utils/create_classification_dataset.py", out, "--mode", "csv", "cct", "splits",
                            "--crops-dir", crops, "--cct-json", shared_data / "mct" / "mct_cct.json",
                            "--split-by", "time", *flags)
    assert result.returncode == 0, result.stderr
    frame = split_crops_of(out)
    report = json.loads((out / "split_report.json").read_text())
    assert report["split_by"] == "time" and report["method"] == "time"
    assert report["time"]["datetimes"]["without_datetime"] + len(frame) == 1108  # none silently lost
    spans = {name: frame[frame["split"] == name].groupby("location")["time"].agg(["min", "max"]) for name in SPLIT_NAMES}
    for first, second in (("train", "val"), ("val", "test"), ("train", "test")):
        shared = spans[first].index.intersection(spans[second].index)
        assert len(shared) or (bool(flags) and "val" in (first, second)), (first, second)  # sparse days: val may miss
        assert (spans[first].loc[shared, "max"] < spans[second].loc[shared, "min"]).all()  # no overlap, in order
        apart = report["time"]["apart"][f"{first}/{second}"]
        assert apart["locations_in_both"] == len(shared) and apart.get("locations_overlapping", 0) == 0
        assert not len(shared) or apart["min_gap_days"] > 0
    assert not any("overlap" in warning for warning in report["warnings"])
    whole_tests = report["time"]["whole_locations"]["test"]  # MCT: most locations are one sequence
    assert (whole_tests > 0) == bool(flags) and (f"{whole_tests} location(s) entirely in test" in str(report["warnings"])) == bool(flags)


def test_mct_location_time_holds_out_both(shared_data: Path, tmp_path: Path) -> None:
    crops = mct_crops(tmp_path, shared_data)
    out = tmp_path / "ds"
    result = run_in_process("utils/create_classification_dataset.py", out, "--mode", "csv", "splits",
                            "--crops-dir", crops, "--cct-json", shared_data / "mct" / "mct_cct.json",
                            "--split-by", "location-time", "--val-frac", "0.3", "--test-frac", "0.3",
                            "--candidates", "500", "--missing-datetimes", "train")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "split_report.json").read_text())
    counts = report["time"]["datetimes"]
    assert counts["outside_both_splits_dropped"] > 0 and counts["without_datetime_in_train"] >= 0
    assert all(row["locations_in_both"] == 0 for row in report["time"]["apart"].values())
    table = pd.read_csv(out / "classification_ds.csv", dtype=str)
    assert len(table) == 1108 - counts["outside_both_splits_dropped"]
    assert not table["location"].str.contains("@").any()


def test_time_flags_without_split_by_time_are_refused(tmp_path: Path) -> None:
    result = run_in_process("utils/create_classification_dataset.py", tmp_path / "ds", "--test-last", "3M")
    assert result.returncode != 0 and "--test-last needs --split-by time" in result.stderr
    result = run_in_process("utils/create_classification_dataset.py", tmp_path / "ds", "--mode", "splits",
                            "--split-by", "time")
    assert result.returncode != 0 and "needs --mode csv and splits" in result.stderr


def test_crops_without_a_datetime_are_counted_and_left_out_or_kept(tmp_path: Path) -> None:
    images, annotations = [], []
    for k in range(4):
        for day in range(6):
            image_id = f"l{k}_d{day}"
            when = "" if (k, day) == (0, 5) else f"2012:03:{day + 1:02d} 10:00:00"  # EXIF style; one without
            images.append({"id": image_id, "file_name": f"{image_id}.jpg", "location": f"l{k}", "datetime": when})
            annotations.append({"id": f"a_{image_id}", "image_id": image_id, "category_id": 1 + (k + day) % 2, "bbox": [0, 0, 5, 5]})
            (tmp_path / "crops").mkdir(exist_ok=True)
            (tmp_path / "crops" / crop_file_name(f"{image_id}.jpg", f"a_{image_id}")).write_bytes(b"")
    cct = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "fox"}, {"id": 2, "name": "owl"}]}
    (tmp_path / "cct.json").write_text(json.dumps(cct))
    for rule, rows in (("drop", 23), ("train", 24)):
        out = tmp_path / rule
        result = run_in_process("utils/create_classification_dataset.py", out, "--mode", "csv", "splits", "--crops-dir",
                                tmp_path / "crops", "--cct-json", tmp_path / "cct.json", "--split-by", "time",
                                "--test-last", "2D", "--val-last", "1D", "--missing-datetimes", rule)
        assert result.returncode == 0, result.stderr
        assert "1 crops have no datetime" in result.stderr
        table = pd.read_csv(out / "classification_ds.csv", dtype=str)
        assert len(table) == rows and set(table["location"].str.split("@").str[1]) == {"train", "val", "test"}
        report = json.loads((out / "split_report.json").read_text())
        assert report["time"]["datetimes"]["without_datetime"] == 1
        assert "1 crop(s) without a datetime: " + ("left out" if rule == "drop" else "kept in train") in report["warnings"]
        splits = json.loads((out / "splits.json").read_text())
        assert ["cct", "l1@test"] in splits["test"] and ["cct", "l1@val"] in splits["val"]
        assert report["splits"]["test"]["n_crops"] == 8  # each location's last 2 days (l0 ends on day 5)
        assert report["splits"]["train"]["n_crops"] == 11 + (rule == "train")


def test_datetimes_out_of_range_or_with_offsets_read_as_wall_clock_or_missing() -> None:
    """Camera clocks write sentinels (9999-12-31, 0000:00:00, year 1) and Camtrap DP-style offsets (DST: +01:00 then
    +02:00): each used to be an OutOfBoundsDatetime or 'Mixed timezones' traceback in --split-by time and in predict's
    sequence windows; now what cannot be held is missing (NaT, counted as without a datetime) and an offset is dropped."""
    text = pd.Series(["2012:03:01 10:00:00", "9999-12-31 23:59:59", "0001-01-01 00:00:00", "1601:01:01 00:00:00",
                      "0000:00:00 00:00:00", "", None, "2020-03-28T10:00:00+01:00", "2020-03-30T10:00:00+02:00",
                      "2020-03-30 11:00:00Z", "2020-03-30 12:00:00"])
    times = parse_datetimes(text)
    assert times.dtype == "datetime64[ns]"
    assert times.isna().tolist() == [False, True, True, True, True, True, True, False, False, False, False]
    assert [str(t) for t in times.dropna()] == ["2012-03-01 10:00:00", "2020-03-28 10:00:00", "2020-03-30 10:00:00",
                                                "2020-03-30 11:00:00", "2020-03-30 12:00:00"]


def test_split_report_warnings_quote_a_huge_class_name_cut_short() -> None:
    """A 1 MB class name (a pasted file, a broken export) was echoed whole in every warning and log line."""
    huge = "x" * 1_000_000
    counts = np.array([[3, 0], [2, 0], [4, 0]])
    problem = SplitProblem([("d", "0"), ("d", "1"), ("d", "2")], ["deer", huge], counts + np.array([[0, 1], [0, 0], [0, 0]]))
    report = build_split_report(problem, np.array([0, 1, 2]), FRACTIONS, dropped_labels={huge + "y": 1})
    assert report["warnings"] and all(len(warning) < 300 for warning in report["warnings"]), report["warnings"]
    assert any("(1000002 characters) is absent from" in warning for warning in report["warnings"])


def day_first_cct(tmp_path: Path) -> tuple[Path, Path]:
    """One location, one image a day 01/05/2012..18/05/2012 written dd/mm/YYYY (a European camera's export)."""
    images, annotations = [], []
    (tmp_path / "crops").mkdir(exist_ok=True)
    for day in range(1, 19):
        image_id = f"d{day}"
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "location": "l1",
                       "datetime": f"{day:02d}/05/2012 10:00:00"})
        annotations.append({"id": f"a_{image_id}", "image_id": image_id, "category_id": 1 + day % 2, "bbox": [0, 0, 5, 5]})
        (tmp_path / "crops" / crop_file_name(f"{image_id}.jpg", f"a_{image_id}")).write_bytes(b"")
    cct = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "fox"}, {"id": 2, "name": "owl"}]}
    (tmp_path / "cct.json").write_text(json.dumps(cct))
    return tmp_path / "cct.json", tmp_path / "crops"


def test_day_first_datetimes_are_refused_or_read_by_the_declared_format(tmp_path: Path) -> None:
    """01/05..18/05 were read month-first where they could be (January..December) and day-first where not: one
    fortnight spread over a year, and split_report.json said the splits never overlapped."""
    cct, crops = day_first_cct(tmp_path)
    args = ("--mode", "csv", "splits", "--crops-dir", crops, "--cct-json", cct, "--split-by", "time", "--test-last", "3D")
    result = run_in_process("utils/create_classification_dataset.py", tmp_path / "guess", *args)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and str(cct) in last and "'01/05/2012 10:00:00'" in last, last
    assert "--datetime-format" in last
    result = run_in_process("utils/create_classification_dataset.py", tmp_path / "ok", *args,
                            "--datetime-format", "%d/%m/%Y %H:%M:%S")
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "ok" / "classification_ds.csv", dtype=str)
    test_files = sorted(table.loc[table["location"] == "l1@test", "path"]) if "path" in table else []
    assert len(test_files) == 3 and all(f"d{day}" in name for day, name in zip((16, 17, 18), test_files)), table
    result = run_in_process("utils/create_classification_dataset.py", tmp_path / "bad", *args, "--datetime-format", "%m")
    assert result.returncode != 0 and "--datetime-format: expected strptime" in result.stderr.strip().splitlines()[-1]


def test_datetimes_are_read_by_one_rule_never_guessed_per_value() -> None:
    """ISO and EXIF only by default; a declared format for everything else; 13/05 cannot turn a day into a month."""
    text = pd.Series(["01/05/2012 10:00", "13/05/2012 10:00", "2012-05-01 10:00:00", ""])
    assert parse_datetimes(text).notna().tolist() == [False, False, True, False]
    day_first = parse_datetimes(text, "%d/%m/%Y %H:%M")
    assert [str(t) for t in day_first[:2]] == ["2012-05-01 10:00:00", "2012-05-13 10:00:00"]
    with pytest.raises(DataError, match=r"^x.json: datetime '01/05/2012 10:00' is not ISO 8601"):
        read_datetimes(text, None, "x.json")
    sentinels = pd.Series(["9999-12-31 23:59:59", "0000:00:00 00:00:00", "2012:05:01 10:00:00"])
    assert read_datetimes(sentinels, None, "x.json").notna().tolist() == [False, False, True]  # missing, not refused
