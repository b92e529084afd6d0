"""Generate the bundled demo dataset: synthetic camera-trap images and a CCT file.

    python utils/make_demo_data.py data/raw/demo
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import MAX_SEED, ArgumentParser, bounded_int, run_main
from classification.demo import make_demo_dataset


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="folder for images/ and demo_cct.json")
    parser.add_argument("--locations", type=bounded_int(1, 10_000), default=8, help="number of camera locations")
    parser.add_argument("--sequences", type=bounded_int(1, 10_000), default=6, help="sequences per location")
    parser.add_argument("--frames", type=bounded_int(1, 10_000), default=3, help="frames per sequence")
    parser.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=0, help="random seed")
    args = parser.parse_args(argv)
    cct_path = make_demo_dataset(args.output_dir, args.locations, args.sequences, args.frames, args.seed)
    print(f"wrote {cct_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
