"""Split search speed: the vectorised search against a per-candidate pandas loop (the references' way).

Prints candidates per second for both, side by side, on a synthetic LILA-sized problem
(~1,000 locations, ~100 classes, skewed counts) and on ../shared/data/mct. The loop is
timed on fewer candidates and its rate extrapolated. Both score the same candidates and
must agree (checked), so the figures compare equal work.

    python benchmarks/bench_split_search.py [--candidates 10000] [--reference-candidates 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from classification.data.split_search import JITTER, improve_locally, random_search, score_assignments
from classification.data.splits import SplitProblem, target_fractions

REPO_ROOT = Path(__file__).resolve().parents[1]


def synthetic_frame(n_locations: int, n_labels: int, seed: int) -> pd.DataFrame:
    """One row per crop: Zipf-like label sizes, lognormal location sizes, few labels per location."""
    rng = np.random.default_rng(seed)
    label_weight = 1.0 / np.arange(1, n_labels + 1) ** 1.1
    location_size = np.maximum(1, rng.lognormal(4.0, 1.2, size=n_locations).astype(int))
    rows_location, rows_label = [], []
    for k in range(n_locations):
        present = rng.choice(n_labels, size=rng.integers(1, 12), replace=False, p=label_weight / label_weight.sum())
        share = rng.dirichlet(np.full(present.size, 0.7))
        labels = rng.choice(present, size=location_size[k], p=share)
        rows_location += [f"{k:04d}"] * labels.size
        rows_label += labels.tolist()
    frame = pd.DataFrame({"dataset": "synthetic", "location": rows_location, "label": [f"species_{y:03d}" for y in rows_label]})
    return frame


def mct_frame(data_dir: Path) -> pd.DataFrame | None:
    """One row per box of the MCT CCT (a sequence without a location is its own group), or None."""
    path = data_dir / "mct" / "mct_cct.json"
    if not path.is_file():
        return None
    cct = json.loads(path.read_text())
    images = {image["id"]: image for image in cct["images"]}
    names = {category["id"]: category["name"] for category in cct["categories"]}
    rows = []
    for annotation in cct["annotations"]:
        image = images[annotation["image_id"]]
        location = image.get("location") or f"seq_{image['seq_id']}"
        rows.append(("mct", location, names[annotation["category_id"]]))
    return pd.DataFrame(rows, columns=["dataset", "location", "label"])


def reference_candidates(problem: SplitProblem, fractions: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Candidates drawn one at a time the references' way: shuffle, cut at int(M·(f + U))."""
    rng = np.random.default_rng(seed)
    m = problem.n_locations
    out = np.empty((n, m), dtype=np.int8)
    for i in range(n):
        order = rng.permutation(m)
        n_train = min(m, max(0, int(m * (fractions[0] + rng.uniform(-JITTER, JITTER)))))
        n_val = min(m - n_train, max(0, int(m * (fractions[1] + rng.uniform(-JITTER, JITTER)))))
        out[i, order[:n_train]] = 0
        out[i, order[n_train : n_train + n_val]] = 1
        out[i, order[n_train + n_val :]] = 2
    return out


def reference_scores(frame: pd.DataFrame, problem: SplitProblem, candidates: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """GUIDE §3's score per candidate with pandas isin/groupby over the crop table, as the references do."""
    frame = frame.assign(key=frame["dataset"] + "/" + frame["location"])
    keys = np.array([f"{d}/{loc}" for d, loc in problem.locations], dtype=object)
    crops_per_label = frame.groupby("label").size().reindex(problem.labels)
    locations_per_label = frame.groupby("label")["key"].nunique().reindex(problem.labels)
    prior = crops_per_label / crops_per_label.sum()
    empty_penalty = 1 + (prior**2).sum() - 2 * prior.min()
    scores = []
    for candidate in candidates:
        score = 0.0
        for split, f in enumerate(fractions):
            part = frame[frame["key"].isin(keys[candidate == split])]
            crops = part.groupby("label").size().reindex(problem.labels, fill_value=0)
            present = part.groupby("label")["key"].nunique().reindex(problem.labels, fill_value=0)
            score += 2 * ((crops / crops_per_label - f) ** 2).sum() + ((present / locations_per_label - f) ** 2).sum()
            if split > 0 and f > 0:
                total = crops.sum()
                score += 2 * (((crops / total - prior) ** 2).sum() if total else empty_penalty)
        scores.append(score)
    return np.array(scores)


def best_time(function, repeats: int = 3) -> float:
    """Fastest of a few runs, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def bench(name: str, frame: pd.DataFrame, n_candidates: int, n_reference: int, fractions: np.ndarray) -> None:
    """Time both implementations on one problem, check they agree, print one block of figures."""
    problem = SplitProblem.from_frame(frame)
    print(f"\n== {name}: {problem.n_locations} locations, {problem.n_labels} classes, {len(frame)} crops")
    search_s = best_time(lambda: random_search(problem, fractions, n_candidates=n_candidates, seed=0))
    candidates = reference_candidates(problem, fractions, n_candidates, seed=1)
    score_s = best_time(lambda: score_assignments(problem, candidates, fractions))

    start = time.perf_counter()
    subset = reference_candidates(problem, fractions, n_reference, seed=1)
    slow = reference_scores(frame, problem, subset, fractions)
    reference_s = time.perf_counter() - start
    fast = score_assignments(problem, subset, fractions)
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)  # same candidates, same scores
    assert int(np.argmin(fast)) == int(np.argmin(slow))

    search_rate, score_rate, reference_rate = n_candidates / search_s, n_candidates / score_s, n_reference / reference_s
    print(f"{'implementation':<42}{'candidates':>11}{'seconds':>10}{'cand/s':>12}{'speed-up':>10}")
    print(f"{'pandas loop per candidate (references)':<42}{n_reference:>11}{reference_s:>10.3f}{reference_rate:>12,.0f}{1:>9.0f}x")
    print(f"{'vectorised score_assignments':<42}{n_candidates:>11}{score_s:>10.3f}{score_rate:>12,.0f}{score_rate / reference_rate:>9,.0f}x")
    speedup = search_rate / reference_rate
    print(f"{'vectorised random_search (draw + score)':<42}{n_candidates:>11}{search_s:>10.3f}{search_rate:>12,.0f}{speedup:>9,.0f}x")
    print(f"extrapolated: {n_candidates} candidates take {n_candidates / reference_rate:,.1f} s in the loop, {search_s:.3f} s vectorised")
    print(f"scores agree on {n_reference} shared candidates (max |diff| {np.abs(fast - slow).max():.1e})")

    result = random_search(problem, fractions, n_candidates=n_candidates, seed=0)
    start = time.perf_counter()
    improved = improve_locally(problem, result, fractions)
    print(
        f"local improvement: score {result.score:.4f} -> {improved.score:.4f} "
        f"({improved.improved_moves} moves/swaps, {time.perf_counter() - start:.2f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on the synthetic problem and on MCT when it is present."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--candidates", type=int, default=10_000, help="candidates for the vectorised search")
    parser.add_argument("--reference-candidates", type=int, default=200, help="candidates for the slow pandas loop")
    parser.add_argument("--locations", type=int, default=1000, help="locations in the synthetic problem")
    parser.add_argument("--classes", type=int, default=100, help="classes in the synthetic problem")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    args = parser.parse_args(argv)
    fractions = target_fractions(0.2, 0.1)
    bench("synthetic LILA-sized", synthetic_frame(args.locations, args.classes, seed=0), args.candidates, args.reference_candidates, fractions)
    frame = mct_frame(args.data_dir)
    if frame is None:
        print(f"\n== mct: skipped, {args.data_dir / 'mct' / 'mct_cct.json'} not found")
    else:
        bench("mct", frame, args.candidates, args.reference_candidates, fractions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
