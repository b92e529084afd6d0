"""Download the images a COCO Camera Traps file lists from a base URL.

    python utils/download_images.py --coco-file cct.json --output-dir data/raw/images \
        --base-url https://example.org/images/ [--threads 8] [--retries 3] [--timeout 30] [--overwrite]

Parallel, resumable (complete files are skipped), retried, size-checked and atomic; see
``classification.data.download`` for the exact rules. Exit code 0 when every image is
present, 1 when some failed (listed in ``<output-dir>/download_failures.csv``), 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import ArgumentParser, run_main
from classification.data.download import download_images


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description="Download the images listed in a COCO Camera Traps JSON file.")
    parser.add_argument("--coco-file", required=True, type=Path, help="CCT JSON whose images[].file_name to fetch")
    parser.add_argument("--output-dir", required=True, type=Path, help="folder to store <file_name> under")
    parser.add_argument("--base-url", required=True, help="URL that file_name is relative to")
    parser.add_argument("--threads", type=int, default=8, help="parallel downloads")
    parser.add_argument("--retries", type=int, default=3, help="retries on network errors, HTTP 5xx and 429")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server")
    parser.add_argument("--backoff-seconds", type=float, default=1.0,
                        help="backoff factor: retries wait 0, 2x, 4x, ... seconds (urllib3), or the server's Retry-After")
    parser.add_argument("--overwrite", action="store_true", help="download again even when a file is complete")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = download_images(
        args.coco_file,
        args.output_dir,
        args.base_url,
        threads=args.threads,
        retries=args.retries,
        timeout=args.timeout,
        overwrite=args.overwrite,
        backoff_seconds=args.backoff_seconds,
    )
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
