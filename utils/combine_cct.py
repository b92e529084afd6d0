"""Combine several CCT files into one; ids become <dataset>/<id>, categories merge by name.

    python utils/combine_cct.py data/interim/combined_cct.json \
        data/interim/a_clean.json data/interim/b_clean.json --names a b
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import ArgumentParser, run_main
from classification.data.cct import load_cct
from classification.data.clean import combine_datasets
from classification.errors import UserError
from classification.io import write_json_atomic


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="combined CCT JSON to write")
    parser.add_argument("cct_json", nargs="+", type=Path, help="CCT files to combine")
    parser.add_argument("--names", nargs="+", help="one dataset name per file (default: each file's stem)")
    parser.add_argument(
        "--prefix-file-names", action="store_true",
        help="make file names <dataset>/<file_name> (images root holds one folder per dataset)",
    )
    args = parser.parse_args(argv)
    names = args.names or [path.stem for path in args.cct_json]
    if len(names) != len(args.cct_json):
        raise UserError(f"--names: got {len(names)} names for {len(args.cct_json)} files")
    combined = combine_datasets([(name, load_cct(path)) for name, path in zip(names, args.cct_json)], args.prefix_file_names)
    write_json_atomic(args.output, combined)
    print(f"wrote {args.output}: {len(combined['images'])} images, {len(combined['annotations'])} annotations, "
          f"{len(combined['categories'])} categories from {len(names)} datasets")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
