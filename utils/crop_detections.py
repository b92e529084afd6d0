"""Crop the boxes of a CCT file or of MegaDetector output into one JPEG per box.

    python utils/crop_detections.py clean_cct.json crops/ --images-dir raw/ \
        --crop-strategy pad --threads 8 --logdir logs/
    python utils/crop_detections.py md_output.json crops/ --images-dir raw/ \
        --threshold 0.2 --labels-cct labels_cct.json

With ``--dask-workers N`` (a local cluster of N processes) or ``--scheduler ADDRESS`` (an
existing Dask cluster, e.g. on Slurm: docs/scaling.md) the images are cropped as shards;
the manifest is the same as one process writes.

Crops are named ``<file_name>___crop_<annotation id>.jpg``; ``crops_manifest.csv`` in
CROPS_DIR lists them. Re-runs skip existing crops. Unusable images (missing, truncated)
are skipped and listed with the reason; the exit code is 0 unless the input or a flag
is wrong (2).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import MAX_WORKERS, ArgumentParser, add_dask_arguments, bounded_int, dask_options, run_main
from classification.data.crop_geometry import CROP_STRATEGIES
from classification.data.crop_options import DEFAULT_MAX_CROP_SIDE, CropOptions
from classification.data.crop_run import crop_detections
from classification.data.detections import DEFAULT_DETECTOR_CATEGORIES, DEFAULT_THRESHOLD


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_json", type=Path, help="CCT JSON with boxes, or MegaDetector batch output")
    parser.add_argument("crops_dir", type=Path, help="folder to write the crops (and crops_manifest.csv) into")
    parser.add_argument("--images-dir", type=Path, required=True, help="folder the file names are relative to")
    parser.add_argument("--crop-strategy", choices=CROP_STRATEGIES, default="square",
                        help="square: max(w, h) square inside the image; pad: exact box padded with black")
    parser.add_argument("--threads", type=bounded_int(1, MAX_WORKERS), default=1, help="images processed in parallel")
    parser.add_argument("--logdir", type=Path, help="write crop_detections_<UTC time>.json with counts and failures here")
    parser.add_argument("--check-crops-valid", action="store_true", help="decode existing crops and redo invalid ones")
    parser.add_argument("--images-base-url", help="fetch images missing from --images-dir from this URL")
    parser.add_argument("--save-full-images", action="store_true", help="keep images fetched from --images-base-url in --images-dir")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="MegaDetector output: crop detections with conf >= this")
    parser.add_argument("--detector-categories", nargs="+", default=list(DEFAULT_DETECTOR_CATEGORIES),
                        help="MegaDetector output: detection categories to crop")
    parser.add_argument("--labels-cct", type=Path, help="MegaDetector output: CCT with image-level labels to join")
    parser.add_argument("--max-size", type=bounded_int(), help="store crops no larger than this many pixels a side")
    parser.add_argument("--max-crop-side", type=bounded_int(), default=DEFAULT_MAX_CROP_SIDE,
                        help="skip (and list) an image with a crop larger than this many pixels a side before --max-size "
                             f"(default {DEFAULT_MAX_CROP_SIDE}: a header declaring a huge image would take gigabytes)")
    parser.add_argument("--missing-locations", choices=["sequence", "image", "drop"], default="sequence",
                        help="images without a location: one group per sequence, one per image, or drop them")
    parser.add_argument("--dataset", help="dataset name for images without one (default: the input file's stem)")
    parser.add_argument("--quality", type=bounded_int(1, 100), default=90, help="JPEG quality of the crops")
    add_dask_arguments(parser, unit="images")
    args = parser.parse_args(argv)
    options = CropOptions(
        crop_strategy=args.crop_strategy,
        threads=args.threads,
        threshold=args.threshold,
        detector_categories=tuple(args.detector_categories),
        labels_cct=args.labels_cct,
        max_size=args.max_size,
        max_crop_side=args.max_crop_side,
        missing_locations=args.missing_locations,
        dataset=args.dataset,
        quality=args.quality,
        check_crops_valid=args.check_crops_valid,
        images_base_url=args.images_base_url,
        save_full_images=args.save_full_images,
        logdir=args.logdir,
        dask=dask_options(args),
    )
    report = crop_detections(args.input_json, args.crops_dir, args.images_dir, options)
    print("\n".join(report.lines()))
    return 0  # images that could not be used are skipped and listed (summary, --logdir log); the run succeeded


if __name__ == "__main__":
    sys.exit(run_main(main))
