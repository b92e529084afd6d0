"""Download the images a COCO Camera Traps file lists, each from its own URL.

    python utils/download_images.py --coco-file cct.json --output-dir data/raw/images \
        [--base-url https://example.org/images/ | --base-url s3://bucket/prefix | --cloud gcp | --url-field url] \
        [--bucket animl-images-serving-prod] [--aws-profile animl] [--threads 8] [--dry-run] [--overwrite]

Where each image comes from: ``--base-url`` + its ``file_name``; else its ``url_<cloud>`` (a LILA
subset, ``--cloud``), its ``url`` (Camtrap DP remote media, a LILA subset) or the field ``--url-field``
names; else its ``serving_bucket_key`` in ``--bucket`` (an Animl export, as it is). Parallel, resumable
(complete files are skipped), retried, size-checked, image-checked and atomic; see
``classification.data.download`` for the exact rules. Exit code 0 when every image is present, 1 when
some failed (listed in ``<output-dir>/download_failures.csv``), 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import MAX_WORKERS, ArgumentParser, add_aws_arguments, aws_options, bounded_int, run_main
from classification.data.download import Connection, download_images, plan_image_downloads
from classification.data.s3 import ANIML_SERVING_BUCKET


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description="Download the images listed in a COCO Camera Traps JSON file.")
    parser.add_argument("--coco-file", required=True, type=Path, help="CCT JSON whose images[].file_name to fetch")
    parser.add_argument("--output-dir", required=True, type=Path, help="folder to store <file_name> under")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--base-url", help="URL that file_name is relative to: http(s)://... or s3://bucket/prefix")
    where.add_argument("--cloud", choices=["gcp", "aws", "azure"], help="take each image's url_<cloud> (a LILA subset)")
    where.add_argument("--url-field", help="take each image's URL from this field (default: url, else serving_bucket_key)")
    parser.add_argument("--bucket", default=ANIML_SERVING_BUCKET,
                        help="bucket (or s3://bucket/prefix) that images' serving_bucket_key names a key in (Animl exports)")
    add_aws_arguments(parser)
    parser.add_argument("--threads", type=bounded_int(1, MAX_WORKERS), default=8, help="parallel downloads")
    parser.add_argument("--retries", type=bounded_int(0, 100), default=3, help="retries on network errors, HTTP 5xx and 429")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server")
    parser.add_argument("--backoff-seconds", type=float, default=1.0,
                        help="backoff factor: retries wait 0, 2x, 4x, ... seconds (urllib3), or the server's Retry-After")
    parser.add_argument("--overwrite", action="store_true", help="download again even when a file is complete")
    parser.add_argument("--dry-run", action="store_true", help="say how many files and bytes would be fetched; write nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    url_field = f"url_{args.cloud}" if args.cloud else args.url_field
    if args.dry_run:
        connection = Connection(args.retries, args.timeout, args.backoff_seconds, aws_options(args))
        plan = plan_image_downloads(args.coco_file, args.output_dir, args.base_url, args.threads, url_field, args.bucket, connection)
        print(plan.summary())
        return 0
    report = download_images(
        args.coco_file,
        args.output_dir,
        args.base_url,
        threads=args.threads,
        retries=args.retries,
        timeout=args.timeout,
        overwrite=args.overwrite,
        backoff_seconds=args.backoff_seconds,
        url_field=url_field,
        bucket=args.bucket,
        aws=aws_options(args),
    )
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
