"""Clean one CCT file: normalise locations, apply a category map, drop unusable boxes.

    python utils/clean_cct.py data/raw/mct_cct.json data/interim/clean_cct.json \
        --category-map data/interim/category_map.json --missing-locations sequence
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import ArgumentParser, run_main
from classification.data.clean import CleanOptions, clean_cct


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cct_json", type=Path, help="CCT JSON file to clean")
    parser.add_argument("output", type=Path, help="clean CCT JSON to write")
    parser.add_argument("--category-map", type=Path, help="edited category_map.json to apply")
    parser.add_argument("--keep-image-level", action="store_true", help="keep annotations without a box")
    parser.add_argument(
        "--max-box-fraction", type=float, default=0.95,
        help="drop boxes covering at least this fraction of both width and height (1.01 keeps all)",
    )
    parser.add_argument(
        "--missing-locations", choices=["sequence", "image", "drop"], default="sequence",
        help="images without a location: one group per sequence, one per image, or drop them",
    )
    parser.add_argument("--drop-missing-locations", action="store_true", help="same as --missing-locations drop")
    parser.add_argument("--dataset", help="dataset name for images without one (default: the file's stem)")
    parser.add_argument("--images-dir", type=Path, help="folder the file_names are relative to")
    parser.add_argument("--read-sizes", action="store_true", help="read missing width/height from the images")
    args = parser.parse_args(argv)
    options = CleanOptions(
        category_map=args.category_map,
        keep_image_level=args.keep_image_level,
        max_box_fraction=args.max_box_fraction,
        missing_locations="drop" if args.drop_missing_locations else args.missing_locations,
        dataset=args.dataset,
        images_dir=args.images_dir,
        read_sizes=args.read_sizes,
    )
    report = clean_cct(args.cct_json, args.output, options)
    print("\n".join(report.lines()))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
