"""Build classification_ds.csv, label_index.json, splits.json and CCT files from crops.

    python utils/create_classification_dataset.py data/processed/mct \
        --mode csv cct splits --crops-dir data/interim/crops \
        --cct-json data/interim/clean_cct.json --min-locs 3 \
        --val-frac 0.2 --test-frac 0.1 --method random

Without ``csv`` in ``--mode`` the existing OUTPUT_DIR/classification_ds.csv is the input
(no crops folder needed): re-split with another seed, or split your own CSV
(``path,dataset,location,label``)::

    python utils/create_classification_dataset.py data/processed/mct --mode splits --seed 7

Splits keep every (dataset, location) in one split; ``random`` keeps the best of
``--candidates`` scored candidates (GUIDE section 3), then improves it locally.
``--split-by time`` holds out the later crops of every location instead (the last
``--test-frac``, ``--test-last 3M`` or ``--test-period 2011-06..2011-08``), and
``--split-by location-time`` holds out both::

    python utils/create_classification_dataset.py data/processed/mct_time \
        --mode csv cct splits --crops-dir data/interim/crops \
        --cct-json data/interim/clean_cct.json --split-by time --test-last 1M --val-last 2W
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import MAX_SEED, ArgumentParser, bounded_int, run_main
from classification.data.dataset import MODES, SPLIT_BY, DatasetOptions, create_classification_dataset
from classification.errors import UserError


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="folder for the dataset files")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES), help="which outputs to write")
    parser.add_argument("--crops-dir", type=Path,
                        help="folder of crops (utils/crop_detections.py); needed with --mode csv. Without csv,"
                             " OUTPUT_DIR/classification_ds.csv is the input, and crops are checked only if given")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--cct-json", type=Path, help="CCT the crops were made from (one crop per boxed annotation)")
    source.add_argument("--crops-manifest", type=Path, nargs="+", default=[],
                        help="crops manifest CSV (default: CROPS_DIR/crops_manifest.csv); several join crop runs made in"
                             " folders under CROPS_DIR (your Animl export's crops and a LILA subset's) into one dataset")
    parser.add_argument("--min-locs", type=bounded_int(), default=1, help="drop labels seen at fewer locations")
    parser.add_argument("--val-frac", type=float, default=0.2, help="target fraction of crops in val")
    parser.add_argument("--test-frac", type=float, default=0.1, help="target fraction of crops in test")
    parser.add_argument("--method", choices=["random", "smallest_first"], default="random", help="split search")
    parser.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=123, help="random seed: same seed, same splits")
    parser.add_argument("--candidates", type=bounded_int(), default=10_000, help="candidates scored by --method random")
    parser.add_argument("--no-improve", action="store_true", help="skip the local improvement after the search")
    parser.add_argument("--match-test", nargs=2, type=Path, metavar=("CSV", "SPLITS"),
                        help="reuse the test locations of an earlier classification_ds.csv and splits.json")
    parser.add_argument("--splits-file", type=Path, help="use this splits.json as is (validated)")
    parser.add_argument("--missing-locations", choices=["sequence", "image", "drop"], default="sequence",
                        help="with --cct-json: images without a location grouped by sequence, by image, or dropped")
    add_time_arguments(parser)
    return parser


TIME_FLAGS = ("test_last", "val_last", "test_period", "val_period", "datetime_format")


def add_time_arguments(parser: ArgumentParser) -> None:
    """The flags of splits held out in time (docs/splits.md, 'Held out in time')."""
    parser.add_argument("--split-by", choices=SPLIT_BY, default="location",
                        help="hold out whole locations (default), the later crops of every location (time), or both")
    parser.add_argument("--test-last", metavar="SPAN",
                        help="with --split-by time: the last SPAN (e.g. 3M, 90D, 2W, 1Y) of every location to test")
    parser.add_argument("--val-last", metavar="SPAN", help="with --split-by time: the SPAN before test to val")
    parser.add_argument("--test-period", metavar="START..END",
                        help="with --split-by time: a calendar period to test, e.g. 2011 or 2011-06..2011-08 (inclusive)")
    parser.add_argument("--val-period", metavar="START..END", help="with --split-by time: a calendar period to val")
    parser.add_argument("--missing-datetimes", choices=["drop", "train"], default="drop",
                        help="with --split-by time: crops without a datetime (nor a sequence with one) left out, or kept in train")
    parser.add_argument("--datetime-format", metavar="FORMAT",
                        help="with --split-by time: the strptime format of every datetime, e.g. '%%d/%%m/%%Y %%H:%%M:%%S' "
                             "(default: ISO 8601 or EXIF YYYY:MM:DD only; day/month order is never guessed)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.splits_file and args.match_test:
        raise UserError("--splits-file and --match-test: give one or the other")
    if args.candidates < 1:
        raise UserError(f"--candidates: must be at least 1, got {args.candidates}")
    given = [name for name in TIME_FLAGS if getattr(args, name)]
    if given and args.split_by == "location":
        raise UserError(f"--{given[0].replace('_', '-')} needs --split-by time or location-time")
    options = DatasetOptions(
        crops_dir=args.crops_dir,
        cct_json=args.cct_json,
        crops_manifests=tuple(args.crops_manifest),
        modes=args.mode,
        min_locs=args.min_locs,
        val_frac=args.val_frac,
        test_frac=args.test_frac,
        method=args.method,
        seed=args.seed,
        candidates=args.candidates,
        improve=not args.no_improve,
        match_test=tuple(args.match_test) if args.match_test else None,
        splits_file=args.splits_file,
        missing_locations=args.missing_locations,
        split_by=args.split_by,
        test_last=args.test_last,
        val_last=args.val_last,
        test_period=args.test_period,
        val_period=args.val_period,
        missing_datetimes=args.missing_datetimes,
        datetime_format=args.datetime_format,
    )
    report = create_classification_dataset(args.output_dir, options)
    print(f"{report.crops} crops written to {args.output_dir}"
          f" ({report.missing_crop_files} missing crop files, {report.unlabelled_crops} unlabelled,"
          f" {len(report.dropped_labels)} labels dropped by --min-locs)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
