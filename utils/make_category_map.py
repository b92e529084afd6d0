"""Write category_map.json (id, name, count, keep, convert_to) for a person to edit.

    python utils/make_category_map.py data/raw/a_cct.json data/raw/b_cct.json \
        --output data/interim/category_map.json

Edit the file (set ``keep: false`` to drop a category, ``convert_to: "deer"`` to merge
it into another name), then pass it to ``utils/clean_cct.py --category-map``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import ArgumentParser, run_main
from classification.data.cct import load_cct
from classification.data.clean import build_category_map, write_category_map
from classification.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cct_json", nargs="+", help="one or more CCT JSON files")
    parser.add_argument("--output", required=True, type=Path, help="category_map.json to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing (maybe edited) map")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.overwrite:
        raise UserError(f"{args.output}: exists and may hold your edits; pass --overwrite to replace it")
    rows = build_category_map([load_cct(path) for path in args.cct_json])
    write_category_map(args.output, rows)
    print(f"wrote {len(rows)} categories to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
