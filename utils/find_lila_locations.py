"""Where target taxa live on LILA, and every other class at those locations (animl-ml's "find rat locations").

    python utils/find_lila_locations.py --taxon rattus --output data/interim/rat_locations.csv [--label-rank species]

Writes one row per (location holding a target, class seen there): ``dataset, location, label, images,
is_target, target_images, location_images``, the locations with most targets first.
``notebooks/lila_species_locations.ipynb`` draws the same table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import ArgumentParser, add_lila_arguments, lila_source, run_main
from classification.data.lila.index import RANKS
from classification.data.lila.run import find_locations
from classification.data.lila.select import SelectionOptions


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description="Find the LILA locations that hold target taxa, and what else lives there.")
    parser.add_argument("--taxon", action="append", required=True, help="a common or scientific name at any rank, or RANK=NAME")
    parser.add_argument("--output", required=True, type=Path, help="CSV to write")
    parser.add_argument("--dataset", action="append", default=[], help="only this LILA dataset (repeatable)")
    parser.add_argument("--country", action="append", default=[], help="only datasets in this country (repeatable)")
    parser.add_argument("--label-rank", default="species", choices=[*RANKS, "original"], help="the level classes are counted at")
    add_lila_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    selection = SelectionOptions(taxa=tuple(args.taxon), datasets=tuple(args.dataset), countries=tuple(args.country),
                                 label_rank=args.label_rank)
    count = find_locations(lila_source(args), selection, args.output)
    print(f"{args.output}: {count} locations hold {', '.join(args.taxon)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
