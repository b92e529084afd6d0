"""Check a COCO Camera Traps JSON file and list every problem with its JSON path.

    python utils/validate_cct.py data/raw/my_cct.json

Exit code 0: usable (warnings may be printed); 2: errors found.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from classification.cli import ArgumentParser, bounded_int, run_main
from classification.data.cct import errors_only, validate_cct
from classification.io import read_json


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cct_json", help="CCT JSON file to check")
    parser.add_argument("--max-problems", type=bounded_int(0), default=50, help="print at most this many problems")
    args = parser.parse_args(argv)
    problems = validate_cct(read_json(args.cct_json))
    for problem in problems[: args.max_problems]:
        print(f"{args.cct_json}: {problem.severity}: {problem}")
    if len(problems) > args.max_problems:
        print(f"... and {len(problems) - args.max_problems} more")
    errors = errors_only(problems)
    print(f"{args.cct_json}: {len(errors)} errors, {len(problems) - len(errors)} warnings")
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
