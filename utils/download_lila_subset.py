"""Select public camera-trap images on LILA by taxon and place, write them as a CCT subset with their
MegaDetector boxes, and download them.

    python utils/download_lila_subset.py --taxon "Rattus rattus" --taxon rattus --taxon "black rat" \
        --output-dir data/raw/lila_rats [--label-rank species] [--dataset NAME] [--country NAME] \
        [--include-empty 500] [--max-per-class 2000] [--max-per-location 200] [--cloud gcp] [--dry-run]

Writes ``<output-dir>/lila_subset_cct.json``, ``<output-dir>/lila_subset_megadetector.json`` and the
images under ``<output-dir>/images/``; then ``crop_detections.py lila_subset_megadetector.json ...
--images-dir <output-dir>/images --labels-cct lila_subset_cct.json`` crops them. The index files are
fetched once (``--metadata-dir``) and the all-images table converted once to Parquet. Exit code 0 when
every image is present, 1 when some downloads failed (listed in ``images/download_failures.csv``), 2 for
bad input (an unknown taxon, dataset or rank names the nearest ones).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import MAX_SEED, MAX_WORKERS, ArgumentParser, add_lila_arguments, bounded_int, lila_source, run_main
from classification.data.lila.index import MD_RESULTS_COLUMNS, RANKS
from classification.data.lila.run import SubsetRequest, make_subset
from classification.data.lila.select import ANNOTATION_LEVELS, SelectionOptions


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description="Select, write and download a subset of LILA's camera-trap images.")
    parser.add_argument("--output-dir", required=True, type=Path, help="where the subset's CCT file and its images/ go")
    pick = parser.add_argument_group("what to select (each flag repeatable; none given: no restriction)")
    pick.add_argument("--taxon", action="append", default=[],
                      help='a common or scientific name at any rank ("Rattus rattus", rattus, "black rat"), or RANK=NAME (family=muridae)')
    pick.add_argument("--dataset", action="append", default=[], help="a LILA dataset, by name or short name")
    pick.add_argument("--location", action="append", default=[], help="a location: <short_name>/<location> or LILA's location_id")
    pick.add_argument("--country", action="append", default=[], help="datasets in this country (the datasets index)")
    pick.add_argument("--continent", action="append", default=[], help="datasets on this continent")
    pick.add_argument("--region", action="append", default=[], help="datasets in this region")
    pick.add_argument("--annotation-level", action="append", default=[], choices=ANNOTATION_LEVELS, help="image or sequence labels")
    pick.add_argument("--include-empty", type=bounded_int(0), default=0, help="also this many blank images from the same datasets and places")
    pick.add_argument("--max-per-dataset", type=bounded_int(), help="at most this many images per dataset")
    pick.add_argument("--max-per-location", type=bounded_int(), help="at most this many images per location")
    pick.add_argument("--max-per-class", type=bounded_int(), help="at most this many images per class")
    pick.add_argument("--label-rank", default="species", choices=[*RANKS, "original"],
                      help="the level every label is mapped to, so names from different datasets merge (original: LILA's own label)")
    pick.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=0, help="which images the caps keep")
    boxes = parser.add_argument_group("boxes")
    boxes.add_argument("--md-results", nargs="+", default=list(MD_RESULTS_COLUMNS), choices=MD_RESULTS_COLUMNS,
                       help="which of a dataset's published MegaDetector results to use, in order of preference")
    boxes.add_argument("--no-boxes", action="store_true", help="write no MegaDetector file")
    add_lila_arguments(parser)
    fetch = parser.add_argument_group("download")
    fetch.add_argument("--no-download", action="store_true", help="write the subset files only")
    fetch.add_argument("--dry-run", action="store_true", help="write the subset files and say how many files and bytes would be fetched")
    fetch.add_argument("--threads", type=bounded_int(1, MAX_WORKERS), default=8, help="parallel downloads")
    fetch.add_argument("--overwrite", action="store_true", help="download again even when a file is complete")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    selection = SelectionOptions(
        taxa=tuple(args.taxon), datasets=tuple(args.dataset), locations=tuple(args.location), countries=tuple(args.country),
        continents=tuple(args.continent), regions=tuple(args.region), annotation_levels=tuple(args.annotation_level),
        include_empty=args.include_empty, max_per_dataset=args.max_per_dataset, max_per_location=args.max_per_location,
        max_per_class=args.max_per_class, label_rank=args.label_rank, seed=args.seed)
    request = SubsetRequest(output_dir=args.output_dir, selection=selection, source=lila_source(args), md_results=tuple(args.md_results),
                            boxes=not args.no_boxes, download=not args.no_download, dry_run=args.dry_run, threads=args.threads,
                            overwrite=args.overwrite)
    result = make_subset(request)
    print("\n".join(result.lines(request)))
    return 0 if result.download is None or result.download.ok else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
