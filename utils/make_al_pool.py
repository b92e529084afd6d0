"""Hide most of a labelled dataset's train split in an unlabelled pool, to try active learning on it.

    python utils/make_al_pool.py data/processed/mct data/processed/mct_al data/interim/mct/pool \
        --crops-dir data/interim/mct/crops --labelled-fraction 0.2 --seed 0

Writes OUT_DIR (classification_ds.csv with the labelled start, label_index.json,
splits.json, pool_answers.csv with the hidden labels) and POOL_DIR (the other train crops,
in their folders, without labels). Val and test stay as they were.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.active_learning.pool import carve_pool
from classification.cli import MAX_SEED, ArgumentParser, bounded_int, run_main


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir", type=Path, help="a dataset folder of utils/create_classification_dataset.py")
    parser.add_argument("output_dir", type=Path, help="the new dataset folder (the labelled start)")
    parser.add_argument("pool_dir", type=Path, help="where the unlabelled pool crops go")
    parser.add_argument("--crops-dir", type=Path, required=True, help="the folder the dataset's paths are relative to")
    parser.add_argument("--labelled-fraction", type=float, default=0.2, help="of each class of the train split, kept labelled")
    parser.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=0)
    args = parser.parse_args(argv)
    result = carve_pool(args.dataset_dir, args.crops_dir, args.output_dir, args.pool_dir, args.labelled_fraction, args.seed)
    print(f"{result.labelled} train crops kept labelled in {result.dataset_dir}; {result.pooled} in the pool "
          f"{result.pool_dir} (hidden labels: {result.answers})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
