"""Split search at LILA scale (issue 10 §2): the random search and the local improvement on synthetic sets.

A synthetic set has N locations, 300 classes, 100 crops per location on average (1,000,000
crops for 10,000 locations) and 5 species per location (Zipf-weighted). For each size it
prints the seconds of the random search (10,000 candidates) and of the local improvement
(on by default in ``create_classification_dataset.py``), and the score of the random
search's best candidate against the final one.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bench_splits.py [--locations 1000 10000]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from classification.data.splits import SplitProblem, improve_locally, random_search, target_fractions


def synthetic_problem(n_locations: int, n_classes: int = 300, crops_per_location: int = 100,
                      species_per_location: int = 5, seed: int = 0) -> SplitProblem:
    """Counts (location, class): Zipf-weighted species, lognormal location sizes, Dirichlet shares.

    Classes that no location drew are left out (a split problem has no empty class).
    """
    rng = np.random.default_rng(seed)
    weight = 1.0 / np.arange(1, n_classes + 1) ** 1.1
    sizes = rng.lognormal(0.0, 1.2, size=n_locations)
    sizes = np.maximum(1, np.round(sizes / sizes.sum() * n_locations * crops_per_location)).astype(np.int64)
    counts = np.zeros((n_locations, n_classes), dtype=np.int64)
    for k in range(n_locations):
        species = rng.choice(n_classes, size=species_per_location, replace=False, p=weight / weight.sum())
        counts[k, species] = rng.multinomial(sizes[k], rng.dirichlet(np.full(species_per_location, 0.7)))
    used = counts.sum(axis=0) > 0
    locations = [("synthetic", f"loc{k:05d}") for k in range(n_locations)]
    labels = [f"species_{y:03d}" for y in np.flatnonzero(used)]
    return SplitProblem(locations, labels, counts[:, used])


def bench(n_locations: int, n_candidates: int, seed: int) -> None:
    """Time the search and the improvement on one synthetic set; print one row."""
    problem = synthetic_problem(n_locations, seed=seed)
    fractions = target_fractions(0.2, 0.1)
    start = time.perf_counter()
    searched = random_search(problem, fractions, n_candidates=n_candidates, seed=seed)
    search_s = time.perf_counter() - start
    start = time.perf_counter()
    improved = improve_locally(problem, searched, fractions)
    improve_s = time.perf_counter() - start
    print(f"{problem.n_locations:>9}{problem.n_labels:>8}{int(problem.counts.sum()):>10}{search_s:>9.2f}{improve_s:>9.2f}"
          f"{search_s + improve_s:>8.2f}{searched.score:>10.4f}{improved.score:>10.4f}{improved.improved_moves:>7}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark for each requested number of locations."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--locations", type=int, nargs="+", default=[1000, 10_000], help="synthetic set sizes")
    parser.add_argument("--candidates", type=int, default=10_000, help="random-search candidates")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"{'locations':>9}{'classes':>8}{'crops':>10}{'search s':>9}{'local s':>9}{'total s':>8}"
          f"{'random':>10}{'final':>10}{'moves':>7}")
    for n_locations in args.locations:
        bench(n_locations, args.candidates, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
