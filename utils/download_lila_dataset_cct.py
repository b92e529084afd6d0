"""Download one LILA dataset's CCT metadata (its ``metadata_url_<cloud>``: a JSON, or a zip holding one).

    python utils/download_lila_dataset_cct.py --dataset "Idaho Camera Traps" --output-dir data/raw/lila [--cloud gcp]

Writes ``<output-dir>/<short_name>.json``, checked to be a CCT file; then validate, clean, combine
and crop it as any CCT, and fetch its images with ``download_images.py --base-url`` (the dataset's
``image_base_url_<cloud>`` from the datasets index).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import ArgumentParser, add_lila_arguments, lila_source, run_main
from classification.data.lila.run import download_dataset_cct


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description="Download one LILA dataset's COCO Camera Traps metadata.")
    parser.add_argument("--dataset", required=True, help="the dataset's name or short name in LILA's datasets index")
    parser.add_argument("--output-dir", required=True, type=Path, help="where <short_name>.json goes")
    add_lila_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path = download_dataset_cct(lila_source(args), args.dataset, args.output_dir)
    print(f"{path}: written")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
