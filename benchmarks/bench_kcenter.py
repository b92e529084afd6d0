"""k-center greedy speed: the library's lazy k-center against a plain one (one full distance update per step).

Prints seconds side by side, and the speed-up, on two synthetic pools of float32 embeddings:
"clustered" (a mixture of Gaussians of skewed sizes, like a camera-trap pool of species × sites)
and "isotropic" (one Gaussian blob, where every distance is about the same). The plain algorithm
runs twice: in float32 (the fair speed comparison; near-ties below float32 rounding can make it
pick differently, so only its agreement is printed) and in float64, whose picks the library must
equal exactly (checked).

    python benchmarks/bench_kcenter.py [--n 100000] [--dim 512] [--budget 1000] [--labelled 1000]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from classification.active_learning.strategies import SelectionInputs, select_k_center


def clustered_pool(n: int, dim: int, seed: int) -> np.ndarray:
    """A mixture of 100 Gaussians with lognormal sizes; within-cluster spread about half the between-cluster one."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.0, size=100)
    labels = rng.choice(100, size=n, p=weights / weights.sum())
    centres = rng.standard_normal((100, dim), dtype=np.float32)
    return centres[labels] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)


def isotropic_pool(n: int, dim: int, seed: int) -> np.ndarray:
    """Standard normal rows: all pairwise distances close to sqrt(2·dim)."""
    return np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)


def reference_k_center(x: np.ndarray, labelled: np.ndarray, budget: int, dtype: type, chunk: int = 2048) -> np.ndarray:
    """Textbook k-center greedy in ``dtype``: min distances to the labelled set, then one full update per pick."""
    pool = np.flatnonzero(~labelled)
    xp: np.ndarray = x[pool].astype(dtype)
    sq = np.einsum("ij,ij->i", xp, xp)
    centres = x[labelled].astype(dtype)
    centre_sq = np.einsum("ij,ij->i", centres, centres)
    nearest: np.ndarray = np.full(pool.size, np.inf, dtype=dtype)
    for start in range(0, pool.size, chunk):
        rows = slice(start, start + chunk)
        for c in range(0, centres.shape[0], chunk):
            d2 = sq[rows, None] - 2.0 * (xp[rows] @ centres[c : c + chunk].T) + centre_sq[None, c : c + chunk]
            nearest[rows] = np.minimum(nearest[rows], d2.min(axis=1))
    picks = []
    for _ in range(min(budget, pool.size)):
        i = int(np.argmax(nearest))
        picks.append(i)
        c = xp[i]
        np.minimum(nearest, sq - 2.0 * (xp @ c) + c @ c, out=nearest)
        nearest[i] = -np.inf
    return pool[picks]


def timed(function):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def agreement(a: np.ndarray, b: np.ndarray) -> str:
    """'identical' or where two pick sequences first differ."""
    if np.array_equal(a, b):
        return "identical"
    return f"first differs at pick {int(np.argmax(a != b))}, {np.intersect1d(a, b).size} of {a.size} items shared"


def bench(name: str, x: np.ndarray, n_labelled: int, budget: int) -> None:
    """Time both implementations on one pool, check the picks agree, print one block of figures."""
    labelled = np.zeros(x.shape[0], dtype=bool)
    labelled[np.random.default_rng(1).choice(x.shape[0], size=n_labelled, replace=False)] = True
    inputs = SelectionInputs(labelled=labelled, embeddings=x)
    print(f"\n== {name}: {x.shape[0]:,} × {x.shape[1]} float32, {n_labelled:,} labelled, budget {budget:,}")

    selection, library_s = timed(lambda: select_k_center(inputs, budget, seed=0))
    plain32, plain32_s = timed(lambda: reference_k_center(x, labelled, budget, np.float32))
    plain64, plain64_s = timed(lambda: reference_k_center(x, labelled, budget, np.float64))

    print(f"{'implementation':<42}{'seconds':>9}{'picks/s':>9}{'library speed-up':>18}  picks vs library")
    for label, seconds, picks in (
        ("plain float32: full update per pick", plain32_s, plain32),
        ("plain float64: full update per pick", plain64_s, plain64),
    ):
        same = agreement(picks, selection.indices)
        print(f"{label:<42}{seconds:>9.2f}{budget / seconds:>9,.0f}{seconds / library_s:>17.1f}x  {same}")
    print(f"{'library select_k_center (lazy, exact)':<42}{library_s:>9.2f}{budget / library_s:>9,.0f}{'':>18}")
    radius = [pick.distance for pick in selection.picks]
    print(f"covering radius {radius[0]:.3f} -> {radius[-1]:.3f}")
    assert np.array_equal(selection.indices, plain64), "library k-center differs from the exact (float64) plain one"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on the clustered and the isotropic pool."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--n", type=int, default=100_000, help="pool size")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--budget", type=int, default=1000, help="items to select")
    parser.add_argument("--labelled", type=int, default=1000, help="items already labelled")
    parser.add_argument("--pools", nargs="+", choices=["clustered", "isotropic"], default=["clustered", "isotropic"])
    args = parser.parse_args(argv)
    pools = {"clustered": clustered_pool, "isotropic": isotropic_pool}
    for name in args.pools:
        bench(name, pools[name](args.n, args.dim, seed=0), args.labelled, args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
