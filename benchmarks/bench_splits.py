"""Split search at LILA scale (issue 10 §2): the random search and the local improvement on synthetic sets.

A synthetic set has N locations, 300 classes, 100 crops per location on average (1,000,000
crops for 10,000 locations) and 5 species per location (Zipf-weighted). For each size it
prints the seconds of counting the crop table (``SplitProblem.from_frame``), of the random
search (10,000 candidates) and of the local improvement (on by default in
``create_classification_dataset.py``), wall-clock and CPU, and the score of the random
search's best candidate against the final one.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bench_splits.py [--locations 1000 10000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pandas as pd

from classification.data.split_search import improve_locally, random_search
from classification.data.splits import SplitProblem, target_fractions

T = TypeVar("T")


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


def crop_table(problem: SplitProblem) -> pd.DataFrame:
    """One row per crop (dataset, location, label): what ``create_classification_dataset`` counts."""
    rows, labels = np.nonzero(problem.counts)
    repeats = problem.counts[rows, labels]
    locations = np.array([location for _, location in problem.locations], dtype=object)
    names = np.array(problem.labels, dtype=object)
    return pd.DataFrame({"dataset": "synthetic", "location": locations[np.repeat(rows, repeats)],
                         "label": names[np.repeat(labels, repeats)]})


def timed(function: Callable[[], T]) -> tuple[T, float, float]:
    """``function()``, its wall-clock and its CPU seconds (this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bench(n_locations: int, n_candidates: int, seed: int) -> None:
    """Count, search and improve on one synthetic set; print one row (wall-clock / CPU seconds)."""
    source = synthetic_problem(n_locations, seed=seed)
    table = crop_table(source)
    fractions = target_fractions(0.2, 0.1)
    problem, *count_s = timed(lambda: SplitProblem.from_frame(table))
    searched, *search_s = timed(lambda: random_search(problem, fractions, n_candidates=n_candidates, seed=seed))
    improved, *improve_s = timed(lambda: improve_locally(problem, searched, fractions))
    total = [sum(t) for t in zip(count_s, search_s, improve_s)]
    cells = "".join(f"{wall:>8.2f}/{cpu:<5.2f}" for wall, cpu in (count_s, search_s, improve_s, total))
    print(f"{problem.n_locations:>9}{problem.n_labels:>8}{len(table):>10}{cells}"
          f"{searched.score:>10.4f}{improved.score:>10.4f}{improved.improved_moves:>7}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark for each requested number of locations."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--locations", type=int, nargs="+", default=[1000, 10_000], help="synthetic set sizes")
    parser.add_argument("--candidates", type=int, default=10_000, help="random-search candidates")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print("seconds as wall-clock/CPU of this process (the CPU figure is what an idle machine's wall-clock would be)")
    print(f"{'locations':>9}{'classes':>8}{'crops':>10}{'count':>14}{'search':>14}{'local':>14}{'total':>14}"
          f"{'random':>10}{'final':>10}{'moves':>7}")
    for n_locations in args.locations:
        bench(n_locations, args.candidates, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
