"""Answer an active-learning request from known labels, as the Timelapse export a person would make.

    python utils/answer_requests.py runs/.../active_learning/round_1/timelapse_request.csv \
        data/processed/mct_al/pool_answers.csv --output round_1_export.csv

For trying the loop unattended (the demo, the tests) on a pool made by utils/make_al_pool.py.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.active_learning.pool import answer_requests
from classification.cli import ArgumentParser, run_main


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("request_csv", type=Path, help="timelapse_request.csv of a round")
    parser.add_argument("answers_csv", type=Path, help="path,label of the pool (pool_answers.csv)")
    parser.add_argument("--output", type=Path, required=True, help="the Timelapse-style export to write")
    parser.add_argument("--label-column", default="Species")
    args = parser.parse_args(argv)
    count = answer_requests(args.request_csv, args.answers_csv, args.output, args.label_column)
    print(f"{count} answers -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
